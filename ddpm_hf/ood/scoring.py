"""Out-of-distribution detection by diffusion reconstruction (the seed's --outlier_detection).

Faithful core: each image is noised to t* = int(T * recon_factor) - 1 with the training
forward process, reconstructed by the one sampling loop (`sampling.denoise`, DDIM with
eta = --ddpm) over the sampling timesteps <= t*, and scored by its per-image --loss_type
error against the input in [-1, 1], plus the LPIPS (AlexNet) distance with --lpips.
Higher = more anomalous; OOD is the positive class of the metrics.

Beyond the original: seeded noise, several noise levels in one run (--recon_factors;
each level's errors are z-scored with in-distribution *training* images that are never
scored, then averaged, as in DDPM-OOD, Graham et al. 2023), all levels of a batch sharing
one model call per timestep, and everything saved: results JSON, per-image CSV, plots.

This module is the method (metrics, LPIPS, the reconstruction, the scorer; the image sets at the
model's format are ddpm_hf/data/sets.py); ood_ddpm.py's run, report and result files are ddpm_hf/commands/ood.py.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..data.images import to_model_range
from ..diffusion.latent import encode
from ..diffusion.losses import per_image_loss
from ..diffusion.sampling import (
    batch_generator,
    decode_latents,
    denoise,
    make_sampler,
    noise_scheduler_from_config,
    num_inference_steps,
)
from ..util.errors import DDPMError, UsageError
from ..util.extras import require_extra
from ..util.precision import inference_autocast

LPIPS_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, fetched by `lpips` on first use
LPIPS_MIN_SIZE = 32  # AlexNet's strides and pools need >= 31 px; smaller images are upsampled for LPIPS
SET_IDS = {"in": 0, "out": 1, "stats": 2, "query": 3}  # separate noise streams per set


# ---- metrics -------------------------------------------------------------------------------


def _fpr_at_tpr(labels, scores, level=0.95) -> float:
    """The original's rule: fpr at the first ROC point whose tpr reaches `level`."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return float(fpr[np.argmax(tpr >= level)])


def ood_metrics(in_scores, out_scores) -> dict:
    """AUROC/FPR95 with OOD positive (as the original), FPR95 with in-distribution positive
    (the usual convention of OOD papers), AUPR-in and AUPR-out."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    in_scores, out_scores = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    scores = np.r_[in_scores, out_scores]
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        # share of in-distribution images flagged when 95% of OOD images are caught
        "fpr95": _fpr_at_tpr(labels, scores),
        # share of OOD images accepted when 95% of in-distribution images are accepted
        "fpr95_in_positive": _fpr_at_tpr(1 - labels, -scores),
        "aupr_in": float(average_precision_score(1 - labels, -scores)),
        "aupr_out": float(average_precision_score(labels, scores)),
    }


# ---- LPIPS ---------------------------------------------------------------------------------


def lpips_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_WEIGHTS


def _lpips_advice() -> str:
    weights = lpips_weights_path()
    return (
        f"--lpips needs torchvision's AlexNet weights: place {LPIPS_WEIGHTS} in {weights.parent} "
        f"($TORCH_HOME/hub/checkpoints/), or run without --lpips"
    )


def require_lpips_weights() -> None:
    """Fail in one line, before any model is loaded, when offline and the AlexNet weights are not cached."""
    import huggingface_hub

    require_extra("lpips", "lpips", "--lpips")
    if not lpips_weights_path().exists() and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise DDPMError(f"{_lpips_advice()} (offline, so not downloading it)")


def load_lpips(pnet_rand: bool = False, device="cpu"):
    """lpips.LPIPS(net="alex"); fails in one line when the AlexNet backbone is neither cached
    nor downloadable (offline: HF_HUB_OFFLINE=1 means no download is even tried)."""
    lpips = require_extra("lpips", "lpips", "--lpips")
    if not pnet_rand:
        require_lpips_weights()
    advice = _lpips_advice()
    try:
        with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net="alex", pnet_rand=pnet_rand, verbose=False)
    except Exception as err:  # no network, a refused or truncated download
        raise DDPMError(f"{advice} (download failed: {type(err).__name__})") from None
    return model.to(device).eval()


def lpips_distance(model, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS of images in [-1, 1]; grayscale is repeated to RGB, small images upsampled."""
    if a.shape[1] == 1:
        a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
    if a.shape[-1] < LPIPS_MIN_SIZE:
        a, b = (
            F.interpolate(x, size=(LPIPS_MIN_SIZE, LPIPS_MIN_SIZE), mode="bilinear", align_corners=False)
            for x in (a, b)
        )
    return model(a, b).flatten()


