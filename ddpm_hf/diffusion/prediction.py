"""What the UNet predicts, turned into the quantities the likelihood and inpainting code need.

A pipeline's scheduler config carries `prediction_type` (epsilon, v_prediction or sample;
older pipelines have none and predict epsilon). diffusers' formulas, with a = alphas_cumprod[t]:
x_t = sqrt(a) x0 + sqrt(1-a) eps, v = sqrt(a) eps - sqrt(1-a) x0.
"""

import torch

from ..config.options import PREDICTION_TYPES


def prediction_type(scheduler_config: dict) -> str:
    kind = scheduler_config.get("prediction_type", "epsilon") or "epsilon"
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {kind!r} in the scheduler config")
    return kind


def _broadcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-image (B,) or scalar coefficient shaped to multiply (B, C, H, W)."""
    a = torch.as_tensor(a, dtype=like.dtype, device=like.device)
    return a.reshape(-1, *([1] * (like.dim() - 1))) if a.dim() else a


def to_x0(output: torch.Tensor, x_t: torch.Tensor, alpha_bar, kind: str) -> torch.Tensor:
    """The model's estimate of x0 from its raw output at x_t."""
    a = _broadcast(alpha_bar, x_t)
    if kind == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * output
    if kind == "sample":
        return output
    raise ValueError(f"unknown prediction_type {kind!r}")


def to_epsilon(output: torch.Tensor, x_t: torch.Tensor, alpha_bar, kind: str) -> torch.Tensor:
    """The model's estimate of the noise (what RePaintScheduler.step expects) from its raw output."""
    a = _broadcast(alpha_bar, x_t)
    if kind == "epsilon":
        return output
    if kind == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    if kind == "sample":
        return (x_t - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction_type {kind!r}")
