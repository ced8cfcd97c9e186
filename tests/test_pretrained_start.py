"""--pretrained_model_name_or_path (ours, or a stock DDPMPipeline/DDIMPipeline saved in tmp: its UNet
and noise schedule taken over) and --model_config_name_or_path (a UNet config only), offline."""

import json

import pytest
from conftest import TINY_TRAIN, run_script, tiny_unet
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler
from safetensors.torch import load_file


def _stock_unet(size=16):
    return tiny_unet(size, seed=1, attention=True)  # not the trainer's seed: a fresh UNet of its config differs


# TINY_TRAIN without its model flags: the start model brings the UNet
DATA = [a for a in TINY_TRAIN[: TINY_TRAIN.index("--model_channels")] if a not in ("--timesteps", "100")]
RUN = [*DATA, "--max_train_steps", "2"]


@pytest.fixture(scope="module")
def stock_ddpm(tmp_path_factory):
    """A stock DDPMPipeline (as google/ddpm-cifar10-32 is), tiny: T = 50, v-prediction, cosine."""
    folder = tmp_path_factory.mktemp("stock") / "ddpm"
    scheduler = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    DDPMPipeline(unet=_stock_unet(), scheduler=scheduler).save_pretrained(folder)
    return folder


def _weights(folder):
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_fine_tuning_a_stock_ddpm_pipeline_takes_over_its_unet_and_schedule(tmp_path, stock_ddpm):
    out = tmp_path / "tuned"
    proc = run_script(
        "train_ddpm.py",
        *RUN,
        "--pretrained_model_name_or_path",
        stock_ddpm,
        "--output_dir",
        out,
        "--sample_timesteps",
        "300",
    )
    assert f"UNet and noise schedule from --pretrained_model_name_or_path {stock_ddpm}" in proc.stdout
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert (unet["block_out_channels"], unet["sample_size"], unet["in_channels"]) == ([32, 32], 16, 1)
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["num_train_timesteps"], scheduler["beta_schedule"], scheduler["prediction_type"]) == (
        50,
        "squaredcos_cap_v2",
        "v_prediction",
    )
    config = json.loads((out / "train_config.json").read_text())
    assert (config["timesteps"], config["sample_timesteps"]) == (50, 50)  # sampling steps capped at its T
    # trained from the stock weights: close to them after two small steps, far from a fresh init
    before, after = _weights(stock_ddpm), _weights(out)
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0 < moved < 0.05
    card_rows = (out / "ddpm_hf_config.json").read_text()
    assert str(stock_ddpm) in card_rows
    pipe = DDIMPipeline.from_pretrained(out)  # the result is a stock pipeline again
    assert pipe.unet.config.sample_size == 16


def test_our_pipeline_as_a_start_and_a_resize_to_its_format(tmp_path, trained_pipeline):
    out = tmp_path / "again"
    run_script(
        "train_ddpm.py",
        *[a for a in RUN if a not in ("--size", "16")],
        "--pretrained_model_name_or_path",
        trained_pipeline,
        "--output_dir",
        out,
    )
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 16  # mnist's 28 px resized
    ours = json.loads((trained_pipeline / "scheduler" / "scheduler_config.json").read_text())
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert {k: saved[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "timestep_spacing")} == {
        k: ours[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "timestep_spacing")
    }


@pytest.mark.slow
def test_a_data_format_other_than_the_models_is_one_line(tmp_path, stock_ddpm):
    proc = run_script(
        "train_ddpm.py",
        *RUN,
        "--size",
        "32",
        "--pretrained_model_name_or_path",
        stock_ddpm,
        "--output_dir",
        tmp_path / "x",
        check=False,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "was trained on 1x16x16 images, but --size/--channels ask for 1x32x32" in proc.stderr
    assert "--size 16 --channels 1" in proc.stderr and not (tmp_path / "x").exists()
    missing = run_script("train_ddpm.py", *RUN, "--pretrained_model_name_or_path", tmp_path / "nothing", check=False)
    assert missing.returncode == 2 and "--pretrained_model_name_or_path" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_model_config_gives_that_architecture_with_new_weights(tmp_path, stock_ddpm):
    out = tmp_path / "from_config"
    config_file = stock_ddpm / "unet" / "config.json"
    run_script(
        "train_ddpm.py",
        *RUN,
        "--timesteps",
        "100",
        "--model_config_name_or_path",
        config_file,
        "--output_dir",
        out,
    )
    unet = json.loads((out / "unet" / "config.json").read_text())
    stock = json.loads(config_file.read_text())
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block"):
        assert unet[key] == stock[key], key
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["num_train_timesteps"] == 100  # the schedule still comes from the flags
    before, after = _weights(stock_ddpm), _weights(out)
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 0.05  # new weights, not the stock ones
    # a DDIMPipeline folder's UNet config serves too, at another size (new weights fit any format)
    ddim = tmp_path / "ddim"
    DDIMPipeline(unet=_stock_unet(size=8), scheduler=DDIMScheduler(num_train_timesteps=20)).save_pretrained(ddim)
    run_script(
        "train_ddpm.py",
        *RUN,
        "--timesteps",
        "100",
        "--model_config_name_or_path",
        ddim,
        "--size",
        "16",
        "--output_dir",
        tmp_path / "ddim_cfg",
    )
    assert json.loads((tmp_path / "ddim_cfg" / "unet" / "config.json").read_text())["sample_size"] == 16
