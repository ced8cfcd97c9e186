"""Train an unconditional DDPM (diffusers UNet2DModel) with Accelerate.

python train_ddpm.py --config configs/quickstart.yaml --output_dir outputs/quickstart
python train_ddpm.py --dataset cifar10 --n_epochs 100 --mixed_precision bf16
python train_ddpm.py --config configs/quickstart.yaml --output_dir outputs/quickstart --resume_from_checkpoint latest
accelerate launch train_ddpm.py --dataset mnist --mixed_precision bf16
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_ddpm.py --config configs/quickstart.yaml
"""

# torch, diffusers and the trainer are imported after the flags are parsed: --help and a bad flag
# answer at once.
from ddpm_hf.config.options import build_parser, parse_config, script_help
from ddpm_hf.util.errors import run_cli

GROUPS = (
    "data",
    "start",
    "model",
    "diffusion",
    "latent",
    "batch",
    "train",
    "precision",
    "output",
    "seed",
    "sampler",
    "samples",
    "fid_metric",
    "fid_train",
    "hub_train",
    "hub",
)
HELPS = {
    "batch_size": "Batch size per process.",
    "mixed_precision": "Mixed precision of training, through Accelerate (default: as `accelerate config` says), and "
    "autocast of the sample grids; bf16 pays off on CPUs with AVX512-BF16/AMX and on Ampere+ GPUs; "
    "auto: bf16 where the device computes it natively, else no.",
    "num_samples": "Images in each sample grid saved during training (default: 16).",
    "fid_reference": "Reference dataset of the FID/KID evaluations of --eval_fid_every (any --dataset form; default: --dataset).",
    "sample_timesteps": "Sampling steps of the sample grids and FID evaluations (the original's step rule: T // (T // S) steps).",
}
NOTES = {
    "sampler": "How the sample grids and --eval_fid_every images are drawn.",
    "fid_metric": "Used with --eval_fid_every.",
}


def build(prog="train_ddpm.py"):
    description, epilog = script_help(__doc__)
    return build_parser(prog, description, GROUPS, epilog=epilog, helps=HELPS, notes=NOTES, aliases=True)


@run_cli
def main(argv):
    cfg, _ = parse_config(build(), argv)
    from ddpm_hf.training.trainer import train

    train(cfg)


if __name__ == "__main__":
    main()
