"""ood_ddpm.py --fit (fit a detector on --dataset and save it to --output_dir) and ood_ddpm.py --detector
DIR --images PATH (score any images with a saved detector: scores.csv, anomalies.png, a one-line summary).
Everything is checked before anything is written; outputs go into a hidden folder moved in whole."""

import csv
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..data.sets import load_query_images, load_set, load_stats_images
from ..models.loader import model_format
from ..ood.detector import MANIFEST, OODDetector, read_detector
from ..ood.scoring import Scorer, plan_levels, require_lpips_weights
from ..util.errors import UsageError
from ..util.files import make_output_dir, remove, writing
from ..util.lock import ensure_not_in_use, lock_output_dir
from .common import compute_device, data_settings, load_checkpoint_model
from .ood import settings_from_config

HELD_OUT_DEFAULT = 500  # held-out in-distribution test images of --fit without --max_samples
ANOMALIES_SHOWN = 8


def run_detector_command(cfg, device=None):
    device = compute_device(device)
    return fit_command(cfg, device) if cfg.fit else score_command(cfg, device)


def _claim_folder(out: Path, files, overwrite: bool, what: str) -> None:
    ensure_not_in_use(out)
    existing = [f for f in files if (out / f).exists()]
    if existing and not overwrite:
        raise UsageError(
            f"{out} already holds {what} ({', '.join(existing)}); pass --overwrite_output_dir to replace it "
            f"or choose another --output_dir"
        )
    make_output_dir(out)
    lock_output_dir(out)


def _move_in(out: Path, what: str, write) -> None:
    """write(staging folder), then every file it wrote moved into `out` (a failure leaves `out` as it was)."""
    staging = out / ".partial"
    remove(staging)
    with writing(out, what, cleanup=[staging], advice="nothing was replaced; free some space and run it again"):
        staging.mkdir()
        write(staging)
        for f in sorted(staging.iterdir()):
            os.replace(f, out / f.name)
        staging.rmdir()


def fit_command(cfg, device) -> OODDetector:
    """Fit on --stats_samples training images of --dataset, hold out its test split (--max_samples, default
    500), set the threshold at --tpr, save the detector folder."""
    if not cfg.output_dir:
        raise UsageError("--fit needs --output_dir DIR: the folder the detector is saved to")
    start = time.perf_counter()
    settings = settings_from_config(cfg)
    if settings.lpips:
        require_lpips_weights()
    loaded = load_checkpoint_model(cfg, device)
    out = Path(cfg.output_dir)
    _claim_folder(out, (MANIFEST,), cfg.overwrite_output_dir, "a detector")
    channels, size = model_format(loaded)
    data = data_settings(cfg, keep_format=False)
    limit = cfg.max_samples or HELD_OUT_DEFAULT
    heldout = load_set(cfg.dataset, "test", data, channels, size, limit, "held-out in-distribution")
    fit_images = load_stats_images(cfg.dataset, data, settings.stats_samples, channels, size, heldout)
    detector = OODDetector.fit(loaded, fit_images, heldout=heldout, tpr=cfg.tpr, device=device, settings=settings)
    source = Path(cfg.checkpoint)
    detector.manifest["model"]["source"] = str(source.resolve()) if source.exists() else cfg.checkpoint
    detector.manifest["dataset"] = cfg.dataset
    _move_in(out, "the detector", detector.save)
    held = detector.heldout_scores
    accepted = np.mean(held <= detector.threshold)
    print(
        f"detector: --score {settings.score} ({detector.manifest['description']}), fitted on {len(fit_images)} "
        f"{cfg.dataset} training images, threshold {detector.threshold:.6g} accepts {accepted:.1%} "
        f"of {len(held)} held-out test images; {detector.manifest['nfe_per_image']} network evaluations per image; "
        f"{time.perf_counter() - start:.1f} s; saved to {out}"
    )
    return detector


def score_command(cfg, device) -> dict:
    """Score --images with the detector in --detector: scores.csv, anomalies.png and a one-line summary."""
    read_detector(cfg.detector)  # a damaged or foreign folder fails before the model is loaded
    detector = OODDetector.load(cfg.detector, cfg.checkpoint, device, mixed_precision=cfg.mixed_precision)
    names, images = load_query_images(cfg.images, *detector.format, data_settings(cfg, keep_format=False))
    out = Path(cfg.output_dir) if cfg.output_dir else Path("ood_results") / f"{Path(cfg.detector).name}_scores"
    _claim_folder(out, ("scores.csv", "anomalies.png"), cfg.overwrite_output_dir, "detector scores")
    start = time.perf_counter()
    scores, p_values, flags = detector.score(images)
    seconds = time.perf_counter() - start

    def write(folder: Path) -> None:
        with open(folder / "scores.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "score", "p_value", "flagged"])
            for row in zip(names, scores, p_values, flags):
                writer.writerow([row[0], repr(float(row[1])), f"{row[2]:.6g}", int(row[3])])
        plot_anomalies(folder / "anomalies.png", detector, images, names, scores)

    _move_in(out, "the detector scores (scores.csv, anomalies.png)", write)
    print(
        f"{len(images)} images, {int(flags.sum())} flagged as out-of-distribution (score > {detector.threshold:.6g}, "
        f"in-distribution acceptance {detector.manifest['tpr']:g}); {len(images) / max(seconds, 1e-9):.1f} images/s; "
        f"results: {out / 'scores.csv'}, {out / 'anomalies.png'}"
    )
    return {"names": names, "scores": scores, "p_values": p_values, "flags": flags, "seconds": seconds}


DISPLAY_STEPS = 20


def reconstruct_for_display(detector: OODDetector, images: torch.Tensor) -> tuple:
    """(images, reconstructions, per-pixel squared error) in [0, 1], from the detector's first noise level,
    over at most DISPLAY_STEPS sampling timesteps: a picture to look at, not the score (300 steps took minutes)."""
    settings, model = detector.score_fn.settings, detector.model
    steps = min(settings.sample_timesteps, DISPLAY_STEPS)
    sampler, levels = plan_levels(settings.recon_factors[:1], model.scheduler_config, steps)
    scorer = Scorer(model.loaded, levels, sampler, settings, None, model.device)
    from ..diffusion.sampling import batch_generator

    x0, recon = scorer.reconstructions(images, batch_generator(settings.seed, 9_000_000))
    x0, recon = ((v.clamp(-1, 1) + 1) / 2 for v in (x0, recon[0]))
    return x0.cpu(), recon.cpu(), (x0 - recon).pow(2).mean(1).cpu()


def plot_anomalies(path: Path, detector: OODDetector, images, names, scores) -> None:
    """The most anomalous images: each with its reconstruction and its per-pixel error heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-np.asarray(scores))[:ANOMALIES_SHOWN]
    x0, recon, err = reconstruct_for_display(detector, images[torch.as_tensor(order)])
    fig, axes = plt.subplots(3, len(order), figsize=(1.6 * len(order) + 0.6, 5.4), squeeze=False)
    for j, i in enumerate(order):
        gray = x0.shape[1] == 1
        for row, picture in enumerate((x0[j], recon[j])):
            axes[row, j].imshow(picture[0] if gray else picture.permute(1, 2, 0), cmap="gray" if gray else None)
        axes[2, j].imshow(err[j], cmap="inferno")
        axes[0, j].set_title(f"{Path(names[i]).name[:14]}\n{scores[i]:.3g}", fontsize=7)
    for row, label in enumerate(("image", "reconstruction", "error")):
        axes[row, 0].set_ylabel(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"most anomalous of {len(scores)} images (score above each)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
