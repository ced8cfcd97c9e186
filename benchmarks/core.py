"""First benchmark: training images/s and sampling image-steps/s of the seed's default model
(1x32x32, 6,469,889 parameters) on this machine. Prints one JSON document.

    .venv/bin/python benchmarks/core.py [--batch_size 128] [--steps 5] [--sample_batch 16]
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import ddpm_hf  # noqa: F401  (installed: pip install -e .)
except ImportError:  # a checkout without the install, run as python benchmarks/core.py from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpm_hf.config.options import DDPMConfig  # noqa: E402
from ddpm_hf.config.sections import Sections  # noqa: E402
from ddpm_hf.diffusion.losses import elementwise_loss  # noqa: E402
from ddpm_hf.diffusion.sampling import denoise, make_noise_scheduler, make_sampler  # noqa: E402
from ddpm_hf.models.unet import build_unet, count_parameters  # noqa: E402


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (after one warm-up step)")
    parser.add_argument("--sample_batch", type=int, default=16)
    parser.add_argument("--sample_steps", type=int, default=10)
    args = parser.parse_args()

    cfg = DDPMConfig()
    torch.manual_seed(0)
    unet = build_unet(Sections.of(cfg).model, 1, 32)
    noise_scheduler = make_noise_scheduler(cfg.timesteps, cfg.beta_start, cfg.beta_end)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.decay, foreach=True)
    x0 = torch.rand(args.batch_size, 1, 32, 32) * 2 - 1

    def train_step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, cfg.timesteps, (x0.shape[0],))
        loss = elementwise_loss(unet(noise_scheduler.add_noise(x0, noise, t), t).sample, noise, cfg.loss_type).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # warm-up
    step_time = timed(train_step, args.steps)

    unet.eval()
    sampler = make_sampler("ddim", noise_scheduler.config)
    sampler.set_timesteps(args.sample_steps)
    x = torch.randn(args.sample_batch, 1, 32, 32)
    denoise(unet, sampler, x, sampler.timesteps[:1])  # warm-up
    sample_time = timed(lambda: denoise(unet, sampler, x, sampler.timesteps, eta=1.0), 2)

    print(
        json.dumps(
            dict(
                model="seed default UNet2DModel 1x32x32",
                parameters=count_parameters(unet),
                torch=torch.__version__,
                threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(),
                train_batch_size=args.batch_size,
                train_step_seconds=round(step_time, 4),
                train_images_per_sec=round(args.batch_size / step_time, 2),
                sample_batch_size=args.sample_batch,
                sample_image_steps_per_sec=round(args.sample_batch * args.sample_steps / sample_time, 2),
            )
        )
    )


if __name__ == "__main__":
    main()
