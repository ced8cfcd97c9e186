"""--rescale_betas_zero_snr and --timestep_spacing travel in the saved scheduler config (stock pipelines
honour them), and a schedule that keeps signal at t = T-1 under noise prediction is named at start-up."""

import json

import pytest
import torch
from conftest import TINY_TRAIN, run_script, tiny_unet
from diffusers import DDIMPipeline, DiffusionPipeline

from ddpm_hf.config.options import DDPMConfig
from ddpm_hf.diffusion.sampling import make_noise_scheduler, make_sampler, terminal_signal, terminal_snr_notice
from ddpm_hf.models.pipeline import save_pipeline


def test_the_seed_default_keeps_22_percent_of_the_signal_and_the_notice_names_the_fixes():
    seed = make_noise_scheduler(300, 1e-4, 0.02)
    assert terminal_signal(seed.config) == pytest.approx(0.219, abs=0.002)
    notice = terminal_snr_notice(seed.config)
    assert notice.startswith("notice: the noise schedule keeps 21.9 % of the signal at t = T-1")
    for needle in ("--rescale_betas_zero_snr", "--timestep_spacing trailing", "--prediction_type v_prediction"):
        assert needle in notice
    assert "docs/quality.md" in notice


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta_schedule="squaredcos_cap_v2"),  # ends near zero signal
        dict(prediction_type="v_prediction"),  # signal left, but not noise prediction
        dict(prediction_type="v_prediction", rescale_betas_zero_snr=True),
    ],
)
def test_no_notice_when_the_schedule_ends_in_noise_or_the_model_does_not_predict_noise(kwargs):
    assert terminal_snr_notice(make_noise_scheduler(300, 1e-4, 0.02, **kwargs).config) is None


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_stock_ddim_pipeline_honours_the_saved_rescale_and_spacing(tmp_path, spacing):
    noise = make_noise_scheduler(
        100, 1e-4, 0.02, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing=spacing
    )
    save_pipeline(tmp_path, tiny_unet().eval(), make_sampler("ddim", noise.config), DDPMConfig().to_dict())
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert (saved["rescale_betas_zero_snr"], saved["timestep_spacing"]) == (True, spacing)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe, DDIMPipeline)
    assert float(pipe.scheduler.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-6)  # zero terminal SNR
    pipe.scheduler.set_timesteps(10)
    first = int(pipe.scheduler.timesteps[0])
    assert first == {"trailing": 99, "leading": 90, "linspace": 99}[spacing]
    # our sampler, built from the saved config, steps over the same times
    ours = make_sampler("ddim", pipe.scheduler.config)
    ours.set_timesteps(10)
    assert torch.equal(ours.timesteps, pipe.scheduler.timesteps)


def test_a_stock_config_without_a_spacing_samples_on_the_trailing_grid(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", "num_train_timesteps": 100})
    )
    from diffusers import DDPMScheduler

    stock = DDPMScheduler.from_pretrained(tmp_path)
    sampler = make_sampler("ddim", stock.config)
    sampler.set_timesteps(10)
    assert int(sampler.timesteps[0]) == 99


def test_rescale_with_noise_prediction_is_refused_in_one_line():
    proc = run_script("train_ddpm.py", *TINY_TRAIN, "--rescale_betas_zero_snr", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--rescale_betas_zero_snr" in proc.stderr and "--prediction_type v_prediction" in proc.stderr


@pytest.mark.slow
def test_training_with_zero_terminal_snr_saves_it_and_prints_no_notice(tmp_path):
    out = tmp_path / "zsnr"
    argv = [*TINY_TRAIN, "--max_train_steps", "2", "--output_dir", out, "--prediction_type", "v_prediction"]
    proc = run_script("train_ddpm.py", *argv, "--rescale_betas_zero_snr", "--timestep_spacing", "leading")
    assert "of the signal at t = T-1" not in proc.stderr
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (saved["rescale_betas_zero_snr"], saved["timestep_spacing"]) == (True, "leading")
    default = run_script("train_ddpm.py", *TINY_TRAIN, "--max_train_steps", "1", "--output_dir", tmp_path / "seed")
    assert "notice: the noise schedule keeps 60." in default.stderr  # T = 100 linear betas in the tiny run
