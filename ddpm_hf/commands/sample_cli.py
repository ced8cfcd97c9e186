"""Sample a trained DDPM: a grid and one PNG per image, or a resumable folder for FID.

ddpm-hf sample --checkpoint outputs/quickstart --num_samples 64 --ddpm 0 --sample_timesteps 50
ddpm-hf sample --checkpoint outputs/quickstart --scheduler dpmsolver++ --sample_timesteps 20
ddpm-hf sample --checkpoint user/ddpm-mnist --fid --num_samples 10000
ddpm-hf sample --checkpoint outputs/quickstart --fid --num_samples 1000 --fid_reference mnist5k
ddpm-hf sample --checkpoint DDPM_mnist_epoch100.pt --dataset mnist --timesteps 1000 --ddpm 0
"""

# torch and diffusers are imported after the flags are parsed: --help and a bad flag answer at once.
from ..config.options import TRAINING_ONLY, build_parser, overwrite_flag
from ..config.parsing import parse_config
from ..util.errors import run_cli
from ..util.logs import setup_logging
from .program import command_help, program_name

# model/diffusion/data flags describe an original .pt checkpoint (converted on the fly).
GROUPS = (
    "checkpoint",
    "sampler",
    "samples",
    "fid",
    "fid_metric",
    "nll",
    "likelihood",
    "inpaint",
    "batch",
    "precision",
    "seed",
    "output",
    "data",
    "model",
    "diffusion",
    "latent",
)
# Training-only flags: they do nothing here.
EXCLUDE = TRAINING_ONLY
HELPS = {
    "output_dir": "Output folder (default: samples/<checkpoint name>; with --fid, the folder that holds fid_samples/, "
    "default: the current folder).",
    "fid_reference": "Compute FID and KID of the --fid folder against this dataset (any --dataset form), "
    "into fid.json.",
    "dataset": "With a .pt --checkpoint: the dataset it was trained on (sets channels and size); also names the "
    "--fid folder.",
    "batch_size": "Images per sampling batch.",
    "mixed_precision": "Autocast of the UNet while sampling (default: full precision); auto: bf16 where the device "
    "computes it natively, else no.",
}
NOTES = {
    "data": "A pipeline folder or Hub model records these; they matter for a .pt --checkpoint, "
    "and for the --fid_reference dataset.",
    "model": "Only for an original .pt --checkpoint (the flags it was trained with); a pipeline records its own.",
    "diffusion": "Only for an original .pt --checkpoint; a pipeline records its own.",
    "latent": "Only for an original latent (LatDDPM_) .pt --checkpoint; a latent pipeline holds its own VAE.",
    "fid_metric": "Needs --fid.",
}

# `ddpm-hf fid | nll | inpaint`: sample's --fid, --nll and --inpaint runs, each with only the flags it reads.
_SCORED = "The dataset whose test images are used (a registry name, a Hub dataset id or an image folder)."
_AFTER = ("batch", "precision", "seed", "output", "data", "model", "diffusion")
MODES = {
    "fid": dict(
        groups=("checkpoint", "sampler", "samples", "fid_metric") + _AFTER + ("latent",),
        doc="""Sample a trained DDPM into a resumable folder of PNGs for FID and score it against a reference (FID/KID).

        ddpm-hf fid --checkpoint user/ddpm-mnist --num_samples 10000
        ddpm-hf fid --checkpoint outputs/quickstart --num_samples 1000 --fid_reference mnist5k
        """,
        helps={
            "num_samples": "Images to sample (default: 50,000).",
            "fid_reference": "Compute FID and KID of the sampled folder against this dataset (any --dataset form), "
            "into fid.json.",
            "output_dir": "The folder that holds fid_samples/ (default: the current folder).",
        },
    ),
    "nll": dict(
        groups=("checkpoint", "samples", "likelihood") + _AFTER,
        doc="""Bits/dim (the variational bound) of --dataset's test split under a trained DDPM, in OUTPUT_DIR/nll.json.

        ddpm-hf nll --checkpoint pretrained/ddpm-mnist5k --dataset mnist5k --num_samples 100 --nll_timesteps 30
        """,
        helps={"num_samples": "Score the first N test images (default: the whole split).", "dataset": _SCORED},
    ),
    "inpaint": dict(
        groups=("checkpoint", "sampler", "samples", "inpaint") + _AFTER,
        doc="""Inpaint --dataset's test images with a trained DDPM (RePaint), into OUTPUT_DIR/inpaint_grid.png and PNGs.

        ddpm-hf inpaint --checkpoint pretrained/ddpm-mnist5k --dataset mnist5k --mask center --num_samples 8
        """,
        helps={"num_samples": "Inpaint the first N test images (default: 16).", "dataset": _SCORED},
    ),
}
_MODE_EXCLUDE = ("scheduler",)  # RePaint and the bound use their own schedulers
_SWITCHES = tuple(MODES)  # set by the mode itself


def _mode_parser(mode: str, prog: str):
    spec = MODES[mode]
    description, epilog = command_help(spec["doc"], mode, prog)
    exclude = EXCLUDE + _SWITCHES + (_MODE_EXCLUDE if mode != "fid" else ())
    # "Needs --fid": here it is the run itself; the data note speaks of --fid_reference, a flag of fid alone.
    notes = {k: v for k, v in NOTES.items() if k != "fid_metric" and (mode == "fid" or k != "data")}
    parser = build_parser(
        prog,
        description,
        spec["groups"],
        extra=_replace_flag(mode),
        epilog=epilog,
        exclude=exclude,
        helps={**HELPS, **spec["helps"]},
        notes=notes,
    )
    parser.set_defaults(**{mode: True})  # the mode's switch, not offered as a flag
    return parser


_REPLACE = {
    None: "Replace the samples already in --output_dir, or the images of a --fid folder made with other settings "
    "(default: refuse).",
    "fid": "Replace the images of a folder made with other settings (default: refuse; same settings: add the rest).",
}


def _replace_flag(mode=None):
    return overwrite_flag(_REPLACE.get(mode, "Replace the results already in --output_dir (default: refuse)."))


def build(prog=None, mode=None):
    """sample's parser; with `mode` (fid, nll, inpaint) the parser of that run alone."""
    if mode:
        return _mode_parser(mode, program_name(mode, prog))
    prog = program_name("sample", prog)
    description, epilog = command_help(__doc__, "sample", prog)
    return build_parser(
        prog, description, GROUPS, extra=_replace_flag(), epilog=epilog, exclude=EXCLUDE, helps=HELPS, notes=NOTES
    )


@run_cli
def main(argv, prog=None, mode=None):
    cfg, _ = parse_config(build(prog, mode), argv)
    setup_logging(cfg.log_level)
    from .common import start_command
    from .sample import run_sampling

    start_command()  # the process-wide settings, once the flags are parsed

    run_sampling(cfg)


if __name__ == "__main__":
    main()
