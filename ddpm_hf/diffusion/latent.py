"""Latent diffusion (`--latent`): the UNet works on the latents of a frozen, pretrained AutoencoderKL.

As the original (docs/original.md): images in [-1, 1], grayscale repeated to the VAE's
3 input channels, latents = `latent_dist.sample()` (or its mean with `--latent_mode mean`)
times the VAE's configured `scaling_factor` (0.18215 for stabilityai/sd-vae-ft-mse);
decoding divides by the same factor. The UNet runs on `latent_channels` at
`size // 2**(len(block_out_channels) - 1)`, read from the VAE's config (8 for the
Stable Diffusion VAEs), never hard-coded.

The VAE is never trained: eval mode, gradients off, outside the optimiser and outside
`accelerator.prepare` (DDP never wraps it); it only moves to the device of the UNet.
"""

import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config.sections import LatentSettings
from ..data.images import to_model_range
from ..util.errors import DDPMError, UsageError, first_line
from ..util.hub_access import check_hub_repo, hub_offline, is_hub_id

VAE_SUBFOLDERS = ("", "vae", "vqvae")  # a VAE folder, a Stable Diffusion pipeline, a ddpm-hf latent pipeline


def _from_pretrained(source, **kwargs):
    from diffusers import AutoencoderKL

    with warnings.catch_warnings():  # huggingface_hub deprecation chatter would break the one-line errors
        warnings.simplefilter("ignore")
        return AutoencoderKL.from_pretrained(source, use_safetensors=True, **kwargs)


def _load_hub_vae(name: str):
    try:  # the local cache first: no request, so a cached VAE loads offline and without retries
        return _from_pretrained(name, local_files_only=True)
    except Exception:
        pass
    if hub_offline():
        raise DDPMError(
            f"cannot load the VAE {name}: it is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
            "downloading it; download it once online, or pass --vae FOLDER (an AutoencoderKL saved with "
            "save_pretrained)"
        )
    # one quick request, so an unreachable Hub fails in a second instead of after ~25 s of retries
    check_hub_repo(
        name,
        f"the VAE {name}",
        "check --vae (or log in for a private model)",
        "pass --vae FOLDER (an AutoencoderKL saved with save_pretrained)",
    )
    try:
        return _from_pretrained(name)
    except Exception as err:
        raise DDPMError(f"cannot load the VAE {name} ({type(err).__name__}: {first_line(err)})") from None


def load_vae(name: str, device="cpu"):
    """The frozen AutoencoderKL of `--vae`: a folder (an AutoencoderKL, or a pipeline folder with vae/ or
    vqvae/) or a Hub id. Every failure is one line, and an unreachable Hub fails in about a second."""
    path = Path(name).expanduser()
    if path.is_dir():
        sub = next((s for s in VAE_SUBFOLDERS if (path / s / "config.json").is_file()), None)
        if sub is None:
            raise UsageError(
                f"--vae {name} is a folder without config.json (nor vae/config.json or vqvae/config.json); "
                f"pass an AutoencoderKL folder saved with save_pretrained, or a Hub id"
            )
        try:
            vae = _from_pretrained(str(path), subfolder=sub or None)
        except Exception as err:
            raise DDPMError(f"cannot load the VAE folder {name} ({type(err).__name__}: {first_line(err)})") from None
    elif not is_hub_id(name):
        raise UsageError(f"--vae {name} is neither an existing folder nor a Hub id (user/name)")
    else:
        vae = _load_hub_vae(name)
    if type(vae).__name__ != "AutoencoderKL":
        raise UsageError(f"--vae {name} is a {type(vae).__name__}, not an AutoencoderKL")
    if vae.config.get("shift_factor"):
        # LDMPipeline, the saved pipeline, decodes z / scaling_factor with no shift.
        raise UsageError(
            f"--vae {name} has a shift_factor ({vae.config.shift_factor}); only VAEs whose latents are scaled "
            f"by scaling_factor alone (such as stabilityai/sd-vae-ft-mse) are supported"
        )
    return vae.requires_grad_(False).eval().to(device)


