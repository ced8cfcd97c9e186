"""A detector fitted once on in-distribution images and deployed: `OODDetector.fit(model, images)` fits a
score on part of the images, scores the held-out rest and sets the threshold that accepts a share `tpr`
of them; `.score(images)` answers (scores, p-values, flags) for any new images. `.save(dir)` writes a
JSON manifest (the score and its settings, the model's weights hash and scheduler, the precision, the
held-out scores, the format version) and the fitted parameters as safetensors; `OODDetector.load(dir)`
refuses a damaged folder, another version, or a model whose weights differ from the fitted one's."""

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..models.loader import load_model, model_format, weights_hash
from ..models.pipeline import LoadedModel
from ..util.errors import DDPMError, UsageError
from ..util.files import is_inside
from ..util.logs import get_logger
from ..util.precision import resolve_mixed_precision
from .network import ScoreModel
from .scores import build_score
from .settings import OODSettings

logger = get_logger(__name__)

FORMAT_VERSION = 1
MANIFEST = "detector.json"
PARAMS = "params.safetensors"
HELD_OUT = 0.2  # share of the fitting images held out for the threshold and the p-values (when none given)


def as_loaded_model(model, device="cpu") -> LoadedModel:
    """A pipeline folder / Hub id / .pt path, a LoadedModel, or a diffusers pipeline object."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(str(model), device=device)
    if hasattr(model, "unet") and hasattr(model, "scheduler"):  # a DDPMPipeline / DDIMPipeline / LDMPipeline
        vae = getattr(model, "vqvae", None)
        return LoadedModel(model.unet.to(device).eval(), dict(model.scheduler.config), vae, {}, "a pipeline object")
    raise UsageError(f"cannot score with {type(model).__name__}: pass a pipeline folder, a Hub id or a pipeline")


def _source(model) -> Optional[str]:
    if isinstance(model, (str, Path)):
        return str(Path(model).resolve()) if Path(model).exists() else str(model)
    return getattr(model, "source", None) or None


def check_images(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise UsageError("images must be a uint8 tensor (N, C, H, W); ddpm_hf.data.sets.load_query_images reads files")
    if len(images) == 0:
        raise UsageError("no images to score")
    if tuple(images.shape[1:]) != (channels, size, size):
        raise UsageError(
            f"images of shape {tuple(images.shape[1:])} do not match the model's ({channels}, {size}, {size}); "
            f"convert them (ddpm_hf.data.sets.load_query_images does, with a notice)"
        )
    return images


def empirical_p_values(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Share of held-out in-distribution scores at least as high (with the +1 of a valid rank p-value)."""
    reference = np.sort(np.asarray(reference, np.float64))
    at_least = len(reference) - np.searchsorted(reference, np.asarray(scores, np.float64), side="left")
    return (1 + at_least) / (1 + len(reference))


