"""Every OOD score on every in/out pair, side by side, with a supervised ceiling per pair.

    python benchmarks/ood_scores.py                                   # shipped model, every score and pair
    python benchmarks/ood_scores.py --checkpoint outputs/quickstart   # another model (merged into the JSON)
    python benchmarks/ood_scores.py --scores path patch --pairs rot90 vflip --n 200
    python benchmarks/ood_scores.py --table_only                      # print the table of the JSON

In-distribution: the first --n mnist5k test digits. Every OOD set but `animalmnist` is made from *other*
mnist5k test digits (test images 500.., never an in-distribution image), transformed (see TRANSFORMS).
Each score is fitted once on --fit_n mnist5k *training* digits (never scored); its features of the
in-distribution set are computed once and every pair reuses them, so the scores see the same images.

The ceiling of a pair: a small CNN trained, supervised, to tell mnist5k training digits from the same
digits transformed (for animalmnist: from animalmnist training images), evaluated on the test images of
the pair (AUROC). What no detector can separate, the ceiling cannot either; what it separates is
separable at all. Results go to --output (JSON, merged by model) and a markdown table is printed.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT_OFFSET = 500  # the OOD sets are built from mnist5k test digits 500..
NOISE_STD = 64.0  # of 255
SHIFT = 4  # pixels, right and down
SCORES = ("recon", "nll", "both", "path", "msma", "fused", "patch", "hidden")
FAR = ("animalmnist", "invert", "noise")
NEAR = ("vflip", "hflip", "rot90", "rot180", "shift", "thick", "thin")


def _morph(digits: np.ndarray, grow: bool) -> np.ndarray:
    from scipy import ndimage

    op = ndimage.grey_dilation if grow else ndimage.grey_erosion
    return np.stack([op(d, size=(2, 2)) for d in digits])


TRANSFORMS = {
    "invert": lambda d: 255 - d,
    "noise": lambda d: np.clip(np.rint(d + np.random.RandomState(0).normal(0.0, NOISE_STD, d.shape)), 0, 255).astype(
        np.uint8
    ),
    "vflip": lambda d: d[:, ::-1, :],  # upside down
    "hflip": lambda d: d[:, :, ::-1],  # mirrored
    "rot90": lambda d: np.rot90(d, k=1, axes=(1, 2)),
    "rot180": lambda d: np.rot90(d, k=2, axes=(1, 2)),
    "shift": lambda d: np.roll(d, (SHIFT, SHIFT), axis=(1, 2)),  # mnist has an empty border: nothing wraps
    "thick": lambda d: _morph(d, grow=True),  # strokes one pixel wider
    "thin": lambda d: _morph(d, grow=False),  # strokes one pixel narrower
}


def transformed(name: str, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, H, W) -> the same digits under TRANSFORMS[name]."""
    return torch.from_numpy(np.ascontiguousarray(TRANSFORMS[name](images[:, 0].numpy())))[:, None]


def load_sets(n: int, fit_n: int, pairs) -> tuple:
    """(fit images, in-distribution test images, {pair: OOD test images}, {pair: (train in, train out)})."""
    from ddpm_hf.data.images import DataSettings, load_images

    def split(name, part):
        return load_images(name, part, DataSettings(size=28, channels=1), progress=False).images

    test, train = split("mnist5k", "test"), split("mnist5k", "train")
    if OUT_OFFSET + n > len(test):
        raise SystemExit(f"error: --n {n} too large: only {len(test) - OUT_OFFSET} test digits from {OUT_OFFSET}")
    base = test[OUT_OFFSET : OUT_OFFSET + n]
    outs, ceiling_train = {}, {}
    for pair in pairs:
        if pair == "animalmnist":
            outs[pair] = split("animalmnist", "test")[:n]
            ceiling_train[pair] = (train, split("animalmnist", "train"))
        else:
            outs[pair] = transformed(pair, base)
            ceiling_train[pair] = (train, transformed(pair, train))
    return train[:fit_n], test[:n], outs, ceiling_train


# ---- the supervised ceiling ------------------------------------------------------------------


