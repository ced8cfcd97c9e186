"""What the commands share: the process-wide settings of their start, where their output goes by
default, and how the device is readied."""

import os
from pathlib import Path

from ..util import host_memory
from ..util.hub_access import check_cache_folders
from ..util.logs import get_logger
from ..util.precision import warn_if_bf16_emulated

logger = get_logger(__name__)


def default_output_dir(root: str, checkpoint) -> Path:
    """ROOT/<checkpoint name>: where a command writes without --output_dir."""
    return Path(root) / Path(str(checkpoint).rstrip("/")).stem


def default_sample_dir(checkpoint) -> Path:
    """samples/<checkpoint name>: where sample_ddpm.py (and --nll, --inpaint) write without --output_dir."""
    return default_output_dir("samples", checkpoint)


def command_device() -> str:
    """Where a command will compute: a GPU if there is one (and Accelerate is not told to use the CPU)."""
    import torch

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"


def compute_device(device=None) -> str:
    """`device` when the caller gives one, else a GPU if there is one: where sample_ddpm.py and ood_ddpm.py
    run (unlike command_device, ACCELERATE_USE_CPU is not read here)."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def start_command() -> None:
    """What a command sets for its whole process, once its flags are parsed; never a library call, so a
    program that imports the package keeps its own settings. On a CPU: glibc keeps freed blocks for reuse
    (util/host_memory.py: at batch 128 the sampler's page faults cost ~1/5 of its time, training's more).
    A cache folder that is a file is refused first, naming its variable."""
    check_cache_folders()
    host_memory.keep_freed_memory(command_device())


def ready_device(mixed_precision, device) -> None:
    """Once a command's inputs are checked (a bad input still gets its one line first): the notice of
    an emulated bf16, and the host memory policy that start_command set, if any."""
    warn_if_bf16_emulated(mixed_precision, device)
    chosen = host_memory.applied()
    if chosen:
        logger.info(chosen)


def data_settings(cfg, keep_format: bool = True):
    """The data section of `cfg`; keep_format=False drops --size/--channels (a loaded model decides them)."""
    from ..config.sections import Sections

    data = Sections.of(cfg).data
    return data if keep_format else data.without_format()


def original_flags(cfg):
    """What an original .pt checkpoint is read with (it records no flags): the run's data, model,
    diffusion and latent sections, and every flag's value for the converted model's record."""
    from ..config.sections import Sections
    from ..models.convert_gzoo import OriginalFlags

    sections = Sections.of(cfg)
    return OriginalFlags(sections.data, sections.model, sections.diffusion, sections.latent, record=cfg.to_dict())


def load_checkpoint_model(cfg, device):
    """--checkpoint (and --revision) loaded on `device`: a pipeline folder, a Hub id or an original .pt."""
    from ..models.loader import load_model

    return load_model(cfg.checkpoint, original_flags(cfg), revision=cfg.revision, device=device)
