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
"""

import csv
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .data import load_images, resolve_spec, same_dataset, to_model_range
from .errors import DDPMError, UsageError
from .files import make_output_dir, remove, simulate_disk_full, writing
from .latent import downsample_factor, encode
from .lock import ensure_not_in_use, lock_output_dir
from .losses import per_image_loss
from .sampling import (batch_generator, decode_latents, denoise, inference_autocast, make_sampler, noise_scheduler_from_config,
                       num_inference_steps, resolve_mixed_precision)

LPIPS_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, fetched by `lpips` on first use
LPIPS_MIN_SIZE = 32  # AlexNet's strides and pools need >= 31 px; smaller images are upsampled for LPIPS
RESULT_FILES = ("ood_results.json", "scores.csv", "histogram.png", "roc.png")
SET_IDS = {"in": 0, "out": 1, "stats": 2}  # separate noise streams per set


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


def load_lpips(pnet_rand: bool = False, device="cpu"):
    """lpips.LPIPS(net="alex"); fails in one line when the AlexNet backbone is neither cached
    nor downloadable (offline: HF_HUB_OFFLINE=1 means no download is even tried)."""
    import huggingface_hub
    import lpips

    weights = lpips_weights_path()
    advice = (f"--lpips needs torchvision's AlexNet weights: place {LPIPS_WEIGHTS} in {weights.parent} "
              f"($TORCH_HOME/hub/checkpoints/), or run without --lpips")
    if not pnet_rand and not weights.exists() and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise DDPMError(f"{advice} (offline, so not downloading it)")
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
        a, b = (F.interpolate(x, size=(LPIPS_MIN_SIZE, LPIPS_MIN_SIZE), mode="bilinear", align_corners=False) for x in (a, b))
    return model(a, b).flatten()


# ---- reconstruction ------------------------------------------------------------------------

@dataclass
class Level:
    factor: float
    t_start: int  # t* = int(T * factor) - 1
    timesteps: list  # the sampler's timesteps <= t*, descending


def plan_levels(factors: List[float], scheduler_config: dict, sample_timesteps: int):
    """(DDIM sampler, one Level per factor) on the original's timestep grid."""
    T = scheduler_config["num_train_timesteps"]
    sampler = make_sampler("ddim", scheduler_config)
    sampler.set_timesteps(num_inference_steps(T, min(sample_timesteps, T)))
    levels = []
    for f in factors:
        t_start = int(T * f) - 1
        steps = [t for t in sampler.timesteps if int(t) <= t_start]
        if not steps:
            first = int(sampler.timesteps[-1])
            raise UsageError(f"recon factor {f} gives t* = {t_start}, below the first sampling timestep {first} "
                             f"(T={T}, {len(sampler.timesteps)} steps); use a factor >= {(first + 1) / T:g} or more --sample_timesteps")
        levels.append(Level(f, t_start, steps))
    return sampler, levels


@torch.inference_mode()
def reconstruct(unet, sampler, noise_scheduler, x0: torch.Tensor, levels: List[Level], eta: float, generator,
                noise: Optional[torch.Tensor] = None) -> torch.Tensor:
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

    def __init__(self, loaded, levels, sampler, cfg, lpips_model=None, device="cpu"):
        sc = loaded.scheduler_config
        self.unet, self.vae, self.levels, self.sampler = loaded.unet, loaded.vae, levels, sampler
        self.noise_scheduler = noise_scheduler_from_config(sc)
        self.eta, self.loss_type, self.seed, self.batch_size = cfg.ddpm, cfg.loss_type, cfg.seed, cfg.batch_size
        self.draws, self.mixed_precision = cfg.recon_draws, cfg.mixed_precision
        self.lpips_model, self.device = lpips_model, device
        self.latent_mode = loaded.train_config.get("latent_mode", "sample")  # as the model was trained (and the original)

    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor, generator) -> dict:
        x0 = to_model_range(images).to(self.device)
        z0 = self._encode(x0, generator)
        # Each draw is one more "level" in the shared reverse pass; errors are averaged over draws.
        runs = [level for level in self.levels for _ in range(self.draws)]
        with inference_autocast(self.mixed_precision, self.device):
            recon = reconstruct(self.unet, self.sampler, self.noise_scheduler, z0, runs, self.eta, generator)
        if self.vae is not None:  # latent model: compare in pixel space, as the original
            recon = decode_latents(self.vae, recon.flatten(0, 1)).unflatten(0, recon.shape[:2])
        target = x0.expand(len(runs), *x0.shape).flatten(0, 1)
        per_level = lambda v: v.view(len(self.levels), self.draws, -1).mean(1).cpu().double()
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
            parts.append(self.score_batch(images[start:start + self.batch_size], gen))
            bar.update(1)
        return {k: torch.cat([p[k] for p in parts], dim=1).numpy() for k in parts[0]}


