"""The OOD scores, each a small class registered by name (`--score NAME`): `features(images, stream)`
computes per-image statistics with the network, `fit(features)` learns what in-distribution *training*
images look like, `score(features)` gives the anomaly score (higher = more anomalous). A new score is a
new class here; neither the command nor the detector changes.

recon   the reconstruction error (the original; several levels: the mean of their z-scores)
nll     the variational bound in bits/dim
both    the mean z-score of recon and nll
path    DiffPath statistics of the DDIM-inversion path, under a Gaussian mixture
msma    noise-prediction norms at several noise levels, under a Gaussian mixture
fused   one mixture over the recon, path and msma statistics together
patch   position-aware: the denoising error and the predicted noise per patch at several noise levels,
        under a mixture (flips, rotations and shifts keep every global moment, but move the patches)
hidden  position-aware: the UNet decoder's own activations, per channel on a coarse grid of patches, at
        one noise level (one network evaluation), under a mixture: what the network recognises, and where
"""

from typing import Dict, List

import numpy as np
import torch
from tqdm.auto import tqdm

from .density import Density
from .network import (
    STREAMS,
    ScoreModel,
    hidden_activations,
    hidden_block,
    msma_levels,
    noise_predictions,
    path_statistics,
    pool_map,
    spaced_timesteps,
)

SCORES: Dict[str, type] = {}


def register(cls):
    SCORES[cls.name] = cls
    return cls


def build_score(name: str, model: ScoreModel, settings) -> "Score":
    return SCORES[name](model, settings)


