"""The training parts: the UNet, its optimiser and LR schedule, the EMA, the data loader, the noise
process and what one step needs, built for a UNet and its data by one function (`build_parts`) and
held in one object (`TrainingParts`). `load_training_data` gives build_parts its inputs for a run:
the --latent VAE, the images (or a stream, or their cached latents) and the UNet sized for them.

The Trainer (trainer.py) holds the parts; train_step.py runs a step through them (what
benchmarks/run.py times).
"""

import dataclasses
import math
from typing import Callable, Optional

import torch
from accelerate import Accelerator

from ..config.sections import (
    DataSettings,
    DiffusionSettings,
    LatentSettings,
    ModelSettings,
    SamplingSettings,
    TrainingSettings,
)
from ..data.cache import cached_images
from ..data.images import StreamingBatches, batch_loader, stream_images
from ..diffusion.latent import encode_dataset, latent_format, load_training_vae
from ..diffusion.sampling import make_noise_scheduler, make_sampler, noise_scheduler_from_config, num_inference_steps
from ..models.pretrained import describe
from ..models.unet import build_unet, check_size_from_first_image, count_parameters, unet_kwargs
from ..util.logs import get_logger
from .ema import PlainEMA, make_ema
from .steps import make_lr_scheduler, make_optimizer

logger = get_logger(__name__)

# On a CPU, pieces of 32 need under half the peak memory of one pass of 128 (2.1 vs 4.7 GB for the seed's
# model) at the same speed (benchmarks/results/train_fp32_batch128_processes.json). Before host_memory.py,
# they were also ~1.3x faster: one pass's activations (> 32 MiB each) were page-faulted in anew each step.
CPU_MICRO_BATCH = 32


def resolve_micro_batch(requested: Optional[int], batch_size: int, device: torch.device) -> int:
    """--micro_batch_size: 0 = the whole batch in one pass; auto (None) = 32 on a CPU, 0 elsewhere."""
    if requested is None:
        requested = CPU_MICRO_BATCH if device.type == "cpu" else 0
    return 0 if requested >= batch_size else requested


@dataclasses.dataclass
class TrainingParts:
    """Everything a training step, a sample grid, a checkpoint and the exported pipeline work on."""

    accelerator: Accelerator
    unet: torch.nn.Module  # as Accelerate prepared it (DDP, torch.compile): what the step runs
    model: torch.nn.Module  # the plain UNet2DModel under it: what the EMA, grids and the pipeline use
    noise_scheduler: object
    ema: PlainEMA
    optimizer: torch.optim.Optimizer  # Accelerate's wrapper
    lr_scheduler: object
    loader: object  # batches of uint8 images (or cached latents), one tuple each
    steps_per_epoch: int  # optimiser updates
    max_steps: int
    micro_batch: int  # 0: the whole batch in one pass
    sampler: object  # --scheduler, for grids and FID
    sample_steps: int
    autocast: Callable  # Accelerate's mixed precision; benchmarks/run.py may set another
    step: "StepSettings"
    vae: Optional[torch.nn.Module] = None  # --latent: the frozen AutoencoderKL (never prepared)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What one step reads besides the parts: the batch's preparation and the loss."""

    loss_type: str = "huber"
    snr_gamma: Optional[float] = None
    max_grad_norm: Optional[float] = None
    random_flip: bool = False
    latent_mode: str = "sample"
    cached_latents: bool = False  # the loader serves --cache_latents moments, not images


@dataclasses.dataclass
class TrainingData:
    """What build_parts needs from a run's data: the UNet sized for it, what the loader serves, the VAE."""

    unet: torch.nn.Module
    data: object  # a uint8 image tensor, cached latents, or a stream under --streaming
    vae: Optional[torch.nn.Module] = None


# The settings sections build_parts reads (Sections' field names): `build_parts(..., **sections.pick(*PART_SECTIONS))`.
PART_SECTIONS = ("training", "diffusion", "sampling", "data", "latent")


def build_parts(
    accelerator: Accelerator,
    unet,
    images,
    *,
    training: TrainingSettings,
    diffusion: DiffusionSettings,
    sampling: SamplingSettings,
    data: DataSettings,
    latent: LatentSettings,
    vae=None,
    scheduler_config=None,
) -> TrainingParts:
    """The noise process (a start model's `scheduler_config`, else `diffusion`), EMA, optimiser, loader
    and LR schedule for `unet` on `images` (a uint8 image or latent tensor, or a stream under
    --streaming), prepared by Accelerate."""
    noise_scheduler = _noise_scheduler(diffusion, scheduler_config)
    t = training
    ema = make_ema(unet, t.ema_rate, t.ema_warmup, t.ema_inv_gamma, t.ema_power)
    optimizer = make_optimizer(unet.parameters(), t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_epsilon)
    loader = _make_loader(training, data, images, accelerator.device)
    if t.compile:
        unet = torch.compile(unet)
    # Under --streaming each process already reads its own part (split_dataset_by_node): Accelerate must not shard it.
    if data.streaming:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    else:
        unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ema.to(accelerator.device)
    steps_per_epoch = math.ceil(len(loader) / t.gradient_accumulation_steps)
    max_steps = t.max_train_steps or t.n_epochs * steps_per_epoch
    return TrainingParts(
        accelerator=accelerator,
        unet=unet,
        model=accelerator.unwrap_model(unet, keep_torch_compile=False),
        noise_scheduler=noise_scheduler,
        ema=ema,
        optimizer=optimizer,
        # Stepped by hand once per optimiser update, so accumulation and process count never change its length.
        lr_scheduler=make_lr_scheduler(
            optimizer.optimizer, t.lr_scheduler, t.lr, max_steps, t.lr_warmup(steps_per_epoch)
        ),
        loader=loader,
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        micro_batch=resolve_micro_batch(t.micro_batch_size, t.batch_size, accelerator.device),
        sampler=make_sampler(sampling.scheduler, noise_scheduler.config),
        sample_steps=num_inference_steps(diffusion.timesteps, sampling.sample_timesteps),
        autocast=accelerator.autocast,
        step=StepSettings(
            diffusion.loss_type, t.snr_gamma, t.max_grad_norm, t.random_flip, latent.latent_mode, latent.cache_latents
        ),
        vae=vae,
    )


