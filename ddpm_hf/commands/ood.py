"""ood_ddpm.py: score the in-distribution and OOD test sets with the OOD method (ddpm_hf/ood/scoring.py),
print the report and write the four result files (ood_results.json, scores.csv, histogram.png,
roc.png) together, atomically. The DDPMConfig is unpacked here."""

import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.images import DataOptions, same_dataset
from ..models.loader import load_model
from ..ood import scoring as method
from ..ood.scoring import (
    SET_IDS,
    Scorer,
    combine,
    load_set,
    load_stats_images,
    model_format,
    ood_metrics,
    plan_levels,
    snap_notices,
)
from ..util.errors import UsageError
from ..util.files import make_output_dir, remove, simulate_disk_full, writing
from ..util.lock import ensure_not_in_use, lock_output_dir
from ..util.precision import resolve_mixed_precision
from .common import ready_device

RESULT_FILES = ("ood_results.json", "scores.csv", "histogram.png", "roc.png")


def default_output_dir(checkpoint: str) -> Path:
    return Path("ood_results") / Path(checkpoint.rstrip("/")).stem


def prepare_output_dir(cfg) -> Path:
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.checkpoint)
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
            lines.append(
                f"  recon_factor {lv['recon_factor']:<5g} (t*={lv['t_start']}, {lv['steps']} steps): "
                f"AUROC {lv['auroc']:.4f} FPR95 {lv['fpr95']:.4f}"
            )
    for name, sm in m.get("per_score", {}).items():  # --score nll|both: every score's AUROC
        lines.append(f"  score {name:<6} AUROC {sm['auroc']:.4f} FPR95 {sm['fpr95']:.4f}")
    for name, sm in m.get("likelihood", {}).get("sets", {}).items():
        lines.append(
            f"  bits/dim of the {name} set: {sm['bpd_mean']:.4f} ± {sm['bpd_mean_se'] or 0:.4f} ({sm['num_images']} images)"
        )
    t = m["timing"]
    lines.append(
        f"cost: {m['cost']['nfe_per_image']} network evaluations per image "
        f"({m['cost']['model_calls_per_batch']} batched model calls per batch), "
        f"{t['images_per_s']:.1f} images/s ({m['counts']['scored']} images scored in {t['score_s']:.1f} s)"
    )
    return "\n".join(lines)


# ---- the whole run -------------------------------------------------------------------------


def likelihood_hook(cfg, loaded, images, raw, stats, factors, device) -> tuple:
    """--score nll|both (ddpm_hf/ood/likelihood.py): the bound of every set, the final scores,
    what ood_results.json adds and the CSV's extra columns."""
    from ..ood import likelihood as ood_likelihood

    start = time.perf_counter()
    nll = ood_likelihood.nll_of_sets(loaded, images, cfg, SET_IDS, device)
    recon = {name: combine(raw[name], stats) for name in images}
    T = loaded.scheduler_config["num_train_timesteps"]
    final, added, columns = ood_likelihood.likelihood_scores(cfg, recon, nll, T, ood_metrics)
    added["likelihood"]["seconds"] = round(time.perf_counter() - start, 3)
    added["score"] = ood_likelihood.describe(cfg, describe_score(cfg, factors), T)
    return final, added, columns


def _load(cfg, device):
    """(LPIPS model or None, loaded model), failing fast: LPIPS weights first, the model's fitness for --score next."""
    lpips_model = method.load_lpips(device=device) if cfg.lpips else None  # before anything slow
    loaded = load_model(cfg.checkpoint, cfg, revision=cfg.revision, device=device)
    if cfg.score != "recon":  # a latent model or a bad --nll_timesteps fails before any image is scored
        from ..ood.likelihood import check_model

        check_model(loaded, cfg)
    return lpips_model, loaded


def _notices(cfg, channels: int, size: int, levels) -> None:
    """Flags that the run does not follow, said once on stderr."""
    for flag, value, used in (("size", cfg.size, size), ("channels", cfg.channels, channels)):
        if value is not None and value != used:
            print(
                f"notice: --{flag} {value} ignored: the model scores {used}-{'px' if flag == 'size' else 'channel'} images",
                file=sys.stderr,
            )
    if cfg.scheduler != "ddim":
        print(
            f"notice: --scheduler {cfg.scheduler} ignored: reconstruction uses DDIM with eta = --ddpm, as the original",
            file=sys.stderr,
        )
    if same_dataset(cfg.dataset, cfg.out_dataset):
        print(
            f"notice: --out_dataset {cfg.out_dataset} is the in-distribution --dataset: both sets are its test split, "
            f"so the scores cannot separate them (AUROC near 0.5); pass another --out_dataset",
            file=sys.stderr,
        )
    for line in snap_notices(levels):
        print(line, file=sys.stderr)


def _load_sets(cfg, channels: int, size: int, with_stats: bool) -> dict:
    data = DataOptions.of(cfg, keep_format=False)  # the model, not --size/--channels, decides the format
    images = {
        "in": load_set(cfg.dataset, "test", data, channels, size, cfg.max_samples, "in-distribution"),
        "out": load_set(cfg.out_dataset, "test", data, channels, size, cfg.max_samples, "OOD"),
    }
    if with_stats:
        images["stats"] = load_stats_images(cfg.dataset, data, cfg.stats_samples, channels, size, images["in"])
    return images