def downsample_factor(vae) -> int:
    """Pixels per latent along each side (diffusers pipelines' `vae_scale_factor`)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_format(vae_name: str, vae, channels: int, size: int, channel_mult) -> tuple:
    """(channels, size) of the UNet's input for `channels` x `size` images, checking that they can be
    encoded by `vae` (--vae `vae_name`) and then downsampled by a UNet of levels `channel_mult`."""
    vae_channels = vae.config.in_channels
    if channels not in (1, vae_channels):
        raise UsageError(
            f"the VAE {vae_name} encodes {vae_channels}-channel images, not {channels}-channel ones; "
            f"pass --channels {vae_channels}"
        )
    factor, unet_factor = downsample_factor(vae), 2 ** (len(channel_mult) - 1)
    if size % (factor * unet_factor):
        raise UsageError(
            f"image size {size} px does not suit --latent: the VAE downsamples by {factor} and the UNet by "
            f"{unet_factor} (--channel_mult), so use a --size that is a multiple of {factor * unet_factor}"
        )
    return vae.config.latent_channels, size // factor


def to_vae_input(vae, x: torch.Tensor) -> torch.Tensor:
    """Grayscale repeated to the VAE's channels (as the original), on the VAE's device and dtype."""
    if x.shape[1] == 1 and vae.config.in_channels != 1:
        x = x.repeat(1, vae.config.in_channels, 1, 1)
    return x.to(device=vae.device, dtype=vae.dtype)


def _latents(distribution, mode: str, generator=None) -> torch.Tensor:
    return distribution.sample(generator) if mode == "sample" else distribution.mean


def _scale(vae, latents: torch.Tensor) -> torch.Tensor:
    # Contiguous: CPU convolutions may return channels-last strides, and `randn_like` of such a
    # tensor draws different noise; this way cached and on-the-fly latents train identically.
    return (latents.float() * vae.config.scaling_factor).contiguous()


@torch.no_grad()
def encode(vae, x: torch.Tensor, mode: str = "sample", generator=None) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents (the UNet's x0), float32 on the VAE's device.
    `sample` draws from the global RNG of the device unless a generator is given."""
    distribution = vae.encode(to_vae_input(vae, x)).latent_dist
    return _scale(vae, _latents(distribution, mode, generator))


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images (nominally [-1, 1], the VAE's channels), float32 on the VAE's device."""
    return vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample.float()


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, mode: str, batch_size: int, progress: bool = True) -> torch.Tensor:
    """--cache_latents: encode uint8 images once, on the VAE's device; returns a CPU float32 tensor.
    With `sample` the cache holds the posterior's moments (mean and log-variance, 2x the latent
    channels), so every epoch still draws a fresh latent, exactly as encoding on the fly would."""
    parts = []
    for start in tqdm(range(0, len(images), batch_size), desc="encoding latents", unit="batch", disable=not progress):
        distribution = vae.encode(to_vae_input(vae, to_model_range(images[start : start + batch_size]))).latent_dist
        parts.append((distribution.parameters if mode == "sample" else distribution.mean).float().cpu().contiguous())
    return torch.cat(parts)


def cached_to_latents(vae, cached: torch.Tensor, mode: str, generator=None) -> torch.Tensor:
    """A batch of the --cache_latents tensor -> scaled latents (a fresh draw per call with `sample`)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return _scale(vae, _latents(DiagonalGaussianDistribution(cached), mode, generator) if mode == "sample" else cached)


def training_latents(vae, batch: torch.Tensor, mode: str, cached: bool) -> torch.Tensor:
    """A training batch (uint8 images, or cached moments/means) -> the UNet's x0."""
    return cached_to_latents(vae, batch, mode) if cached else encode(vae, to_model_range(batch), mode)


def load_training_vae(latent: LatentSettings):
    """The VAE of a training run (None without --latent), loaded before anything slow."""
    if not latent.latent:
        if latent.cache_latents:
            raise UsageError("--cache_latents caches the VAE latents of --latent; add --latent or drop --cache_latents")
        return None
    return load_vae(latent.vae)
