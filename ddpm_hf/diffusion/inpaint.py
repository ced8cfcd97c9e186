"""RePaint (Lugmayr et al. 2022) with diffusers' RePaintScheduler (the sample_ddpm.py --inpaint
run: ddpm_hf/commands/inpaint.py).

The trained, unconditional UNet fills the masked region of test images: at every reverse step
the known region is replaced by the original noised to that step, and every `jump_length` steps
the sample is renoised back `jump_length` steps and denoised again, `jump_n_sample` times in all,
so the filled region can harmonise with the known one. The paper's defaults are j = r = 10 with
250 steps; here the steps are --sample_timesteps (capped at T) and eta is --ddpm (1 = DDPM, the
paper's). Model calls per image: about steps x r (undo steps cost no model call).

Masks are 1 where the image is kept and 0 where it is inpainted (RePaint's "gt_keep" masks, and
RePaintScheduler's convention); a --mask PNG is read the same way: white keeps, black inpaints.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ..data.images import to_uint8
from ..util.errors import DDPMError
from .prediction import to_epsilon

GRID_COLUMNS = 16


def make_masks(kind: str, n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 1, size, size) float masks, 1 = keep, 0 = inpaint."""
    masks = torch.ones(n, 1, size, size)
    half = size // 2
    if kind == "left_half":
        masks[..., :half] = 0
    elif kind == "center":
        lo = (size - half) // 2
        masks[..., lo : lo + half, lo : lo + half] = 0
    elif kind == "random_box":  # sides in [size/4, size/2], anywhere inside the image; seeded
        gen = torch.Generator().manual_seed(seed)
        for i in range(n):
            h, w = (int(v) for v in torch.randint(size // 4, half + 1, (2,), generator=gen))
            top, left = (
                int(torch.randint(0, size - h + 1, (), generator=gen)),
                int(torch.randint(0, size - w + 1, (), generator=gen)),
            )
            masks[i, :, top : top + h, left : left + w] = 0
    else:
        masks[:] = read_mask(kind, size)
    return masks


def read_mask(path: str, size: int) -> torch.Tensor:
    """A mask PNG, grayscale, resized (nearest) to the model's size: >= 128 keeps, < 128 inpaints."""
    try:  # the header was checked with the flags (feature_checks.check_mask_file); decoding may still fail
        with Image.open(path) as img:
            gray = img.convert("L").resize((size, size), Image.NEAREST)
    except Exception as err:
        raise DDPMError(
            f"--mask {path} cannot be decoded ({type(err).__name__}: {str(err)[:80]}); save it again"
        ) from None
    return (torch.from_numpy(np.asarray(gray).copy()) >= 128).float()[None, None]


def make_repaint_scheduler(
    scheduler_config: dict, steps: int, jump_length: int, jump_n_sample: int, eta: float, device
):
    from diffusers import RePaintScheduler

    # clip_sample: x0 estimates stay in the image range, as RePaint's clip_denoised
    scheduler = RePaintScheduler.from_config(scheduler_config, clip_sample=True, eta=eta)
    scheduler.set_timesteps(steps, jump_length=jump_length, jump_n_sample=jump_n_sample, device=device)
    scheduler.eta = eta
    return scheduler


@torch.inference_mode()
def repaint(
    unet, scheduler, original: torch.Tensor, mask: torch.Tensor, kind: str, generator, progress=False
) -> torch.Tensor:
    """RePaintPipeline's loop on images in [-1, 1]: a model call on every step down in time, an
    undo (renoising, no model call) on every step up; the model's output is turned into epsilon."""
    from diffusers.utils.torch_utils import randn_tensor

    dtype = next(unet.parameters()).dtype
    x = randn_tensor(original.shape, generator=generator, device=original.device, dtype=torch.float32)
    alphas_cumprod = scheduler.alphas_cumprod.to(original.device)
    t_last = int(scheduler.timesteps[0]) + 1
    for t in tqdm(scheduler.timesteps.tolist(), desc="RePaint", leave=False, disable=not progress):
        if t < t_last:
            out = unet(x.to(dtype), t).sample.float()
            eps = to_epsilon(out, x, alphas_cumprod[t], kind)
            x = scheduler.step(eps, t, x, original, mask, generator).prev_sample
        else:
            x = scheduler.undo_step(x, t_last, generator)
        t_last = t
    return x


def model_calls(scheduler) -> int:
    steps = scheduler.timesteps.tolist()
    return sum(1 for prev, t in zip([steps[0] + 1] + steps, steps) if t < prev)


def save_grid(rows: list, path: Path) -> None:
    """Rows of GRID_COLUMNS images: original | masked | inpainted, repeated for every 16 images."""
    from .sampling import save_png

    n = len(rows[0])
    columns = min(n, GRID_COLUMNS)
    padded = [torch.cat([r, r.new_zeros(-n % columns, *r.shape[1:])]) for r in rows]  # grey filler tiles
    tiles = [p[i : i + columns] for i in range(0, len(padded[0]), columns) for p in padded]
    save_png(to_uint8(make_grid(torch.cat(tiles), nrow=columns, padding=2, pad_value=1.0)), path)


def hole_mse(inpainted: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error in [-1, 1] over the inpainted pixels (how far from the truth)."""
    hole = (1 - mask).expand_as(original)
    return ((inpainted - original) ** 2 * hole).flatten(1).sum(1) / hole.flatten(1).sum(1).clamp_min(1)
