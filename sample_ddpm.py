"""Sample a trained DDPM: a grid and one PNG per image, or a resumable folder for FID.

    python sample_ddpm.py --checkpoint outputs/quickstart --num_samples 64 --ddpm 0 --sample_timesteps 50
    python sample_ddpm.py --checkpoint user/ddpm-mnist --fid --num_samples 10000
    python sample_ddpm.py --checkpoint outputs/quickstart --fid --num_samples 1000 --fid_reference mnist5k
"""

from ddpm_hf.config import build_parser, parse_config
from ddpm_hf.errors import run_cli
from ddpm_hf.sampling import run_sampling

# model/diffusion/data flags describe an original .pt checkpoint (converted on the fly).
GROUPS = ("checkpoint", "sampler", "samples", "fid", "fid_metric", "nll", "likelihood", "inpaint", "batch", "precision", "seed", "output", "data", "model", "diffusion")


@run_cli
def main(argv):
    parser = build_parser("sample_ddpm.py", __doc__.strip().splitlines()[0], GROUPS)
    cfg, _ = parse_config(parser, argv)
    run_sampling(cfg)


if __name__ == "__main__":
    main()
