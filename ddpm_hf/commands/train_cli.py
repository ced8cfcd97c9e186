"""Train an unconditional DDPM (diffusers UNet2DModel) with Accelerate.

ddpm-hf train --config configs/quickstart.yaml --output_dir outputs/quickstart
ddpm-hf train --dataset cifar10 --n_epochs 100 --mixed_precision bf16
ddpm-hf train --config configs/quickstart.yaml --output_dir outputs/quickstart --resume_from_checkpoint latest
accelerate launch -m ddpm_hf train --dataset mnist --mixed_precision bf16
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m ddpm_hf train --config configs/quickstart.yaml
"""

# torch, diffusers and the trainer are imported after the flags are parsed: --help and a bad flag
# answer at once.
from ..config.options import build_parser
from ..config.parsing import parse_config
from ..util.errors import run_cli
from ..util.logs import setup_logging
from .program import command_help, program_name

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
    "fid_reference": "Reference dataset of the FID/KID evaluations of --eval_fid_every (any --dataset form; "
    "default: --dataset).",
    "sample_timesteps": "Sampling steps of the sample grids and FID evaluations (the original's step rule: "
    "T // (T // S) steps).",
}
NOTES = {
    "sampler": "How the sample grids and --eval_fid_every images are drawn.",
    "fid_metric": "Used with --eval_fid_every.",
}


def build(prog=None):
    prog = program_name("train", prog)
    description, epilog = command_help(__doc__, "train", prog)
    return build_parser(prog, description, GROUPS, epilog=epilog, helps=HELPS, notes=NOTES, aliases=True)


@run_cli
def main(argv, prog=None):
    cfg, _ = parse_config(build(prog), argv)
    setup_logging(cfg.log_level)
    from .common import start_command
    from .train import train

    start_command()  # the process-wide settings, once the flags are parsed

    train(cfg)


if __name__ == "__main__":
    main()
