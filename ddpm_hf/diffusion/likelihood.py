"""The variational bound on -log p(x) of a trained DDPM, per image, in bits/dim (Ho et al. 2020).

For 8-bit images x0 scaled to [-1, 1] and a model with T timesteps (index t = 0..T-1, as
diffusers counts them):

    -log p(x0) <= L_T + sum_{t=1}^{T-1} L_t + L_0
    L_T = KL(q(x_{T-1} | x0) || N(0, I))                                    (prior, no model call)
    L_t = E_{x_t ~ q(x_t|x0)} KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))   (one model call each)
    L_0 = -log p(x0 | x_0-noised), a discretised Gaussian over the 256 pixel levels

p(x_{t-1} | x_t) has the posterior mean computed from the model's x0 estimate (clipped to
[-1, 1], as Ho et al.'s and improved-diffusion's `calc_bpd_loop`) and DDPM's "fixed_small"
variance, the true posterior variance beta~_t, so each L_t is a squared distance of means;
the decoder's scale is sqrt(beta~_1), the clipped log variance of those codes. Each
expectation is estimated with one draw of x_t per image and timestep (fresh seeded noise).

`--nll_timesteps K` (K < T) evaluates L_0 exactly and K-1 of the T-1 terms L_t, drawn per
image uniformly without replacement and weighted by (T-1)/(K-1): unbiased, with the standard
error of sampling from a finite population. L_0 is always computed because it is one large
term whose omission would dominate the estimator's variance.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..util.errors import UsageError
from .prediction import prediction_type, to_x0

BIN_HALF_WIDTH = 1 / 255  # 8-bit levels are 2/255 apart in [-1, 1]
MIN_PROBABILITY = 1e-12  # floor of a pixel's decoder probability (Ho et al.'s clamp): no -inf


@dataclass
class Schedule:
    """Float64 tensors over t = 0..T-1 of the model's forward process."""

    alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor  # beta~_t; 0 at t = 0
    posterior_log_variance_clipped: torch.Tensor  # log beta~_t with t = 0 taking beta~_1's value
    coef_x0: torch.Tensor  # posterior mean = coef_x0 * x0 + coef_xt * x_t
    coef_xt: torch.Tensor

    @property
    def T(self) -> int:
        return len(self.alphas_cumprod)


def make_schedule(scheduler_config: dict) -> Schedule:
    """The schedule of a pipeline's scheduler config (any beta_schedule diffusers knows)."""
    from diffusers import DDPMScheduler

    betas = DDPMScheduler.from_config(scheduler_config).betas.double()
    a = torch.cumprod(1 - betas, 0)
    a_prev = torch.cat([a.new_ones(1), a[:-1]])
    var = betas * (1 - a_prev) / (1 - a)
    log_var = torch.log(torch.cat([var[1:2], var[1:]]))
    return Schedule(a, var, log_var, betas * a_prev.sqrt() / (1 - a), (1 - a_prev) * (1 - betas).sqrt() / (1 - a))


