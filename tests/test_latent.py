"""--latent: a frozen AutoencoderKL, training (on the fly and --cache_latents), the saved LDMPipeline,
sampling, OOD in pixel space, and one-line failures. Offline: a tiny random VAE saved to a temporary folder."""

import json
import time

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, run_script
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

from ddpm_hf.config.sections import LatentSettings
from ddpm_hf.data.images import to_model_range, to_uint8
from ddpm_hf.diffusion.latent import (
    cached_to_latents,
    decode_latents,
    downsample_factor,
    encode,
    encode_dataset,
    latent_format,
    load_training_vae,
    load_vae,
    training_latents,
)
from ddpm_hf.util.errors import UsageError

# 32 px images -> 4x4 latents (the tiny VAE downsamples by 8, like Stable Diffusion's) -> a 2-level UNet.
LATENT_TRAIN = [
    *TINY_TRAIN,
    "--size",
    "32",
    "--max_train_samples",
    "48",
    "--batch_size",
    "16",
    "--logging_steps",
    "1",
    "--max_train_steps",
    "3",
    "--latent",
]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A randomly initialised AutoencoderKL with 4 levels (factor 8) and 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(vae_dir):
    return load_vae(str(vae_dir))


@pytest.fixture(scope="module")
def latent_run(vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent") / "run"
    proc = run_script("train_ddpm.py", *LATENT_TRAIN, "--vae", vae_dir, "--output_dir", out)
    return out, proc


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]


# ---- the encoding rules, in process ------------------------------------------------------------


def test_vae_is_frozen_and_factor_comes_from_its_config(vae):
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert downsample_factor(vae) == 8
    levels = [1, 2]
    assert latent_format("tiny", vae, 1, 32, levels) == (4, 4) and latent_format("tiny", vae, 3, 64, levels) == (4, 8)
    with pytest.raises(UsageError, match="multiple of 16"):  # 8 (VAE) x 2 (UNet levels)
        latent_format("tiny", vae, 1, 24, levels)
    with pytest.raises(UsageError, match="pass --channels 3"):
        latent_format("tiny", vae, 2, 32, levels)


def test_encode_decode_follow_the_original_rules(vae):
    gray = torch.rand(4, 1, 32, 32) * 2 - 1
    rgb = gray.repeat(1, 3, 1, 1)
    factor = vae.config.scaling_factor
    with torch.no_grad():
        dist = vae.encode(rgb).latent_dist
        eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
        # grayscale is repeated to RGB; mean and sample are scaled by the configured factor
        assert torch.allclose(encode(vae, gray, "mean"), dist.mean * factor, atol=1e-6)
        sampled = encode(vae, gray, "sample", torch.Generator().manual_seed(3))
        assert torch.allclose(sampled, (dist.mean + dist.std * eps) * factor, atol=1e-6)
        assert (sampled - encode(vae, gray, "mean")).abs().max() > 1e-3  # a real draw, not the mean
        z = encode(vae, gray, "mean")
        decoded = decode_latents(vae, z)
        assert decoded.shape == (4, 3, 32, 32)
        assert torch.allclose(decoded, vae.decode(z / factor).sample, atol=1e-6)


def test_cached_latents_equal_latents_encoded_on_the_fly(vae):
    images = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    for mode, channels in (("sample", 8), ("mean", 4)):  # sample caches the moments (mean and log-variance)
        cached = encode_dataset(vae, images, mode, batch_size=4, progress=False)
        assert cached.shape == (10, channels, 4, 4) and cached.is_contiguous()
        direct = encode(vae, to_model_range(images), mode, torch.Generator().manual_seed(1))
        assert torch.allclose(cached_to_latents(vae, cached, mode, torch.Generator().manual_seed(1)), direct, atol=1e-5)
        torch.manual_seed(9)
        a = training_latents(vae, images, mode, cached=False)
        torch.manual_seed(9)
        b = training_latents(vae, cached, mode, cached=True)
        assert torch.allclose(a, b, atol=1e-5) and a.is_contiguous() and b.is_contiguous()


