"""Sample a trained DDPM: a grid and one PNG per image, or a resumable folder for FID.

python sample_ddpm.py --checkpoint outputs/quickstart --num_samples 64 --ddpm 0 --sample_timesteps 50
python sample_ddpm.py --checkpoint outputs/quickstart --scheduler dpmsolver++ --sample_timesteps 20
python sample_ddpm.py --checkpoint user/ddpm-mnist --fid --num_samples 10000
python sample_ddpm.py --checkpoint outputs/quickstart --fid --num_samples 1000 --fid_reference mnist5k
python sample_ddpm.py --checkpoint DDPM_mnist_epoch100.pt --dataset mnist --timesteps 1000 --ddpm 0
"""

# torch and diffusers are imported after the flags are parsed: --help and a bad flag answer at once.
from ddpm_hf.config.options import build_parser, overwrite_flag, parse_config, script_help
from ddpm_hf.util.errors import run_cli

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
EXCLUDE = (
    "max_train_samples",
    "num_workers",
    "streaming",
    "shuffle_buffer_size",
    "cache_latents",
    "rescale_betas_zero_snr",
    "timestep_spacing",
)
HELPS = {
    "output_dir": "Output folder (default: samples/<checkpoint name>; with --fid, the folder that holds fid_samples/, "
    "default: the current folder).",
    "fid_reference": "Compute FID and KID of the --fid folder against this dataset (any --dataset form), into fid.json.",
    "dataset": "With a .pt --checkpoint: the dataset it was trained on (sets channels and size); also names the --fid folder.",
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


def build(prog="sample_ddpm.py"):
    description, epilog = script_help(__doc__)
    replace = overwrite_flag(
        "Replace the samples already in --output_dir, or the images of a --fid folder made with "
        "other settings (default: refuse)."
    )
    return build_parser(
        prog, description, GROUPS, extra=replace, epilog=epilog, exclude=EXCLUDE, helps=HELPS, notes=NOTES
    )


@run_cli
def main(argv):
    cfg, _ = parse_config(build(), argv)
    from ddpm_hf.commands.sample import run_sampling

    run_sampling(cfg)


if __name__ == "__main__":
    main()
