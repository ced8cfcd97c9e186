"""diffusers' train_unconditional.py flag names as aliases of ours: its README's command line runs
through train_ddpm.py (with a local folder), YAML keys likewise, the crop switches, and
`--resume_from_checkpoint checkpoint-N` found inside the output folder."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, run_script
from PIL import Image

import train_ddpm
from ddpm_hf.commands.common import data_settings
from ddpm_hf.config.aliases import RENAMED, UNSUPPORTED
from ddpm_hf.config.parsing import parse_config
from ddpm_hf.config.sections import DataSettings
from ddpm_hf.data.images import load_images
from ddpm_hf.util.errors import UsageError

# The diffusers example README's "Unconditional Flowers" command, with its own "Using your own data"
# --train_data_dir instead of the Hub dataset, tiny sizes, and no --push_to_hub (offline).
README_FLAGS = [
    "--resolution=16",
    "--center_crop",
    "--random_flip",
    "--train_batch_size=8",
    "--num_epochs=1",
    "--gradient_accumulation_steps=1",
    "--use_ema",
    "--learning_rate=1e-4",
    "--lr_warmup_steps=2",
    "--mixed_precision=no",
]
MODEL_ONLY = [a for a in TINY_MODEL if a not in ("--size", "16")]


def _folder(path, n=16, shape=(16, 24)):
    """Non-square RGB images: the crop decides which columns survive."""
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path / f"img{i:02d}.png")
    return path


def _parse(*argv):
    return parse_config(train_ddpm.build(), list(argv))[0]


def test_each_alias_sets_our_setting():
    cfg = _parse(
        "--dataset_name=user/flowers",
        "--resolution=48",
        "--train_batch_size=4",
        "--eval_batch_size=9",
        "--dataloader_num_workers=2",
        "--num_epochs=7",
        "--save_images_epochs=3",
        "--learning_rate=2e-4",
        "--adam_weight_decay=1e-6",
        "--ema_max_decay=0.9999",
        "--logger=tensorboard",
        "--ddpm_num_steps=1000",
        "--ddpm_num_inference_steps=50",
        "--ddpm_beta_schedule=squaredcos_cap_v2",
        "--use_ema",
        "--local_rank=0",
        "--adam_beta1=0.95",
        "--adam_epsilon=1e-7",
    )
    got = {k: getattr(cfg, k) for k in set(RENAMED.values()) | {"ema_warmup", "adam_beta1", "adam_epsilon"}}
    assert got == dict(
        dataset="user/flowers",
        size=48,
        batch_size=4,
        num_samples=9,
        num_workers=2,
        n_epochs=7,
        sample_and_save_freq=3,
        lr=2e-4,
        decay=1e-6,
        ema_rate=0.9999,
        report_to="tensorboard",
        timesteps=1000,
        sample_timesteps=50,
        beta_schedule="squaredcos_cap_v2",
        ema_warmup=True,
        adam_beta1=0.95,
        adam_epsilon=1e-7,
    )
    assert _parse("--random_crop").crop == "random" and _parse("--center_crop").crop == "center"


def test_help_lists_the_aliases_once_and_not_as_flags(capsys):
    with pytest.raises(SystemExit):
        train_ddpm.build().parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.count("--resolution") == 1 and "--resolution = --size" in out
    assert "--train_data_dir = --dataset" in out and "--center_crop = --crop center" in out


def test_one_setting_under_two_names_with_two_values_is_refused(tmp_path):
    with pytest.raises(UsageError, match="--size and --resolution set the same setting"):
        _parse("--size", "32", "--resolution", "64")
    with pytest.raises(UsageError, match="pass only one of them"):
        _parse("--dataset_name", "a/b", "--train_data_dir", str(tmp_path))
    assert _parse("--size", "32", "--resolution", "32").size == 32  # the same value twice is no conflict


@pytest.mark.parametrize("flag", sorted(UNSUPPORTED))
def test_diffusers_flags_without_a_meaning_here_say_why_in_one_line(flag):
    proc = run_script("train_ddpm.py", f"--{flag}", "1", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: --{flag} (a diffusers train_unconditional.py flag) has no equivalent")


def test_yaml_keys_take_diffusers_names_too(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("resolution: 24\ntrain_batch_size: 6\nlearning_rate: 3.0e-4\nuse_ema: true\ncenter_crop: false\n")
    cfg = _parse("--config", str(config))
    assert (cfg.size, cfg.batch_size, cfg.lr, cfg.ema_warmup, cfg.crop) == (24, 6, 3e-4, True, "random")
    assert _parse("--config", str(config), "--size", "32").size == 32  # the command line still wins
    config.write_text("size: 16\nresolution: 24\n")
    with pytest.raises(UsageError, match="'size' and 'resolution' set the same setting"):
        _parse("--config", str(config))
    config.write_text("resolution: big\n")
    with pytest.raises(UsageError, match="'size' must be int"):
        _parse("--config", str(config))


def test_center_and_random_crop_of_non_square_images(tmp_path):
    folder = _folder(tmp_path / "imgs", n=4, shape=(16, 24))
    source = np.stack([np.asarray(Image.open(folder / f"img{i:02d}.png")) for i in range(4)]).transpose(0, 3, 1, 2)
    center = load_images(str(folder), "train", DataSettings(size=16, channels=3), progress=False).images
    assert torch.equal(center, torch.from_numpy(source[:, :, :, 4:20]))  # 24 columns, the middle 16

    def random(seed):
        cfg = _parse("--dataset", str(folder), "--size", "16", "--channels", "3", "--random_crop", "--seed", str(seed))
        return load_images(str(folder), "train", data_settings(cfg), progress=False, seed=cfg.seed).images

    windows = random(0)
    offsets = [
        next(o for o in range(9) if torch.equal(windows[i], torch.from_numpy(source[i, :, :, o : o + 16])))
        for i in range(4)
    ]
    assert len(set(offsets)) > 1  # a window per image, not one for all
    assert torch.equal(random(0), windows) and not torch.equal(random(1), windows)  # seeded


@pytest.mark.slow
def test_the_diffusers_readme_command_trains_and_resumes_from_checkpoint_n(tmp_path):
    data, out = _folder(tmp_path / "flowers"), tmp_path / "ddpm-ema-flowers-16"
    argv = ["--train_data_dir", data, *README_FLAGS, f"--output_dir={out}", *MODEL_ONLY, "--checkpointing_steps=1"]
    proc = run_script("train_ddpm.py", *argv, "--timesteps", "100", "--sample_timesteps", "4", "--eval_batch_size=2")
    assert "notice: the noise schedule keeps" in proc.stderr  # diffusers' default schedule meets the seed's trap
    config = json.loads((out / "train_config.json").read_text())
    assert {k: config[k] for k in ("dataset", "size", "crop", "random_flip", "batch_size", "n_epochs")} == dict(
        dataset=str(data), size=16, crop="center", random_flip=True, batch_size=8, n_epochs=1
    )
    assert (config["ema_warmup"], config["lr"], config["lr_warmup_steps"]) == (True, 1e-4, 2)
    assert (out / "model_index.json").is_file() and (out / "checkpoints" / "checkpoint-2").is_dir()
    # diffusers' resume form: a bare checkpoint name, looked up in the output folder
    more = [a if a != "--num_epochs=1" else "--num_epochs=2" for a in argv]
    resumed = run_script(
        "train_ddpm.py",
        *more,
        "--timesteps",
        "100",
        "--sample_timesteps",
        "4",
        "--eval_batch_size=2",
        "--resume_from_checkpoint",
        "checkpoint-1",
    )
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-1'}" in resumed.stdout + resumed.stderr
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps[-1] == 4
    missing = run_script("train_ddpm.py", *more, "--resume_from_checkpoint", "checkpoint-99", check=False)
    assert missing.returncode == 2 and "no checkpoint-99 in" in missing.stderr and "checkpoint-4" in missing.stderr
