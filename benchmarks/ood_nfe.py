"""OOD detection: AUROC against cost (network evaluations per image) for a list of sampling-step counts.

    python benchmarks/ood_nfe.py --checkpoint outputs/quickstart
    python benchmarks/ood_nfe.py --checkpoint outputs/quickstart --steps 300 50 20 --budget_minutes 20
    python benchmarks/ood_nfe.py --plot_only                       # redraw the plot from the JSON
    python benchmarks/ood_nfe.py --table                           # print the JSON as docs/ood.md's table

Every setting is one `ood_ddpm.py` run (the same code path: its flags parsed by its parser, then
`ddpm_hf.ood.scoring.run_ood`, in this process so the model and data load in seconds), on the SAME images
(the first --max_samples of each test split) with the same --seed, so AUROC differences between
settings are paired. Two scores per sampling-step count S (--sample_timesteps):
- single: the seed default, one noise level (--recon_factor 0.5);
- multi:  --recon_factors 0.1 0.2 0.3 0.4 0.5, z-scored with --stats_samples training images.
Everything else stays at the seed's defaults (eta = --ddpm 1.0, huber error, batch 128, fp32).

The reference is the seed default (single level, S = 300); it always runs. The other settings run
single level first, then multi level, cheapest first; before each one the script extrapolates its
cost from the throughput (image-NFE/s) measured so far and skips it, saying so in the JSON, when it
would end past --budget_minutes. For each setting the JSON also gives the minutes the default
report (every test image: --max_samples unset) would take at the measured images/s (derived, not
measured), and the paired bootstrap standard error of its AUROC difference to the reference.
Writes OUTPUT (default benchmarks/results/ood_nfe.json) and the plot next to it (.png).
"""

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's ddpm_hf and ood_ddpm.py, never another one

TOLERANCE = 0.005  # "within 0.005 AUROC of the seed default"
SIDECAR = "ood_nfe_timing.json"
METRICS = ("auroc", "fpr95", "fpr95_in_positive", "aupr_in", "aupr_out")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="outputs/quickstart", help="trained pipeline folder (make demo's model)")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--out_dataset", default="animalmnist")
    p.add_argument(
        "--steps", type=int, nargs="+", default=[300, 150, 100, 50, 30, 20, 10], help="--sample_timesteps values"
    )
    p.add_argument(
        "--factors", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5], help="levels of the multi-level score"
    )
    p.add_argument("--max_samples", type=int, default=200, help="images of each test set, the same for every setting")
    p.add_argument(
        "--stats_samples", type=int, default=256, help="training images of the multi-level z-scores (seed default)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--budget_minutes", type=float, default=55.0, help="skip settings whose extrapolated end is past this"
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples for the AUROC differences")
    p.add_argument("--work_dir", default="/tmp/ood_nfe_runs", help="each run's ood_ddpm.py output folder goes here")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "ood_nfe.json"))
    p.add_argument(
        "--machine", default=None, help="label of the machine in the JSON (default: /proc/cpuinfo's model name)"
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="take a setting's results from --work_dir when an earlier run there had the same flags (marked 'reused')",
    )
    p.add_argument("--plot_only", action="store_true")
    p.add_argument("--table", action="store_true", help="print the results JSON as a Markdown table, run nothing")
    return p.parse_args(argv)


def machine_label():
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
        cores = sum(line.startswith("processor") for line in info.splitlines())
        avx = (
            "AVX512-BF16"
            if "avx512_bf16" in flags
            else ("AVX-512 without BF16" if "avx512f" in flags else "no AVX-512")
        )
        return f"{cores}-core {name}, {avx}"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def settings(args):
    """(mode, S, factors) of every setting: single level first, then multi level."""
    out = [("single", s, [0.5]) for s in args.steps]
    return out + [("multi", s, list(args.factors)) for s in args.steps]


def plan(factors, S, scheduler_config):
    """Network evaluations per image of one setting (no model call: the timestep plan only), or the reason
    it cannot run (a level's t* below the first sampling timestep)."""
    from ddpm_hf.ood.scoring import plan_levels
    from ddpm_hf.util.errors import UsageError

    try:
        _, levels = plan_levels(factors, scheduler_config, S)
    except UsageError as err:
        return str(err)
    return sum(len(lv.timesteps) for lv in levels)


