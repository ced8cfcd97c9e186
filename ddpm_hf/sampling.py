"""Noise schedulers and the one sampling loop used by previews, sample_ddpm.py and OOD.

Training noise comes from `DDPMScheduler` (linear betas by default, --beta_schedule otherwise). Sampling uses `DDIMScheduler`
with trailing spacing, where `eta` is the seed's `--ddpm`, or any other diffusers
scheduler (`--scheduler`): the loop scales the initial noise by `init_noise_sigma`,
calls `scale_model_input`, and passes `eta`/`generator` only to `step`s that take them.
"""

import contextlib
import hashlib
import inspect
import json
import math
import re
import time
from pathlib import Path
from typing import Optional

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from .errors import UsageError
from .files import RETRY, atomic_write, free_bytes, make_output_dir, read_json, remove, write_text
from .latent import decode_latents, downsample_factor  # noqa: F401  (latent models decode here; ood.py imports it from here)
from .lock import LOCK_NAME, ensure_not_in_use, lock_output_dir

GRID_MAX = 256  # images in sample_ddpm.py's grid.png; only these are kept in memory
FID_ORIGIN = "fid_origin.json"  # what made the images of a --fid folder
ORIGIN_INFO = ("checkpoint", "revision")  # recorded, not compared: the weights' hash says whether it is the same model
FLAG_NAMES = dict(scheduler="scheduler", steps="sample_timesteps (steps)", eta="ddpm (eta)", seed="seed",
                  batch_size="batch_size", precision="mixed_precision", timesteps="timesteps (T)",
                  beta_start="beta_start", beta_end="beta_end")
PNG_OVERHEAD = 1024  # bytes per PNG beyond its pixels, a generous bound (sampled noise barely compresses)
FEATURE_BYTES = 2048 * 20  # per scored image: its Inception features in float32, and float64 twice (FID, KID)


def make_noise_scheduler(timesteps: int, beta_start: float, beta_end: float, beta_schedule: str = "linear",
                         prediction_type: str = "epsilon", clip_sample: bool = False) -> DDPMScheduler:
    """The forward process (with the seed's linear betas, `add_noise` equals the original's exactly).
    Its config is what every sampler and the saved pipeline inherit: T, betas, the prediction type
    and whether a sampler clips its predicted clean image."""
    return DDPMScheduler(num_train_timesteps=timesteps, beta_start=beta_start, beta_end=beta_end,
                         beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=clip_sample)


def noise_scheduler_from_config(config) -> DDPMScheduler:
    """The forward process of a saved model (any scheduler's config of it: T, betas, prediction type)."""
    return DDPMScheduler.from_config(config, clip_sample=config.get("clip_sample", False))


def make_sampler(name: str, config) -> object:
    """A sampling scheduler built from a noise scheduler's config (same T, betas, prediction type and
    clipping; configs saved before --clip_sample existed do not clip, as the original)."""
    clip = bool(config.get("clip_sample", False))
    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=clip, set_alpha_to_one=True, steps_offset=0,
                                         timestep_spacing="trailing")
    if name == "ddpm":
        return DDPMScheduler.from_config(config, clip_sample=clip, timestep_spacing="trailing")
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
def denoise(unet, scheduler, x: torch.Tensor, timesteps, eta: float = 0.0, generator=None, progress=False,
            on_step=None) -> torch.Tensor:
    """Run `scheduler.step` over `timesteps` (descending) from `x`: one model call per step.
    `on_step()`, if given, is called after every step (a caller's progress bar)."""
    kwargs = _step_kwargs(scheduler, eta, generator)
    dtype = next(unet.parameters()).dtype
    for t in tqdm(timesteps, desc="sampling", leave=False, disable=not progress):
        model_input = scheduler.scale_model_input(x, t).to(dtype)
        eps = unet(model_input, t).sample.float()
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
        if on_step is not None:
            on_step()
    return x