def combine(scores: dict, stats: Optional[dict]) -> np.ndarray:
    """One score per image. One level (the original): error + LPIPS. Several levels: the mean
    of every component's z-score under the in-distribution statistics `stats`."""
    if stats is None:
        return scores["recon_error"][0] + (scores["lpips"][0] if "lpips" in scores else 0.0)
    z = [(scores[k] - stats[k].mean(1, keepdims=True)) / np.maximum(stats[k].std(1, ddof=1, keepdims=True), 1e-12)
         for k in scores]
    return np.concatenate(z).mean(0)


# ---- data ----------------------------------------------------------------------------------

def model_format(loaded):
    """(channels, size) of the images the model scores (pixel space for latent models)."""
    unet = loaded.unet
    if loaded.vae is None:
        return unet.config.in_channels, unet.config.sample_size
    return loaded.vae.config.in_channels, unet.config.sample_size * downsample_factor(loaded.vae)


def native_format(name: str, split: str, cfg):
    """(channels, size) a dataset has before conversion: the registry's, else its first image's."""
    spec = resolve_spec(name)
    if spec.channels:
        return spec.channels, spec.size
    first = load_images(name, split, replace(cfg, size=None, channels=None), limit=1, progress=False)
    return first.channels, first.size


def load_set(name: str, split: str, cfg, channels: int, size: int, limit, role: str):
    """uint8 images at the model's format, with a notice when the dataset had to be converted."""
    native_c, native_s = native_format(name, split, cfg)
    if native_c != channels:
        how = "converted to grayscale" if channels == 1 else "grayscale repeated to RGB"
        print(f"notice: {role} set {name} has {native_c}-channel images; {how} for the {channels}-channel model", file=sys.stderr)
    if native_s != size:
        how = "shrunk" if native_s > size else "enlarged"
        print(f"notice: {role} set {name} has {native_s} px images; {how} to the model's {size} px", file=sys.stderr)
    plain = replace(cfg, size=None, channels=None)  # the model, not --size/--channels, decides the format
    return load_images(name, split, plain, size=size, channels=channels, limit=limit, progress=False).images


def load_stats_images(cfg, channels, size, evaluated: torch.Tensor) -> torch.Tensor:
    """`stats_samples` in-distribution training images, none of them equal to an evaluated image
    (a flat image folder has one split, so its train and test splits are the same images)."""
    seen = {hashlib.sha1(img.numpy().tobytes()).digest() for img in evaluated}
    pool = load_set(cfg.dataset, "train", cfg, channels, size, cfg.stats_samples + len(evaluated), "statistics")
    keep = [i for i, img in enumerate(pool) if hashlib.sha1(img.numpy().tobytes()).digest() not in seen][:cfg.stats_samples]
    if len(keep) < 2:
        raise UsageError(f"--recon_factors needs in-distribution images that are not scored for its statistics, "
                         f"but {cfg.dataset} has none left; lower --max_samples or use a dataset with a train split")
    return pool[keep]


# ---- outputs -------------------------------------------------------------------------------

def default_output_dir(checkpoint: str) -> Path:
    return Path("ood_results") / Path(checkpoint.rstrip("/")).stem


def prepare_output_dir(cfg) -> Path:
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.checkpoint)
    ensure_not_in_use(out)
    existing = [f for f in RESULT_FILES if (out / f).exists()]
    if existing and not cfg.overwrite_output_dir:
        raise UsageError(f"{out} already holds OOD results ({', '.join(existing)}); pass --overwrite_output_dir "
                         f"to replace them or choose another --output_dir")
    make_output_dir(out)
    lock_output_dir(out)
    return out