def _noise_scheduler(diffusion: DiffusionSettings, scheduler_config=None):
    if scheduler_config is not None:
        return noise_scheduler_from_config(scheduler_config)
    d = diffusion
    return make_noise_scheduler(
        d.timesteps,
        d.beta_start,
        d.beta_end,
        d.beta_schedule,
        d.prediction_type,
        d.clip_sample,
        rescale_betas_zero_snr=d.rescale_betas_zero_snr,
        timestep_spacing=d.timestep_spacing,
    )


def _make_loader(training: TrainingSettings, data: DataSettings, images, device: torch.device):
    t = training
    if data.streaming:  # epochs are virtual: --max_train_steps in --n_epochs parts (warm-up, sample grids, FID)
        steps = math.ceil(t.max_train_steps / t.n_epochs) * t.gradient_accumulation_steps
        return StreamingBatches(images, t.batch_size, steps, data.num_workers, device)
    return batch_loader(images, t.batch_size, t.seed, data.num_workers)


# ---- a run's inputs to build_parts ------------------------------------------------------------


def load_training_data(
    accelerator: Accelerator,
    start=None,
    *,
    data: DataSettings,
    model: ModelSettings,
    latent: LatentSettings,
    batch_size: int,
    seed: int = 0,
    exclude=None,
) -> TrainingData:
    """The --latent VAE (loaded first: an unreachable one fails before the data), the images (or a
    stream of them), and the UNet sized for them or for their latents (`start`'s when a pretrained
    model or UNet config is the start). `seed` draws --crop random windows and the stream's order;
    `exclude`: a folder inside an image folder that is not data (the output folder)."""
    vae = load_training_vae(latent)
    if vae is not None and data.size and start is None:  # a --size the UNet cannot downsample fails before the data
        unet_kwargs(model, 1, latent_format(latent.vae, vae, 1, data.size, model.channel_mult)[1])
    main = accelerator.is_main_process
    size, channels = (start.size, start.channels) if start else (None, None)  # a start model sets the format
    rank, processes = accelerator.process_index, accelerator.num_processes
    images = (
        stream_images(data.dataset, data, seed, rank, processes, size, channels, exclude=exclude)
        if data.streaming
        else cached_images(data.dataset, "train", data, size, channels, data.max_train_samples, main, seed, exclude)
    )
    if getattr(images, "first_image", ""):
        check_size_from_first_image(model, images.size, images.first_image, data.dataset)
    if vae is not None:
        vae.to(accelerator.device)  # never prepared: no DDP wrapper, no optimiser, no checkpoint
    unet_format = (
        latent_format(latent.vae, vae, images.channels, images.size, model.channel_mult)
        if vae
        else (images.channels, images.size)
    )
    unet = start.unet if start else build_unet(model, *unet_format)
    _check_batch_fits(batch_size, unet, unet_format[1], accelerator.device, getattr(images, "decided_by", ""))
    _describe_data(data, latent, start, images, unet, vae, unet_format)
    if data.streaming:
        return TrainingData(unet, images, vae)
    # --cache_latents: the loader serves the encoded dataset instead of the images.
    if latent.cache_latents:
        encoded = encode_dataset(vae, images.images, latent.latent_mode, batch_size, progress=main)
        return TrainingData(unet, encoded, vae)
    return TrainingData(unet, images.images, vae)


def _describe_data(data: DataSettings, latent: LatentSettings, start, images, unet, vae, unet_format: tuple) -> None:
    if start:
        logger.info(describe(start))
    logger.info(
        f"data: {data.dataset}, {'streamed' if data.streaming else len(images.images)} images of "
        f"{images.channels}x{images.size}x{images.size}; UNet: {count_parameters(unet):,} parameters"
    )
    if vae is not None:
        channels, size = unet_format
        logger.info(
            f"latent: the UNet diffuses {channels}x{size}x{size} latents of the VAE {latent.vae} "
            f"(latent_dist.{latent.latent_mode} x {vae.config.scaling_factor}"
            f"{', cached once' if latent.cache_latents else ', encoded every batch'})"
        )


def _check_batch_fits(batch: int, unet, size: int, device: torch.device, decided_by: str) -> None:
    """A training batch (activations kept for the backward pass; weights, gradients and Adam's two
    moments) fits on the device, before the first step allocates it."""
    from ..util.memory import refuse_if_too_big, unet_batch_bytes

    need = unet_batch_bytes(unet.config, batch, size, training=True) + 16 * count_parameters(unet)
    refuse_if_too_big(
        need,
        device,
        f"training a batch of {batch} at {size}x{size}",
        f"lower --batch_size, or {decided_by}" if decided_by else "lower --batch_size or --size",
    )