def test_bad_vae_settings_fail_with_one_clear_line(tmp_path):
    with pytest.raises(UsageError, match="needs|add --latent"):
        load_training_vae(LatentSettings(cache_latents=True))
    assert load_training_vae(LatentSettings()) is None
    with pytest.raises(UsageError, match="neither an existing folder nor a Hub id"):
        load_vae(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="without config.json"):
        load_vae(str(tmp_path))


@pytest.mark.slow
def test_a_pipeline_folder_serves_as_vae(latent_run, vae):
    run, _ = latent_run
    again = load_vae(str(run))  # its vqvae/ subfolder
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), vae.state_dict().values()))


def test_unreachable_vae_fails_fast_in_one_line(tmp_path, capsys):
    from train_ddpm import main as train_main

    start = time.time()
    with pytest.raises(
        SystemExit
    ) as exit_info:  # the script's entry point, in process (conftest sets HF_HUB_OFFLINE=1)
        train_main([*LATENT_TRAIN, "--vae", "some/unreachable-id", "--output_dir", str(tmp_path / "out")])
    elapsed = time.time() - start
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1, lines
    assert lines[0] == (
        "error: cannot load the VAE some/unreachable-id: it is not in the Hugging Face cache and "
        "HF_HUB_OFFLINE=1 forbids downloading it; download it once online, or pass --vae FOLDER "
        "(an AutoencoderKL saved with save_pretrained)"
    )
    assert not (tmp_path / "out").exists()
    assert elapsed < 20  # the VAE is looked up before the data, the model or Accelerate


def test_unreachable_hub_is_asked_once_without_retries(monkeypatch):
    import huggingface_hub.constants
    import huggingface_hub.hf_api
    from diffusers import AutoencoderKL  # noqa: F401  (imported before the clock starts)

    from ddpm_hf.util.errors import DDPMError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", "http://127.0.0.1:9")  # a closed port
    start = time.time()
    with pytest.raises(DDPMError, match="cannot reach the Hugging Face Hub for the VAE some/unreachable-id"):
        load_vae("some/unreachable-id")
    assert time.time() - start < 10  # huggingface_hub's own retries would take ~25 s