def write_results(out: Path, results: dict, write_others) -> None:
    """The four result files, written into a hidden folder and moved in together: a full disk leaves
    neither a partial scores.csv (which would block a rerun) nor a mix of old and new results."""
    staging = out / ".ood_results.partial"
    remove(staging)
    kept = "the earlier results there are unchanged" if (out / RESULT_FILES[0]).exists() else "nothing was written"
    with writing(out, f"the OOD results ({', '.join(RESULT_FILES)})", cleanup=[staging],
                 advice=f"{kept}; free some space (or choose another --output_dir) and run the command again"):
        staging.mkdir()
        write_others(staging)
        (staging / "ood_results.json").write_text(json.dumps(results, indent=2))
        simulate_disk_full("ood_results")
        for name in RESULT_FILES:
            os.replace(staging / name, out / name)
        staging.rmdir()


def _level_tag(levels, level):
    return "" if len(levels) == 1 else f"@{level.factor:g}"


def write_scores_csv(path: Path, sets: dict, levels, lpips_used: bool, extra: Optional[dict] = None) -> None:
    """One row per image: set, index, per-level reconstruction error (and LPIPS), `extra`'s columns
    ({column: {set: values}}, e.g. bits/dim), final score."""
    extra = extra or {}
    columns = []
    for level in levels:
        tag = _level_tag(levels, level)
        columns += [f"recon_error{tag}"] + ([f"lpips{tag}"] if lpips_used or len(levels) == 1 else [])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["set", "index", *columns, *extra, "score"])
        for name, (scores, final) in sets.items():
            for j in range(len(final)):
                row = []
                for li in range(len(levels)):
                    row.append(repr(float(scores["recon_error"][li, j])))
                    if lpips_used:
                        row.append(repr(float(scores["lpips"][li, j])))
                    elif len(levels) == 1:
                        row.append("")
                row += [repr(float(values[name][j])) for values in extra.values()]
                writer.writerow([name, j, *row, repr(float(final[j]))])