def batch_generator(seed: int, index: int) -> torch.Generator:
    """Noise of batch `index` depends only on (seed, index): an interrupted run that resumes
    at a batch produces the images it would have produced."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)


@torch.inference_mode()
def sample_batch(unet, scheduler, n: int, steps: int, eta: float, generator, vae=None, progress=False,
                 on_step=None) -> torch.Tensor:
    """`n` samples in [-1, 1] (pixel space; latents are decoded through `vae`), on the CPU."""
    device = next(unet.parameters()).device
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    scheduler.set_timesteps(steps, device=device)
    x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * scheduler.init_noise_sigma
    x = denoise(unet, scheduler, x, scheduler.timesteps, eta=eta, generator=generator, progress=progress, on_step=on_step)
    return (decode_latents(vae, x) if vae is not None else x).cpu()


def generate(unet, scheduler, num_images: int, steps: int, eta: float = 1.0, seed: int = 0, batch_size: int = 128,
             vae=None, progress=True) -> torch.Tensor:
    """`num_images` samples in [-1, 1], in batches of `batch_size`."""
    batches = math.ceil(num_images / batch_size)
    return torch.cat([
        sample_batch(unet, scheduler, min(batch_size, num_images - b * batch_size), steps, eta, batch_generator(seed, b),
                     vae, progress=progress and batches == 1)
        for b in tqdm(range(batches), desc="sampling batches", disable=not progress or batches == 1)])


def _save_png(image_uint8: torch.Tensor, path: Path, advice: str = RETRY) -> None:
    """Write to a temporary name, then rename: an interrupted run or a full disk never leaves a
    truncated PNG under a final name that a rerun would count as done."""
    array = image_uint8.permute(1, 2, 0).squeeze(-1).numpy()
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"), f"the image {path.name}",
                 point="grid" if path.name == "grid.png" else "png", advice=advice)


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


def model_digest(loaded) -> str:
    """SHA-256 of the weights (UNet, and VAE of a latent model): the same model however it was reached."""
    digest = hashlib.sha256()
    for module in (loaded.unet, loaded.vae):
        for name, tensor in sorted(module.state_dict().items()) if module is not None else ():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fid_origin(cfg, loaded, steps: int, eta, precision: str) -> dict:
    """What made the images of a --fid folder; images of another origin must not join them."""
    sc = loaded.scheduler_config
    return dict(model_sha256=model_digest(loaded), timesteps=sc["num_train_timesteps"], beta_start=sc["beta_start"],
                beta_end=sc["beta_end"], scheduler=cfg.scheduler, steps=steps, eta=eta, seed=cfg.seed,
                batch_size=cfg.batch_size, precision=precision, checkpoint=str(cfg.checkpoint), revision=cfg.revision)


def _differences(saved: dict, origin: dict) -> list:
    differ = [k for k in origin if k not in ORIGIN_INFO and saved.get(k) != origin[k]]
    return [("--checkpoint: a model with other weights" if k == "model_sha256" else f"--{FLAG_NAMES.get(k, k)}: {saved.get(k)} there, {origin[k]} now")
            for k in differ]


def check_fid_folder(folder: Path, origin: dict, overwrite: bool) -> None:
    """Refuse to add images to a --fid folder made by another model or settings (or of unknown origin);
    --overwrite_output_dir empties it instead. Records the origin of a new folder."""
    record = folder / FID_ORIGIN
    pngs = [p for p in folder.glob("*.png") if p.stem.isdigit()]
    if pngs:  # images to protect (an empty folder just takes the new record)
        saved = read_json(record, "pass --overwrite_output_dir to start the folder over") if record.exists() else None
        saved = {} if saved is not None and not isinstance(saved, dict) else saved  # not a record: matches nothing
        differ = _differences(saved, origin) if saved is not None else [f"origin unknown: no {FID_ORIGIN} (an older version, or by hand)"]
        if not differ:
            return
        if not overwrite:
            raise UsageError(f"{folder} holds {len(pngs)} image(s) made differently ({'; '.join(differ)}); pass "
                             f"--overwrite_output_dir to replace them, or choose another --output_dir")
        remove(*pngs, folder / "fid.json", record)
    write_text(record, json.dumps(origin, indent=2) + "\n", "the FID folder's origin record", point="fid_origin")


def prepare_sample_dir(out: Path, overwrite: bool) -> None:
    """sample_ddpm.py without --fid never writes over earlier samples unless told to."""
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if entries and not overwrite:
        raise UsageError(f"output folder {out} is not empty ({len(entries)} entries: {', '.join(entries[:3])}"
                         f"{', ...' if len(entries) > 3 else ''}); pass --overwrite_output_dir to replace its samples, or choose another --output_dir")
    if entries:
        remove(*[out / name for name in entries if name == "grid.png" or (name.endswith(".png") and name[:-4].isdigit())])


def _available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def capacity_problem(num_images: int, image_bytes: int, folder, free_disk: int, free_memory: Optional[int], scored: bool) -> Optional[str]:
    """Why --num_samples cannot fit (None when it can): the PNGs on disk, and with --fid_reference
    the images and their Inception features in memory."""
    disk = num_images * (image_bytes + PNG_OVERHEAD)
    if disk > free_disk:
        return f"needs about {_gb(disk)} of disk for the PNGs but {folder} has {_gb(free_disk)} free"
    memory = num_images * (image_bytes + FEATURE_BYTES)
    if scored and free_memory is not None and memory > free_memory:
        return f"needs about {_gb(memory)} of memory to score them (images and Inception features) but {_gb(free_memory)} is available"
    return None


def _gb(n: int) -> str:
    return f"{n / 1e12:,.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _check_capacity(cfg, out: Path, num_images: int, unet, vae) -> None:
    channels = vae.config.out_channels if vae is not None else unet.config.in_channels
    size = unet.config.sample_size * (downsample_factor(vae) if vae is not None else 1)
    missing = num_images - (sum(1 for p in out.glob("*.png") if p.stem.isdigit()) if cfg.fid else 0)
    problem = capacity_problem(max(missing, 0), channels * size * size, out, free_bytes(out), _available_memory(), bool(cfg.fid_reference))
    if problem:
        raise UsageError(f"--num_samples {num_images} ({channels}x{size}x{size} images) {problem}; lower --num_samples"
                         + (" or choose another --output_dir" if "disk" in problem else ""))


def _sampling_setup(cfg, loaded, device, num_images: int):
    """(output folder, sampler, steps, eta) after the folder and capacity checks; the folder is locked."""
    T = loaded.scheduler_config["num_train_timesteps"]
    scheduler = make_sampler(cfg.scheduler, loaded.scheduler_config)
    steps = num_inference_steps(T, min(cfg.sample_timesteps, T))
    eta = cfg.ddpm if "eta" in _step_kwargs(scheduler, cfg.ddpm, None) else None
    out = fid_folder(cfg, loaded) if cfg.fid else Path(cfg.output_dir or f"samples/{Path(cfg.checkpoint).stem}")
    _check_capacity(cfg, out, num_images, loaded.unet, loaded.vae)
    make_output_dir(out)
    lock_output_dir(out)
    if cfg.fid:
        precision = resolve_mixed_precision(cfg.mixed_precision, device) or "no"
        check_fid_folder(out, fid_origin(cfg, loaded, steps, eta, precision), cfg.overwrite_output_dir)
    else:
        prepare_sample_dir(out, cfg.overwrite_output_dir)
    return out, scheduler, steps, eta


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
    if cfg.checkpoint and not cfg.fid:  # before loading anything: a folder in use or holding samples fails at once
        early = Path(cfg.output_dir or f"samples/{Path(cfg.checkpoint).stem}")
        ensure_not_in_use(early)
        if not cfg.overwrite_output_dir:
            prepare_sample_dir(early, overwrite=False)
    loaded = load_model(cfg.checkpoint, cfg, revision=cfg.revision, device=device)
    num_images = cfg.num_samples or (50_000 if cfg.fid else 16)
    out, scheduler, steps, eta = _sampling_setup(cfg, loaded, device, num_images)
    advice = ("the images already written are kept: free some space and run the same command again to add the rest"
              if cfg.fid else "free some space (or choose another --output_dir) and run the command again with --overwrite_output_dir")
    batches = math.ceil(num_images / cfg.batch_size)
    todo = []  # (batch index, PNG paths) still to sample
    for b in range(batches):
        first, n = b * cfg.batch_size, min(cfg.batch_size, num_images - b * cfg.batch_size)
        paths = [out / f"{i}.png" for i in range(first, first + n)]
        if not (cfg.fid and all(p.exists() for p in paths)):  # else: written by an earlier run
            todo.append((b, paths))
    done, start, grid_images = 0, time.time(), []
    # The bar counts sampling steps (one UNet call on a whole batch each), not batches: a single
    # batch of 300 steps moves 300 times instead of sitting at 0/1.
    per_batch = f"{steps} steps per batch" if len(todo) > 1 else f"{steps} steps"
    with tqdm(total=len(todo) * steps, desc=f"sampling {sum(len(p) for _, p in todo)} images ({cfg.scheduler}, {per_batch})",
              unit="step") as bar:
        for k, (b, paths) in enumerate(todo):
            if len(todo) > 1:
                bar.set_postfix_str(f"batch {k + 1}/{len(todo)}")
            with inference_autocast(cfg.mixed_precision, device):
                images = to_uint8(sample_batch(loaded.unet, scheduler, len(paths), steps, cfg.ddpm, batch_generator(cfg.seed, b),
                                               loaded.vae, on_step=lambda: bar.update(1)))
            for image, path in zip(images, paths):
                _save_png(image, path, advice)
            done += len(paths)
            first = b * cfg.batch_size
            if not cfg.fid and first < GRID_MAX:  # the grid shows the first GRID_MAX images; the rest are not kept
                grid_images.append(images[:GRID_MAX - first])
    if not cfg.fid:
        grid = make_grid(torch.cat(grid_images), nrow=int(math.ceil(math.sqrt(min(num_images, GRID_MAX)))), padding=2)
        _save_png(grid, out / "grid.png", advice)
    elapsed = time.time() - start
    print(f"wrote {done} new image(s) ({num_images - done} already there) to {out} in {elapsed:.1f} s"
          + ("" if cfg.fid else f"; grid: {out / 'grid.png'}"))
    if evaluator is not None:
        from .fid import evaluate_folder

        evaluate_folder(evaluator, out, num_images, sampler=dict(
            scheduler=cfg.scheduler, steps=steps, sample_timesteps=cfg.sample_timesteps, eta=eta, seed=cfg.seed,
            checkpoint=str(cfg.checkpoint), sampling_seconds_this_run=round(elapsed, 1)))
    return out