def _per_image(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.to(like.device)[t].reshape(-1, *([1] * (like.dim() - 1)))


def posterior_mean(s: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _per_image(s.coef_x0, t, x0) * x0 + _per_image(s.coef_xt, t, x_t) * x_t


def _log_ndtr_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) without cancellation: in the upper tail the symmetric
    Phi(-lower) - Phi(-upper) keeps both CDFs small, where log_ndtr is accurate."""
    flip = lower > 0
    a, b = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return log_a + torch.log(-torch.expm1(log_b - log_a))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Per-pixel log P(x) of 8-bit values x in [-1, 1]: the Gaussian's mass over x's bin of
    width 2/255, the two end bins extending to -inf and +inf (Ho et al. 2020, eq. 13)."""
    inv_scale = torch.exp(-log_scale)
    upper, lower = (x - mean + BIN_HALF_WIDTH) * inv_scale, (x - mean - BIN_HALF_WIDTH) * inv_scale
    log_p = torch.where(
        x < -1 + BIN_HALF_WIDTH,
        torch.special.log_ndtr(upper),
        torch.where(x > 1 - BIN_HALF_WIDTH, torch.special.log_ndtr(-lower), _log_ndtr_difference(upper, lower)),
    )
    return log_p.clamp_min(math.log(MIN_PROBABILITY))


def prior_nats(s: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """KL(q(x_{T-1} | x0) || N(0, I)) per image, in nats (closed form, no model call)."""
    a = s.alphas_cumprod[-1]
    kl = 0.5 * (a * x0**2 + (1 - a) - 1 - torch.log(1 - a))
    return kl.flatten(1).sum(1)


@torch.inference_mode()
def term_nats(
    model_fn: Callable,
    s: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    kind: str,
    clip: bool = True,
) -> torch.Tensor:
    """L_t per image (nats) at per-image timesteps t (B,): the decoder NLL where t = 0, else the
    KL of the true posterior to the model's, both with variance beta~_t. x0, noise: float64."""
    a = _per_image(s.alphas_cumprod, t, x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    x0_hat = to_x0(model_fn(x_t.float(), t).double(), x_t, s.alphas_cumprod.to(x0.device)[t], kind)
    if clip:  # the model's images live in [-1, 1]; so does the mean of its last step
        x0_hat = x0_hat.clamp(-1, 1)
    mean_p = posterior_mean(s, x0_hat, x_t, t)
    kl = (posterior_mean(s, x0, x_t, t) - mean_p) ** 2 / (2 * _per_image(s.posterior_variance, t, x0).clamp_min(1e-300))
    decoder = -discretized_gaussian_log_likelihood(
        x0, mean_p, 0.5 * _per_image(s.posterior_log_variance_clipped, t, x0)
    )
    return torch.where(t == 0, decoder.flatten(1).sum(1), kl.flatten(1).sum(1))


def draw_timesteps(T: int, K: Optional[int], batch: int, generator: torch.Generator) -> torch.Tensor:
    """(B, K) timesteps per image: all T in order, or t = 0 plus K-1 of 1..T-1 drawn uniformly
    without replacement (independently per image)."""
    if K is None or K >= T:
        return torch.arange(T).expand(batch, T)
    drawn = torch.rand((batch, T - 1), generator=generator).argsort(1)[:, : K - 1] + 1
    return torch.cat([torch.zeros(batch, 1, dtype=torch.long), drawn], 1)


def combine_terms(prior: torch.Tensor, terms: torch.Tensor, T: int) -> tuple:
    """(estimate, standard error) in nats from the prior and the (B, K) evaluated terms, whose
    first column is L_0. With K < T the rest are a uniform sample of the T-1 KL terms."""
    K = terms.shape[1]
    if K >= T:
        return prior + terms.sum(1), torch.zeros_like(prior)
    kl = terms[:, 1:]
    n, population = kl.shape[1], T - 1
    estimate = prior + terms[:, 0] + population / n * kl.sum(1)
    # sampling without replacement: Var(sum estimate) = N^2 (1 - n/N) s^2 / n
    se = population * ((1 - n / population) * kl.var(1, correction=1) / n).sqrt()
    return estimate, se


def bound_batch(
    model_fn: Callable,
    s: Schedule,
    images: torch.Tensor,
    kind: str,
    generator: torch.Generator,
    K: Optional[int] = None,
    clip: bool = True,
    bar=None,
) -> dict:
    """Per-image bound (nats) of uint8 images: one model call per evaluated timestep, batched."""
    device = images.device
    x0 = images.double().div(127.5).sub(1.0)
    timesteps = draw_timesteps(s.T, K, len(images), generator).to(device)
    terms = []
    for k in range(timesteps.shape[1]):
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(device)
        terms.append(term_nats(model_fn, s, x0, timesteps[:, k], noise, kind, clip))
        if bar is not None:
            bar.update(1)
    terms = torch.stack(terms, 1)
    prior = prior_nats(s, x0)
    estimate, se = combine_terms(prior, terms, s.T)
    return dict(nats=estimate, se=se, prior=prior, decoder=terms[:, 0], terms=terms if K is None or K >= s.T else None)


def unet_model_fn(unet, mixed_precision=None, device="cpu") -> Callable:
    """(x_t float32, t (B,)) -> the UNet's raw output in float32, under --mixed_precision."""
    from ..util.precision import inference_autocast

    dtype = next(unet.parameters()).dtype

    def call(x_t, t):
        with inference_autocast(mixed_precision, device):
            return unet(x_t.to(dtype), t).sample.float()

    return call


def bits_per_dim(
    model_fn: Callable,
    scheduler_config: dict,
    images: torch.Tensor,
    batch_size: int,
    seed: int,
    K: Optional[int] = None,
    clip: bool = True,
    stream: int = 0,
    progress: bool = True,
    desc: str = "bits/dim",
    device="cpu",
) -> dict:
    """Per-image bound of uint8 images (N, C, H, W) in bits/dim, as numpy arrays: bpd, se (its standard
    error from timestep sampling), prior, decoder and, when exact, terms (N, T). Batch b's noise and
    timesteps depend only on (seed, stream, b)."""
    from .sampling import batch_generator

    s, kind = make_schedule(scheduler_config), prediction_type(scheduler_config)
    calls = s.T if K is None else min(K, s.T)
    bits = images[0].numel() * math.log(2)  # nats per image -> bits per dimension
    parts = []
    with tqdm(
        total=math.ceil(len(images) / batch_size) * calls,
        desc=f"{desc} ({calls} model calls per image)",
        unit="call",
        disable=not progress,
    ) as bar:
        for b, start in enumerate(range(0, len(images), batch_size)):
            gen = batch_generator(seed, stream * 1_000_000 + b)
            parts.append(
                bound_batch(model_fn, s, images[start : start + batch_size].to(device), kind, gen, K, clip, bar)
            )
    keys = [k for k in parts[0] if parts[0][k] is not None]
    out = {("bpd" if k == "nats" else k): torch.cat([p[k].cpu() for p in parts]).numpy() / bits for k in keys}
    out["calls_per_image"] = calls
    return out


def check_nll_timesteps(K: Optional[int], T: int) -> None:
    if K is not None and not 3 <= K <= T:
        raise UsageError(
            f"--nll_timesteps must be between 3 (L_0 and two sampled KL terms, for a standard error) "
            f"and the model's T = {T}, got {K}"
        )


def refuse_latent(loaded, what: str) -> None:
    """Bits/dim and inpainting are defined on pixels; a latent model's bound is of its latents."""
    if loaded.vae is not None:
        raise UsageError(f"{what} needs a pixel-space model; {loaded.source} is a latent model (--latent)")


def summarise(result: dict, T: int, K: Optional[int]) -> dict:
    """Dataset-level numbers of a `bits_per_dim` result: the mean and its standard errors."""
    bpd, n = result["bpd"], len(result["bpd"])
    summary = dict(
        bpd_mean=float(np.mean(bpd)),
        bpd_std=float(np.std(bpd, ddof=1)) if n > 1 else 0.0,
        bpd_mean_se=float(np.std(bpd, ddof=1) / math.sqrt(n)) if n > 1 else None,
        prior_bpd_mean=float(np.mean(result["prior"])),
        decoder_bpd_mean=float(np.mean(result["decoder"])),
        timestep_se_mean=float(np.sqrt(np.mean(result["se"] ** 2))),
        num_images=n,
        T=T,
        timesteps_evaluated=T if K is None else min(K, T),
        exact=K is None or K >= T,
    )
    if result.get("terms") is not None:  # the mean of every L_t: where the bits are spent
        summary["terms_bpd_mean"] = [float(v) for v in result["terms"].mean(0)]
    return summary
