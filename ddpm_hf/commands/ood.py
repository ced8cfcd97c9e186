"""ood_ddpm.py: the DDPMConfig unpacked into OODSettings, the in-distribution and OOD test sets scored
(ddpm_hf/ood/run.py: an OODRun), the report printed and the four result files (ood_results.json,
scores.csv, histogram.png, roc.png) written together, atomically, from the run. --fit and --detector
are ddpm_hf/commands/detect.py."""

import csv
import json
import os
import time
from pathlib import Path

import numpy as np

from ..config.sections import validate
from ..data.images import same_dataset
from ..data.sets import load_set, load_stats_images
from ..models.loader import model_format
from ..ood.network import ScoreModel
from ..ood.run import OODRun, evaluate
from ..ood.scores import NLLScore, ReconScore, build_score
from ..ood.scoring import ood_metrics, require_lpips_weights, snap_notices
from ..ood.settings import OODSettings
from ..util.errors import UsageError
from ..util.files import make_output_dir, remove, writing
from ..util.lock import ensure_not_in_use, lock_output_dir
from ..util.logs import get_logger
from ..util.precision import resolve_mixed_precision
from .common import compute_device, data_settings, default_output_dir, load_checkpoint_model, ready_device

logger = get_logger(__name__)

RESULT_FILES = ("ood_results.json", "scores.csv", "histogram.png", "roc.png")


def prepare_output_dir(cfg) -> Path:
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir("ood_results", cfg.checkpoint)
    ensure_not_in_use(out)
    existing = [f for f in RESULT_FILES if (out / f).exists()]
    if existing and not cfg.overwrite_output_dir:
        raise UsageError(
            f"{out} already holds OOD results ({', '.join(existing)}); pass --overwrite_output_dir "
            f"to replace them or choose another --output_dir"
        )
    make_output_dir(out)
    lock_output_dir(out)
    return out


def write_results(out: Path, results: dict, write_others) -> None:
    """The four result files, written into a hidden folder and moved in together: a full disk leaves
    neither a partial scores.csv (which would block a rerun) nor a mix of old and new results."""
    staging = out / ".ood_results.partial"
    remove(staging)
    kept = "the earlier results there are unchanged" if (out / RESULT_FILES[0]).exists() else "nothing was written"
    with writing(
        out,
        f"the OOD results ({', '.join(RESULT_FILES)})",
        cleanup=[staging],
        advice=f"{kept}; free some space (or choose another --output_dir) and run the command again",
    ):
        staging.mkdir()
        write_others(staging)
        (staging / "ood_results.json").write_text(json.dumps(results, indent=2))
        for name in RESULT_FILES:
            os.replace(staging / name, out / name)
        staging.rmdir()


