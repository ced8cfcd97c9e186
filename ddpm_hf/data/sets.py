"""Image sets at a model's format: the evaluated splits, the in-distribution training images that
fit a detector (never the scored ones), and the images a saved detector is asked about (a folder, a
file, a glob or a Hub dataset id), each converted to the model's channels and size with a notice."""

import glob
import hashlib
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from ..config.sections import DataSettings
from ..util.errors import DDPMError, UsageError
from ..util.hub_access import is_hub_id
from ..util.logs import get_logger
from .images import is_gray, load_images, pil_to_array, resolve_spec

logger = get_logger(__name__)


def native_format(name: str, split: str, data: DataSettings):
    """(channels, size) a dataset has before conversion: the registry's, else its first image's."""
    spec = resolve_spec(name)
    if spec.channels:
        return spec.channels, spec.size
    first = load_images(name, split, data.without_format(), limit=1, progress=False)
    return first.channels, first.size


def load_set(name: str, split: str, data: DataSettings, channels: int, size: int, limit, role: str):
    """uint8 images at the model's format (not --size/--channels), with a notice when the dataset had to
    be converted. `data`: the rest of loading (its --size/--channels are not used)."""
    data = data.without_format()
    _conversion_notice(f"{role} set {name}", native_format(name, split, data), channels, size)
    return load_images(name, split, data, size=size, channels=channels, limit=limit, progress=False).images


def load_stats_images(
    dataset: str, data: DataSettings, stats_samples: int, channels, size, evaluated: torch.Tensor
) -> torch.Tensor:
    """`stats_samples` in-distribution training images, none of them equal to an evaluated image
    (a flat image folder has one split, so its train and test splits are the same images)."""
    seen = {hashlib.sha1(img.numpy().tobytes()).digest() for img in evaluated}
    pool = load_set(dataset, "train", data, channels, size, stats_samples + len(evaluated), "statistics")
    keep = [i for i, img in enumerate(pool) if hashlib.sha1(img.numpy().tobytes()).digest() not in seen][:stats_samples]
    if len(keep) < 2:
        raise UsageError(
            f"--recon_factors needs in-distribution images that are not scored for its statistics, "
            f"but {dataset} has none left; lower --max_samples or use a dataset with a train split"
        )
    return pool[keep]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _query_files(spec: str) -> List[Path]:
    """The image files a folder (recursively), a file or a glob names, sorted; [] for none."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        candidates = path.rglob("*")
    else:
        candidates = (Path(p) for p in glob.glob(spec, recursive=True))
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _conversion_notice(what: str, native: Tuple[int, int], channels: int, size: int) -> None:
    native_c, native_s = native
    if native_c != channels:
        how = "converted to grayscale" if channels == 1 else "grayscale repeated to RGB"
        logger.warning(f"notice: {what} has {native_c}-channel images; {how} for the {channels}-channel model")
    if native_s != size:
        how = "shrunk" if native_s > size else "enlarged"
        logger.warning(f"notice: {what} has {native_s} px images; {how} to the model's {size} px")


def load_query_images(spec: str, channels: int, size: int, data: Optional[DataSettings] = None) -> tuple:
    """(names, uint8 images (N, C, size, size)) of the images a detector is asked about: a folder, an image
    file, a glob or a Hub dataset id (its test split). Images of another format are converted with a notice;
    an empty selection or an unreadable file is one line."""
    files = _query_files(spec)
    if not files:
        if is_hub_id(spec) and not os.path.exists(spec):
            images = load_set(spec, "test", data or DataSettings(), channels, size, None, "the image set")
            return [f"{spec}[{i}]" for i in range(len(images))], images
        if os.path.isdir(spec):
            raise UsageError(f"image folder {spec} holds no images ({', '.join(IMAGE_SUFFIXES)}); put images in it")
        raise UsageError(
            f"--images {spec} matches no image file; pass a folder, an image file, a glob or a Hub dataset id"
        )
    arrays, formats = [], set()
    for f in files:
        try:
            with Image.open(f) as img:
                formats.add((1 if is_gray(img.mode) else 3, min(img.size)))
                arrays.append(pil_to_array(img, channels, size))
        except Exception as err:
            raise DDPMError(f"cannot read image {f} ({type(err).__name__}); remove it or replace it") from None
    for native in sorted(formats):
        _conversion_notice(f"--images {spec}", native, channels, size)
    return [str(f) for f in files], torch.from_numpy(np.stack(arrays))
