"""Checks of the likelihood / inpainting / feature-metric flags, kept apart from config.validate
(one line each, exit code 2); what needs the model (T, pixel space) is checked once it is loaded."""

import os

from ..util.errors import UsageError

MASKS = ("random_box", "left_half", "center")
MASK_MAX_PIXELS = 4096 * 4096  # a mask is resized to the model's side; more is a decompression bomb, not a mask


def validate_features(cfg) -> None:
    modes = [flag for flag in ("fid", "nll", "inpaint") if getattr(cfg, flag)]
    if len(modes) > 1:
        raise UsageError(f"--{' and --'.join(modes)} are different runs of the sample command; pass only one of them")
    if cfg.nll_timesteps is not None and cfg.nll_timesteps < 3:
        raise UsageError(
            "--nll_timesteps must be at least 3 (L_0 and two sampled KL terms, for a standard error), got "
            f"{cfg.nll_timesteps}"
        )
    for name in ("jump_length", "jump_n_sample"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.mask not in MASKS and not (cfg.mask.lower().endswith(".png") and os.path.isfile(cfg.mask)):
        raise UsageError(f"--mask must be one of {', '.join(MASKS)} or an existing .png file, got {cfg.mask!r}")
    if cfg.mask not in MASKS:
        check_mask_file(cfg.mask)
    if not cfg.dinov2_model.strip():
        raise UsageError("--dinov2_model must be a Hub id (facebook/dinov2-base) or a local folder")


def check_mask_file(path: str) -> None:
    """A --mask file is an image of sane size, read from its header before any model is loaded: a file
    that is not an image, or a decompression bomb (a small PNG of 40000x40000 pixels), is one line."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap below decides
            with Image.open(path) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        width = height = None
    except Exception as err:
        raise UsageError(
            f"--mask {path} is not an image ({type(err).__name__}); pass a PNG, white = keep, black = inpaint"
        ) from None
    if width is None or width * height > MASK_MAX_PIXELS:
        shape = f"{width}x{height} pixels" if width else "larger than PIL decodes"
        raise UsageError(
            f"--mask {path} is {shape}, more than a mask may have ({MASK_MAX_PIXELS:,} pixels, e.g. 4096x4096); "
            f"it is resized to the model's size: save it at that size"
        )