def plot_results(out: Path, in_final, out_final, per_level_scores, labels, metrics, multi: bool, xlabel=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    name_in, name_out = labels
    xlabel = xlabel or ("mean z-score over noise levels" if multi else "anomaly score (reconstruction error" + (" + LPIPS)" if "lpips" in metrics else ")"))
    edges = np.histogram_bin_edges(np.r_[in_final, out_final], bins=100)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.hist(in_final, bins=edges, alpha=0.6, label=f"in-distribution: {name_in} ({len(in_final)})")
    ax.hist(out_final, bins=edges, alpha=0.6, label=f"OOD: {name_out} ({len(out_final)})")
    ax.set(xlabel=xlabel, ylabel="images", title=f"AUROC {metrics['auroc']:.4f}, FPR95 {metrics['fpr95']:.4f}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "histogram.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    y = np.r_[np.zeros(len(in_final)), np.ones(len(out_final))]
    if multi:
        for factor, (s_in, s_out) in per_level_scores.items():
            fpr, tpr, _ = roc_curve(y, np.r_[s_in, s_out])
            ax.plot(fpr, tpr, lw=1, ls="--", label=f"recon_factor {factor:g}")
    fpr, tpr, _ = roc_curve(y, np.r_[in_final, out_final])
    ax.plot(fpr, tpr, lw=2, label=f"{'combined' if multi else 'score'} (AUROC {metrics['auroc']:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.set(xlabel=f"false positive rate ({name_in} flagged)", ylabel=f"true positive rate ({name_out} flagged)", title="ROC, OOD positive")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=120)
    plt.close(fig)


def describe_score(cfg, factors) -> str:
    parts = "reconstruction error" + (" and LPIPS" if cfg.lpips else "")
    draws = f", each the mean of {cfg.recon_draws} noise draws" if cfg.recon_draws > 1 else ""
    if cfg.recon_factors is None:
        return f"{cfg.loss_type} {parts.replace(' and ', ' + ')} at recon_factor {factors[0]:g}{draws}"
    return f"mean z-score of the {cfg.loss_type} {parts} at recon_factors {' '.join(f'{f:g}' for f in factors)}{draws}"


def format_report(results: dict) -> str:
    m, c = results, results["counts"]
    lines = [
        f"OOD report: {m['settings']['dataset']} ({c['in']} in-distribution images) vs {m['settings']['out_dataset']} "
        f"({c['out']} OOD images); score: {m['score']}",
        f"AUC score: {m['auroc']:.4f} FPR95: {m['fpr95']:.4f}",  # the original's line (its values to 4 decimals)
        f"AUROC (OOD positive):                                  {m['auroc']:.4f}",
        f"FPR95, original (in-dist. flagged at 95% OOD caught):  {m['fpr95']:.4f}",
        f"FPR at 95% TPR, in-dist. positive (OOD accepted):      {m['fpr95_in_positive']:.4f}",
        f"AUPR-in (in-distribution positive):                    {m['aupr_in']:.4f}",
        f"AUPR-out (OOD positive):                               {m['aupr_out']:.4f}",
    ]
    if len(m["per_level"]) > 1:
        for lv in m["per_level"]:
            lines.append(f"  recon_factor {lv['recon_factor']:<5g} (t*={lv['t_start']}, {lv['steps']} steps): "
                         f"AUROC {lv['auroc']:.4f} FPR95 {lv['fpr95']:.4f}")
    for name, sm in m.get("per_score", {}).items():  # --score nll|both: every score's AUROC
        lines.append(f"  score {name:<6} AUROC {sm['auroc']:.4f} FPR95 {sm['fpr95']:.4f}")
    for name, sm in m.get("likelihood", {}).get("sets", {}).items():
        lines.append(f"  bits/dim of the {name} set: {sm['bpd_mean']:.4f} ± {sm['bpd_mean_se'] or 0:.4f} ({sm['num_images']} images)")
    t = m["timing"]
    lines.append(f"cost: {m['cost']['nfe_per_image']} network evaluations per image "
                 f"({m['cost']['model_calls_per_batch']} batched model calls per batch), "
                 f"{t['images_per_s']:.1f} images/s ({m['counts']['scored']} images scored in {t['score_s']:.1f} s)")
    return "\n".join(lines)


# ---- the whole run -------------------------------------------------------------------------

def likelihood_hook(cfg, loaded, images, raw, stats, factors, device) -> tuple:
    """--score nll|both (ddpm_hf/ood_likelihood.py): the bound of every set, the final scores,
    what ood_results.json adds and the CSV's extra columns."""
    from . import ood_likelihood

    start = time.perf_counter()
    nll = ood_likelihood.nll_of_sets(loaded, images, cfg, SET_IDS, device)
    recon = {name: combine(raw[name], stats) for name in images}
    T = loaded.scheduler_config["num_train_timesteps"]
    final, added, columns = ood_likelihood.likelihood_scores(cfg, recon, nll, T, ood_metrics)
    added["likelihood"]["seconds"] = round(time.perf_counter() - start, 3)
    added["score"] = ood_likelihood.describe(cfg, describe_score(cfg, factors), T)
    return final, added, columns


def run_ood(cfg, device=None) -> dict:
    """ood_ddpm.py: score both test sets, print the report, write the four result files."""
    from .model import count_parameters
    from .pipeline import load_model

    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lpips_model = load_lpips(device=device) if cfg.lpips else None  # before anything slow: fail fast
    loaded = load_model(cfg.checkpoint, cfg, revision=cfg.revision, device=device)
    if cfg.score != "recon":  # a latent model or a bad --nll_timesteps fails before any image is scored
        from .ood_likelihood import check_model

        check_model(loaded, cfg)
    out_dir = prepare_output_dir(cfg)
    factors = list(cfg.recon_factors) if cfg.recon_factors else [cfg.recon_factor]
    multi = cfg.recon_factors is not None
    sampler, levels = plan_levels(factors, loaded.scheduler_config, cfg.sample_timesteps)
    channels, size = model_format(loaded)
    for flag, value, used in (("size", cfg.size, size), ("channels", cfg.channels, channels)):
        if value is not None and value != used:
            print(f"notice: --{flag} {value} ignored: the model scores {used}-{'px' if flag == 'size' else 'channel'} images", file=sys.stderr)
    if cfg.scheduler != "ddim":
        print(f"notice: --scheduler {cfg.scheduler} ignored: reconstruction uses DDIM with eta = --ddpm, as the original", file=sys.stderr)
    if same_dataset(cfg.dataset, cfg.out_dataset):
        print(f"notice: --out_dataset {cfg.out_dataset} is the in-distribution --dataset: both sets are its test split, "
              f"so the scores cannot separate them (AUROC near 0.5); pass another --out_dataset", file=sys.stderr)

    images = {"in": load_set(cfg.dataset, "test", cfg, channels, size, cfg.max_samples, "in-distribution"),
              "out": load_set(cfg.out_dataset, "test", cfg, channels, size, cfg.max_samples, "OOD")}
    if multi or cfg.score == "both":
        images["stats"] = load_stats_images(cfg, channels, size, images["in"])
    load_s = time.perf_counter() - start

    scorer = Scorer(loaded, levels, sampler, cfg, lpips_model, device)
    batches = sum(math.ceil(len(v) / cfg.batch_size) for v in images.values())
    nfe = cfg.recon_draws * sum(len(lv.timesteps) for lv in levels)  # network evaluations per image
    score_start = time.perf_counter()
    with tqdm(total=batches, desc=f"scoring ({len(levels)} level(s) x {cfg.recon_draws} draw(s), {nfe} NFE/image)",
              unit="batch") as bar:
        raw = {name: scorer.score(imgs, name, bar) for name, imgs in images.items()}
    score_s = time.perf_counter() - score_start

    stats = raw.get("stats") if multi else None
    final = {name: combine(raw[name], stats) for name in ("in", "out")}
    added, columns = {}, None
    if cfg.score != "recon":
        final, added, columns = likelihood_hook(cfg, loaded, images, raw, stats, factors, device)
    metrics = ood_metrics(final["in"], final["out"])
    per_level, per_level_scores = [], {}
    for li, level in enumerate(levels):
        level_scores = [raw[s]["recon_error"][li] + (raw[s]["lpips"][li] if cfg.lpips else 0.0) for s in ("in", "out")]
        per_level_scores[level.factor] = level_scores
        per_level.append({"recon_factor": level.factor, "t_start": level.t_start, "steps": len(level.timesteps),
                          **ood_metrics(*level_scores)})
    scored = sum(len(v) for v in images.values())
    results = {
        **metrics,
        "per_level": per_level,
        "counts": {"in": len(images["in"]), "out": len(images["out"]), "stats": len(images.get("stats", [])), "scored": scored},
        "score": describe_score(cfg, factors),
        "settings": {
            "dataset": cfg.dataset, "out_dataset": cfg.out_dataset, "recon_factors": factors,
            "t_start": [lv.t_start for lv in levels], "ddpm_eta": cfg.ddpm, "sample_timesteps": cfg.sample_timesteps,
            "loss_type": cfg.loss_type, "lpips": cfg.lpips, "batch_size": cfg.batch_size, "max_samples": cfg.max_samples,
            "recon_draws": cfg.recon_draws, "stats_samples": cfg.stats_samples if "stats" in images else None, "seed": cfg.seed,
            "mixed_precision": resolve_mixed_precision(cfg.mixed_precision, device) or "no",
        },
        "model": {"checkpoint": str(cfg.checkpoint), "source": str(loaded.source), "image_size": size, "channels": channels,
                  "latent": loaded.vae is not None, "timesteps": loaded.scheduler_config["num_train_timesteps"],
                  "parameters": count_parameters(loaded.unet)},
        "cost": {"nfe_per_image": nfe,
                 "model_calls_per_batch": max(len(lv.timesteps) for lv in levels)},
        "timing": {"load_s": round(load_s, 3), "score_s": round(score_s, 3), "images_per_s": scored / max(score_s, 1e-9),
                   "total_s": None, "device": str(device)},
    }
    results.update(added, settings=dict(results["settings"], score=cfg.score))

    def write_others(folder: Path) -> None:
        write_scores_csv(folder / "scores.csv", {s: (raw[s], final[s]) for s in ("in", "out")}, levels, cfg.lpips, columns)
        plot_results(folder, final["in"], final["out"], per_level_scores, (cfg.dataset, cfg.out_dataset),
                     {**metrics, **({"lpips": True} if cfg.lpips else {})}, multi, added.get("score"))

    results["timing"]["total_s"] = round(time.perf_counter() - start, 3)
    write_results(out_dir, results, write_others)
    print(format_report(results))
    print(f"results: {out_dir / 'ood_results.json'}, {out_dir / 'scores.csv'}, {out_dir / 'histogram.png'}, {out_dir / 'roc.png'}")
    return results