def flags_of(args, mode, S, factors, out_dir):
    argv = [
        "--checkpoint",
        args.checkpoint,
        "--dataset",
        args.dataset,
        "--out_dataset",
        args.out_dataset,
        "--sample_timesteps",
        str(S),
        "--max_samples",
        str(args.max_samples),
        "--seed",
        str(args.seed),
        "--output_dir",
        str(out_dir),
        "--overwrite_output_dir",
    ]
    if mode == "multi":
        argv += ["--recon_factors", *map(str, factors), "--stats_samples", str(args.stats_samples)]
    return argv


def earlier_results(args, mode, S, factors, out_dir):
    """--reuse: the results an earlier run left in out_dir, when its flags were these."""
    earlier = out_dir / "ood_results.json"
    if not (args.reuse and earlier.exists() and (out_dir / "scores.csv").exists()):
        return None
    results = json.loads(earlier.read_text())
    wanted = {
        "dataset": args.dataset,
        "out_dataset": args.out_dataset,
        "recon_factors": factors,
        "sample_timesteps": S,
        "max_samples": args.max_samples,
        "seed": args.seed,
        "ddpm_eta": 1.0,
        "batch_size": 128,
        "loss_type": "huber",
        "recon_draws": 1,
        "lpips": False,
        "score": "recon",
        "stats_samples": args.stats_samples if mode == "multi" else None,
    }
    same_model = Path(results["model"]["checkpoint"]).resolve() == Path(args.checkpoint).resolve()
    return results if same_model and all(results["settings"].get(k) == v for k, v in wanted.items()) else None


def run_setting(args, mode, S, factors, out_dir):
    """One ood_ddpm.py run: (results, wall seconds). Beside its results it leaves SIDECAR: this process's CPU
    seconds (all threads) and the 1-minute load average at the end, to show how much of the shared CPU it had."""
    import ood_ddpm
    from ddpm_hf.commands.ood import run_ood
    from ddpm_hf.config.parsing import parse_config

    cfg, _ = parse_config(ood_ddpm.build(), flags_of(args, mode, S, factors, out_dir))
    assert (cfg.ddpm, cfg.batch_size, cfg.loss_type, cfg.recon_draws) == (1.0, 128, "huber", 1), "seed defaults changed"
    start, cpu = time.perf_counter(), time.process_time()
    results = run_ood(cfg)
    wall = time.perf_counter() - start
    (out_dir / SIDECAR).write_text(
        json.dumps({"cpu_s": round(time.process_time() - cpu, 1), "load_avg_1min": os.getloadavg()[0]})
    )
    return results, wall


def read_scores(path):
    """Final per-image scores of a run's scores.csv: (in, out) lists."""
    sets = {"in": [], "out": []}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            sets[row["set"]].append(float(row["score"]))
    return sets["in"], sets["out"]