# ---- training ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_saves_an_ldm_pipeline_with_the_frozen_vae(latent_run, vae_dir):
    run, proc = latent_run
    assert "the UNet diffuses 4x4x4 latents" in proc.stdout
    index = json.loads((run / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline" and index["vqvae"] == ["diffusers", "AutoencoderKL"]
    unet_config = json.loads((run / "unet" / "config.json").read_text())
    assert (unet_config["in_channels"], unet_config["out_channels"], unet_config["sample_size"]) == (4, 4, 4)
    # The VAE comes out exactly as it went in (frozen), and checkpoints hold the UNet only.
    saved = load_file(run / "vqvae" / "diffusion_pytorch_model.safetensors")
    original = load_file(vae_dir / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    unet_keys = load_file(run / "unet" / "diffusion_pytorch_model.safetensors").keys()
    assert load_file(run / "checkpoints" / "checkpoint-3" / "model.safetensors").keys() == unet_keys
    losses = _losses(run)
    assert len(losses) == 3 and all(0 < v < 2 for v in losses)
    grid = Image.open(run / "samples" / "epoch_0001.png")  # 4 decoded previews, 2x2 grid of 32 px images
    assert grid.mode == "RGB" and grid.size == (2 * 34 + 2, 2 * 34 + 2)


@pytest.mark.slow
def test_cache_latents_trains_identically(latent_run, vae_dir, tmp_path):
    run, _ = latent_run
    proc = run_script(
        "train_ddpm.py", *LATENT_TRAIN, "--cache_latents", "--vae", vae_dir, "--output_dir", tmp_path / "cached"
    )
    assert "cached once" in proc.stdout
    # The cache holds the posterior moments, so every draw (and so every loss) is the one on-the-fly encoding makes.
    assert np.allclose(_losses(tmp_path / "cached"), _losses(run), rtol=0, atol=1e-6)
    a = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cached" / "unet" / "diffusion_pytorch_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


# ---- the saved pipeline, sampling and OOD --------------------------------------------------------


@pytest.mark.slow
def test_stock_ldm_pipeline_loads_and_samples_like_ddpm_hf(latent_run):
    from diffusers import DiffusionPipeline, LDMPipeline

    from ddpm_hf.diffusion.sampling import make_sampler, sample_batch
    from ddpm_hf.models.loader import load_model

    run, _ = latent_run
    pipe = DiffusionPipeline.from_pretrained(run, use_safetensors=True)  # no custom code, no trust_remote_code
    assert type(pipe) is LDMPipeline and type(pipe.vqvae).__name__ == "AutoencoderKL"
    images = pipe(
        batch_size=3, generator=torch.Generator().manual_seed(7), eta=0.0, num_inference_steps=5, output_type="np"
    ).images
    assert images.shape == (3, 32, 32, 3)
    loaded = load_model(str(run))
    assert loaded.vae is not None and not any(p.requires_grad for p in loaded.vae.parameters())
    ours = sample_batch(
        loaded.unet,
        make_sampler("ddim", loaded.scheduler_config),
        3,
        5,
        0.0,
        torch.Generator().manual_seed(7),
        loaded.vae,
    )
    ours = ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.std() > 0.01 and np.abs(images - ours).max() < 1e-5


@pytest.mark.slow
def test_sample_script_writes_decoded_pixel_images(latent_run, tmp_path):
    from ddpm_hf.diffusion.sampling import batch_generator, make_sampler, sample_batch
    from ddpm_hf.models.loader import load_model
    from sample_ddpm import main as sample_main

    run, _ = latent_run
    sample_main.__wrapped__(
        [
            "--checkpoint",
            str(run),
            "--output_dir",
            str(tmp_path),
            "--fid",
            "--num_samples",
            "3",
            "--batch_size",
            "2",
            "--sample_timesteps",
            "5",
        ]
    )
    folder = tmp_path / "fid_samples" / "mnist5k" / "ddpm_1.0_timesteps_5_ep1"
    assert sorted(p.name for p in folder.glob("*.png")) == ["0.png", "1.png", "2.png"]
    assert (folder / "fid_origin.json").exists()  # what made the images (sample_ddpm.py --fid)
    first = np.asarray(Image.open(folder / "0.png"))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    loaded = load_model(str(run))  # the PNG is batch 0 of seed 0, decoded through the VAE
    expected = (
        to_uint8(
            sample_batch(
                loaded.unet, make_sampler("ddim", loaded.scheduler_config), 2, 5, 1.0, batch_generator(0, 0), loaded.vae
            )
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    assert np.abs(first.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.slow
def test_ood_scores_latent_models_in_pixel_space(latent_run, tmp_path):
    from ddpm_hf.models.loader import load_model
    from ddpm_hf.ood.scoring import Scorer, load_lpips, plan_levels
    from ddpm_hf.ood.settings import OODSettings
    from ood_ddpm import main as ood_main

    run, _ = latent_run
    ood_main.__wrapped__(
        [
            "--checkpoint",
            str(run),
            "--dataset",
            "mnist5k",
            "--out_dataset",
            "animalmnist",
            "--max_samples",
            "4",
            "--batch_size",
            "4",
            "--sample_timesteps",
            "10",
            "--output_dir",
            str(tmp_path),
        ]
    )
    results = json.loads((tmp_path / "ood_results.json").read_text())
    assert results["model"]["latent"] is True
    assert (results["model"]["channels"], results["model"]["image_size"]) == (3, 32)
    assert results["counts"]["in"] == results["counts"]["out"] == 4 and 0 <= results["auroc"] <= 1
    # LPIPS on decoded reconstructions (a random AlexNet: no download; a code-path check)
    loaded = load_model(str(run))
    cfg = OODSettings(batch_size=4, sample_timesteps=10)
    sampler, levels = plan_levels([0.5], loaded.scheduler_config, 10)
    scorer = Scorer(loaded, levels, sampler, cfg, lpips_model=load_lpips(pnet_rand=True))
    with tqdm(disable=True) as bar:
        scores = scorer.score(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), "in", bar)
    assert scores["recon_error"].shape == scores["lpips"].shape == (1, 3)
    assert np.isfinite(scores["recon_error"]).all() and (scores["lpips"] > 0).all()
