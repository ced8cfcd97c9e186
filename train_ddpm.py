"""Train an unconditional DDPM (diffusers UNet2DModel) with Accelerate.

    python train_ddpm.py --config configs/quickstart.yaml
    accelerate launch train_ddpm.py --dataset cifar10 --mixed_precision bf16
"""

from ddpm_hf.config import build_parser, parse_config
from ddpm_hf.errors import run_cli
from ddpm_hf.training import train

GROUPS = ("data", "model", "diffusion", "latent", "batch", "train", "precision", "output", "seed", "sampler", "samples", "fid_metric", "fid_train", "hub_train", "hub")


@run_cli
def main(argv):
    parser = build_parser("train_ddpm.py", __doc__.strip().splitlines()[0], GROUPS)
    cfg, _ = parse_config(parser, argv)
    train(cfg)


if __name__ == "__main__":
    main()