def write_scores_csv(path: Path, run: OODRun) -> None:
    """One row per test image: set, index, every per-image statistic of the score, final score."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["set", "index", *run.columns, "score"])
        for name in ("in", "out"):
            for j, (row, final) in enumerate(zip(run.features[name], run.scores[name])):
                writer.writerow([name, j, *(repr(float(v)) for v in row), repr(float(final))])


def plot_results(out: Path, in_final, out_final, per_level_scores, labels, metrics, multi: bool, xlabel=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    name_in, name_out = labels
    xlabel = xlabel or (
        "mean z-score over noise levels"
        if multi
        else "anomaly score (reconstruction error" + (" + LPIPS)" if "lpips" in metrics else ")")
    )
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
    ax.set(
        xlabel=f"false positive rate ({name_in} flagged)",
        ylabel=f"true positive rate ({name_out} flagged)",
        title="ROC, OOD positive",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=120)
    plt.close(fig)


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
            lines.append(
                f"  recon_factor {lv['recon_factor']:<5g} (t*={lv['t_start']}, {lv['steps']} steps): "
                f"AUROC {lv['auroc']:.4f} FPR95 {lv['fpr95']:.4f}"
            )
    for name, sm in m.get("per_score", {}).items():  # --score nll|both: every score's AUROC
        lines.append(f"  score {name:<6} AUROC {sm['auroc']:.4f} FPR95 {sm['fpr95']:.4f}")
    for name, sm in m.get("likelihood", {}).get("sets", {}).items():
        lines.append(
            f"  bits/dim of the {name} set: {sm['bpd_mean']:.4f} ± {sm['bpd_mean_se'] or 0:.4f} "
            f"({sm['num_images']} images)"
        )
    t = m["timing"]
    lines.append(
        f"cost: {m['cost']['nfe_per_image']} network evaluations per image "
        f"({m['cost']['model_calls_per_batch']} batched model calls per batch), "
        f"{t['images_per_s']:.1f} images/s ({m['counts']['scored']} images scored in {t['score_s']:.1f} s)"
    )
    return "\n".join(lines)


# ---- the whole run -------------------------------------------------------------------------


# OODSettings fields that are DDPMConfig fields of the same name and meaning
SAME_NAMED = (
    "score", "sample_timesteps", "loss_type", "lpips", "recon_draws", "nll_timesteps", "path_steps",
    "msma_levels", "patch_grid", "hidden_levels", "hidden_grid", "stats_samples", "batch_size", "seed",
    "mixed_precision",
)  # fmt: skip


def settings_from_config(cfg) -> OODSettings:
    """The OOD flags of a DDPMConfig as OODSettings (checked there: an unknown --score fails before any loading)."""
    return OODSettings(
        **{name: getattr(cfg, name) for name in SAME_NAMED},
        recon_factors=list(cfg.recon_factors) if cfg.recon_factors else [cfg.recon_factor],
        recon_zscore=cfg.recon_factors is not None,
        eta=cfg.ddpm,
    )


def find_part(score, kind):
    """The score itself or the part of a composite that is a `kind` (None if neither)."""
    if isinstance(score, kind):
        return score
    return next((p for p in getattr(score, "parts", ()) if isinstance(p, kind)), None)


def _notices(cfg, channels: int, size: int, recon) -> None:
    """Flags that the run does not follow, said once on stderr."""
    for flag, value, used in (("size", cfg.size, size), ("channels", cfg.channels, channels)):
        if value is not None and value != used:
            logger.warning(
                f"notice: --{flag} {value} ignored: the model scores "
                f"{used}-{'px' if flag == 'size' else 'channel'} images"
            )
    if cfg.scheduler != "ddim":
        logger.warning(
            f"notice: --scheduler {cfg.scheduler} ignored: reconstruction uses DDIM with eta = --ddpm, as the original"
        )
    if same_dataset(cfg.dataset, cfg.out_dataset):
        logger.warning(
            f"notice: --out_dataset {cfg.out_dataset} is the in-distribution --dataset: both sets are its test split, "
            f"so the scores cannot separate them (AUROC near 0.5); pass another --out_dataset"
        )
    for line in snap_notices(recon.levels) if recon is not None else ():
        logger.warning(line)


def _load_sets(cfg, channels: int, size: int, with_stats: bool) -> dict:
    data = data_settings(cfg, keep_format=False)  # the model, not --size/--channels, decides the format
    images = {
        "in": load_set(cfg.dataset, "test", data, channels, size, cfg.max_samples, "in-distribution"),
        "out": load_set(cfg.out_dataset, "test", data, channels, size, cfg.max_samples, "OOD"),
    }
    if with_stats:
        images["stats"] = load_stats_images(cfg.dataset, data, cfg.stats_samples, channels, size, images["in"])
    return images


def _per_level(run: OODRun, recon) -> tuple:
    """(per-level metrics for ood_results.json, {factor: (in scores, out scores)} for the ROC plot)."""
    if recon is None:
        return [], {}
    per_level, per_level_scores = [], {}
    for level in recon.levels:
        tag = "" if len(recon.levels) == 1 else f"@{level.factor:g}"
        cols = [i for i, c in enumerate(run.columns) if c in (f"recon_error{tag}", f"lpips{tag}")]
        level_scores = [run.features[s][:, cols].sum(1) for s in ("in", "out")]
        per_level_scores[level.factor] = level_scores
        entry = {"recon_factor": level.factor, "t_start": level.t_start, "steps": len(level.timesteps)}
        if level.t_requested is not None:
            entry["t_requested"] = level.t_requested
        per_level.append({**entry, **ood_metrics(*level_scores)})
    return per_level, per_level_scores


def _likelihood_section(nll, seconds: float) -> dict:
    from ..diffusion.likelihood import summarise

    T, K = nll.model.T, nll.settings.nll_timesteps
    summaries = {name: summarise(r, T, K) for name, r in nll.results.items()}
    for summary in summaries.values():
        summary.pop("terms_bpd_mean", None)  # per-timestep profiles belong to sample_ddpm.py --nll
    return dict(nll_timesteps=K, sets=summaries, calls_per_image=nll.nfe_per_image, seconds=round(seconds, 3))


def _results(cfg, loaded, device, run: OODRun, per_level, timing) -> dict:
    from ..models.unet import count_parameters

    channels, size = model_format(loaded)
    recon, s = find_part(run.score, ReconScore), run.settings
    results = {
        **run.metrics,
        "per_level": per_level,
        "counts": run.counts(),
        "score": run.score.describe(),
        "settings": {
            "dataset": cfg.dataset,
            "out_dataset": cfg.out_dataset,
            **{k: v for k, v in s.to_dict().items() if k not in ("mixed_precision", "eta")},
            "t_start": [lv.t_start for lv in recon.levels] if recon else None,
            "ddpm_eta": s.eta,
            "max_samples": cfg.max_samples,
            "stats_samples": s.stats_samples if "stats" in run.features else None,
            "mixed_precision": resolve_mixed_precision(s.mixed_precision, device) or "no",
        },
        "model": {
            "checkpoint": str(cfg.checkpoint),
            "source": str(loaded.source),
            "image_size": size,
            "channels": channels,
            "latent": loaded.vae is not None,
            "timesteps": loaded.scheduler_config["num_train_timesteps"],
            "parameters": count_parameters(loaded.unet),
        },
        "cost": {
            "nfe_per_image": run.nfe_per_image,
            "model_calls_per_batch": max(len(lv.timesteps) for lv in recon.levels) if recon else run.nfe_per_image,
        },
        "timing": {
            "load_s": round(timing["load_s"], 3),
            "score_s": round(run.timings["score_s"], 3),
            "fit_s": round(run.timings["fit_s"], 3),
            "images_per_s": run.timings["images_per_s"],
            "total_s": None,
            "device": str(device),
        },
    }
    if run.per_score:
        results["per_score"] = run.per_score
    nll = find_part(run.score, NLLScore)
    if nll is not None:
        results["likelihood"] = _likelihood_section(nll, run.timings["score_s"])
    return results


def _prepare(cfg, device) -> tuple:
    """(settings, loaded model, score), failing fast: the settings first, LPIPS and the model's fitness next."""
    settings = settings_from_config(cfg)
    if settings.lpips:
        require_lpips_weights()
    loaded = load_checkpoint_model(cfg, device)
    model = ScoreModel(loaded, device, settings.mixed_precision, settings.seed, settings.batch_size)
    return settings, loaded, build_score(settings.score, model, settings)


