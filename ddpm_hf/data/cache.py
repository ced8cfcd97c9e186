"""Decoded training images on disk: one memory-mapped uint8 file per split and format, shared by the
processes of a run and reused by later runs (docs/training.md, section "Decoded images on disk").

A file is named after what it holds (dataset, split, size, channels and a digest of the rest of its
key) and starts with a header: MAGIC, the header's length, and JSON with the whole key, which adds
the source's identity (a folder's file names, sizes and modification times, or datasets'
fingerprint), and the shape. The pixels, (N, C, size, size) uint8, start at HEADER_BYTES.

It is built once, under a lock beside it (`util.lock.waiting_lock`): the other processes of a run
wait, then open the finished file read-only. The builder decodes a chunk at a time, written with
plain writes (not through a mapping, whose pages would count in its memory), into a temporary file
renamed into place whole. A file of another key (the source changed), a damaged one (a bad header, a
size that does not match), a link or a hard link is rebuilt with a notice, never written through.
"""

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config.sections import DataSettings
from ..util.errors import DDPMError, UsageError, short
from ..util.files import atomic_write, free_bytes, open_own, remove_stale_temporaries
from ..util.lock import waiting_lock
from ..util.logs import get_logger
from .images import ImageData, SplitSource, load_images, prepare_split

logger = get_logger(__name__)

MAGIC = b"DDPMIMG\x00"
FORMAT_VERSION = 1
HEADER_BYTES = 64 << 10  # room for the key (a folder path may be 4 KiB long); the pixels start page-aligned
ADVICE = "free some space, or choose another --cache_dir"


def default_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "ddpm_hf" / "images"


def cache_key(source: SplitSource, data: DataSettings, limit: Optional[int]) -> dict:
    """Everything the decoded pixels depend on; `identity` is the source's content, the rest its location."""
    is_folder = os.path.isdir(source.name)
    crop = data.crop
    return dict(
        dataset=str(Path(source.name).resolve()) if is_folder else source.name,
        config=data.dataset_config_name,
        image_column=source.column,
        split=source.split,
        size=source.size,
        channels=source.channels,
        max_train_samples=limit,
        crop=crop if source.crop_seed is None else f"{crop}:{source.crop_seed}",
        version=FORMAT_VERSION,
        identity=source.files_digest() if is_folder else source.fingerprint,
    )


