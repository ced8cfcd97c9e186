"""What the commands share: where their output goes by default."""

from pathlib import Path


def default_sample_dir(checkpoint) -> Path:
    """samples/<checkpoint name>: where sample_ddpm.py (and --nll, --inpaint) write without --output_dir."""
    return Path(f"samples/{Path(str(checkpoint).rstrip('/')).stem}")
