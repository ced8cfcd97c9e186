"""The seed's losses on predicted noise (training) and on reconstructions (OOD)."""

import torch
import torch.nn.functional as F


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str) -> torch.Tensor:
    """huber = smooth L1 with beta 1 (the original's), l2 = squared error, l1 = absolute error."""
    if loss_type == "huber":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    raise ValueError(f"unknown loss_type {loss_type}")


def per_image_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Mean over C, H, W: one value per image."""
    return elementwise_loss(pred, target, loss_type).flatten(1).mean(1)


def prediction_target(noise_scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output under the scheduler's prediction type."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind}")


def min_snr_weights(noise_scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) per-image weights on the loss of the scheduler's prediction type:
    min(SNR, gamma) on the clean-image error, i.e. min(SNR, gamma) / SNR on the noise error and
    min(SNR, gamma) / (SNR + 1) on the velocity error."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr.clamp(min=1e-12)  # zero-SNR steps weigh like the others (limit 1)
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped
