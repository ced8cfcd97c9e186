"""The variational bound (ddpm_hf/diffusion/likelihood.py) against exact answers.

For data with independent N(MU, S^2) pixels the best noise predictor is linear in x_t, so the
model's posterior mean is linear too and every KL term has a closed form; the expectation over
x_t of each term is closed-form as well, and the decoder's is a 1-D integral (Gauss-Hermite).
The reference values below are computed in float64 numpy/scipy from the DDPM formulas, not
with the code under test.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ddpm_hf.diffusion.likelihood import (
    bits_per_dim,
    combine_terms,
    discretized_gaussian_log_likelihood,
    make_schedule,
    prior_nats,
    term_nats,
)
from ddpm_hf.diffusion.sampling import make_noise_scheduler

MU, S = 0.3, 0.5
T = 100
SHAPE = (1, 4, 4)  # 16 dimensions


def gaussian_model(kind="epsilon"):
    """The exact E[eps | x_t] (or the v / x0 it implies) for N(MU, S^2) pixels, at per-image t."""
    a_all = make_noise_scheduler(T, 1e-4, 0.02).alphas_cumprod.double()

    def call(x, t):
        a = a_all[t].reshape(-1, 1, 1, 1)
        x = x.double()
        eps = (1 - a).sqrt() / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind]
        return out.float()

    return call


def config(kind="epsilon"):
    return dict(make_noise_scheduler(T, 1e-4, 0.02).config, prediction_type=kind)


def image():
    """One 16-pixel 8-bit image drawn from the Gaussian."""
    rng = np.random.RandomState(0)
    return torch.from_numpy(np.clip(np.round((rng.normal(MU, S, SHAPE) + 1) * 127.5), 0, 255).astype(np.uint8))


# ---- the float64 reference ------------------------------------------------------------------


def reference_schedule():
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    a = np.cumprod(1 - betas)
    a_prev = np.r_[1.0, a[:-1]]
    return betas, a, a_prev, betas * (1 - a_prev) / (1 - a)


def x0_hat(x_t, a):
    """The linear x0 estimate of the exact denoiser: g x_t + h."""
    g, h = math.sqrt(a) * S**2 / (a * S**2 + 1 - a), (1 - a) * MU / (a * S**2 + 1 - a)
    return g * x_t + h, g, h


def bin_log_probability(x0, mean, sigma):
    """log of the Gaussian's mass over each 8-bit bin (scipy; the upper tail through survival functions)."""
    up, lo = (x0 + 1 / 255 - mean) / sigma, (x0 - 1 / 255 - mean) / sigma
    with np.errstate(divide="ignore"):
        inner = np.log(np.where(lo > 0, norm.sf(lo) - norm.sf(up), norm.cdf(up) - norm.cdf(lo)))
    log_p = np.where(x0 < -0.999, norm.logcdf(up), np.where(x0 > 0.999, norm.logsf(lo), inner))
    return np.maximum(log_p, math.log(1e-12))  # the implementation's (and Ho et al.'s) floor


def decoder_nll(x0, mean, sigma):
    return -bin_log_probability(x0, mean, sigma)


def reference_terms(x0, expected: bool):
    """Per-term nats of the bound: at x_t = sqrt(a) x0 (noise 0), or their expectation over x_t."""
    betas, a, a_prev, var = reference_schedule()
    terms = np.zeros(T)
    for t in range(1, T):
        c1 = betas[t] * math.sqrt(a_prev[t]) / (1 - a[t])
        _, g, h = x0_hat(0.0, a[t])
        bias = g * math.sqrt(a[t]) * x0 + h - x0  # E[x0_hat] - x0
        spread = g**2 * (1 - a[t]) if expected else 0.0
        terms[t] = (c1**2 * (bias**2 + spread) / (2 * var[t])).sum()
    sigma = math.sqrt(var[1])
    if expected:  # E over x_1 ~ N(sqrt(a_0) x0, 1 - a_0), by 80-point Gauss-Hermite
        z, w = np.polynomial.hermite.hermgauss(80)
        x1 = math.sqrt(a[0]) * x0[..., None] + math.sqrt(2 * (1 - a[0])) * z
        terms[0] = (decoder_nll(x0[..., None], x0_hat(x1, a[0])[0], sigma) * w / math.sqrt(math.pi)).sum()
    else:
        terms[0] = decoder_nll(x0, x0_hat(math.sqrt(a[0]) * x0, a[0])[0], sigma).sum()
    prior = (0.5 * (a[-1] * x0**2 + (1 - a[-1]) - 1 - math.log(1 - a[-1]))).sum()
    return terms, prior


# ---- tests ----------------------------------------------------------------------------------


