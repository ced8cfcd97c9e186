"""Every --scheduler through the one sampling loop (ddpm_hf.diffusion.sampling.denoise / sample_batch).

Two kinds of model: a tiny random UNet2DModel (the loop must match diffusers' own
DDIMPipeline bit for bit) and the exact noise predictor of Gaussian data, for which the
probability-flow ODE has a closed-form solution and the sample distribution is known, so
each solver's accuracy is a number rather than a picture.
"""

import types

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, UNet2DModel

from ddpm_hf.config.options import SCHEDULERS
from ddpm_hf.diffusion.sampling import make_noise_scheduler, make_sampler, sample_batch

MU, S = 0.3, 0.5  # the Gaussian "data set": every pixel ~ N(MU, S^2)


class GaussianDenoiser(torch.nn.Module):
    """E[eps | x_t] for data ~ N(MU, S^2): the best possible noise predictor."""

    def __init__(self, alphas_cumprod, size=16):
        super().__init__()
        self.register_buffer("a", alphas_cumprod.clone())
        self.unused = torch.nn.Parameter(torch.zeros(()))  # the loop reads the dtype/device of a parameter
        self.config = types.SimpleNamespace(in_channels=1, sample_size=size)

    def forward(self, x, t):
        a = self.a[int(t)]
        return types.SimpleNamespace(sample=(1 - a).sqrt() / (a * S**2 + 1 - a) * (x - a.sqrt() * MU))


def _gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def gaussian():
    noise = make_noise_scheduler(300, 1e-4, 0.02)
    a = noise.alphas_cumprod
    z = torch.randn((64, 1, 16, 16), generator=_gen())  # the noise sample_batch draws from _gen()
    # The ODE keeps (x_t - sqrt(a_t) MU) / sqrt(a_t S^2 + 1 - a_t) constant: its exact end point.
    exact = MU + S * (z - a[-1].sqrt() * MU) / (a[-1] * S**2 + 1 - a[-1]).sqrt()
    return GaussianDenoiser(a), noise.config, exact


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def test_ddim_loop_equals_stock_ddim_pipeline(tiny_unet):
    config = make_noise_scheduler(100, 1e-4, 0.02).config
    ours = sample_batch(tiny_unet, make_sampler("ddim", config), 3, 10, 0.0, _gen())
    stock = DDIMPipeline(unet=tiny_unet, scheduler=make_sampler("ddim", config))(
        batch_size=3, generator=_gen(), num_inference_steps=10, eta=0.0, output_type="np"
    ).images
    np.testing.assert_allclose((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), stock, atol=1e-6)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_runs_and_is_reproducible(tiny_unet, name):
    scheduler = make_sampler(name, make_noise_scheduler(100, 1e-4, 0.02).config)
    first = sample_batch(tiny_unet, scheduler, 2, 7, 1.0, _gen())
    again = sample_batch(tiny_unet, scheduler, 2, 7, 1.0, _gen())
    assert first.shape == (2, 1, 8, 8) and torch.isfinite(first).all()
    assert len(scheduler.timesteps) == 7 and int(scheduler.timesteps[0]) == 99  # trailing spacing starts at T-1
    torch.testing.assert_close(first, again)


def test_ode_solvers_converge_to_the_exact_solution(gaussian):
    unet, config, exact = gaussian
    error = {
        (name, steps): (sample_batch(unet, make_sampler(name, config), 64, steps, 0.0, _gen()) - exact)
        .abs()
        .max()
        .item()
        for name in ("ddim", "dpmsolver++", "unipc")
        for steps in (10, 20, 50)
    }
    # Measured: ddim 0.33 / 0.17 / 0.069; dpmsolver++ 0.11 / 0.0014 / 0.008; unipc 0.10 / 0.0047 / 0.0018.
    assert error["ddim", 10] > error["ddim", 20] > error["ddim", 50]
    for solver in ("dpmsolver++", "unipc"):  # second order: far closer than DDIM at the same step count
        assert error[solver, 10] < 0.5 * error["ddim", 10]
        assert error[solver, 20] < 0.1 * error["ddim", 20]
        assert error[solver, 50] < 0.02
    assert error["ddim", 50] < 0.1


def test_ancestral_samplers_reach_the_data_distribution(gaussian):
    unet, config, _ = gaussian
    ddpm = sample_batch(unet, make_sampler("ddpm", config), 64, 300, 0.0, _gen())
    # DDPM with the full 300 steps: the right distribution (16,384 values; std error ~0.004).
    assert abs(ddpm.mean().item() - MU) < 0.03 and abs(ddpm.std().item() - S) < 0.02
    # The DDPM scheduler is DDIM with eta = 1 (the seed's --ddpm 1): the same numbers, draw for draw.
    for steps in (20, 300):
        ddim_eta1 = sample_batch(unet, make_sampler("ddim", config), 64, steps, 1.0, _gen())
        ddpm = sample_batch(unet, make_sampler("ddpm", config), 64, steps, 0.0, _gen())
        torch.testing.assert_close(ddpm, ddim_eta1, atol=1e-4, rtol=1e-4)
