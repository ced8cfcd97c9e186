"""Checks of the likelihood / inpainting / feature-metric flags, kept apart from config.validate
(one line each, exit code 2); what needs the model (T, pixel space) is checked once it is loaded."""

import os

from ..util.errors import UsageError

MASKS = ("random_box", "left_half", "center")


def validate_features(cfg) -> None:
    modes = [flag for flag in ("fid", "nll", "inpaint") if getattr(cfg, flag)]
    if len(modes) > 1:
        raise UsageError(f"--{' and --'.join(modes)} are different runs of the sample command; pass only one of them")
    if cfg.nll_timesteps is not None and cfg.nll_timesteps < 3:
        raise UsageError(
            f"--nll_timesteps must be at least 3 (L_0 and two sampled KL terms, for a standard error), got {cfg.nll_timesteps}"
        )
    for name in ("jump_length", "jump_n_sample"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.mask not in MASKS and not (cfg.mask.lower().endswith(".png") and os.path.isfile(cfg.mask)):
        raise UsageError(f"--mask must be one of {', '.join(MASKS)} or an existing .png file, got {cfg.mask!r}")
    if not cfg.dinov2_model.strip():
        raise UsageError("--dinov2_model must be a Hub id (facebook/dinov2-base) or a local folder")
