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

from ..config.options import DDPMConfig
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
    vae: Optional[torch.nn.Module] = None  # --latent: the frozen AutoencoderKL (never prepared)


@dataclasses.dataclass
class TrainingData:
    """What build_parts needs from a run's data: the UNet sized for it, what the loader serves, the VAE."""

    unet: torch.nn.Module
    data: object  # a uint8 image tensor, cached latents, or a stream under --streaming
    vae: Optional[torch.nn.Module] = None


def build_parts(
    cfg: DDPMConfig, accelerator: Accelerator, unet, data, vae=None, scheduler_config=None
) -> TrainingParts:
    """The noise process (a start model's `scheduler_config`, else the flags), EMA, optimiser, loader
    and LR schedule for `unet` on `data` (a uint8 image or latent tensor, or a stream under
    --streaming), prepared by Accelerate."""
    noise_scheduler = _noise_scheduler(cfg, scheduler_config)
    ema = make_ema(unet, cfg.ema_rate, cfg.ema_warmup, cfg.ema_inv_gamma, cfg.ema_power)
    optimizer = make_optimizer(unet.parameters(), cfg.lr, cfg.decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon)
    loader = _make_loader(cfg, data, accelerator.device)
    if cfg.compile:
        unet = torch.compile(unet)
    if cfg.streaming:  # each process already reads its own part (split_dataset_by_node): Accelerate must not shard it
        unet, optimizer = accelerator.prepare(unet, optimizer)
    else:
        unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ema.to(accelerator.device)
    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.n_epochs * steps_per_epoch
    return TrainingParts(
        accelerator=accelerator,
        unet=unet,
        model=accelerator.unwrap_model(unet, keep_torch_compile=False),
        noise_scheduler=noise_scheduler,
        ema=ema,
        optimizer=optimizer,
        # Stepped by hand once per optimiser update, so accumulation and process count never change its length.
        lr_scheduler=make_lr_scheduler(
            optimizer.optimizer, cfg.lr_scheduler, cfg.lr, max_steps, cfg.lr_warmup(steps_per_epoch)
        ),
        loader=loader,
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        micro_batch=resolve_micro_batch(cfg.micro_batch_size, cfg.batch_size, accelerator.device),
        sampler=make_sampler(cfg.scheduler, noise_scheduler.config),
        sample_steps=num_inference_steps(cfg.timesteps, cfg.sample_timesteps),
        autocast=accelerator.autocast,
        vae=vae,
    )


def _noise_scheduler(cfg: DDPMConfig, scheduler_config=None):
    if scheduler_config is not None:
        return noise_scheduler_from_config(scheduler_config)
    return make_noise_scheduler(
        cfg.timesteps,
        cfg.beta_start,
        cfg.beta_end,
        cfg.beta_schedule,
        cfg.prediction_type,
        cfg.clip_sample,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        timestep_spacing=cfg.timestep_spacing,
    )


def _make_loader(cfg: DDPMConfig, data, device: torch.device):
    if cfg.streaming:  # epochs are virtual: --max_train_steps in --n_epochs parts (warm-up, sample grids, FID)
        steps = math.ceil(cfg.max_train_steps / cfg.n_epochs) * cfg.gradient_accumulation_steps
        return StreamingBatches(data, cfg.batch_size, steps, cfg.num_workers, device)
    return batch_loader(data, cfg.batch_size, cfg.seed, cfg.num_workers)


# ---- a run's inputs to build_parts ------------------------------------------------------------


def load_training_data(cfg: DDPMConfig, accelerator: Accelerator, start=None) -> TrainingData:
    """The --latent VAE (loaded first: an unreachable one fails before the data), the images (or a
    stream of them), and the UNet sized for them or for their latents (`start`'s when a pretrained
    model or UNet config is the start)."""
    vae = load_training_vae(cfg)
    if vae is not None and cfg.size and start is None:  # a --size the UNet cannot downsample fails before the data
        unet_kwargs(cfg, 1, latent_format(cfg, vae, 1, cfg.size)[1])
    main = accelerator.is_main_process
    size, channels = (start.size, start.channels) if start else (None, None)  # a start model sets the format
    data = (
        stream_images(cfg.dataset, cfg, accelerator.process_index, accelerator.num_processes, size, channels)
        if cfg.streaming
        else cached_images(cfg.dataset, "train", cfg, size, channels, cfg.max_train_samples, main)
    )
    if getattr(data, "first_image", ""):
        check_size_from_first_image(cfg, data.size, data.first_image, cfg.dataset)
    if vae is not None:
        vae.to(accelerator.device)  # never prepared: no DDP wrapper, no optimiser, no checkpoint
    channels, size = latent_format(cfg, vae, data.channels, data.size) if vae else (data.channels, data.size)
    unet = start.unet if start else build_unet(cfg, channels, size)
    _check_batch_fits(cfg, unet, size, accelerator.device, getattr(data, "decided_by", ""))
    _describe_data(cfg, accelerator, start, data, unet, vae, (channels, size))
    if cfg.streaming:
        return TrainingData(unet, data, vae)
    # --cache_latents: the loader serves the encoded dataset instead of the images.
    if cfg.cache_latents:
        return TrainingData(unet, encode_dataset(vae, data.images, cfg.latent_mode, cfg.batch_size, progress=main), vae)
    return TrainingData(unet, data.images, vae)


def _describe_data(cfg: DDPMConfig, accelerator: Accelerator, start, data, unet, vae, unet_format: tuple) -> None:
    if start:
        logger.info(describe(start))
    logger.info(
        f"data: {cfg.dataset}, {'streamed' if cfg.streaming else len(data.images)} images of "
        f"{data.channels}x{data.size}x{data.size}; UNet: {count_parameters(unet):,} parameters"
    )
    if vae is not None:
        channels, size = unet_format
        logger.info(
            f"latent: the UNet diffuses {channels}x{size}x{size} latents of the VAE {cfg.vae} "
            f"(latent_dist.{cfg.latent_mode} x {vae.config.scaling_factor}"
            f"{', cached once' if cfg.cache_latents else ', encoded every batch'})"
        )


def _check_batch_fits(cfg: DDPMConfig, unet, size: int, device: torch.device, decided_by: str) -> None:
    """A training batch (activations kept for the backward pass; weights, gradients and Adam's two
    moments) fits on the device, before the first step allocates it."""
    from ..util.memory import refuse_if_too_big, unet_batch_bytes

    batch = cfg.batch_size
    need = unet_batch_bytes(unet.config, batch, size, training=True) + 16 * count_parameters(unet)
    refuse_if_too_big(
        need,
        device,
        f"training a batch of {batch} at {size}x{size}",
        f"lower --batch_size, or {decided_by}" if decided_by else "lower --batch_size or --size",
    )