def paired_bootstrap(ref, other, n, seed=0):
    """Standard error of AUROC(other) - AUROC(ref) over images resampled with replacement (the same
    resample for both scores: the images are shared)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    (ri, ro), (oi, oo) = (tuple(map(np.asarray, s)) for s in (ref, other))
    y = np.r_[np.zeros(len(ri)), np.ones(len(ro))]
    deltas = []
    for _ in range(n):
        a, b = rng.integers(0, len(ri), len(ri)), rng.integers(0, len(ro), len(ro))
        deltas.append(roc_auc_score(y, np.r_[oi[a], oo[b]]) - roc_auc_score(y, np.r_[ri[a], ro[b]]))
    return float(np.std(deltas, ddof=1))


def full_counts(args):
    """Images the default report scores: every test image of both sets (--max_samples unset)."""
    from ddpm_hf.config.sections import DataSettings
    from ddpm_hf.data.images import load_split

    data = DataSettings()
    return {
        name: len(load_split(ds, "test", data)[0]) for name, ds in (("in", args.dataset), ("out", args.out_dataset))
    }


def recommend(rows):
    """The cheapest measured setting (NFE/image, then the report's minutes) within TOLERANCE of the reference."""
    ref = next(r for r in rows if r.get("reference"))
    done = [r for r in rows if "auroc" in r]
    within = [r for r in done if r["auroc"] >= ref["auroc"] - TOLERANCE]
    best = min(within, key=lambda r: (r["nfe_per_image"], r["report_minutes"]))
    better = [
        r
        for r in done
        if r["mode"] == "multi" and r["auroc"] > ref["auroc"] and r["report_minutes"] < ref["report_minutes"]
    ]
    cheapest_better = min(better, key=lambda r: (r["nfe_per_image"], r["report_minutes"])) if better else None

    def tag(r):
        return r and {
            k: r[k] for k in ("mode", "sample_timesteps", "nfe_per_image", "auroc", "report_minutes", "flags")
        }

    return {
        "rule": "cheapest setting (NFE/image) whose AUROC is >= the seed default's (single level, S=300) - "
        f"{TOLERANCE}",
        "reference": tag(ref),
        "recommended": tag(best),
        "multi_level_beating_reference_cheaper": tag(cheapest_better),
    }


def plot(doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["settings"] if "auroc" in r]
    ref = next(r for r in rows if r.get("reference"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, label, marker in (
        ("single", "single level (recon_factor 0.5, the seed default)", "o"),
        ("multi", "multi level (0.1-0.5, z-scored)", "s"),
    ):
        pts = sorted((r["nfe_per_image"], r["auroc"], r["sample_timesteps"]) for r in rows if r["mode"] == mode)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        for x, y, s in pts:
            ax.annotate(f"S={s}", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7)
    ax.axhline(ref["auroc"], color="grey", lw=0.8, ls="--", label=f"seed default (S=300): {ref['auroc']:.4f}")
    ax.axhspan(ref["auroc"] - TOLERANCE, ref["auroc"], color="grey", alpha=0.15, label=f"within {TOLERANCE} of it")
    ax.set_xscale("log")
    c = doc["counts"]
    ax.set(
        xlabel="network evaluations per image (log)",
        ylabel="AUROC (OOD positive)",
        title=f"{doc['dataset']} vs {doc['out_dataset']}: {c['in']} / {c['out']} test images, eta 1.0",
    )
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(doc):
    """docs/ood.md's table: one row per setting, measured or skipped."""
    lines = [
        "| score | S | NFE / image | AUROC | ΔAUROC (± paired SE) | FPR95 | AUPR-in | AUPR-out | images/s | "
        "default report (derived) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["settings"]:
        name = (
            "single level 0.5" + (" (seed default)" if r["reference"] else "")
            if r["mode"] == "single"
            else "multi level 0.1-0.5"
        )
        if "auroc" not in r:
            why = (
                f"~{r['estimated_s'] / 60:.0f} min extrapolated"
                if "estimated_s" in r
                else "a level below the first timestep"
            )
            lines.append(
                f"| {name} | {r['sample_timesteps']} | {r.get('nfe_per_image', '-')} | not run: {why} | | | | | | |"
            )
            continue
        delta = "reference" if r["reference"] else f"{r['delta_auroc']:+.4f} ± {r['delta_auroc_se']:.4f}"
        lines.append(
            f"| {name} | {r['sample_timesteps']} | {r['nfe_per_image']} | **{r['auroc']:.4f}** | {delta} | "
            f"{r['fpr95']:.3f} | "
            f"{r['aupr_in']:.3f} | {r['aupr_out']:.3f} | {r['images_per_s']:.2f} | {r['report_minutes']:.0f} min |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    output = Path(args.output)
    if args.table:
        print(table(json.loads(output.read_text())))
        return
    if args.plot_only:
        plot(json.loads(output.read_text()), output.with_suffix(".png"))
        return
    from ddpm_hf.models.loader import load_model

    start = time.perf_counter()
    scheduler_config = load_model(args.checkpoint, None).scheduler_config
    report = full_counts(args)
    todo = [(m, s, f, plan(f, s, scheduler_config)) for m, s, f in settings(args)]
    ref_key = ("single", max(args.steps))
    rows, scores = (
        [
            {"mode": m, "sample_timesteps": s, "levels": f, "reference": False, "skipped": f"impossible: {nfe}"}
            for m, s, f, nfe in todo
            if isinstance(nfe, str)
        ],
        {},
    )
    todo = [t for t in todo if not isinstance(t[3], str)]
    # reference first, then single level cheapest first, then multi level cheapest first
    todo.sort(key=lambda t: ((t[0], t[1]) != ref_key, t[0] == "multi", t[3]))
    rate = {}  # mode -> image-NFE per second measured so far (total, seconds)
    for mode, S, factors, nfe in todo:
        images = 2 * args.max_samples + (args.stats_samples if mode == "multi" else 0)
        row = {
            "mode": mode,
            "sample_timesteps": S,
            "levels": factors,
            "nfe_per_image": nfe,
            "reference": (mode, S) == ref_key,
        }
        out_dir = Path(args.work_dir) / f"{mode}_S{S}"
        earlier = earlier_results(args, mode, S, factors, out_dir)
        known = rate.get(mode) or rate.get("single")
        if known and not row["reference"] and earlier is None:
            estimate = nfe * images / (known[0] / known[1])
            elapsed = time.perf_counter() - start
            if elapsed + estimate > args.budget_minutes * 60:
                row.update(
                    skipped=f"extrapolated {estimate / 60:.1f} min at the {mode if mode in rate else 'single'}-level "
                    f"throughput measured so far; {elapsed / 60:.1f} min spent of the {args.budget_minutes:g} "
                    "min budget",
                    estimated_s=round(estimate, 1),
                )
                print(f"== skip {mode} S={S}: {row['skipped']}", flush=True)
                rows.append(row)
                continue
        print(
            f"== {mode} S={S}: {nfe} NFE/image, {images} images" + (f" (reusing {out_dir})" if earlier else ""),
            flush=True,
        )
        if earlier:
            res, wall, reused = earlier, earlier["timing"]["total_s"], True
        else:
            (res, wall), reused = run_setting(args, mode, S, factors, out_dir), False
        t = res["timing"]
        total, secs = rate.get(mode, (0.0, 0.0))
        rate[mode] = (total + nfe * res["counts"]["scored"], secs + t["score_s"])
        report_images = report["in"] + report["out"] + (args.stats_samples if mode == "multi" else 0)
        row.update({k: round(res[k], 4) for k in METRICS})
        row.update(
            per_level_auroc={f"{lv['recon_factor']:g}": round(lv["auroc"], 4) for lv in res["per_level"]}
            if mode == "multi"
            else None,
            model_calls_per_batch=res["cost"]["model_calls_per_batch"],
            counts=res["counts"],
            images_per_s=round(t["images_per_s"], 3),
            score_s=round(t["score_s"], 1),
            seconds=round(wall, 1),
            reused=reused,
            report_images=report_images,
            report_minutes=round(report_images / t["images_per_s"] / 60, 2),
            flags="--sample_timesteps %d" % S
            + (" --recon_factors " + " ".join(f"{f:g}" for f in factors) if mode == "multi" else ""),
        )
        sidecar = out_dir / SIDECAR
        row.update(json.loads(sidecar.read_text()) if sidecar.exists() else {"cpu_s": None, "load_avg_1min": None})
        scores[(mode, S)] = read_scores(out_dir / "scores.csv")
        rows.append(row)
    ref_scores = scores[ref_key]
    ref_auroc = next(r for r in rows if r["reference"])["auroc"]
    for row in rows:
        if "auroc" in row and not row["reference"]:
            row["delta_auroc"] = round(row["auroc"] - ref_auroc, 4)
            row["delta_auroc_se"] = round(
                paired_bootstrap(ref_scores, scores[(row["mode"], row["sample_timesteps"])], args.bootstrap), 4
            )
    rows.sort(key=lambda r: (r["mode"] == "multi", -r["sample_timesteps"]))
    import torch

    doc = {
        "what": "AUROC against network evaluations per image (NFE) of ood_ddpm.py, paired: the same images and "
        "seed in every setting",
        "machine": args.machine or machine_label(),
        "torch_threads": torch.get_num_threads(),
        "checkpoint": args.checkpoint,
        "dataset": args.dataset,
        "out_dataset": args.out_dataset,
        "counts": {"in": args.max_samples, "out": args.max_samples, "stats_multi_level": args.stats_samples},
        "fixed": {
            "ddpm_eta": 1.0,
            "loss_type": "huber",
            "batch_size": 128,
            "mixed_precision": "no (fp32)",
            "seed": args.seed,
            "max_samples": args.max_samples,
        },
        "default_report": {
            **report,
            "stats_multi_level": args.stats_samples,
            "note": "report_minutes = the default report's images (every test image, plus the statistics images of the "
            "multi-level score) / the setting's measured images/s: derived, not measured; model and data "
            "loading (seconds) not included",
        },
        "budget_minutes": args.budget_minutes,
        "study_minutes": round((time.perf_counter() - start) / 60, 1),
        "reused_minutes": round(sum(r["seconds"] for r in rows if r.get("reused")) / 60, 1),
        "command": "python benchmarks/ood_nfe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": rows,
    }
    doc["recommendation"] = recommend(rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, output.with_suffix(".png"))
    print(json.dumps(doc["recommendation"], indent=2))
    print(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
