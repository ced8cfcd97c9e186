"""OOD AUROC of the reconstruction score, the bits/dim score and both, on several in/out pairs.

    python benchmarks/ood_pairs.py                                        # the shipped model, every pair
    python benchmarks/ood_pairs.py --pairs animalmnist vflip              # some pairs
    python benchmarks/ood_pairs.py --checkpoint outputs/quickstart        # another model (results merged)
    python benchmarks/ood_pairs.py --table_only                           # print the table of the JSON

In-distribution: the first --max_samples mnist5k test digits (what ood_ddpm.py scores). Each
out-of-distribution set is a folder of PNGs; all but `animalmnist` are made here from *other*
mnist5k test digits (test images OUT_OFFSET, OUT_OFFSET+1, ..., loaded through ddpm_hf's own data
loading, so never an in-distribution image), transformed:

    animalmnist  the animalmnist test split (a registry name: far OOD, animal silhouettes)
    vflip        digits flipped upside down (near OOD: the same strokes, widths and ink statistics)
    rot90        digits rotated 90 degrees counter-clockwise (near OOD, likewise)
    noise        digits plus Gaussian pixel noise, std NOISE_STD (of 255), clipped to [0, 255]
    invert       255 - digit: white background, black strokes (far OOD, same shapes)

For each pair it runs `ood_ddpm.py --score both` (which reports the AUROC of recon, nll and their
z-score mean in one run), then gathers the AUROCs into --output (merged with what is there, keyed
by model and pair) and prints a table.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT_OFFSET = 500  # out sets are built from mnist5k test digits 500.. (the in set is the first --max_samples)
NOISE_STD = 64.0  # of 255
PAIRS = ("animalmnist", "vflip", "rot90", "noise", "invert")


def transform(name: str, digits: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 (N, 28, 28) -> uint8 (N, 28, 28)."""
    if name == "vflip":
        return digits[:, ::-1, :].copy()
    if name == "rot90":
        return np.rot90(digits, k=1, axes=(1, 2)).copy()
    if name == "noise":
        noisy = digits.astype(np.float64) + np.random.RandomState(seed).normal(0.0, NOISE_STD, digits.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if name == "invert":
        return 255 - digits
    raise ValueError(name)


def build_folder(name: str, n: int, root: Path) -> Path:
    """A folder of n PNGs: mnist5k test digits OUT_OFFSET.. transformed by `name`."""
    from PIL import Image

    from ddpm_hf.config.sections import DataSettings
    from ddpm_hf.data.images import load_images

    folder = root / f"mnist5k_{name}"
    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    test = load_images("mnist5k", "test", DataSettings(), progress=False).images  # (1000, 1, 28, 28) uint8
    if OUT_OFFSET + n > len(test):
        raise SystemExit(
            f"error: --max_samples {n} too large: only {len(test) - OUT_OFFSET} test digits from {OUT_OFFSET}"
        )
    digits = transform(name, test[OUT_OFFSET : OUT_OFFSET + n, 0].numpy())
    for i, img in enumerate(digits):
        Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
    return folder


def run_pair(args, pair: str) -> dict:
    out = pair if pair == "animalmnist" else str(build_folder(pair, args.max_samples, args.work_dir / "folders"))
    model = Path(args.checkpoint).name
    out_dir = args.work_dir / model / pair
    cmd = [
        sys.executable,
        str(REPO / "ood_ddpm.py"),
        "--checkpoint",
        args.checkpoint,
        "--dataset",
        "mnist5k",
        "--out_dataset",
        out,
        "--score",
        "both",
        "--sample_timesteps",
        str(args.sample_timesteps),
        "--recon_factors",
        *map(str, args.recon_factors),
        "--max_samples",
        str(args.max_samples),
        "--stats_samples",
        str(args.stats_samples),
        "--nll_timesteps",
        str(args.nll_timesteps),
        "--mixed_precision",
        "no",
        "--seed",
        "0",
        "--output_dir",
        str(out_dir),
        "--overwrite_output_dir",
    ]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    res = json.loads((out_dir / "ood_results.json").read_text())
    per = res["per_score"]
    sets = res["likelihood"]["sets"]
    return {
        "out": pair,
        "out_dataset": out
        if pair == "animalmnist"
        else f"mnist5k test {OUT_OFFSET}..{OUT_OFFSET + args.max_samples - 1}, {pair}",
        "auroc": {k: round(v["auroc"], 4) for k, v in per.items()},
        "fpr95_in_positive": {k: round(v["fpr95_in_positive"], 4) for k, v in per.items()},
        "bpd_mean": {k: round(v["bpd_mean"], 4) for k, v in sets.items() if "bpd_mean" in v},
        "seconds": round(seconds, 1),
        "command": " ".join(["python" if c == sys.executable else c for c in cmd]).replace(str(REPO) + "/", ""),
    }


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        text = info.read_text()
        names = [row.split(":", 1)[1].strip() for row in text.splitlines() if row.startswith("model name")]
        cpu = f"{len(names)}-core {names[0] if names else cpu}, {'with' if 'avx512' in text else 'without'} AVX-512"
    return f"{cpu}, torch {torch.__version__} with {torch.get_num_threads()} thread(s), fp32"


def table(results: dict) -> str:
    rows = [
        "| model | in / out | AUROC recon | AUROC nll | AUROC both | bits/dim in / out | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, pairs in results.get("models", {}).items():
        for pair, r in pairs.items():
            a, b = r["auroc"], r["bpd_mean"]
            rows.append(
                f"| {model} | mnist5k / {pair} | {a['recon']:.3f} | {a['nll']:.3f} | {a.get('both', float('nan')):.3f} "
                f"| {b.get('in', float('nan')):.3f} / {b.get('out', float('nan')):.3f} | {r['seconds']:.0f} |"
            )
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--checkpoint", default=str(REPO / "pretrained" / "ddpm-mnist5k"))
    p.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    p.add_argument("--max_samples", type=int, default=200)
    p.add_argument("--stats_samples", type=int, default=128)
    p.add_argument("--sample_timesteps", type=int, default=20)
    p.add_argument("--recon_factors", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--nll_timesteps", type=int, default=30)
    p.add_argument(
        "--work_dir", type=Path, default=Path("/tmp/ddpm_hf_ood_pairs"), help="image folders and ood_ddpm.py outputs"
    )
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "likelihood" / "ood_pairs.json")
    p.add_argument("--table_only", action="store_true")
    args = p.parse_args(argv)
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    if not args.table_only:
        results.setdefault("models", {})
        model = Path(args.checkpoint).name
        for pair in args.pairs:
            results["models"].setdefault(model, {})[pair] = run_pair(args, pair)
            results["machine"] = machine()
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(
                json.dumps(results, indent=2) + "\n"
            )  # after every pair: a stopped run keeps its results
    print(table(results))


if __name__ == "__main__":
    main()
