"""The step rule and the one sampling loop, against stock diffusers."""

import torch
from diffusers import DDIMPipeline, UNet2DModel

from ddpm_hf.config.sections import ModelSettings
from ddpm_hf.diffusion.sampling import make_noise_scheduler, make_sampler, num_inference_steps, sample_batch
from ddpm_hf.models.unet import unet_kwargs


def test_step_rule_of_the_original_without_its_crashes():
    assert num_inference_steps(300, 300) == 300
    assert num_inference_steps(1000, 300) == 333  # the original crashed here (1000 % 3 != 0)
    assert num_inference_steps(1000, 400) == 500
    assert num_inference_steps(300, 10) == 10


def test_trailing_ddim_visits_the_originals_timesteps():
    sampler = make_sampler("ddim", make_noise_scheduler(300, 1e-4, 0.02).config)
    sampler.set_timesteps(num_inference_steps(300, 10))
    assert sampler.timesteps.tolist() == list(range(299, -1, -30))
    assert sampler.config.set_alpha_to_one and not sampler.config.clip_sample


def _random_unet():
    torch.manual_seed(0)  # not zero-initialised, so the noise prediction is non-trivial
    return UNet2DModel(
        **unet_kwargs(
            ModelSettings(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2], num_res_blocks=1), 1, 8
        )
    ).eval()


def test_loop_equals_stock_ddim_pipeline_on_the_same_noise():
    unet = _random_unet()
    sampler = make_sampler("ddim", make_noise_scheduler(100, 1e-4, 0.02).config)
    pipe = DDIMPipeline(unet=unet, scheduler=sampler)
    pipe.set_progress_bar_config(disable=True)
    for eta in (0.0, 1.0):
        ours = sample_batch(unet, sampler, 3, 10, eta, torch.Generator().manual_seed(1))
        stock = pipe(
            batch_size=3, num_inference_steps=10, eta=eta, generator=torch.Generator().manual_seed(1), output_type="pt"
        ).images  # (x/2+0.5).clamp(0,1)
        assert torch.allclose(
            (ours / 2 + 0.5).clamp(0, 1), stock.permute(0, 3, 1, 2) if stock.shape[-1] == 1 else stock, atol=1e-5
        )


def test_every_scheduler_runs_through_the_loop():
    unet = _random_unet()
    config = make_noise_scheduler(100, 1e-4, 0.02).config
    for name in ("ddim", "ddpm", "dpmsolver++", "unipc"):
        sampler = make_sampler(name, config)
        out = sample_batch(unet, sampler, 2, 10, 1.0, torch.Generator().manual_seed(0))
        assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
        assert len(sampler.timesteps) == 10
