"""The trained network as the OOD scores see it: its noise prediction at any timestep (whatever it was
trained to predict), images fed in batches with seeded noise, and the statistics the scores build on:
the DDIM-inversion path (DiffPath, Heng et al. 2024), the noise predictions at several noise levels
(multi-scale score norms, Mahmood et al. 2021), the decoder's hidden activations and pooling of maps
onto a grid of patches."""

from typing import Callable, List

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.images import to_model_range
from ..diffusion.latent import encode
from ..diffusion.prediction import prediction_type, to_epsilon
from ..diffusion.sampling import batch_generator, noise_scheduler_from_config
from ..util.precision import inference_autocast

STREAMS = {"in": 0, "out": 1, "stats": 2, "query": 3}  # separate noise streams per image set


class ScoreModel:
    """A loaded model (models.pipeline.LoadedModel) on a device, in a precision, with a seed."""

    def __init__(self, loaded, device="cpu", mixed_precision=None, seed: int = 0, batch_size: int = 128):
        self.loaded, self.unet, self.vae = loaded, loaded.unet, loaded.vae
        self.scheduler_config = loaded.scheduler_config
        self.noise_scheduler = noise_scheduler_from_config(self.scheduler_config)
        self.alphas = self.noise_scheduler.alphas_cumprod.double()
        self.T = len(self.alphas)
        self.kind = prediction_type(self.scheduler_config)
        self.device, self.mixed_precision, self.seed, self.batch_size = device, mixed_precision, seed, batch_size
        self.dtype = next(self.unet.parameters()).dtype

    @torch.inference_mode()
    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The network's noise estimate at x_t (float32), one model call per image."""
        steps = torch.full((len(x_t),), int(t), dtype=torch.long, device=x_t.device)
        with inference_autocast(self.mixed_precision, self.device):
            out = self.unet(x_t.to(self.dtype), steps).sample.float()
        return to_epsilon(out, x_t, self.alphas[int(t)].float(), self.kind)

    def x0(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> what the UNet diffuses (pixels in [-1, 1], or the latent mean of a latent model)."""
        x = to_model_range(images).to(self.device)
        return x if self.vae is None else encode(self.vae, x, "mean")

    def noised(self, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        a = self.alphas[int(t)].float()
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def batched(self, images: torch.Tensor, fn: Callable, stream: str, desc: str) -> np.ndarray:
        """fn(x0 batch, generator) -> (B, D) features, over all images; batch b's noise depends only on
        (seed, stream, b)."""
        parts = []
        starts = range(0, len(images), self.batch_size)
        for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", leave=False, disable=len(starts) < 2)):
            gen = batch_generator(self.seed, 100 + STREAMS[stream] * 1_000_000 + b)
            with torch.inference_mode():
                parts.append(fn(self.x0(images[start : start + self.batch_size]), gen).double().cpu())
        return torch.cat(parts).numpy()


def spaced_timesteps(T: int, n: int, first: int = 0) -> List[int]:
    """n timesteps from `first` to T - 1, evenly spaced (integers, no repeats for n <= T - first)."""
    return sorted({int(round(t)) for t in np.linspace(first, T - 1, n)})


def inversion_noise(model: ScoreModel, x0: torch.Tensor, steps: int) -> List[torch.Tensor]:
    """The predicted noise along the deterministic DDIM path from x0 (t = 0) to x_T in `steps` model
    calls: at each timestep the noise estimate moves x_t to the next timestep with the same noise."""
    ts = spaced_timesteps(model.T, steps + 1)
    x, out = x0, []
    for t, t_next in zip(ts[:-1], ts[1:]):
        eps = model.eps(x, t)
        a, a_next = model.alphas[t].float(), model.alphas[t_next].float()
        x0_hat = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
        out.append(eps)
    return out


def moments(x: torch.Tensor) -> torch.Tensor:
    """(B, 3): the first three raw moments of each image's values."""
    flat = x.flatten(1)
    return torch.stack([flat.mean(1), flat.pow(2).mean(1), flat.pow(3).mean(1)], 1)


def path_statistics(model: ScoreModel, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, 6) DiffPath statistics: the sums over the path of the first three moments of the predicted noise
    and of its step-to-step change."""
    eps = inversion_noise(model, x0, steps)
    level = sum(moments(e) for e in eps)
    change = sum(moments(b - a) for a, b in zip(eps[:-1], eps[1:])) if len(eps) > 1 else torch.zeros_like(level)
    return torch.cat([level, change], 1)


def msma_levels(model: ScoreModel, levels: int) -> List[int]:
    """The noise levels of the multi-scale score: `levels` timesteps from a little noise up to T - 1."""
    return spaced_timesteps(model.T, levels, first=max(1, model.T // 50))


def noise_predictions(model: ScoreModel, x0: torch.Tensor, timesteps: List[int], generator) -> tuple:
    """((L, B, ...) predicted noise, (L, B, ...) drawn noise) of x0 noised to each timestep."""
    preds, drawn = [], []
    for t in timesteps:
        z = torch.randn(x0.shape, generator=generator).to(x0.device)
        preds.append(model.eps(model.noised(x0, t, z), t))
        drawn.append(z)
    return torch.stack(preds), torch.stack(drawn)


def pool_map(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) per-pixel values -> (B, grid * grid) means over a grid of patches (channels averaged)."""
    return F.adaptive_avg_pool2d(maps.mean(1, keepdim=True), grid).flatten(1)


def hidden_block(unet) -> torch.nn.Module:
    """The decoder block whose output the hidden score reads: the middle one of the up blocks (for a
    three-level UNet, the block that upsamples to full resolution: shapes and strokes, not single pixels)."""
    return unet.up_blocks[len(unet.up_blocks) // 2]


def hidden_activations(model: ScoreModel, x0: torch.Tensor, timesteps: List[int], generator, grid: int):
    """(B, L * C * grid * grid): the output of `hidden_block` when x0 noised to each timestep is denoised,
    averaged over a grid of patches (channel by channel, so where a feature fires is kept)."""
    captured = []
    handle = hidden_block(model.unet).register_forward_hook(lambda module, args, out: captured.append(out.float()))
    try:
        for t in timesteps:
            z = torch.randn(x0.shape, generator=generator).to(x0.device)
            model.eps(model.noised(x0, t, z), t)
    finally:
        handle.remove()
    return torch.cat([F.adaptive_avg_pool2d(a, grid).flatten(1) for a in captured], 1)
