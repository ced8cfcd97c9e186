"""Flag out-of-distribution images with a DDPM: score two test sets, or fit a detector (--fit) and use it (--detector).

ddpm-hf ood --config configs/quickstart.yaml --checkpoint outputs/quickstart
ddpm-hf ood --checkpoint outputs/ddpm_cifar10 --dataset cifar10 --out_dataset svhn --lpips
ddpm-hf ood --checkpoint outputs/quickstart --recon_factors 0.1 0.3 0.5 --max_samples 500
ddpm-hf ood --checkpoint pretrained/ddpm-mnist5k --dataset mnist5k --fit --score patch --output_dir detectors/mnist5k
ddpm-hf ood --detector detectors/mnist5k --images my_images/ --output_dir scored
"""

import argparse

# torch and diffusers are imported after the flags are parsed: --help and a bad flag answer at once.
from ..config.options import TRAINING_ONLY, build_parser
from ..config.parsing import parse_config
from ..util.errors import run_cli
from ..util.logs import setup_logging
from .program import command_help, program_name

# model flags describe an original .pt checkpoint (converted on the fly); diffusion holds --loss_type.
GROUPS = (
    "checkpoint",
    "data",
    "ood",
    "likelihood",
    "sampler",
    "diffusion",
    "batch",
    "precision",
    "seed",
    "output",
    "model",
    "latent",
)
# Training-only flags, and --scheduler (reconstruction is DDIM with eta --ddpm, as the original's).
EXCLUDE = (*TRAINING_ONLY, "scheduler")
HELPS = {
    "dataset": "In-distribution dataset, scored on its test split (a registry name, a Hub dataset id or an image "
    "folder).",
    "ddpm": "DDIM eta of the reconstruction: 1.0 is DDPM-like ancestral sampling, 0.0 deterministic DDIM.",
    "sample_timesteps": "Sampling steps of the whole chain (the original's step rule: T // (T // S)); a reconstruction "
    "runs the steps below its starting noise level.",
    "batch_size": "Images scored per batch.",
    "output_dir": "Folder of the OOD results (default: ood_results/<checkpoint name>).",
    "mixed_precision": "Autocast of the UNet while scoring (default: full precision); auto: bf16 where the device "
    "computes it natively, else no.",
    "loss_type": "Per-image reconstruction error of the score.",
}
NOTES = {
    "sampler": "The reconstruction: DDIM over the sampling steps below each noise level.",
    "model": "Only for an original .pt --checkpoint (the flags it was trained with); a pipeline records its own.",
    "diffusion": "--timesteps and the betas only for an original .pt --checkpoint; a pipeline records its own.",
    "latent": "Only for an original latent (LatDDPM_) .pt --checkpoint; a latent pipeline holds its own VAE.",
}


def _extra(parser):
    output = next(g for g in parser._action_groups if g.title == "output")
    output.add_argument(
        "--overwrite_output_dir",
        dest="overwrite_output_dir",
        action=argparse.BooleanOptionalAction,
        help="Replace OOD results already in --output_dir (default: refuse).",
    )


def build(prog=None):
    prog = program_name("ood", prog)
    description, epilog = command_help(__doc__, "ood", prog)
    return build_parser(
        prog, description, GROUPS, extra=_extra, epilog=epilog, exclude=EXCLUDE, helps=HELPS, notes=NOTES
    )


@run_cli
def main(argv, prog=None):
    cfg, _ = parse_config(build(prog), argv)
    setup_logging(cfg.log_level)
    if cfg.fit or cfg.detector:
        from .detect import run_detector_command

        run_detector_command(cfg)  # nothing returned: a console script passes main()'s result to sys.exit
        return
    from .common import start_command
    from .ood import run_ood

    start_command()  # the process-wide settings, once the flags are parsed
    run_ood(cfg)


if __name__ == "__main__":
    main()
