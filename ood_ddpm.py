"""Flag out-of-distribution images by how badly a trained DDPM reconstructs them.

    python ood_ddpm.py --config configs/quickstart.yaml --checkpoint outputs/quickstart
    python ood_ddpm.py --checkpoint outputs/ddpm_cifar10 --dataset cifar10 --out_dataset svhn --lpips
    python ood_ddpm.py --checkpoint outputs/quickstart --recon_factors 0.1 0.3 0.5 --max_samples 500
"""

import argparse

from ddpm_hf.config import build_parser, parse_config
from ddpm_hf.errors import run_cli
from ddpm_hf.ood import run_ood

# model flags describe an original .pt checkpoint (converted on the fly); diffusion holds --loss_type.
GROUPS = ("checkpoint", "sampler", "ood", "likelihood", "data", "batch", "seed", "output", "diffusion", "model")


def _extra(parser):
    parser.add_argument("--overwrite_output_dir", dest="overwrite_output_dir", action=argparse.BooleanOptionalAction,
                        help="Replace OOD results already in --output_dir (default: refuse). "
                             "Default --output_dir: ood_results/<checkpoint name>.")


@run_cli
def main(argv):
    parser = build_parser("ood_ddpm.py", __doc__.strip().splitlines()[0], GROUPS, extra=_extra)
    cfg, _ = parse_config(parser, argv)
    run_ood(cfg)


if __name__ == "__main__":
    main()
