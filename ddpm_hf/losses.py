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