class OODDetector:
    def __init__(self, score, model: ScoreModel, manifest: dict):
        self.score_fn, self.model, self.manifest = score, model, manifest
        self.heldout_scores = np.asarray(manifest["heldout_scores"], np.float64)
        self.threshold = float(manifest["threshold"])

    @property
    def format(self) -> tuple:
        return model_format(self.model.loaded)

    @classmethod
    def fit(
        cls,
        pipeline_or_path,
        images: torch.Tensor,
        score: str = "hidden",  # the recommended score (docs/ood.md: every score on every pair)
        heldout: Optional[torch.Tensor] = None,
        tpr: float = 0.95,
        device: str = "cpu",
        settings: Optional[OODSettings] = None,
        **settings_kwargs,
    ) -> "OODDetector":
        """Fit `score` on in-distribution uint8 `images` (N, C, H, W); `heldout` (default: a seeded fifth of
        `images`, never fitted on) sets the threshold accepting `tpr` of it and the p-values."""
        settings = settings or OODSettings(score=score, **settings_kwargs)
        if not 0 < tpr < 1:
            raise UsageError(f"tpr must be in (0, 1), got {tpr}")
        loaded = as_loaded_model(pipeline_or_path, device)
        channels, size = model_format(loaded)
        images = check_images(images, channels, size)
        if heldout is None:
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(settings.seed))
            n_held = max(2, int(round(len(images) * HELD_OUT)))
            images, heldout = images[order[n_held:]], images[order[:n_held]]
        heldout = check_images(heldout, channels, size)
        model = ScoreModel(loaded, device, settings.mixed_precision, settings.seed, settings.batch_size)
        fn = build_score(settings.score, model, settings)
        fn.fit(fn.features(images, "stats"))
        held = fn.score(fn.features(heldout, "in"))
        manifest = {
            "format_version": FORMAT_VERSION,
            "score": settings.score,
            "description": fn.describe(),
            "settings": settings.to_dict(),
            "model": {
                "source": _source(pipeline_or_path),
                "weights_sha256": weights_hash(loaded.unet),
                "scheduler": dict(loaded.scheduler_config),
                "channels": channels,
                "size": size,
            },
            "precision": resolve_mixed_precision(settings.mixed_precision, device) or "no",
            "nfe_per_image": fn.nfe_per_image,
            "columns": fn.columns,
            "fit_images": len(images),
            "tpr": tpr,
            "threshold": float(np.quantile(held, tpr, method="higher")),
            "heldout_scores": [float(v) for v in held],
        }
        return cls(fn, model, manifest)

    def score(self, images: torch.Tensor) -> tuple:
        """(scores, p_values, flags) of uint8 images: flags mark scores above the threshold."""
        images = check_images(images, *self.format)
        scores = self.score_fn.score(self.score_fn.features(images, "query"))
        return scores, empirical_p_values(scores, self.heldout_scores), scores > self.threshold

    def save(self, folder) -> Path:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays, meta = self.score_fn.state()
        save_file({k: np.ascontiguousarray(v, np.float64) for k, v in arrays.items()}, str(folder / PARAMS))
        (folder / MANIFEST).write_text(json.dumps({**self.manifest, "state": meta}, indent=2, default=str))
        return folder

    @classmethod
    def load(cls, folder, pipeline_or_path=None, device: str = "cpu", mixed_precision=None) -> "OODDetector":
        """The detector saved in `folder`, on its own model (the manifest's source) or `pipeline_or_path`,
        which must hold the same weights. `mixed_precision` other than the fit's gets a notice."""
        manifest, arrays = read_detector(folder)
        settings = OODSettings.from_dict(manifest["settings"])
        loaded = as_loaded_model(pipeline_or_path or manifest["model"]["source"], device)
        if weights_hash(loaded.unet) != manifest["model"]["weights_sha256"]:
            raise UsageError(
                f"the detector {folder} was fitted for another model (its weights hash differs from "
                f"{manifest['model']['source']}'s); fit a detector for this model with --fit"
            )
        if mixed_precision is not None:
            used = resolve_mixed_precision(mixed_precision, device) or "no"
            if used != manifest["precision"]:
                logger.warning(
                    f"notice: scoring in precision {used}, the detector was fitted in {manifest['precision']}: "
                    f"scores shift a little against its threshold"
                )
            settings.mixed_precision = mixed_precision
        model = ScoreModel(loaded, device, settings.mixed_precision, settings.seed, settings.batch_size)
        fn = build_score(settings.score, model, settings)
        try:
            fn.load_state(arrays, manifest.get("state", {}))
        except (KeyError, ValueError, TypeError) as err:
            raise DDPMError(
                f"the detector {folder} is damaged ({PARAMS} does not fit its score: {err}); fit it again"
            ) from None
        return cls(fn, model, manifest)


REQUIRED = ("format_version", "score", "settings", "model", "precision", "threshold", "heldout_scores")


def read_detector(folder) -> tuple:
    """(manifest, fitted arrays) of a detector folder; one line for a missing, damaged or foreign one."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    advice = "fit the detector again with ood_ddpm.py --fit"
    if not (folder / MANIFEST).is_file():
        raise UsageError(f"{folder} is not a detector folder (no {MANIFEST}); {advice}")
    for name in (MANIFEST, PARAMS):  # a link out would have any file (a device, someone's secrets) read as ours
        if not is_inside(folder, folder / name):
            raise UsageError(
                f"{folder / name} is a link leading outside {folder} (to {os.path.realpath(folder / name)}); "
                f"a detector folder holds its own files: copy the file in, or {advice}"
            )
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DDPMError(f"{folder / MANIFEST} is damaged (not JSON: {err}); {advice}") from None
    missing = [k for k in REQUIRED if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise DDPMError(f"{folder / MANIFEST} is damaged (missing {', '.join(missing)}); {advice}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise UsageError(
            f"{folder} is a detector of format version {manifest['format_version']}; this ddpm-hf reads version "
            f"{FORMAT_VERSION}; {advice}"
        )
    try:
        arrays = load_file(str(folder / PARAMS))
    except Exception as err:
        raise DDPMError(f"{folder / PARAMS} is missing or damaged ({type(err).__name__}); {advice}") from None
    return manifest, arrays
