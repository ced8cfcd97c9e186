"""The model card says what the saved configs say: schedule, prediction type, clipping, spacing, EMA warm-up."""

import json
import re

import pytest
from conftest import REPO, tiny_unet
from diffusers import DDIMScheduler

from ddpm_hf.config.options import DDPMConfig
from ddpm_hf.diffusion.sampling import make_noise_scheduler, make_sampler
from ddpm_hf.hub.upload import build_model_card
from ddpm_hf.models.pipeline import save_pipeline

SHIPPED = REPO / "pretrained" / "ddpm-mnist5k"
CASES = [
    dict(beta_schedule="linear", prediction_type="epsilon", clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=True),
    dict(beta_schedule="scaled_linear", prediction_type="sample", clip_sample=True, timestep_spacing="leading"),
    dict(beta_schedule="linear", prediction_type="v_prediction", rescale_betas_zero_snr=True),
]


def _saved(tmp_path, diffusion: dict, ema_warmup: bool):
    unet = tiny_unet()
    noise = make_noise_scheduler(200, 1e-4, 0.02, **diffusion)
    config = {**DDPMConfig(**diffusion).to_dict(), "timesteps": 200, "ema_warmup": ema_warmup, "trained_steps": 4}
    save_pipeline(tmp_path, unet, make_sampler("ddim", noise.config), config)
    return json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())


@pytest.mark.parametrize("diffusion", CASES, ids=lambda d: f"{d['beta_schedule']}-{d['prediction_type']}")
def test_card_describes_the_saved_scheduler_config(tmp_path, diffusion):
    saved = _saved(tmp_path, diffusion, ema_warmup=diffusion["prediction_type"] != "epsilon")
    card = build_model_card(tmp_path, "tester/ddpm").text
    rows = dict(re.findall(r"^\| `--(\w+)` \| (.*) \|$", card, flags=re.M))
    for key in ("beta_schedule", "prediction_type", "timestep_spacing"):
        assert rows[key] == str(saved[key]), key
    for key in ("clip_sample", "rescale_betas_zero_snr"):
        assert rows[key] == json.dumps(saved[key]), key
    assert rows["timesteps"] == "200" and rows["ema_warmup"] == json.dumps(diffusion["prediction_type"] != "epsilon")
    words = {
        "linear": "linear betas (0.0001 to 0.02)",
        "scaled_linear": "scaled-linear betas (0.0001 to 0.02)",
        "squaredcos_cap_v2": "the cosine schedule (`squaredcos_cap_v2`)",
    }
    assert f"T = 200 steps of {words[saved['beta_schedule']]}" in card
    assert "linear betas" not in card or saved["beta_schedule"] != "squaredcos_cap_v2"
    assert f"(`{saved['prediction_type']}`)" in card
    assert ("clips its clean-image estimate" in card) == saved["clip_sample"]
    assert f"`{saved['timestep_spacing']}` timestep spacing" in card
    assert ("rescaled to zero terminal SNR" in card) == saved["rescale_betas_zero_snr"]
    # the signal left at t = T-1, as stock diffusers computes it from the saved config
    left = float(DDIMScheduler.from_pretrained(tmp_path / "scheduler").alphas_cumprod[-1].sqrt())
    assert f"{100 * left:.1f} % of the signal is left at t = T-1" in card
    if rows["ema_warmup"] == "true":
        assert "decay warmed up as diffusers' `EMAModel`" in card and "`--ema_power`" in card
    else:
        assert "constant decay 0.999" in card and "`--ema_power`" not in card


def test_no_link_that_breaks_on_the_hub(tmp_path):
    _saved(tmp_path, CASES[0], ema_warmup=False)
    card = build_model_card(tmp_path, "tester/ddpm").text
    for target in re.findall(r"\]\(([^)]+)\)", card):
        assert target.startswith("https://") or (tmp_path / target).is_file(), target


def test_the_shipped_card_is_the_generated_one():
    """pretrained/ddpm-mnist5k/README.md is what `push --card_only` writes from its configs (regenerate it with:
    python -m ddpm_hf.commands.push pretrained/ddpm-mnist5k --hub_model_id pretrained/ddpm-mnist5k --card_only)."""
    shipped = (SHIPPED / "README.md").read_text()
    assert shipped == str(build_model_card(SHIPPED, "pretrained/ddpm-mnist5k"))
    assert "cosine schedule (`squaredcos_cap_v2`)" in shipped and "(`v_prediction`)" in shipped
    assert "../" not in shipped and "linear betas" not in shipped