def cache_path(folder: Path, key: dict) -> Path:
    """One file per location: a changed source rebuilds its file instead of leaving the old one behind."""
    location = {k: v for k, v in key.items() if k != "identity"}
    digest = hashlib.sha256(json.dumps(location, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(key["dataset"]).name).strip("-") or "dataset"
    return folder / f"{slug[:40]}_{key['split']}_{key['size']}px_{key['channels']}ch_{digest}.u8"


def _read_header(fd: int) -> dict:
    head = os.pread(fd, 16, 0)
    if len(head) < 16 or head[:8] != MAGIC:
        raise ValueError("not an image cache file (bad magic)")
    length = int.from_bytes(head[8:16], "little")
    if not 0 < length <= HEADER_BYTES - 16:
        raise ValueError("bad header length")
    return json.loads(os.pread(fd, length, 16).decode("utf-8"))


def _problem(fd: int, key: dict) -> Optional[str]:
    """Why the open cache file `fd` is not an intact one of `key`, or None."""
    try:
        header = _read_header(fd)
        shape = tuple(header["shape"])
        expected = HEADER_BYTES + int(np.prod(shape))
        if header["key"] != key:
            return "holds another version of the data (the source changed)"
        if len(shape) != 4 or os.fstat(fd).st_size != expected:
            return f"is damaged ({os.fstat(fd).st_size} bytes where its header says {expected})"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"is damaged ({short(err, 80)})"
    return None


def _open_intact(path: Path, key: dict) -> tuple:
    """(pixels, header) of an intact cache file of `key` at `path`, or (None, why not; None: no file)."""
    if path.is_symlink():
        return None, "is a symbolic link (replaced by a file, never written through)"
    try:
        fd = open_own(path, os.O_RDONLY)  # O_NOFOLLOW: a link planted since the check is not followed either
    except FileNotFoundError:
        return None, None
    except (OSError, DDPMError) as err:
        return None, f"is not a file of its own ({short(err, 80)})"
    try:
        problem = _problem(fd, key)
        if problem:
            return None, problem
        header = _read_header(fd)
        # mode "c" (copy on write) maps the file read-only on disk; torch.from_numpy accepts it (it warns
        # for mode "r"), and a stray in-place write would change this process's pages, never the file.
        with os.fdopen(os.dup(fd), "rb") as f:
            pixels = np.memmap(f, dtype=np.uint8, mode="c", offset=HEADER_BYTES, shape=tuple(header["shape"]))
        return torch.from_numpy(pixels), header
    finally:
        os.close(fd)


def _write(tmp: Path, source: SplitSource, key: dict, progress: bool) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.seek(HEADER_BYTES)
        count = 0
        for chunk in source.chunks(progress):
            f.write(np.ascontiguousarray(chunk).data)
            count += len(chunk)
        if not count:
            raise DDPMError(f"no readable images in dataset {source.name} ({source.split} split)")
        shape = [count, source.channels, source.size, source.size]
        header = json.dumps(dict(key=key, shape=shape, skipped=source.skipped, decided_by=source.decided_by))
        if len(header) > HEADER_BYTES - 16:
            raise DDPMError(f"the image cache's key is too long ({len(header)} bytes); use a shorter dataset path")
        f.seek(0)
        f.write(MAGIC + len(header.encode()).to_bytes(8, "little") + header.encode())
        f.flush()
        os.fsync(f.fileno())  # the rename below publishes whole pixels, after a power cut too


class CacheUnavailable(Exception):
    """The cache folder cannot take the file (read-only, full): training decodes into memory instead."""


def _build(path: Path, source: SplitSource, key: dict, progress: bool) -> None:
    need = HEADER_BYTES + len(source) * source.channels * source.size**2
    free = free_bytes(path.parent)
    if free < need:
        raise CacheUnavailable(f"{need / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")
    remove_stale_temporaries(path)  # left by a killed build (the lock is ours now)
    # whichever process holds the lock builds the file: it says so, main process or not
    logger.info(f"decoding {len(source)} images of {source.name} into the image cache {path}", main_process_only=False)
    try:
        atomic_write(path, lambda tmp: _write(Path(tmp), source, key, progress), "the decoded images", ADVICE)
    except DDPMError as err:
        if err.__cause__ is None:  # about the data (no readable image), not about the disk
            raise
        raise CacheUnavailable(short(err.__cause__, 160)) from err


def cached_images(
    name: str,
    split: str,
    data: DataSettings,
    size: Optional[int] = None,
    channels: Optional[int] = None,
    limit: Optional[int] = None,
    progress: bool = True,
    seed: int = 0,
    exclude: Optional[str] = None,
) -> ImageData:
    """The split as `load_images` decodes it, with the images a uint8 tensor mapped from the cache
    file (decoded into it first when it is missing or stale) in --cache_dir: indexing it reads only
    those images."""
    source = prepare_split(name, split, data, size, channels, limit, seed, exclude)
    key = cache_key(source, data, limit)
    chosen = data.cache_dir
    folder = Path(chosen or default_cache_dir()).expanduser()
    try:
        images, header = _open_or_build(cache_path(folder, key), source, key, progress)
    except (OSError, CacheUnavailable) as err:
        reason = getattr(err, "strerror", None) or short(err, 160)
        if chosen:
            raise UsageError(
                f"cannot keep the decoded images in --cache_dir {folder} ({reason}); choose a writable folder with room"
            ) from None
        logger.warning(  # the default folder only saves memory: without it, training decodes as it always could
            f"warning: cannot keep the decoded images in {folder} ({reason}); decoding them into memory instead "
            f"(set --cache_dir to a writable folder with space)"
        )
        return load_images(name, split, data, size, channels, limit, progress, seed, exclude)
    return ImageData(
        images, source.channels, source.size, name, header["skipped"], source.decided_by, source.first_image
    )


def _open_or_build(path: Path, source: SplitSource, key: dict, progress: bool) -> tuple:
    """(pixels, header) of the cache file, built first (by this process or, while it waits, another)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images, header_or_problem = _open_intact(path, key)
    if images is None:
        with waiting_lock(path.with_name(f".{path.name}.lock")):
            images, header_or_problem = _open_intact(path, key)  # another process may have built it meanwhile
            if images is None:
                if header_or_problem:
                    logger.warning(
                        f"notice: the image cache {path} {header_or_problem}; rebuilding it", main_process_only=False
                    )
                _build(path, source, key, progress)
                images, header_or_problem = _open_intact(path, key)
    if images is None:
        raise DDPMError(f"the image cache {path} {header_or_problem} right after it was written; {ADVICE}")
    return images, header_or_problem
