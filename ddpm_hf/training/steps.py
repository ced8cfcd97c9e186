"""The step rule: the diffusion objective of a batch, the optimiser and its learning-rate schedule.

Library code with explicit arguments; the Trainer (trainer.py) applies it with Accelerate, and
benchmarks/run.py times the Trainer's own step.
"""

import contextlib
from typing import Optional

import torch

from ..diffusion.losses import elementwise_loss, min_snr_weights, per_image_loss, prediction_target


def make_optimizer(
    parameters, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW, with PyTorch's fused kernel (one pass over all parameters) on CPU and CUDA, else the
    foreach one (benchmarks/run.py, components: fused is several times faster on CPU)."""
    parameters = list(parameters)
    fast = {"fused": True} if all(p.device.type in ("cpu", "cuda") for p in parameters) else {"foreach": True}
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, **fast)


def draw_noise(noise_scheduler, x0: torch.Tensor) -> tuple:
    """The batch's Gaussian noise, then its uniform timesteps (this order: exact resume depends on it)."""
    noise = torch.randn_like(x0)
    return noise, torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)


def diffusion_loss(
    unet,
    noise_scheduler,
    x0: torch.Tensor,
    loss_type: str = "huber",
    snr_gamma: Optional[float] = None,
    autocast=contextlib.nullcontext,
    noise: Optional[torch.Tensor] = None,
    t: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The objective of one batch: Gaussian noise and uniform timesteps (drawn unless given), the
    forward process, the UNet under `autocast()` (Accelerate's mixed precision), and the mean
    `loss_type` (huber, l2, l1) between the UNet's output and its target (the scheduler's
    prediction_type), each image's loss weighted by min-SNR-gamma when `snr_gamma` is set."""
    if noise is None:
        noise, t = draw_noise(noise_scheduler, x0)
    with autocast():
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t).sample
    target = prediction_target(noise_scheduler, x0, noise, t)
    if snr_gamma is None:
        return elementwise_loss(pred.float(), target, loss_type).mean()
    return (per_image_loss(pred.float(), target, loss_type) * min_snr_weights(noise_scheduler, t, snr_gamma)).mean()


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """--random_flip: each image mirrored left-right with probability 1/2 (the global RNG, so seeded
    and restored with the checkpoint's RNG states)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def make_lr_scheduler(optimizer, name: str, lr: float, total_steps: int, warmup_steps: int):
    """The learning-rate schedule, stepped once per optimiser update: the original's OneCycleLR
    (`one_cycle`: from 1e-6 up to `lr` over `warmup_steps`, cosine back to 1e-6), or any schedule of
    diffusers' get_scheduler (`cosine`, `constant`, ...)."""
    if name != "one_cycle":
        from diffusers.optimization import get_scheduler

        return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    warm = min(warmup_steps, total_steps - 1)
    # A one-step warm-up is a 0/0 inside OneCycleLR (its first phase would end at step 0): none instead.
    pct_start = warm / total_steps if warm > 1 else 0.0
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=lr,
        total_steps=total_steps,
        pct_start=pct_start,
        anneal_strategy="cos",
        cycle_momentum=False,
        div_factor=lr / 1e-6,
        final_div_factor=1,
    )
