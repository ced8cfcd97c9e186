"""The --mask file of inpainting, checked from its header with the flags (sections.InpaintSettings);
what needs the model (its size) is checked once it is loaded."""

from ..util.errors import UsageError

MASKS = ("random_box", "left_half", "center")
MASK_MAX_PIXELS = 4096 * 4096  # a mask is resized to the model's side; more is a decompression bomb, not a mask


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