# ---- reconstruction ------------------------------------------------------------------------


@dataclass
class Level:
    factor: float
    t_start: int  # t* = int(T * factor) - 1, snapped down to the sampling grid (the reverse pass starts there)
    timesteps: list  # the sampler's timesteps <= t*, descending
    t_requested: Optional[int] = None  # int(T * factor) - 1 when it was off the grid (else None)


def plan_levels(factors: List[float], scheduler_config: dict, sample_timesteps: int):
    """(DDIM sampler, one Level per factor) on the original's timestep grid. A t* between two grid
    points is snapped down to the grid point below it (images are noised to the level the reverse
    pass starts from, not to t* with the first step skipped); `t_requested` records the snap."""
    T = scheduler_config["num_train_timesteps"]
    sampler = make_sampler("ddim", scheduler_config)
    sampler.set_timesteps(num_inference_steps(T, min(sample_timesteps, T)))
    levels = []
    for f in factors:
        t_star = int(T * f) - 1
        steps = [t for t in sampler.timesteps if int(t) <= t_star]
        if not steps:
            first = int(sampler.timesteps[-1])
            raise UsageError(
                f"recon factor {f} gives t* = {t_star}, below the first sampling timestep {first} "
                f"(T={T}, {len(sampler.timesteps)} steps); use a factor >= {(first + 1) / T:g} or more "
                "--sample_timesteps"
            )
        t_start = int(steps[0])
        levels.append(Level(f, t_start, steps, t_star if t_start != t_star else None))
    return sampler, levels


def snap_notices(levels) -> List[str]:
    """One line per level whose t* was off the sampling grid and was snapped."""
    return [
        f"notice: recon factor {lv.factor:g} gives t* = {lv.t_requested}, between sampling timesteps; "
        f"noising to t* = {lv.t_start} instead, where the reverse pass starts"
        for lv in levels
        if lv.t_requested is not None
    ]


