"""Noise schedulers and the one sampling loop used by previews, sample_ddpm.py and OOD.

Training noise comes from `DDPMScheduler` (linear betas). Sampling uses `DDIMScheduler`
with trailing spacing, where `eta` is the seed's `--ddpm`, or any other diffusers
scheduler (`--scheduler`): the loop scales the initial noise by `init_noise_sigma`,
calls `scale_model_input`, and passes `eta`/`generator` only to `step`s that take them.
"""

import contextlib
import inspect
import math
import os
import re
import time
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from .errors import UsageError
from .latent import decode_latents  # noqa: F401  (latent models decode here; ood.py imports it from here)


def make_noise_scheduler(timesteps: int, beta_start: float, beta_end: float) -> DDPMScheduler:
    """The forward process; `add_noise` equals the original's exactly."""
    return DDPMScheduler(num_train_timesteps=timesteps, beta_start=beta_start, beta_end=beta_end,
                         beta_schedule="linear", clip_sample=False)


def make_sampler(name: str, config) -> object:
    """A sampling scheduler built from a noise scheduler's config (same T and betas)."""
    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                         timestep_spacing="trailing")
    if name == "ddpm":
        return DDPMScheduler.from_config(config, clip_sample=False, timestep_spacing="trailing")
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", timestep_spacing="trailing")
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config, timestep_spacing="trailing")
    raise ValueError(f"unknown scheduler {name}")


def num_inference_steps(timesteps: int, sample_timesteps: int) -> int:
    """The original's step rule: stride s = T // S, so T // s steps (T=1000, S=400 -> 500)."""
    return timesteps // (timesteps // sample_timesteps)


def native_bf16(device) -> bool:
    """Whether the device computes bf16 natively (a GPU that supports it, a CPU with AVX512-BF16 or
    AMX); elsewhere bf16 is emulated and slower than fp32."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.device(device).type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_mixed_precision(mixed_precision, device):
    """--mixed_precision auto -> 'bf16' where native, else 'no'; other values unchanged."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if native_bf16(device) else "no"


def inference_autocast(mixed_precision, device) -> contextlib.AbstractContextManager:
    """--mixed_precision for sampling and scoring: torch.autocast of the UNet (fp32 weights, bf16/fp16
    convolutions and matmuls; bf16 is ~2x faster on an AVX512-BF16 CPU, benchmarks/run.py);
    None or 'no': full precision."""
    mixed_precision = resolve_mixed_precision(mixed_precision, device)
    if mixed_precision in (None, "no"):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def _step_kwargs(scheduler, eta, generator) -> dict:
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


@torch.inference_mode()
def denoise(unet, scheduler, x: torch.Tensor, timesteps, eta: float = 0.0, generator=None, progress=False) -> torch.Tensor:
    """Run `scheduler.step` over `timesteps` (descending) from `x`: one model call per step."""
    kwargs = _step_kwargs(scheduler, eta, generator)
    dtype = next(unet.parameters()).dtype
    for t in tqdm(timesteps, desc="sampling", leave=False, disable=not progress):
        model_input = scheduler.scale_model_input(x, t).to(dtype)
        eps = unet(model_input, t).sample.float()
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x


def batch_generator(seed: int, index: int) -> torch.Generator:
    """Noise of batch `index` depends only on (seed, index): an interrupted run that resumes
    at a batch produces the images it would have produced."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)


@torch.inference_mode()
def sample_batch(unet, scheduler, n: int, steps: int, eta: float, generator, vae=None, progress=False) -> torch.Tensor:
    """`n` samples in [-1, 1] (pixel space; latents are decoded through `vae`), on the CPU."""
    device = next(unet.parameters()).device
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    scheduler.set_timesteps(steps, device=device)
    x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * scheduler.init_noise_sigma
    x = denoise(unet, scheduler, x, scheduler.timesteps, eta=eta, generator=generator, progress=progress)
    return (decode_latents(vae, x) if vae is not None else x).cpu()


def generate(unet, scheduler, num_images: int, steps: int, eta: float = 1.0, seed: int = 0, batch_size: int = 128,
             vae=None, progress=True) -> torch.Tensor:
    """`num_images` samples in [-1, 1], in batches of `batch_size`."""
    batches = math.ceil(num_images / batch_size)
    return torch.cat([
        sample_batch(unet, scheduler, min(batch_size, num_images - b * batch_size), steps, eta, batch_generator(seed, b),
                     vae, progress=progress and batches == 1)
        for b in tqdm(range(batches), desc="sampling batches", disable=not progress or batches == 1)])


def _save_png(image_uint8: torch.Tensor, path: Path) -> None:
    """Write to a temporary name, then rename: an interrupted run never leaves a truncated
    PNG under a final name that a rerun would count as done."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image_uint8.permute(1, 2, 0).squeeze(-1).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def fid_folder(cfg, loaded) -> Path:
    """The seed's layout: fid_samples/{dataset}/ddpm_{ddpm}_timesteps_{S}_ep{N}/."""
    train = loaded.train_config
    dataset = Path(train.get("dataset") or cfg.dataset).name
    epochs = train.get("trained_epochs", train.get("n_epochs", "unknown"))
    match = re.search(r"epoch_?(\d+)", Path(loaded.source).name)
    if match:  # the original parsed N from "...epochN.pt"
        epochs = int(match.group(1))
    root = Path(cfg.output_dir or ".")
    # Other samplers get their own folder, so a rerun never reuses another sampler's images.
    suffix = "" if cfg.scheduler == "ddim" else f"_{cfg.scheduler}"
    return root / "fid_samples" / dataset / f"ddpm_{cfg.ddpm}_timesteps_{cfg.sample_timesteps}_ep{epochs}{suffix}"


