"""`ddpm-hf convert`: an original GenerativeZoo .pt checkpoint into a diffusers pipeline folder; pass the
flags it was trained with (it records none of them). The conversion itself is models/convert_gzoo.py.

    ddpm-hf convert --checkpoint DDPM_mnist_epoch100.pt --output_dir ddpm-mnist --timesteps 1000
"""

import shlex
from pathlib import Path

from ..config.options import build_parser
from ..config.parsing import parse_config
from ..util.errors import UsageError, run_cli
from ..util.logs import get_logger, setup_logging
from .program import program_name

logger = get_logger(__name__)

GROUPS = ("checkpoint", "output", "data", "model", "diffusion", "latent")


def convert(cfg) -> Path:
    """Write the converted --checkpoint as a standard pipeline folder in --output_dir."""
    from ..diffusion.sampling import make_sampler
    from ..models.convert_gzoo import load_original_checkpoint
    from ..models.pipeline import save_pipeline
    from ..util.files import make_output_dir, move_in, remove, writing
    from .common import original_flags

    if not cfg.checkpoint or not cfg.checkpoint.endswith(".pt"):
        raise UsageError("--checkpoint must be an original .pt file")
    if not cfg.output_dir:
        raise UsageError("--output_dir is required: the folder to write the pipeline to")
    out = Path(cfg.output_dir)
    if (out / "model_index.json").exists():
        raise UsageError(f"{out} already holds a pipeline; remove it or choose another --output_dir")
    loaded = load_original_checkpoint(cfg.checkpoint, original_flags(cfg))
    make_output_dir(out)
    # Saved aside and moved in whole: a link planted in `out` (unet/, ddpm_hf_config.json) is replaced, not
    # written through, and a failed save leaves `out` as it was.
    staging = out / ".pipeline.partial"
    remove(staging)
    with writing(out, "the pipeline", cleanup=[staging]):
        scheduler = make_sampler("ddim", loaded.scheduler_config)
        save_pipeline(staging, loaded.unet, scheduler, loaded.train_config, vae=loaded.vae)
    move_in(staging, out, last="model_index.json")
    logger.info(
        f"converted {cfg.checkpoint} to the pipeline folder {out}; sample it with: python sample_ddpm.py "
        f"--checkpoint {shlex.quote(str(out))}"
    )
    return out


@run_cli
def main(argv=None, prog=None):
    parser = build_parser(
        program_name("convert", prog),
        "Convert an original GenerativeZoo DDPM checkpoint (.pt) "
        "into a diffusers pipeline folder; pass the flags it was trained with.",
        GROUPS,
    )
    cfg, _ = parse_config(parser, argv)
    setup_logging(cfg.log_level)
    convert(cfg)


if __name__ == "__main__":
    main()