def zscores(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (values - mean) / np.maximum(std, 1e-12)


class Score:
    """A score: per-image features, fitted on in-distribution training features, scored on any."""

    name = ""
    uses_density = False
    needs_training_images = True  # whether `fit` learns anything (else training images are not loaded)

    def __init__(self, model: ScoreModel, settings):
        self.model, self.settings = model, settings
        self.fitted: Dict[str, np.ndarray] = {}

    @property
    def columns(self) -> List[str]:
        raise NotImplementedError

    @property
    def nfe_per_image(self) -> int:
        raise NotImplementedError

    def features(self, images: torch.Tensor, stream: str) -> np.ndarray:
        raise NotImplementedError

    def fit(self, features: np.ndarray) -> None:
        raise NotImplementedError

    def score(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    # the fitted state: plain arrays (safetensors) and a few JSON values
    def state(self) -> tuple:
        return dict(self.fitted), {}

    def load_state(self, arrays: Dict[str, np.ndarray], meta: dict) -> None:
        self.fitted = {k: np.asarray(v, np.float64) for k, v in arrays.items()}


class DensityScore(Score):
    """A score whose anomaly is the negative log-likelihood of its features under a mixture."""

    uses_density = True

    def fit(self, features: np.ndarray) -> None:
        self.density = Density.fit(features, seed=self.settings.seed)

    def score(self, features: np.ndarray) -> np.ndarray:
        return self.density.nll(features)

    def state(self) -> tuple:
        return self.density.to_arrays(), self.density.describe()

    def load_state(self, arrays, meta) -> None:
        self.density = Density.from_arrays(arrays, meta["covariance_type"])


@register
class ReconScore(Score):
    name = "recon"

    def __init__(self, model, settings):
        super().__init__(model, settings)
        from . import scoring

        self.sampler, self.levels = scoring.plan_levels(
            settings.recon_factors, model.scheduler_config, settings.sample_timesteps
        )
        lpips_model = scoring.load_lpips(device=model.device) if settings.lpips else None
        self.scorer = scoring.Scorer(model.loaded, self.levels, self.sampler, settings, lpips_model, model.device)

    @property
    def needs_training_images(self):
        return self.settings.recon_zscore

    @property
    def columns(self):
        kinds = ["recon_error"] + (["lpips"] if self.settings.lpips else [])
        tags = ["" if len(self.levels) == 1 else f"@{lv.factor:g}" for lv in self.levels]
        return [f"{k}{tag}" for tag in tags for k in kinds]

    @property
    def nfe_per_image(self):
        return self.settings.recon_draws * sum(len(lv.timesteps) for lv in self.levels)

    def features(self, images, stream):
        batches = -(-len(images) // self.settings.batch_size)
        with tqdm(total=batches, desc=f"scoring: reconstruction ({self.nfe_per_image} NFE/image)", unit="batch") as bar:
            raw = self.scorer.score(images, stream, bar)
        parts = [raw[k] for k in ("recon_error", "lpips") if k in raw]  # each (L, N)
        return np.stack(parts, 1).reshape(len(self.levels) * len(parts), -1).T  # columns: level by level

    def fit(self, features):
        self.fitted = {"mean": features.mean(0), "std": features.std(0, ddof=1)}

    def score(self, features):
        if not self.settings.recon_zscore:  # the original: error (+ LPIPS) at its one level
            return features.sum(1)
        return zscores(features, self.fitted["mean"], self.fitted["std"]).mean(1)

    def describe(self):
        s = self.settings
        parts = "reconstruction error" + (" and LPIPS" if s.lpips else "")
        draws = f", each the mean of {s.recon_draws} noise draws" if s.recon_draws > 1 else ""
        factors = " ".join(f"{f:g}" for f in s.recon_factors)
        if not s.recon_zscore:
            return f"{s.loss_type} {parts.replace(' and ', ' + ')} at recon_factor {factors}{draws}"
        return f"mean z-score of the {s.loss_type} {parts} at recon_factors {factors}{draws}"


@register
class NLLScore(Score):
    name = "nll"
    columns = ["nll_bpd", "nll_se"]
    needs_training_images = False

    def __init__(self, model, settings):
        super().__init__(model, settings)
        from ..diffusion.likelihood import check_nll_timesteps, refuse_latent

        refuse_latent(model.loaded, f"--score {settings.score}")
        check_nll_timesteps(settings.nll_timesteps, model.T)
        self.results = {}  # stream -> the bits_per_dim result (its summary goes into reports)

    @property
    def nfe_per_image(self):
        return self.model.T if self.settings.nll_timesteps is None else min(self.settings.nll_timesteps, self.model.T)

    def features(self, images, stream):
        from ..diffusion.likelihood import bits_per_dim, unet_model_fn

        m = self.model
        result = bits_per_dim(
            unet_model_fn(m.unet, m.mixed_precision, m.device),
            m.scheduler_config,
            images,
            self.settings.batch_size,
            self.settings.seed,
            self.settings.nll_timesteps,
            stream=10 + STREAMS[stream],
            desc=f"bits/dim of the {stream} set",
            device=m.device,
        )
        self.results[stream] = result
        return np.stack([result["bpd"], result["se"]], 1)

    def fit(self, features):
        self.fitted = {"mean": features[:, :1].mean(0), "std": features[:, :1].std(0, ddof=1)}

    def score(self, features):
        return features[:, 0]

    def describe(self):
        K = self.nfe_per_image
        return f"variational bound in bits/dim ({K} of {self.model.T} timesteps)"


class CompositeScore(Score):
    """A score over the features of several parts (their columns side by side)."""

    parts_names: tuple = ()

    def __init__(self, model, settings):
        super().__init__(model, settings)
        self.parts = [SCORES[name](model, settings) for name in self.parts_names]

    @property
    def columns(self):
        return [c for p in self.parts for c in p.columns]

    @property
    def nfe_per_image(self):
        return sum(p.nfe_per_image for p in self.parts)

    def features(self, images, stream):
        return np.concatenate([p.features(images, stream) for p in self.parts], 1)

    def split(self, features) -> List[np.ndarray]:
        edges = np.cumsum([len(p.columns) for p in self.parts])[:-1]
        return np.split(features, edges, axis=1)

    def fit_parts(self, features) -> None:
        for p, f in zip(self.parts, self.split(features)):
            p.fit(f)

    def part_scores(self, features) -> Dict[str, np.ndarray]:
        """Each part's own score of the same images (the reports compare them with the composite's)."""
        return {p.name: p.score(f) for p, f in zip(self.parts, self.split(features))}

    def state(self):
        arrays, meta = super().state()
        for p in self.parts:
            part_arrays, part_meta = p.state()
            arrays.update({f"{p.name}.{k}": v for k, v in part_arrays.items()})
            meta[p.name] = part_meta
        return arrays, meta

    def load_state(self, arrays, meta):
        super().load_state({k: v for k, v in arrays.items() if "." not in k}, meta)
        for p in self.parts:
            prefix = f"{p.name}."
            p.load_state({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}, meta[p.name])


@register
class BothScore(CompositeScore):
    name = "both"
    parts_names = ("recon", "nll")

    def _stacked(self, features) -> np.ndarray:
        return np.stack(list(self.part_scores(features).values()), 1)

    def fit(self, features):
        self.fit_parts(features)
        s = self._stacked(features)
        self.fitted = {"mean": s.mean(0), "std": s.std(0, ddof=1)}

    def score(self, features):
        return zscores(self._stacked(features), self.fitted["mean"], self.fitted["std"]).mean(1)

    def describe(self):
        recon, nll = self.parts
        return f"mean z-score of the {nll.describe()} and the reconstruction score ({recon.describe()})"


@register
class PathScore(DensityScore):
    name = "path"
    columns = [f"path_{kind}_m{k}" for kind in ("eps", "deps") for k in (1, 2, 3)]

    @property
    def nfe_per_image(self):
        return self.settings.path_steps

    def features(self, images, stream):
        steps = self.settings.path_steps

        def fn(x0, gen):
            return path_statistics(self.model, x0, steps)

        return self.model.batched(images, fn, stream, f"scoring: DDIM inversion ({steps} NFE/image)")

    def describe(self):
        return f"DiffPath statistics of a {self.settings.path_steps}-step DDIM inversion under a Gaussian mixture"


@register
class MSMAScore(DensityScore):
    name = "msma"

    @property
    def timesteps(self):
        return msma_levels(self.model, self.settings.msma_levels)

    @property
    def columns(self):
        return [f"msma_norm@{t}" for t in self.timesteps]

    @property
    def nfe_per_image(self):
        return len(self.timesteps)

    def features(self, images, stream):
        def fn(x0, gen):
            preds, _ = noise_predictions(self.model, x0, self.timesteps, gen)
            return preds.flatten(2).pow(2).mean(2).sqrt().T  # (B, L) RMS of the predicted noise

        return self.model.batched(images, fn, stream, f"scoring: noise predictions ({self.nfe_per_image} NFE/image)")

    def describe(self):
        return f"noise-prediction norms at {self.nfe_per_image} noise levels under a Gaussian mixture"


@register
class FusedScore(CompositeScore, DensityScore):
    name = "fused"
    parts_names = ("recon", "path", "msma")

    def fit(self, features):
        self.fit_parts(features)
        DensityScore.fit(self, features)

    def score(self, features):
        return DensityScore.score(self, features)

    def describe(self):
        return "one Gaussian mixture over the reconstruction errors, DiffPath and msma statistics"


@register
class PatchScore(DensityScore):
    """Per-patch statistics at a few noise levels: the squared denoising error (predicted minus drawn noise)
    and the predicted noise itself, each averaged over a grid of patches, so where a stroke is matters."""

    name = "patch"
    LEVELS = 3

    @property
    def timesteps(self):
        return spaced_timesteps(self.model.T, self.LEVELS + 2)[1:-1]  # interior levels: neither clean nor pure noise

    @property
    def columns(self):
        g = self.settings.patch_grid
        return [f"patch_{kind}@{t}_{i}" for t in self.timesteps for kind in ("err", "eps") for i in range(g * g)]

    @property
    def nfe_per_image(self):
        return len(self.timesteps)

    def features(self, images, stream):
        g = self.settings.patch_grid

        def fn(x0, gen):
            preds, drawn = noise_predictions(self.model, x0, self.timesteps, gen)
            per_level = [torch.cat([pool_map((p - z).pow(2), g), pool_map(p, g)], 1) for p, z in zip(preds, drawn)]
            return torch.cat(per_level, 1)

        return self.model.batched(images, fn, stream, f"scoring: patch statistics ({self.nfe_per_image} NFE/image)")

    def describe(self):
        g = self.settings.patch_grid
        levels = self.nfe_per_image
        return (
            f"denoising error and predicted noise on {g}x{g} patches at {levels} noise levels under a Gaussian mixture"
        )


@register
class HiddenScore(DensityScore):
    """The network's hidden activations at a little noise: a flipped or rotated digit keeps its ink
    statistics but not the features the decoder has learnt for digits, nor where they fire."""

    name = "hidden"

    @property
    def timesteps(self):
        T = self.model.T
        return sorted({min(T - 1, max(1, int(round(f * T)))) for f in self.settings.hidden_levels})

    @property
    def columns(self):
        return [f"hidden@{t}_{i}" for t in self.timesteps for i in range(self._width)]

    @property
    def _width(self):
        channels = hidden_block(self.model.unet).resnets[-1].out_channels
        return channels * self.settings.hidden_grid**2

    @property
    def nfe_per_image(self):
        return len(self.timesteps)

    def features(self, images, stream):
        ts, g = self.timesteps, self.settings.hidden_grid

        def fn(x0, gen):
            return hidden_activations(self.model, x0, ts, gen, g)

        return self.model.batched(images, fn, stream, f"scoring: hidden activations ({len(ts)} NFE/image)")

    def describe(self):
        g, levels = self.settings.hidden_grid, " ".join(f"{f:g}" for f in self.settings.hidden_levels)
        return f"decoder activations on {g}x{g} patches at noise level(s) {levels} of T under a Gaussian mixture"
