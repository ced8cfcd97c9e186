"""Time-to-quality on mnist5k: FID and KID against images seen, for a list of training recipes.

    python benchmarks/quality.py                                   # every recipe, 20,000 images each
    python benchmarks/quality.py --recipes benchmarks/recipes/original.yaml benchmarks/recipes/v_prediction.yaml
    python benchmarks/quality.py --speed_steps 30                  # add this CPU's training minutes per recipe
    python benchmarks/quality.py --plot_only                       # redraw the plot from the JSON

A recipe is a YAML file of `train_ddpm.py` flags laid over `benchmarks/recipes/_base.yaml` (today's
quickstart settings; `original.yaml` is empty, so it is the base itself). Each recipe is trained by
`train_ddpm.py` from the same seed for the same budget of images seen; its EMA model is evaluated with
`--eval_fid_every` (1,000 samples with the recipe's own sampler against the mnist5k training split,
one evaluation per epoch of 4,000 images). The held-out test split, scored the same way, is the floor.
Writes OUTPUT_DIR/quality.json and OUTPUT_DIR/quality.png (FID against images seen, the floor dashed).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "benchmarks" / "recipes"
TRAIN_IMAGES = 4000  # mnist5k's training split: one epoch


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument(
        "--recipes", nargs="+", type=Path, default=None, help="recipe YAML files (default: all of benchmarks/recipes/)"
    )
    p.add_argument("--base", type=Path, default=RECIPES / "_base.yaml", help="settings every recipe starts from")
    p.add_argument("--images", type=int, default=20_000, help="budget: training images seen per recipe")
    p.add_argument("--eval_every", type=int, default=1, help="evaluate every N epochs (4,000 images each)")
    p.add_argument("--fid_num_samples", type=int, default=1000)
    p.add_argument("--parallel", type=int, default=1, help="recipes trained at once (a GPU takes several)")
    p.add_argument(
        "--speed_steps", type=int, default=0, help="also time N optimiser steps of each recipe on this machine"
    )
    p.add_argument("--output_dir", type=Path, default=REPO / "benchmarks" / "results" / "quality")
    p.add_argument("--plot_only", action="store_true", help="redraw quality.png from OUTPUT_DIR/quality.json")
    p.add_argument(
        "--speed_only",
        action="store_true",
        help="with --speed_steps: add this machine's training speed to an existing OUTPUT_DIR/quality.json",
    )
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: flags passed to every train_ddpm.py run")
    args = p.parse_args(argv)
    args.train_flags = [f for f in args.train_flags if f != "--"]
    args.recipes = args.recipes or sorted(r for r in RECIPES.glob("*.yaml") if not r.name.startswith("_"))
    return args


def recipe_config(base: Path, recipe: Path) -> dict:
    return {**(yaml.safe_load(base.read_text()) or {}), **(yaml.safe_load(recipe.read_text()) or {})}


def train_command(config_path: Path, out: Path, epochs: int, args, extra=()) -> list:
    return [
        sys.executable,
        str(REPO / "train_ddpm.py"),
        "--config",
        str(config_path),
        "--output_dir",
        str(out),
        "--overwrite_output_dir",
        "--n_epochs",
        str(epochs),
        "--report_to",
        "none",
        "--seed",
        "0",
        "--checkpointing_steps",
        "1000000",
        "--sample_and_save_freq",
        "1000000",
        *extra,
        *args.train_flags,
    ]


def launch(name: str, config: dict, args, speed=False) -> tuple:
    """Start one train_ddpm.py run of a recipe (a quality run, or a short timing run); returns (process, folder)."""
    out = args.output_dir / ("speed" if speed else "runs") / name
    out.mkdir(parents=True, exist_ok=True)
    config_path = out.parent / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    if speed:
        extra = ["--max_train_steps", str(args.speed_steps), "--logging_steps", str(max(args.speed_steps // 3, 1))]
        cmd = train_command(config_path, out, 1, args, extra)
    else:
        epochs = max(round(args.images / TRAIN_IMAGES), 1)
        extra = [
            "--eval_fid_every",
            str(args.eval_every),
            "--fid_num_samples",
            str(args.fid_num_samples),
            "--fid_reference",
            "mnist5k",
        ]
        cmd = train_command(config_path, out, epochs, args, extra)
    log = open(out.parent / f"{name}.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env), out


def run_all(jobs: dict, args, speed=False) -> dict:
    """Run {name: config} at most --parallel at a time; returns {name: (exit code, seconds, folder)}."""
    pending, running, done = list(jobs.items()), {}, {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name, config = pending.pop(0)
            running[name] = (*launch(name, config, args, speed), time.time())
        time.sleep(1)
        for name, (proc, out, start) in list(running.items()):
            if proc.poll() is not None:
                done[name] = (proc.returncode, time.time() - start, out)
                del running[name]
                print(
                    f"{'speed' if speed else 'quality'} run {name}: exit {proc.returncode} after {done[name][1]:.0f} s",
                    flush=True,
                )
    return done


def read_points(out: Path, config: dict) -> list:
    """FID/KID records of a run's train_log.jsonl, with the images seen at each."""
    log = out / "train_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    per_step = config.get("batch_size", 128) * config.get("gradient_accumulation_steps", 1)
    # A partial last batch makes an epoch a little less than its steps x batch: count whole epochs as 4,000.
    return [
        dict(
            images=min(r["step"] * per_step, (r["epoch"] + 1) * TRAIN_IMAGES),
            epoch=r["epoch"] + 1,
            fid=r["fid"],
            kid=r["kid_mean"],
        )
        for r in records
        if "fid" in r
    ]