def run_sampling(cfg, device=None) -> Path:
    """sample_ddpm.py: a grid plus one PNG per image, or (--fid) a resumable folder of PNGs."""
    from .data import to_uint8
    from .pipeline import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.nll or cfg.inpaint:  # the other two runs of sample_ddpm.py (likelihood.py, inpaint.py)
        from .inpaint import run_inpaint
        from .likelihood import run_nll

        return (run_nll if cfg.nll else run_inpaint)(cfg, device)
    evaluator = None
    if cfg.fid_reference:
        if not cfg.fid:
            raise UsageError("--fid_reference measures the --fid folder; add --fid (and --num_samples N)")
        from .fid import FIDEvaluator

        # Before loading the model and sampling: missing Inception weights fail in a second.
        evaluator = FIDEvaluator(cfg, cfg.fid_reference, cfg.fid_reference_split, device=device)
    loaded = load_model(cfg.checkpoint, cfg, revision=cfg.revision, device=device)
    num_images = cfg.num_samples or (50_000 if cfg.fid else 16)
    out = fid_folder(cfg, loaded) if cfg.fid else Path(cfg.output_dir or f"samples/{Path(cfg.checkpoint).stem}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"output folder {out} is not writable ({err.strerror}); choose another --output_dir") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"output folder {out} is not writable; choose another --output_dir")
    scheduler = make_sampler(cfg.scheduler, loaded.scheduler_config)
    steps = num_inference_steps(loaded.scheduler_config["num_train_timesteps"], min(cfg.sample_timesteps, loaded.scheduler_config["num_train_timesteps"]))
    batches = math.ceil(num_images / cfg.batch_size)
    done = 0
    start = time.time()
    all_images = []
    for b in tqdm(range(batches), desc=f"sampling {num_images} images ({cfg.scheduler}, {steps} steps)", unit="batch"):
        first, n = b * cfg.batch_size, min(cfg.batch_size, num_images - b * cfg.batch_size)
        paths = [out / f"{i}.png" for i in range(first, first + n)]
        if cfg.fid and all(p.exists() for p in paths):
            continue  # written by an earlier run
        with inference_autocast(cfg.mixed_precision, device):
            images = to_uint8(sample_batch(loaded.unet, scheduler, n, steps, cfg.ddpm, batch_generator(cfg.seed, b), loaded.vae))
        for image, path in zip(images, paths):
            _save_png(image, path)
        done += n
        if not cfg.fid:
            all_images.append(images)
    if not cfg.fid:
        grid = make_grid(torch.cat(all_images)[:256], nrow=int(math.ceil(math.sqrt(min(num_images, 256)))), padding=2)
        _save_png(grid, out / "grid.png")
    elapsed = time.time() - start
    print(f"wrote {done} new image(s) ({num_images - done} already there) to {out} in {elapsed:.1f} s"
          + ("" if cfg.fid else f"; grid: {out / 'grid.png'}"))
    if evaluator is not None:
        from .fid import evaluate_folder

        eta = cfg.ddpm if "eta" in _step_kwargs(scheduler, cfg.ddpm, None) else None
        evaluate_folder(evaluator, out, num_images, sampler=dict(
            scheduler=cfg.scheduler, steps=steps, sample_timesteps=cfg.sample_timesteps, eta=eta, seed=cfg.seed,
            checkpoint=str(cfg.checkpoint), sampling_seconds_this_run=round(elapsed, 1)))
    return out
