"""sample_ddpm.py --inpaint: the first --num_samples test images of --dataset, masked and inpainted
(RePaint: ddpm_hf/diffusion/inpaint.py) -> per-image PNGs, inpaint_grid.png and inpaint.json."""

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.images import to_model_range, to_uint8
from ..data.sets import load_set
from ..diffusion.inpaint import hole_mse, make_masks, make_repaint_scheduler, model_calls, repaint, save_grid
from ..diffusion.likelihood import refuse_latent
from ..diffusion.prediction import prediction_type
from ..diffusion.sampling import batch_generator, save_png
from ..models.loader import model_format
from ..util.files import make_output_dir, write_json
from ..util.precision import inference_autocast
from .common import data_settings, default_sample_dir, load_checkpoint_model, ready_device


def run_inpaint(cfg, device="cpu") -> Path:
    """sample_ddpm.py --inpaint: the first --num_samples test images of --dataset, masked and inpainted."""
    loaded = load_checkpoint_model(cfg, device)
    refuse_latent(loaded, "--inpaint")
    out = make_output_dir(cfg.output_dir or default_sample_dir(cfg.checkpoint))
    channels, size = model_format(loaded)
    images = to_model_range(
        load_set(cfg.dataset, "test", data_settings(cfg), channels, size, cfg.num_samples or 16, "inpainted")
    )
    masks = make_masks(cfg.mask, len(images), size, cfg.seed)
    ready_device(cfg.mixed_precision, device)
    steps = min(cfg.sample_timesteps, loaded.scheduler_config["num_train_timesteps"])
    scheduler = make_repaint_scheduler(
        loaded.scheduler_config, steps, cfg.jump_length, cfg.jump_n_sample, cfg.ddpm, device
    )
    kind, start, results = prediction_type(loaded.scheduler_config), time.perf_counter(), []
    for b, first in enumerate(
        tqdm(
            range(0, len(images), cfg.batch_size),
            desc=f"inpainting ({model_calls(scheduler)} model calls per batch)",
            unit="batch",
        )
    ):
        x0, m = images[first : first + cfg.batch_size].to(device), masks[first : first + cfg.batch_size].to(device)
        with inference_autocast(cfg.mixed_precision, device):
            results.append(
                repaint(loaded.unet, scheduler, x0, m, kind, batch_generator(cfg.seed, b)).clamp(-1, 1).cpu()
            )
    inpainted, masked = torch.cat(results), images * masks  # masked: the hole shown mid-grey (0)
    for i in range(len(images)):
        save_png(to_uint8(inpainted[i]), out / f"inpainted_{i}.png")
        save_png(to_uint8(masks[i] * 2 - 1), out / f"mask_{i}.png")
    save_grid([images, masked, inpainted], out / "inpaint_grid.png")
    mse = hole_mse(inpainted, images, masks)
    write_json(
        out / "inpaint.json",
        dict(
            dataset=cfg.dataset,
            split="test",
            num_images=len(images),
            mask=cfg.mask,
            steps=steps,
            jump_length=cfg.jump_length,
            jump_n_sample=cfg.jump_n_sample,
            eta=cfg.ddpm,
            seed=cfg.seed,
            model_calls_per_batch=model_calls(scheduler),
            hole_mse_mean=float(mse.mean()),
            hole_mse=[float(v) for v in mse],
            checkpoint=str(cfg.checkpoint),
            seconds=round(time.perf_counter() - start, 1),
            device=str(device),
        ),
    )
    print(
        f"inpainted {len(images)} {cfg.dataset} test image(s) ({cfg.mask} masks, {steps} steps, j={cfg.jump_length}, "
        f"r={cfg.jump_n_sample}) in {time.perf_counter() - start:.1f} s; mean squared error in the hole "
        f"{float(mse.mean()):.4f}; grid: {out / 'inpaint_grid.png'}"
    )
    return out