def _score_sets(scorer, images: dict, cfg, levels, nfe: int) -> dict:
    batches = sum(math.ceil(len(v) / cfg.batch_size) for v in images.values())
    with tqdm(
        total=batches,
        desc=f"scoring ({len(levels)} level(s) x {cfg.recon_draws} draw(s), {nfe} NFE/image)",
        unit="batch",
    ) as bar:
        return {name: scorer.score(imgs, name, bar) for name, imgs in images.items()}


def _per_level(levels, raw: dict, lpips: bool) -> tuple:
    """(per-level metrics for ood_results.json, {factor: (in scores, out scores)} for the ROC plot)."""
    per_level, per_level_scores = [], {}
    for li, level in enumerate(levels):
        level_scores = [raw[s]["recon_error"][li] + (raw[s]["lpips"][li] if lpips else 0.0) for s in ("in", "out")]
        per_level_scores[level.factor] = level_scores
        entry = {"recon_factor": level.factor, "t_start": level.t_start, "steps": len(level.timesteps)}
        if level.t_requested is not None:
            entry["t_requested"] = level.t_requested
        per_level.append({**entry, **ood_metrics(*level_scores)})
    return per_level, per_level_scores


def _results(cfg, loaded, device, levels, factors, images, metrics, per_level, timing) -> dict:
    channels, size = model_format(loaded)
    scored = sum(len(v) for v in images.values())
    from ..models.unet import count_parameters

    return {
        **metrics,
        "per_level": per_level,
        "counts": {
            "in": len(images["in"]),
            "out": len(images["out"]),
            "stats": len(images.get("stats", [])),
            "scored": scored,
        },
        "score": describe_score(cfg, factors),
        "settings": {
            "dataset": cfg.dataset,
            "out_dataset": cfg.out_dataset,
            "recon_factors": factors,
            "t_start": [lv.t_start for lv in levels],
            "ddpm_eta": cfg.ddpm,
            "sample_timesteps": cfg.sample_timesteps,
            "loss_type": cfg.loss_type,
            "lpips": cfg.lpips,
            "batch_size": cfg.batch_size,
            "max_samples": cfg.max_samples,
            "recon_draws": cfg.recon_draws,
            "stats_samples": cfg.stats_samples if "stats" in images else None,
            "seed": cfg.seed,
            "mixed_precision": resolve_mixed_precision(cfg.mixed_precision, device) or "no",
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
            "nfe_per_image": cfg.recon_draws * sum(len(lv.timesteps) for lv in levels),
            "model_calls_per_batch": max(len(lv.timesteps) for lv in levels),
        },
        "timing": {
            "load_s": round(timing["load_s"], 3),
            "score_s": round(timing["score_s"], 3),
            "images_per_s": scored / max(timing["score_s"], 1e-9),
            "total_s": None,
            "device": str(device),
        },
    }


def run_ood(cfg, device=None) -> dict:
    """ood_ddpm.py: score both test sets, print the report, write the four result files."""
    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lpips_model, loaded = _load(cfg, device)
    out_dir = prepare_output_dir(cfg)
    factors = list(cfg.recon_factors) if cfg.recon_factors else [cfg.recon_factor]
    multi = cfg.recon_factors is not None
    sampler, levels = plan_levels(factors, loaded.scheduler_config, cfg.sample_timesteps)
    channels, size = model_format(loaded)
    _notices(cfg, channels, size, levels)
    images = _load_sets(cfg, channels, size, with_stats=multi or cfg.score == "both")
    timing = {"load_s": time.perf_counter() - start}
    ready_device(cfg.mixed_precision, device)  # after the checks: a bad input still gets one line
    scorer = Scorer(loaded, levels, sampler, cfg, lpips_model, device)
    score_start = time.perf_counter()
    raw = _score_sets(scorer, images, cfg, levels, cfg.recon_draws * sum(len(lv.timesteps) for lv in levels))
    timing["score_s"] = time.perf_counter() - score_start
    stats = raw.get("stats") if multi else None
    final = {name: combine(raw[name], stats) for name in ("in", "out")}
    added, columns = {}, None
    if cfg.score != "recon":
        final, added, columns = likelihood_hook(cfg, loaded, images, raw, stats, factors, device)
    metrics = ood_metrics(final["in"], final["out"])
    per_level, per_level_scores = _per_level(levels, raw, cfg.lpips)
    results = _results(cfg, loaded, device, levels, factors, images, metrics, per_level, timing)
    results.update(added, settings=dict(results["settings"], score=cfg.score))

    def write_others(folder: Path) -> None:
        write_scores_csv(
            folder / "scores.csv", {s: (raw[s], final[s]) for s in ("in", "out")}, levels, cfg.lpips, columns
        )
        plot_results(
            folder,
            final["in"],
            final["out"],
            per_level_scores,
            (cfg.dataset, cfg.out_dataset),
            {**metrics, **({"lpips": True} if cfg.lpips else {})},
            multi,
            added.get("score"),
        )

    results["timing"]["total_s"] = round(time.perf_counter() - start, 3)
    write_results(out_dir, results, write_others)
    print(format_report(results))
    print(
        f"results: {out_dir / 'ood_results.json'}, {out_dir / 'scores.csv'}, {out_dir / 'histogram.png'}, {out_dir / 'roc.png'}"
    )
    return results