def run_ood(cfg, device=None) -> dict:
    """ood_ddpm.py: score both test sets, print the report, write the four result files
    (--fit and --detector: ddpm_hf/commands/detect.py). The flags are checked as the command checks them."""
    validate(cfg, timesteps_known=False)
    start = time.perf_counter()
    device = compute_device(device)
    settings, loaded, score = _prepare(cfg, device)
    out_dir = prepare_output_dir(cfg)
    channels, size = model_format(loaded)
    recon = find_part(score, ReconScore)
    _notices(cfg, channels, size, recon)
    images = _load_sets(cfg, channels, size, with_stats=score.needs_training_images)
    timing = {"load_s": time.perf_counter() - start}
    ready_device(cfg.mixed_precision, device)  # after the checks: a bad input still gets one line
    run = evaluate(score, images)
    per_level, per_level_scores = _per_level(run, recon)
    results = _results(cfg, loaded, device, run, per_level, timing)
    multi = settings.recon_zscore and isinstance(score, ReconScore)

    def write_others(folder: Path) -> None:
        write_scores_csv(folder / "scores.csv", run)
        metrics = {**run.metrics, **({"lpips": True} if settings.lpips else {})}
        xlabel = None if isinstance(score, ReconScore) else f"anomaly score ({score.name})"
        labels = (cfg.dataset, cfg.out_dataset)
        plot_results(folder, run.scores["in"], run.scores["out"], per_level_scores, labels, metrics, multi, xlabel)

    results["timing"]["total_s"] = round(time.perf_counter() - start, 3)
    write_results(out_dir, results, write_others)
    print(format_report(results))
    print(
        f"results: {out_dir / 'ood_results.json'}, {out_dir / 'scores.csv'}, {out_dir / 'histogram.png'}, "
        f"{out_dir / 'roc.png'}"
    )
    return results
