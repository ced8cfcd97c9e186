"""Scoring speed of a saved OOD detector: fit, save, load, then time `OODDetector.score` on new images.

    python benchmarks/ood_detector.py                      # shipped model, the recommended score (hidden)
    python benchmarks/ood_detector.py --score patch --images 500 --rounds 5

The detector is fitted on --fit_n mnist5k training digits, saved and loaded again (the deployed path),
then scores --images images (half in-distribution test digits, half rotated ones) in --rounds timed
rounds after one warm-up. Prints images/s per round and writes --output (JSON).
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_scores import REPO, load_sets, machine  # noqa: E402
from timing import interleave, rate  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--checkpoint", default=str(REPO / "pretrained" / "ddpm-mnist5k"))
    p.add_argument("--score", default="hidden")
    p.add_argument("--fit_n", type=int, default=1000)
    p.add_argument("--images", type=int, default=1000, help="images scored per round (half rotated digits)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "ood" / "ood_detector.json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    from ddpm_hf import OODDetector

    load_start = os.getloadavg()
    torch.manual_seed(0)
    fit, test_in, outs, _ = load_sets(args.images // 2, args.fit_n, ["rot90"])
    images = torch.cat([test_in, outs["rot90"]])
    with tempfile.TemporaryDirectory() as folder:
        OODDetector.fit(args.checkpoint, fit, score=args.score).save(folder)
        detector = OODDetector.load(folder, args.checkpoint)
    times = interleave({"score": lambda: detector.score(images)}, args.rounds, label="detector")
    result = {
        "machine": machine(),
        "command": "python " + " ".join(sys.argv),
        "score": args.score,
        "nfe_per_image": detector.manifest["nfe_per_image"],
        "precision": detector.manifest["precision"],
        "images": len(images),
        "load_average_start_end": [load_start, os.getloadavg()],
        "images_per_sec": rate(times["score"], len(images)),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