def read_speed(out: Path) -> float:
    """Training images/s of a timing run: the log windows after the first (which holds the warm-up)."""
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    rates = [r["images_per_sec"] for r in records if "images_per_sec" in r][1:]
    return sum(rates) / len(rates) if rates else float("nan")


def floor(args) -> dict:
    """FID/KID of 1,000 held-out test digits against the training split: what a perfect model scores."""
    sys.path.insert(0, str(REPO))
    from ddpm_hf.config.options import DDPMConfig
    from ddpm_hf.config.sections import Sections
    from ddpm_hf.data.images import load_images
    from ddpm_hf.metrics.fid import FIDEvaluator

    flags = dict(zip(args.train_flags[::2], args.train_flags[1::2]))
    max_ref = flags.get("--fid_reference_max")
    cfg = DDPMConfig(
        dataset="mnist5k",
        size=28,
        inception_weights=flags.get("--inception_weights"),
        fid_reference_max=int(max_ref) if max_ref else None,
    )
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    sections = Sections.of(cfg)
    evaluator = FIDEvaluator(sections.fid, sections.data, "mnist5k", "train", device=device, batch_size=cfg.batch_size)
    test = load_images("mnist5k", "test", sections.data, size=28, channels=1)
    result = evaluator.evaluate(test.images[: args.fid_num_samples])
    return dict(fid=result["fid"], kid=result["kid_mean"], images=len(test.images[: args.fid_num_samples]))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    ranked = sorted(
        results["recipes"].items(), key=lambda kv: min([p["fid"] for p in kv[1].get("points", [])] or [1e9])
    )
    for i, (name, r) in enumerate(ranked):  # 20 colours, and line styles, so that no two recipes look alike
        if r.get("points"):
            ax.plot(
                [p["images"] for p in r["points"]],
                [p["fid"] for p in r["points"]],
                marker="o",
                ms=3,
                label=name,
                color=plt.cm.tab20(i % 20),
                ls=("-", "--", ":")[i // 20 % 3] if i < 20 else "-.",
            )
    if results.get("floor"):
        ax.axhline(
            results["floor"]["fid"], ls="--", color="k", label=f"held-out digits ({results['floor']['fid']:.1f})"
        )
    ax.set_yscale("log")
    ax.set_xlabel("training images seen")
    ax.set_ylabel(f"FID ({results['fid_num_samples']} EMA samples vs mnist5k train)")
    ax.set_title("time to quality on mnist5k")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def fid_at(points: list, images: int):
    return next((p["fid"] for p in points if p["images"] == images), None)


def table(results: dict, early: int = 8000) -> str:
    """One row per recipe, best final FID first; the FID at `early` images compares runs stopped early too."""
    lines = [
        f"| recipe | images seen | CPU minutes | FID at {early:,} | FID | KID ×1000 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    done = {k: r for k, r in results["recipes"].items() if r.get("points")}
    for name, r in sorted(
        done.items(),
        key=lambda kv: (kv[1]["points"][-1]["images"] < results["images_budget"], kv[1]["points"][-1]["fid"]),
    ):
        last, ips = r["points"][-1], r.get("train_images_per_sec")
        minutes = f"{last['images'] / ips / 60:.1f}" if ips else "–"
        at = fid_at(r["points"], early)
        lines.append(
            f"| {name} | {last['images']:,} | {minutes} | {f'{at:.1f}' if at else '–'} | {last['fid']:.1f} | "
            f"{1000 * last['kid']:.1f} |"
        )
    lines += [
        f"| {name} | – | – | – | failed (exit {r.get('exit_code')}) | – |"
        for name, r in results["recipes"].items()
        if not r.get("points")
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "quality.json"
    if args.plot_only:
        results = json.loads(path.read_text())
        plot(results, args.output_dir / "quality.png")
        print(table(results))
        return
    configs = {r.stem: recipe_config(args.base, r) for r in args.recipes}
    results = dict(
        images_budget=args.images,
        fid_num_samples=args.fid_num_samples,
        base=str(args.base.resolve().relative_to(REPO)),
        train_flags=args.train_flags,
        recipes={},
    )
    if args.speed_only:
        results = json.loads(path.read_text())
    if args.speed_steps:
        import platform

        results["speed_machine"] = dict(
            cpu=platform.processor() or platform.machine(),
            threads=os.cpu_count(),
            avx512_bf16="avx512_bf16" in Path("/proc/cpuinfo").read_text(),
        )
        for name, (code, _, out) in run_all(configs, args, speed=True).items():
            results["recipes"].setdefault(name, {})["train_images_per_sec"] = read_speed(out) if code == 0 else None
    if args.speed_only:
        path.write_text(json.dumps(results, indent=1))
        print(table(results))
        return
    for name, (code, seconds, out) in run_all(configs, args).items():
        results["recipes"].setdefault(name, {}).update(
            config=configs[name], exit_code=code, wall_seconds=round(seconds, 1), points=read_points(out, configs[name])
        )
    results["floor"] = floor(args)
    path.write_text(json.dumps(results, indent=1))
    plot(results, args.output_dir / "quality.png")
    print(table(results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
