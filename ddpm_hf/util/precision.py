"""The precision policy: where bf16 is native, what --mixed_precision auto means, the autocast of
sampling and scoring, and the notice when an explicit bf16 will be slower than fp32."""

import contextlib
import time

import torch

from .logs import get_logger

logger = get_logger(__name__)


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
    return torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    )


def bf16_slowdown(device, size: int = 256, repeats: int = 5) -> float:
    """How many times slower a bf16 matmul is than an fp32 one on `device`, measured now (best of
    `repeats`; ~0.1 s on a CPU that emulates bf16)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device)

    def best(x) -> float:
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            x @ x
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    best(a)  # warm-up: the first call loads the kernels
    return best(a.bfloat16()) / max(best(a), 1e-9)


def warn_if_bf16_emulated(mixed_precision, device) -> None:
    """An explicit --mixed_precision bf16 on a device without native bf16: one notice with the measured
    slowdown (`auto` would have picked fp32 there)."""
    if mixed_precision != "bf16" or native_bf16(device):
        return
    slower = bf16_slowdown(device)
    where = "this CPU has no AVX512-BF16/AMX" if torch.device(device).type == "cpu" else "this GPU has no native bf16"
    logger.warning(
        f"notice: --mixed_precision bf16 is emulated here ({where}): a bf16 matmul measured {slower:.1f}x slower "
        "than fp32 "
        f"just now; --mixed_precision auto (or no) runs fp32 here"
    )
