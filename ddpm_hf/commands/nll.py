"""sample_ddpm.py --nll: bits/dim of --dataset's test split (the bound: ddpm_hf/diffusion/likelihood.py) -> nll.json."""

import time

from ..data.sets import load_set
from ..diffusion.likelihood import bits_per_dim, check_nll_timesteps, refuse_latent, summarise, unet_model_fn
from ..diffusion.prediction import prediction_type
from ..models.loader import model_format
from ..util.files import make_output_dir, write_json
from .common import data_settings, default_sample_dir, load_checkpoint_model, ready_device


def run_nll(cfg, device="cpu") -> dict:
    """sample_ddpm.py --nll: bits/dim of --dataset's test split (its first --num_samples images) -> nll.json."""
    loaded = load_checkpoint_model(cfg, device)
    refuse_latent(loaded, "--nll")
    T = loaded.scheduler_config["num_train_timesteps"]
    check_nll_timesteps(cfg.nll_timesteps, T)
    out = make_output_dir(cfg.output_dir or default_sample_dir(cfg.checkpoint))
    channels, size = model_format(loaded)
    images = load_set(cfg.dataset, "test", data_settings(cfg), channels, size, cfg.num_samples, "evaluated")
    ready_device(cfg.mixed_precision, device)
    start = time.perf_counter()
    result = bits_per_dim(
        unet_model_fn(loaded.unet, cfg.mixed_precision, device),
        loaded.scheduler_config,
        images,
        cfg.batch_size,
        cfg.seed,
        cfg.nll_timesteps,
        desc=f"bits/dim of {cfg.dataset}",
        device=device,
    )
    summary = dict(
        summarise(result, T, cfg.nll_timesteps),
        dataset=cfg.dataset,
        split="test",
        checkpoint=str(cfg.checkpoint),
        seed=cfg.seed,
        prediction_type=prediction_type(loaded.scheduler_config),
        seconds=round(time.perf_counter() - start, 1),
        device=str(device),
        bpd=[float(v) for v in result["bpd"]],
        bpd_se=[float(v) for v in result["se"]],
    )
    write_json(out / "nll.json", summary)
    se = f" ± {summary['bpd_mean_se']:.4f} (images)" if summary["bpd_mean_se"] is not None else ""
    sub = "" if summary["exact"] else f", timestep-sampling SE per image {summary['timestep_se_mean']:.4f}"
    print(
        f"{cfg.dataset} (test, {len(images)} images): {summary['bpd_mean']:.4f}{se} bits/dim "
        f"({summary['timesteps_evaluated']} of {T} timesteps{sub}); wrote {out / 'nll.json'}"
    )
    return summary
