"""`ddpm_hf.train(cfg)`: a training run from the Python API, checked as the command checks it."""

from pathlib import Path

from ..config.options import DDPMConfig
from ..config.sections import validate


def train(cfg: DDPMConfig) -> Path:
    """Train as `ddpm-hf train` (train_ddpm.py) does: the same checks first (a bad value raises the
    command's UsageError line), then the Trainer with the sections it reads. Returns the output folder
    (a diffusers pipeline)."""
    from ..training.trainer import TRAINER_SECTIONS, Trainer

    sections = validate(cfg)
    return Trainer(**sections.pick(*TRAINER_SECTIONS), settings=cfg.to_dict()).run()
