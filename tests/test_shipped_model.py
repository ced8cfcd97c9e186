"""The reference model shipped in pretrained/ddpm-mnist5k: a standard pipeline that stock diffusers samples."""

import json

import torch
from conftest import REPO
from diffusers import DDIMPipeline, DiffusionPipeline

SHIPPED = REPO / "pretrained" / "ddpm-mnist5k"


def test_shipped_model_is_small_safetensors_with_a_model_card():
    files = {p.relative_to(SHIPPED).as_posix(): p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in files and not any(
        f.endswith((".bin", ".pt", ".pkl")) for f in files
    )
    assert sum(files.values()) < 10 * 2**20
    card = (SHIPPED / "README.md").read_text()
    assert "FID" in card and "AUROC" in card and "v_prediction" in card


def test_shipped_model_loads_with_stock_diffusers_and_draws_digits():
    pipe = DiffusionPipeline.from_pretrained(SHIPPED)
    assert isinstance(pipe, DDIMPipeline)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.clip_sample
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=8, num_inference_steps=20, eta=1.0, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (8, 28, 28, 1)
    # MNIST digits: mostly black background with a few bright strokes (an untrained model gives noise).
    dark, bright = (images < 0.1).mean(), (images > 0.9).mean()
    assert dark > 0.6 and 0.03 < bright < 0.35
    config = json.loads((SHIPPED / "ddpm_hf_config.json").read_text())
    assert config["dataset"] == "mnist5k" and config["trained_steps"] == 3125
