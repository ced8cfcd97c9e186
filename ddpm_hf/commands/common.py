"""What the commands share: where their output goes by default, and how the device is readied."""

from pathlib import Path

from ..util.host_memory import keep_freed_memory
from ..util.precision import warn_if_bf16_emulated


def default_sample_dir(checkpoint) -> Path:
    """samples/<checkpoint name>: where sample_ddpm.py (and --nll, --inpaint) write without --output_dir."""
    return Path(f"samples/{Path(str(checkpoint).rstrip('/')).stem}")


def ready_device(mixed_precision, device) -> None:
    """Once a command's inputs are checked (a bad input still gets its one line first): the notice of
    an emulated bf16, and on a CPU the host memory policy (ddpm_hf/util/host_memory.py: at batch 128 the
    sampler's page faults cost ~1/5 of its time)."""
    warn_if_bf16_emulated(mixed_precision, device)
    chosen = keep_freed_memory(device)
    if chosen:
        print(chosen)