def test_decoder_is_a_distribution_over_the_256_levels():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, scale in ((0.3, 0.01), (-0.99, 0.2), (1.5, 0.05), (0.0, 3.0)):
        log_p = discretized_gaussian_log_likelihood(
            levels, torch.tensor(mean, dtype=torch.float64), torch.tensor(math.log(scale), dtype=torch.float64)
        )
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        np.testing.assert_allclose(
            log_p.numpy(), bin_log_probability(levels.numpy(), mean, scale), rtol=1e-9, atol=1e-12
        )


def test_every_term_at_fixed_noise_matches_the_closed_form():
    s, x0 = make_schedule(config()), image().double()[None] / 127.5 - 1
    ours = np.array(
        [
            term_nats(gaussian_model(), s, x0, torch.tensor([t]), torch.zeros_like(x0), "epsilon", clip=False).item()
            for t in range(T)
        ]
    )
    ref, ref_prior = reference_terms(x0[0].numpy(), expected=False)
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=1e-7)
    assert ours.sum() == pytest.approx(ref.sum(), rel=1e-5)
    assert prior_nats(s, x0).item() == pytest.approx(ref_prior, rel=1e-6)  # diffusers' float32 betas


def test_bound_matches_the_analytic_expectation():
    n = 4000
    images = image()[None].expand(n, *SHAPE)
    result = bits_per_dim(gaussian_model(), config(), images, batch_size=1000, seed=0, clip=False, progress=False)
    terms, prior = reference_terms(image().double().numpy() / 127.5 - 1, expected=True)
    analytic = (terms.sum() + prior) / (16 * math.log(2))
    mc_se = result["bpd"].std(ddof=1) / math.sqrt(n)
    assert mc_se < 0.002 * analytic  # the comparison below is a sharp one
    assert abs(result["bpd"].mean() - analytic) < 4 * mc_se
    np.testing.assert_allclose(result["terms"].mean(0), terms / (16 * math.log(2)), rtol=0.05, atol=4e-4)
    assert (result["se"] == 0).all() and result["calls_per_image"] == T


def test_subsampled_bound_is_unbiased_with_an_honest_standard_error():
    n, K = 4000, 12
    images = image()[None].expand(n, *SHAPE)
    full = bits_per_dim(gaussian_model(), config(), images, batch_size=1000, seed=1, clip=False, progress=False)
    sub = bits_per_dim(gaussian_model(), config(), images, batch_size=1000, seed=1, K=K, clip=False, progress=False)
    terms, prior = reference_terms(image().double().numpy() / 127.5 - 1, expected=True)
    analytic = (terms.sum() + prior) / (16 * math.log(2))
    assert sub["calls_per_image"] == K and (sub["se"] > 0).all()
    assert abs(sub["bpd"].mean() - analytic) < 4 * sub["bpd"].std(ddof=1) / math.sqrt(n)
    # The spread of the estimates = x_t noise (the full bound's spread) + timestep sampling (the reported SE).
    predicted = math.sqrt(full["bpd"].var(ddof=1) + np.mean(sub["se"] ** 2))
    assert 0.85 < sub["bpd"].std(ddof=1) / predicted < 1.15


def test_combine_terms_weights_and_finite_population_error():
    prior, terms = torch.tensor([1.0]), torch.tensor([[5.0, 1.0, 2.0, 3.0]])  # L_0 then three of T-1 = 9 KL terms
    estimate, se = combine_terms(prior, terms, T=10)
    assert estimate.item() == pytest.approx(1 + 5 + 9 / 3 * 6)
    assert se.item() == pytest.approx(9 * math.sqrt((1 - 3 / 9) * 1.0 / 3))  # sample variance of 1, 2, 3 is 1
    estimate, se = combine_terms(prior, torch.ones(1, 10), T=10)
    assert estimate.item() == 11 and se.item() == 0


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_prediction_types_give_the_same_bound(kind):
    images = image()[None].expand(8, *SHAPE)
    eps = bits_per_dim(gaussian_model(), config(), images, batch_size=8, seed=0, clip=False, progress=False)
    other = bits_per_dim(gaussian_model(kind), config(kind), images, batch_size=8, seed=0, clip=False, progress=False)
    np.testing.assert_allclose(other["bpd"], eps["bpd"], rtol=1e-4)


def test_seeded():
    images = torch.randint(0, 256, (6, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def run(seed, bs):
        return bits_per_dim(gaussian_model(), config(), images, batch_size=bs, seed=seed, K=10, progress=False)["bpd"]

    np.testing.assert_array_equal(run(0, 3), run(0, 3))
    assert not np.array_equal(run(0, 3), run(1, 3))
