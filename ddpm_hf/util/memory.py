"""Memory estimates checked before allocating: a batch or a decoded data set that cannot fit is one line
naming the flag to change, instead of a minutes-long swap storm, an OOM kill or a 40 GB allocation error.

The estimates err low (a refusal is certain to be needed; what passes may still run out, and run_cli
turns that into one line too): images are counted at their stored size, UNet activations as a few
float32 tensors per resolution level (more when training keeps them for the backward pass).
"""

from typing import Optional

from .errors import UsageError


def available_memory(device="cpu") -> Optional[int]:
    """Bytes free for tensors on `device`: the GPU's free memory, or the host's available RAM (None: unknown)."""
    if str(device).startswith("cuda"):
        import torch

        try:
            return torch.cuda.mem_get_info(torch.device(device))[0]
        except Exception:
            return None
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def gb(n: float) -> str:
    return f"{n / 1e12:,.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def unet_batch_bytes(unet_config, batch: int, size: int, training: bool = False) -> int:
    """A low estimate of the activations of one UNet2DModel call on `batch` images of side `size`."""
    channels = list(unet_config.get("block_out_channels") or (64,))
    per_block = int(unet_config.get("layers_per_block") or 1)
    total = 0
    for level, width in enumerate(channels):
        side = max(size >> level, 1)
        # inference: the skip connections and two working tensors; training: every resnet's inner tensors
        tensors = (2 * per_block + 1) * 6 if training else per_block + 3
        total += tensors * width * side * side  # attention matrices left out: fused kernels never hold them
    return 4 * batch * total


def refuse_if_too_big(need: int, device, what: str, advice: str) -> None:
    """UsageError when `need` bytes exceed what `device` has free."""
    free = available_memory(device)
    if free is not None and need > free:
        where = "GPU memory" if str(device).startswith("cuda") else "memory"
        raise UsageError(f"{what} needs about {gb(need)} of {where} but {gb(free)} is available; {advice}")
