"""One training step through the parts (parts.py), as a run makes it and benchmarks/run.py times it:

x0 = model_input(parts, batch)          uint8 images -> pixels in [-1, 1] or VAE latents
flags = train_step(parts, state, x0)    forward/backward, collective flags, optimiser update
after_update(parts, state)              LR schedule, EMA, step counter (after an update)

What a step reads besides the parts is `parts.step` (parts.StepSettings).
"""

import contextlib

import torch

from ..data.images import to_model_range
from ..diffusion.latent import training_latents
from .checkpoints import TrainerState
from .parts import TrainingParts
from .steps import diffusion_loss, draw_noise, random_hflip


def model_input(parts: TrainingParts, batch: torch.Tensor) -> torch.Tensor:
    """uint8 images -> what the UNet diffuses: pixels in [-1, 1], or the VAE's latents."""
    if parts.step.random_flip:
        batch = random_hflip(batch)
    if parts.vae:
        return training_latents(parts.vae, batch, parts.step.latent_mode, parts.step.cached_latents)
    return to_model_range(batch)


def train_step(
    parts: TrainingParts, state: TrainerState, x0: torch.Tensor, stop_requested: bool = False
) -> torch.Tensor:
    """Forward and backward of one batch, and the optimiser update at the end of an accumulation.
    Returns the collective flags (any non-finite loss, any stop request): a non-finite loss makes
    no update and its gradients are dropped unused; a finite one joins the running loss."""
    with parts.accelerator.accumulate(parts.unet):
        loss = forward_backward(parts, x0)
        flags = collective_flags(parts.accelerator, loss, stop_requested)
        if flags[0] > 0:
            parts.optimizer.zero_grad(set_to_none=True)
            return flags
        update(parts, parts.step.max_grad_norm)
    state.loss_sum += loss.detach()
    state.loss_count += 1
    return flags


def forward_backward(parts: TrainingParts, x0: torch.Tensor) -> torch.Tensor:
    """The batch's loss and its gradients, in pieces of `micro_batch` images: noise and timesteps
    are drawn for the whole batch, each piece's loss is weighted by its share of the batch, so the
    loss and gradient are the batch's (GroupNorm has no batch statistics); only one piece's
    activations are held at a time (parts.CPU_MICRO_BATCH)."""
    noise, t = draw_noise(parts.noise_scheduler, x0)
    size = parts.micro_batch or len(x0)
    pieces = list(zip(x0.split(size), noise.split(size), t.split(size)))
    total = torch.zeros((), device=x0.device)
    for i, (x, n, steps) in enumerate(pieces):
        last = i == len(pieces) - 1  # DDP all-reduces the gradients once, after the last piece
        with contextlib.nullcontext() if last else parts.accelerator.no_sync(parts.unet):
            step = parts.step
            loss = diffusion_loss(
                parts.unet, parts.noise_scheduler, x, step.loss_type, step.snr_gamma, parts.autocast, n, steps
            ) * (len(x) / len(x0))
            parts.accelerator.backward(loss)
        total += loss.detach()
    return total


def update(parts: TrainingParts, max_grad_norm: float) -> None:
    if max_grad_norm and parts.accelerator.sync_gradients:
        parts.accelerator.clip_grad_norm_(parts.unet.parameters(), max_grad_norm)
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)


def collective_flags(accelerator, loss: torch.Tensor, stop_requested: bool) -> torch.Tensor:
    """One collective per batch: every process learns whether any loss is non-finite and whether
    any process was asked to stop."""
    local = torch.stack(
        [(~torch.isfinite(loss.detach())).float(), torch.tensor(float(stop_requested), device=loss.device)]
    )
    return accelerator.gather(local).view(-1, 2).amax(0)


def after_update(parts: TrainingParts, state: TrainerState) -> None:
    """What every optimiser update moves: the LR schedule, the EMA, the step counter."""
    parts.lr_scheduler.step()
    parts.ema.step(parts.unet.parameters())
    state.global_step += 1