@torch.inference_mode()
def reconstruct(
    unet,
    sampler,
    noise_scheduler,
    x0: torch.Tensor,
    levels: List[Level],
    eta: float,
    generator,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(L, B, ...) reconstructions of x0 from every level (forward noise (L, B, ...) drawn when not given).

    The reverse passes of all levels share one model call per timestep: the levels are taken
    from the noisiest down, and each one joins the batch when the pass reaches its first
    timestep (they all run on the same timestep grid)."""
    b = x0.shape[0]
    if noise is None:
        noise = randn_tensor((len(levels), *x0.shape), generator=generator, device=x0.device, dtype=x0.dtype)
    order = sorted(range(len(levels)), key=lambda i: -int(levels[i].t_start))
    x = x0.new_empty((0, *x0.shape[1:]))
    for k, i in enumerate(order):
        t_star = torch.full((b,), levels[i].t_start, dtype=torch.long, device=x0.device)
        x = torch.cat([x, noise_scheduler.add_noise(x0, noise[i], t_star)])
        joins_next = int(levels[order[k + 1]].timesteps[0]) if k + 1 < len(order) else -1
        segment = [t for t in levels[i].timesteps if int(t) > joins_next]
        if segment:  # empty when the next level starts on the same timestep
            x = denoise(unet, sampler, x, segment, eta=eta, generator=generator)
    chunks = x.view(len(levels), b, *x0.shape[1:])
    out = torch.empty_like(chunks)
    out[order] = chunks
    return out


class Scorer:
    """Reconstruction errors (and LPIPS) of uint8 images at every level."""

    def __init__(self, loaded, levels, sampler, settings, lpips_model=None, device="cpu"):
        """`settings`: an OODSettings (eta, loss_type, seed, batch_size, recon_draws, mixed_precision)."""
        sc = loaded.scheduler_config
        self.unet, self.vae, self.levels, self.sampler = loaded.unet, loaded.vae, levels, sampler
        self.noise_scheduler = noise_scheduler_from_config(sc)
        self.eta, self.loss_type, self.seed = settings.eta, settings.loss_type, settings.seed
        self.batch_size, self.draws, self.mixed_precision = (
            settings.batch_size,
            settings.recon_draws,
            settings.mixed_precision,
        )
        self.lpips_model, self.device = lpips_model, device
        self.latent_mode = loaded.train_config.get(
            "latent_mode", "sample"
        )  # as the model was trained (and the original)

    @torch.inference_mode()
    def reconstructions(self, images: torch.Tensor, generator) -> tuple:
        """(x0 in [-1, 1], (levels x draws, B, ...) reconstructions in pixel space) of uint8 images."""
        x0 = to_model_range(images).to(self.device)
        z0 = self._encode(x0, generator)
        # Each draw is one more "level" in the shared reverse pass; errors are averaged over draws.
        runs = [level for level in self.levels for _ in range(self.draws)]
        with inference_autocast(self.mixed_precision, self.device):
            recon = reconstruct(self.unet, self.sampler, self.noise_scheduler, z0, runs, self.eta, generator)
        if self.vae is not None:  # latent model: compare in pixel space, as the original
            recon = decode_latents(self.vae, recon.flatten(0, 1)).unflatten(0, recon.shape[:2])
        return x0, recon

    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor, generator) -> dict:
        x0, recon = self.reconstructions(images, generator)
        runs = recon.shape[0]
        target = x0.expand(runs, *x0.shape).flatten(0, 1)

        def per_level(v):
            return v.view(len(self.levels), self.draws, -1).mean(1).cpu().double()

        result = {"recon_error": per_level(per_image_loss(recon.flatten(0, 1), target, self.loss_type))}
        if self.lpips_model is not None:
            result["lpips"] = per_level(lpips_distance(self.lpips_model, recon.flatten(0, 1), target))
        return result

    def _encode(self, x0, generator):
        if self.vae is None:
            return x0
        # latent_dist.sample() draws from the batch's generator: seeded, and on the model's device like everything else
        return encode(self.vae, x0, self.latent_mode, generator)

    def score(self, images: torch.Tensor, set_name: str, bar) -> dict:
        """{'recon_error': (L, N), ['lpips': (L, N)]} as numpy; batch b's noise depends only on (seed, set, b)."""
        parts = []
        for b, start in enumerate(range(0, len(images), self.batch_size)):
            gen = batch_generator(self.seed, SET_IDS[set_name] * 1_000_000 + b)
            parts.append(self.score_batch(images[start : start + self.batch_size], gen))
            bar.update(1)
        return {k: torch.cat([p[k] for p in parts], dim=1).numpy() for k in parts[0]}


def combine(scores: dict, stats: Optional[dict]) -> np.ndarray:
    """One score per image. One level (the original): error + LPIPS. Several levels: the mean
    of every component's z-score under the in-distribution statistics `stats`."""
    if stats is None:
        return scores["recon_error"][0] + (scores["lpips"][0] if "lpips" in scores else 0.0)
    z = [
        (scores[k] - stats[k].mean(1, keepdims=True)) / np.maximum(stats[k].std(1, ddof=1, keepdims=True), 1e-12)
        for k in scores
    ]
    return np.concatenate(z).mean(0)
