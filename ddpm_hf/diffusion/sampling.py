"""Noise schedulers and the one sampling loop used by previews, sample_ddpm.py and OOD
(the sample_ddpm.py command itself: ddpm_hf/commands/sample.py).

Training noise comes from `DDPMScheduler` (linear betas by default, --beta_schedule otherwise). Sampling
uses `DDIMScheduler` with trailing spacing, where `eta` is the seed's `--ddpm`, or any other diffusers
scheduler (`--scheduler`): the loop scales the initial noise by `init_noise_sigma`,
calls `scale_model_input`, and passes `eta`/`generator` only to `step`s that take them.
"""

import inspect
import math
from pathlib import Path
from typing import Optional

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from ..util.files import RETRY, atomic_write
from .latent import decode_latents  # noqa: F401  (latent models decode here; ood.py imports it from here)

GRID_MAX = 256  # images in sample_ddpm.py's grid.png; only these are kept in memory


def make_noise_scheduler(
    timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    rescale_betas_zero_snr: bool = False,
    timestep_spacing: str = "trailing",
) -> DDPMScheduler:
    """The forward process (with the seed's linear betas, `add_noise` equals the original's exactly).
    Its config is what every sampler and the saved pipeline inherit: T, betas (rescaled to zero
    terminal SNR with `rescale_betas_zero_snr`), the prediction type, whether a sampler clips its
    predicted clean image, and how a sampler spaces its steps."""
    return DDPMScheduler(
        num_train_timesteps=timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        rescale_betas_zero_snr=rescale_betas_zero_snr,
        timestep_spacing=timestep_spacing,
    )


def sampler_spacing(config) -> str:
    """How a sampler spaces its steps: what the model's scheduler config records, else "trailing"
    (the original's step rule; stock configs that never set it would get diffusers' "leading")."""
    defaulted = config.get("_use_default_values") or ()
    spacing = config.get("timestep_spacing")
    return spacing if spacing and "timestep_spacing" not in defaulted else "trailing"


def schedule_settings(config, sample_timesteps: int) -> dict:
    """The diffusion settings (DDPMConfig's names) a saved scheduler config holds: what a run that takes
    over a pretrained model's schedule records; its sampling steps are at most its T."""
    T = config["num_train_timesteps"]
    return dict(
        timesteps=T,
        beta_start=config.get("beta_start", 0.0001),
        beta_end=config.get("beta_end", 0.02),
        beta_schedule=config.get("beta_schedule", "linear"),
        prediction_type=config.get("prediction_type", "epsilon"),
        clip_sample=bool(config.get("clip_sample", False)),
        rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
        timestep_spacing=sampler_spacing(config),
        sample_timesteps=min(sample_timesteps, T),
    )


def terminal_signal(config) -> float:
    """sqrt(alpha_bar) at t = T-1: the fraction of the image a fully noised sample still holds."""
    return float(noise_scheduler_from_config(config).alphas_cumprod[-1].sqrt())


def terminal_snr_notice(config) -> Optional[str]:
    """A notice when noise prediction meets a schedule that keeps over 1 % of the signal at t = T-1:
    sampling starts from pure noise, a state the model never saw (docs/quality.md)."""
    signal = terminal_signal(config)
    if config.get("prediction_type", "epsilon") != "epsilon" or signal <= 0.01:
        return None
    return (
        f"notice: the noise schedule keeps {100 * signal:.1f} % of the signal at t = T-1, but sampling starts from "
        f"pure noise, so a noise-predicting model draws grey scribbles; end the schedule in noise with "
        f"--rescale_betas_zero_snr --prediction_type v_prediction (keep --timestep_spacing trailing), or train "
        f"--beta_schedule squaredcos_cap_v2 --prediction_type v_prediction as configs/quickstart.yaml does "
        f"(docs/quality.md)"
    )


def noise_scheduler_from_config(config) -> DDPMScheduler:
    """The forward process of a saved model (any scheduler's config of it: T, betas, prediction type)."""
    return DDPMScheduler.from_config(config, clip_sample=config.get("clip_sample", False))


def make_sampler(name: str, config) -> object:
    """A sampling scheduler built from a noise scheduler's config (same T, betas, prediction type and
    clipping; configs saved before --clip_sample existed do not clip, as the original)."""
    clip, spacing = bool(config.get("clip_sample", False)), sampler_spacing(config)
    if name == "ddim":
        return DDIMScheduler.from_config(
            config, clip_sample=clip, set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing
        )
    if name == "ddpm":
        return DDPMScheduler.from_config(config, clip_sample=clip, timestep_spacing=spacing)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", timestep_spacing=spacing)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config, timestep_spacing=spacing)
    raise ValueError(f"unknown scheduler {name}")


def num_inference_steps(timesteps: int, sample_timesteps: int) -> int:
    """The original's step rule: stride s = T // S, so T // s steps (T=1000, S=400 -> 500)."""
    return timesteps // (timesteps // sample_timesteps)


def step_kwargs(scheduler, eta, generator) -> dict:
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


@torch.inference_mode()
def denoise(
    unet, scheduler, x: torch.Tensor, timesteps, eta: float = 0.0, generator=None, progress=False, on_step=None
) -> torch.Tensor:
    """Run `scheduler.step` over `timesteps` (descending) from `x`: one model call per step.
    `on_step()`, if given, is called after every step (a caller's progress bar)."""
    kwargs = step_kwargs(scheduler, eta, generator)
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
def sample_batch(
    unet, scheduler, n: int, steps: int, eta: float, generator, vae=None, progress=False, on_step=None
) -> torch.Tensor:
    """`n` samples in [-1, 1] (pixel space; latents are decoded through `vae`), on the CPU."""
    device = next(unet.parameters()).device
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    scheduler.set_timesteps(steps, device=device)
    x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * scheduler.init_noise_sigma
    x = denoise(
        unet, scheduler, x, scheduler.timesteps, eta=eta, generator=generator, progress=progress, on_step=on_step
    )
    return (decode_latents(vae, x) if vae is not None else x).cpu()


def generate(
    unet,
    scheduler,
    num_images: int,
    steps: int,
    eta: float = 1.0,
    seed: int = 0,
    batch_size: int = 128,
    vae=None,
    progress=True,
    batches=None,
) -> torch.Tensor:
    """`num_images` samples in [-1, 1], in batches of `batch_size`; `batches`: only the batches of these
    indices (a process's share of an evaluation), each seeded by its global index as in the whole set."""
    todo = range(math.ceil(num_images / batch_size)) if batches is None else list(batches)
    if not todo:
        return torch.zeros(0)
    return torch.cat(
        [
            sample_batch(
                unet,
                scheduler,
                min(batch_size, num_images - b * batch_size),
                steps,
                eta,
                batch_generator(seed, b),
                vae,
                progress=progress and len(todo) == 1,
            )
            for b in tqdm(todo, desc="sampling batches", disable=not progress or len(todo) == 1)
        ]
    )


def save_png(image_uint8: torch.Tensor, path: Path, advice: str = RETRY) -> None:
    """Write to a temporary name, then rename: an interrupted run or a full disk never leaves a
    truncated PNG under a final name that a rerun would count as done."""
    array = image_uint8.permute(1, 2, 0).squeeze(-1).numpy()
    atomic_write(
        path,
        lambda tmp: Image.fromarray(array).save(tmp, format="PNG"),
        f"the image {path.name}",
        advice=advice,
    )
