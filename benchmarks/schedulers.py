"""FID, KID and wall time of each sampler at several step counts, for one trained model.

    python benchmarks/schedulers.py --checkpoint outputs/quickstart --num_samples 1000

Every (scheduler, steps) pair starts from the same noise (same seed); images go through
the same Inception features and the same cached reference statistics (ddpm_hf/metrics/fid.py).
A "real data" row measures held-out images of the reference dataset the same way: the
floor that FID at this sample count can reach (FID is biased upwards at small N; KID is
not). Prints a Markdown table and writes every number to --out (JSON).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:
    import ddpm_hf  # noqa: F401  (installed: pip install -e .)
except ImportError:  # a checkout without the install, run as python benchmarks/schedulers.py from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm_hf.commands.common import original_flags  # noqa: E402
from ddpm_hf.config.options import SCHEDULERS, DDPMConfig  # noqa: E402
from ddpm_hf.config.sections import Sections  # noqa: E402
from ddpm_hf.data.images import load_images, to_uint8  # noqa: E402
from ddpm_hf.diffusion.sampling import generate, make_sampler  # noqa: E402
from ddpm_hf.metrics.fid import FIDEvaluator  # noqa: E402
from ddpm_hf.models.loader import load_model  # noqa: E402
from ddpm_hf.util.errors import run_cli  # noqa: E402
from ddpm_hf.util.precision import inference_autocast, resolve_mixed_precision  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--checkpoint", default="outputs/quickstart", help="trained pipeline folder")
    p.add_argument("--reference", default="mnist5k", help="FID reference dataset (any --dataset form)")
    p.add_argument("--reference_split", default="train")
    p.add_argument("--reference_max", type=int, default=None, help="first N reference images (default: all)")
    p.add_argument("--real_split", default="test", help="split of the 'real data' row ('' to skip it)")
    p.add_argument("--num_samples", type=int, default=1000, help="images per (scheduler, steps)")
    p.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=SCHEDULERS)
    p.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50])
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (ddim only)")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mixed_precision",
        default="auto",
        choices=("no", "fp16", "bf16", "auto"),
        help="autocast of the UNet while sampling (auto: bf16 where native)",
    )
    p.add_argument("--inception_weights", default=None)
    p.add_argument("--fid_cache_dir", default=None)
    p.add_argument("--out", default="benchmarks/results/schedulers.json")
    return p.parse_args(argv)


def table(rows) -> str:
    lines = [
        "| sampler | steps | sampling s | FID | KID ×1000 | precision | recall | density | coverage |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    number = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731  (None: too few images for k-NN)
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['steps'] if r['steps'] else '–'} | {r['sampling_seconds']:.0f} | "
            f"{r['fid']:.1f} | {1000 * r['kid_mean']:.1f} ± {1000 * r['kid_std']:.1f} | "
            + " | ".join(number(r.get(k)) for k in ("precision", "recall", "density", "coverage"))
            + " |"
        )
    return "\n".join(lines)


@run_cli
def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    cfg = DDPMConfig(
        inception_weights=args.inception_weights,
        fid_cache_dir=args.fid_cache_dir,
        fid_reference_max=args.reference_max,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    sections = Sections.of(cfg)
    evaluator = FIDEvaluator(
        sections.fid, sections.data, args.reference, args.reference_split, batch_size=args.batch_size, seed=args.seed
    )
    loaded = load_model(args.checkpoint, original_flags(cfg))
    size, channels = loaded.unet.config.sample_size, loaded.unet.config.in_channels
    torch.manual_seed(args.seed)
    evaluator.reference_stats(size, channels)  # once, before any timing
    rows, out = [], Path(args.out)

    def record(row):
        rows.append(row)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(args=vars(args), rows=rows), indent=2, default=str) + "\n")

    if args.real_split:
        real = load_images(
            args.reference,
            args.real_split,
            sections.data,
            size=size,
            channels=channels,
            limit=args.num_samples,
            progress=False,
        ).images
        record(
            dict(
                sampler=f"real data ({args.reference} {args.real_split})",
                steps=0,
                sampling_seconds=0.0,
                **_metrics(evaluator.evaluate(real)),
            )
        )
    for name in args.schedulers:
        for steps in args.steps:
            scheduler = make_sampler(name, loaded.scheduler_config)
            start = time.time()
            with inference_autocast(args.mixed_precision, "cpu"):
                images = generate(
                    loaded.unet,
                    scheduler,
                    args.num_samples,
                    steps,
                    eta=args.eta,
                    seed=args.seed,
                    batch_size=args.batch_size,
                    progress=False,
                )
            seconds = time.time() - start
            label = f"ddim (eta {args.eta:g})" if name == "ddim" else name
            record(
                dict(
                    sampler=label,
                    steps=steps,
                    sampling_seconds=seconds,
                    **_metrics(evaluator.evaluate(to_uint8(images))),
                )
            )
    print(
        f"\n{len(rows)} rows, {args.num_samples} images each, precision "
        f"{resolve_mixed_precision(args.mixed_precision, 'cpu')}, reference {args.reference} "
        f"({args.reference_split}, "
        f"{rows[0]['num_reference']} images), extractor {evaluator.extractor.info['name']}\n"
    )
    print(table(rows))
    print(f"\nwrote {out}")


def _metrics(result):
    keep = (
        "fid",
        "kid_mean",
        "kid_std",
        "precision",
        "recall",
        "density",
        "coverage",
        "num_generated",
        "num_reference",
        "seconds_features",
    )
    return {k: result[k] for k in keep}


if __name__ == "__main__":
    main()