def _cnn() -> torch.nn.Module:
    c = torch.nn
    return c.Sequential(
        c.Conv2d(1, 16, 3, padding=1), c.ReLU(), c.MaxPool2d(2),
        c.Conv2d(16, 32, 3, padding=1), c.ReLU(), c.MaxPool2d(2),
        c.Flatten(), c.Linear(32 * 7 * 7, 64), c.ReLU(), c.Linear(64, 1),
    )  # fmt: skip


def ceiling_auroc(train_in, train_out, test_in, test_out, epochs: int = 3, seed: int = 0) -> float:
    """AUROC on the test pair of a CNN trained to tell train_in (0) from train_out (1)."""
    from ddpm_hf.ood.scoring import ood_metrics

    torch.manual_seed(seed)
    x = torch.cat([train_in, train_out]).float() / 127.5 - 1
    y = torch.cat([torch.zeros(len(train_in)), torch.ones(len(train_out))])
    net, order = _cnn(), torch.randperm(len(x))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(epochs):
        for idx in order.split(64):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[idx])[:, 0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        order = torch.randperm(len(x))
    with torch.no_grad():
        logits = [net(t.float() / 127.5 - 1)[:, 0].numpy() for t in (test_in, test_out)]
    return ood_metrics(*logits)["auroc"]


# ---- the unsupervised scores -----------------------------------------------------------------


class CachedFeatures:
    """Each score's features of each image set, computed once: a composite score (both, fused) reads its
    parts' features from here, which are what the parts compute alone (same noise streams)."""

    def __init__(self):
        self.cache, self.seconds = {}, {}

    def __call__(self, score, images, key: str, stream: str) -> np.ndarray:
        from ddpm_hf.ood.scores import CompositeScore

        if isinstance(score, CompositeScore):
            return np.concatenate([self(p, images, key, stream) for p in score.parts], 1)
        if (score.name, key) not in self.cache:
            start = time.perf_counter()
            self.cache[score.name, key] = score.features(images, stream)
            self.seconds[score.name, key] = time.perf_counter() - start
        return self.cache[score.name, key]

    def cost(self, score, keys) -> float:
        """Seconds the features of these sets took (a composite: its parts' together)."""
        from ddpm_hf.ood.scores import CompositeScore

        parts = score.parts if isinstance(score, CompositeScore) else [score]
        return sum(self.seconds[p.name, k] for p in parts for k in keys)


def run_score(name: str, model, args, sets, features: CachedFeatures) -> dict:
    """Fit one score on the training digits, score the in set and every OOD set; AUROC and FPR95 per pair,
    network evaluations and images/s (feature extraction, the cost of scoring)."""
    from ddpm_hf.ood.scores import build_score
    from ddpm_hf.ood.scoring import ood_metrics
    from ddpm_hf.ood.settings import OODSettings

    fit, test_in, outs = sets
    settings = OODSettings(
        score=name,
        recon_factors=args.recon_factors,
        sample_timesteps=args.sample_timesteps,
        nll_timesteps=args.nll_timesteps,
        stats_samples=len(fit),
        batch_size=args.batch_size,
    )
    score = build_score(name, model, settings)
    start = time.perf_counter()
    score.fit(features(score, fit, "fit", "stats"))
    fit_s = time.perf_counter() - start
    in_scores = score.score(features(score, test_in, "in", "in"))
    result = {}
    for pair, images in outs.items():
        metrics = ood_metrics(in_scores, score.score(features(score, images, pair, "out")))
        result[pair] = {"auroc": round(metrics["auroc"], 4), "fpr95": round(metrics["fpr95_in_positive"], 4)}
    scored = len(test_in) + sum(len(v) for v in outs.values())
    return {
        "pairs": result,
        "nfe_per_image": score.nfe_per_image,
        "images_per_s": round(scored / features.cost(score, ["in", *outs]), 1),
        "fit_s": round(fit_s, 1),
        "describe": score.describe(),
    }


def machine() -> str:
    import platform

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    cpu = f"{len(names)}-core {names[0] if names else platform.machine()}"
    flags = "AVX512-BF16" if "avx512_bf16" in text else ("AVX-512, no BF16" if "avx512f" in text else "no AVX-512")
    return f"{cpu} ({flags}), torch {torch.__version__}, {torch.get_num_threads()} threads, fp32"


def table(results: dict, metric: str = "auroc") -> str:
    """One markdown table per model: a row per score, a column per pair (`metric`: auroc or fpr95, the
    fraction of OOD images accepted at 95 % in-distribution acceptance), the ceiling (AUROC) last."""
    lines = []
    for model, res in results.get("models", {}).items():
        measured = set(res.get("ceiling", {})).union(*(s["pairs"] for s in res["scores"].values()))
        pairs = [p for p in (*FAR, *NEAR) if p in measured]
        what = "AUROC" if metric == "auroc" else "FPR95 (lower is better)"
        lines += [
            f"**{model}**, {what} ({res['n']} in vs {res['n']} out per pair, fitted on {res['fit_n']} training digits)",
            "",
        ]
        lines.append("| score | NFE/img | img/s | " + " | ".join(pairs) + " |")
        lines.append("|---|---:|---:|" + "---:|" * len(pairs))
        for name, s in res["scores"].items():
            cells = [f"{s['pairs'][p][metric]:.3f}" if p in s["pairs"] else "" for p in pairs]
            lines.append(f"| {name} | {s['nfe_per_image']} | {s['images_per_s']:.0f} | " + " | ".join(cells) + " |")
        if metric == "auroc" and res.get("ceiling"):
            lines.append(
                "| *ceiling (supervised CNN)* | | | "
                + " | ".join(f"{res['ceiling'][p]:.3f}" if p in res["ceiling"] else "" for p in pairs)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--checkpoint", default=str(REPO / "pretrained" / "ddpm-mnist5k"))
    p.add_argument("--scores", nargs="*", choices=SCORES, default=list(SCORES), help="none: the ceiling only")
    p.add_argument("--pairs", nargs="+", choices=(*FAR, *NEAR), default=[*FAR, *NEAR])
    p.add_argument("--n", type=int, default=500, help="in-distribution and OOD test images per pair")
    p.add_argument("--fit_n", type=int, default=1000, help="mnist5k training digits each score is fitted on")
    p.add_argument("--sample_timesteps", type=int, default=20)
    p.add_argument("--recon_factors", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--nll_timesteps", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--no_ceiling", action="store_true")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "ood" / "ood_scores.json")
    p.add_argument("--table_only", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    if not args.table_only:
        from ddpm_hf.models.loader import load_model
        from ddpm_hf.ood.network import ScoreModel

        torch.manual_seed(0)
        fit, test_in, outs, ceiling_train = load_sets(args.n, args.fit_n, args.pairs)
        model = ScoreModel(load_model(args.checkpoint), "cpu", None, 0, args.batch_size)
        entry = results.setdefault("models", {}).setdefault(Path(args.checkpoint).name, {"scores": {}, "ceiling": {}})
        entry.update(n=args.n, fit_n=args.fit_n, machine=machine())
        commands = entry.setdefault("commands", [entry.pop("command")] if "command" in entry else [])
        if (command := "python " + " ".join(sys.argv)) not in commands:
            commands.append(command)  # every run that wrote into this entry, in order
        save = lambda: args.output.write_text(json.dumps(results, indent=2) + "\n")  # noqa: E731
        args.output.parent.mkdir(parents=True, exist_ok=True)
        for pair in [] if args.no_ceiling else args.pairs:
            entry["ceiling"][pair] = round(ceiling_auroc(*ceiling_train[pair], test_in, outs[pair]), 4)
            print(f"ceiling {pair}: {entry['ceiling'][pair]:.3f}", flush=True)
        save()
        features = CachedFeatures()
        for name in args.scores:
            entry["scores"][name] = run_score(name, model, args, (fit, test_in, outs), features)
            print(name, json.dumps(entry["scores"][name]["pairs"]), flush=True)
            save()  # after every score: a stopped run keeps its results
    print(table(results))
    print(table(results, "fpr95"))


if __name__ == "__main__":
    main()
