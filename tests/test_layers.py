"""The layering: one helper per question (Hub id, Hub reachable,
writable folder, atomic write), the command layer's unpacking of DDPMConfig, and the defects'
regression tests. Fast: no model is trained here."""

import os
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from ddpm_hf.config.options import DDPMConfig, load_yaml
from ddpm_hf.config.parsing import parse_config
from ddpm_hf.config.sections import DataSettings, ModelSettings
from ddpm_hf.util.errors import DDPMError, UsageError
from ddpm_hf.util.hub_access import check_hub_repo, is_hub_id

LIBRARY = REPO / "ddpm_hf"


# ---- "is this a Hub id?": one rule -----------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("user/name", True),
        ("stabilityai/sd-vae-ft-mse", True),
        ("ylecun/mnist", True),
        ("~/my_images", False),
        ("./x", False),
        ("../x/y", False),
        ("/abs/x", False),
        ("a/b/c", False),
        ("name", False),
        ("user/", False),
        ("/name", False),
        ("user//name", False),
        ("a\\b", False),
        ("", False),
    ],
)
def test_is_hub_id(name, expected):
    assert is_hub_id(name) is expected


def test_resolve_spec_reads_a_home_path_as_a_folder_not_a_hub_id():
    from ddpm_hf.data.images import resolve_spec

    with pytest.raises(UsageError, match=r"image folder ~/my_images does not exist"):
        resolve_spec("~/my_images")  # was: a Hub id "~/my_images"
    with pytest.raises(UsageError, match="does not exist"):
        resolve_spec("a/b/c")
    assert resolve_spec("user/name").hub_id == "user/name"


def test_every_loader_uses_the_same_hub_id_rule(tmp_path):
    from ddpm_hf.diffusion.latent import load_vae
    from ddpm_hf.hub.upload import _dataset_ids
    from ddpm_hf.metrics.features import load_dinov2
    from ddpm_hf.models.loader import load_model

    for name in ("~/vae", "a/b/c", "./x"):
        with pytest.raises(UsageError, match="neither an existing folder nor a Hub id"):
            load_vae(name)
        with pytest.raises(UsageError, match="neither an existing folder nor a Hub id"):
            load_dinov2(name)
        with pytest.raises(UsageError, match="does not exist"):
            load_model(name)
    assert _dataset_ids("~/my_images", source=False) == ("my_images", None)
    assert _dataset_ids("user/name", source=False) == ("user/name", "user/name")


def test_no_other_hub_id_test_is_written_out():
    """The rule lives in hub_access.py only (it was written four times, and the versions disagreed)."""
    pattern = re.compile(r"count\(\"/\"\) [!=]= 1|startswith\(\(\"\.\", \"/\"")
    found = [
        str(p.relative_to(REPO))
        for p in LIBRARY.rglob("*.py")
        if pattern.search(p.read_text()) and p.name != "hub_access.py"
    ]
    assert not found


# ---- "is the Hub reachable?": one request, one line -------------------------------------------


def test_check_hub_repo_is_one_line(monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "dataset_info", unreachable)
    with pytest.raises(
        DDPMError,
        match=r"^cannot reach the Hugging Face Hub for model u/n \(ConnectionError\); set "
        r"HF_HUB_OFFLINE=1 to use a cached copy, or pass a folder$",
    ):
        check_hub_repo("u/n", "model u/n", "check it", "pass a folder")
    with pytest.raises(DDPMError, match="for dataset 'u/d'"):
        check_hub_repo("u/d", "dataset 'u/d'", "check the id", "use a folder", repo_type="dataset")


def test_no_other_hub_request_is_written_out():
    found = [
        str(p.relative_to(REPO))
        for p in LIBRARY.rglob("*.py")
        if re.search(r"\b(model_info|dataset_info)\(", p.read_text()) and p.name != "hub_access.py"
    ]
    assert not found


# ---- "is the output folder writable?" and the atomic write: one helper each --------------------


def test_one_writable_check(tmp_path):
    from ddpm_hf.util.files import make_output_dir

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="is not writable"):
        make_output_dir(blocker / "out")
    assert not (blocker / "out").exists()
    others = [
        str(p.relative_to(REPO))
        for p in LIBRARY.rglob("*.py")
        if "is not writable" in p.read_text() and p.name != "files.py"
    ]
    assert not others


def test_one_atomic_write():
    """Temporary names and renames of files only in util/files.py."""
    others = [
        str(p.relative_to(REPO))
        for p in LIBRARY.rglob("*.py")
        if re.search(r"\.tmp\"|os\.replace\(tmp", p.read_text()) and p.name != "files.py"
    ]
    assert not others


def test_the_atomic_write_keeps_the_old_file_on_a_failure(tmp_path, monkeypatch):
    import faults

    from ddpm_hf.util import files

    path = tmp_path / "card.md"
    files.write_text(path, "old")
    rename = os.replace

    def full_disk_rename(src, dst, *args, **kwargs):  # the new text is on disk under the temporary name
        if Path(dst) == path:
            raise faults.full_disk()
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk_rename)
    with pytest.raises(DDPMError, match="could not write the model card .*no space left"):
        files.write_text(path, "new", "the model card")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["card.md"]


# ---- "the first line of an error": one helper ------------------------------------------------


def test_first_line_of_an_error():
    from ddpm_hf.util.errors import first_line

    assert first_line(ValueError("bad value\n  at line 3\n  at line 9")) == "bad value"
    assert first_line(ValueError("x" * 300)) == "x" * 200 and first_line("abcdef", 3) == "abc"
    assert first_line(ValueError()) == "" and first_line("  \n ") == ""  # says nothing: the caller names the type
    assert first_line("\n  yaml: mapping values\nmore") == "yaml: mapping values"


def test_no_other_first_line_is_written_out():
    written_out = [p.name for p in LIBRARY.rglob("*.py") if "splitlines()[0]" in p.read_text()]
    assert written_out == ["errors.py"]


def test_one_rule_for_checkpoint_and_epoch_names():
    from ddpm_hf.models.convert_gzoo import epoch_in_name
    from ddpm_hf.training.checkpoints import is_checkpoint_name

    assert epoch_in_name("cifar10_epoch50") == 50 and epoch_in_name("ddpm_epoch_7.pt") == 7
    assert epoch_in_name("model.pt") is None
    assert is_checkpoint_name("checkpoint-12") and not is_checkpoint_name("checkpoint-12.partial")
    assert not is_checkpoint_name("checkpoint-") and not is_checkpoint_name("step-12")


def test_the_format_follows_the_first_readable_image():
    """A folder's (decoded whole) and a stream's format: damaged files before the first image are passed over."""
    import io

    from ddpm_hf.data import images

    png = io.BytesIO()
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(png, format="PNG")
    damaged, good = {"bytes": b"not an image", "path": None}, {"bytes": png.getvalue(), "path": None}
    raw = [{"image": damaged}, {"image": good}]
    assert images._first_image(raw, "image", "d").size == (8, 6)
    with pytest.raises(DDPMError, match="none of the first 1 images of d can be read"):
        images._first_image(raw[:1], "image", "d")

    class Stream(list):
        def take(self, n):
            return self[:n]

    assert images._stream_format(Stream(raw), "image", "s") == (3, 6, "the first image, 8x6")
    arrays = Stream([{"image": np.zeros((5, 7), np.uint8)}])
    assert images._stream_format(arrays, "image", "s") == (1, 5, "an array of (5, 7)")
    with pytest.raises(DDPMError, match="none of the first 50 images of s can be read"):
        images._stream_format(Stream(raw[:1] * 60), "image", "s")


# Environment variables the library may read: user settings, each documented. Test-only behaviour
# (faults, kills, a full disk) is injected from outside by tests/faults.py, never through a variable
# that, left in a user's shell, would change a real run.
USER_VARIABLES = {
    "DDPM_HF_DEBUG",  # =1: tracebacks instead of one-line errors, as --debug (docs/reliability.md)
    "DDPM_HF_KEEP_FREED_MEMORY",  # =0: the user turns the host allocator policy off (docs/performance.md)
}


def test_the_library_reads_no_test_variable():
    found = {
        (name, str(p.relative_to(REPO)))
        for p in LIBRARY.rglob("*.py")
        for name in re.findall(r"DDPM_HF_[A-Z0-9_]+", p.read_text())
        if name not in USER_VARIABLES
    }
    assert not found, f"test hooks in the library (move them to tests/faults.py): {sorted(found)}"


# ---- defects ----------------------------------------------------------------------------------


def test_overwrite_clears_everything_an_earlier_run_left(tmp_path):
    from ddpm_hf.util.files import clear_earlier_run

    out = tmp_path / "run"
    for rel in (
        "checkpoints/checkpoint-2/model.safetensors",
        "train_log.jsonl",
        "samples/epoch_0001.png",
        "samples/epoch_0005.png",
        "best_fid/fid.json",
        "fid.json",
        "ood_results.json",
        "scores.csv",
        "histogram.png",
        "roc.png",
        "model_index.json",
        "samples/mine.png",
    ):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("x")
    clear_earlier_run(out)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["model_index.json", "samples/mine.png"]  # the pipeline is overwritten by the new run itself
    assert clear_earlier_run(tmp_path / "missing") == []


def test_yaml_scalar_for_a_list_is_a_list_of_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("recon_factors: 0.5\nattention_resolutions: 4\nchannel_mult: 1\n")
    assert load_yaml(path) == {"recon_factors": [0.5], "attention_resolutions": [4], "channel_mult": [1]}
    path.write_text("recon_factors: true\n")
    with pytest.raises(UsageError, match="'recon_factors' must be a list of float"):
        load_yaml(path)


def test_sampling_steps_follow_the_loaded_models_T():
    from ddpm_hf.commands.sample import sampling_steps

    def loaded(T):
        return types.SimpleNamespace(scheduler_config={"num_train_timesteps": T})

    assert sampling_steps(DDPMConfig(sample_timesteps=500), loaded(1000)) == 500  # not refused against --timesteps 300
    assert (
        sampling_steps(DDPMConfig(sample_timesteps=400), loaded(1000)) == 500
    )  # the original's rule: 1000 // (1000 // 400)
    assert sampling_steps(DDPMConfig(sample_timesteps=300), loaded(100)) == 100


def test_ood_and_sample_take_bf16_and_latent():
    import ood_ddpm
    import sample_ddpm

    for script in (ood_ddpm, sample_ddpm):
        cfg, _ = parse_config(
            script.build(),
            [
                "--checkpoint",
                "x.pt",
                "--mixed_precision",
                "bf16",
                "--latent",
                "--vae",
                "some/vae",
                "--dataset",
                "mnist",
            ],
        )
        assert cfg.mixed_precision == "bf16" and cfg.latent and cfg.vae == "some/vae"
        assert "--cache_latents" not in script.build().format_help()  # training only


def test_fid_and_data_agree_on_grayscale_modes(tmp_path):
    from ddpm_hf.data.images import is_gray
    from ddpm_hf.metrics.fid import read_folder

    assert all(is_gray(m) for m in ("L", "1", "I", "F", "LA", "I;16")) and not any(
        is_gray(m) for m in ("RGB", "RGBA", "P")
    )
    Image.fromarray(np.full((8, 8, 2), 200, np.uint8), "LA").save(tmp_path / "0.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "1.png")  # 16-bit grayscale
    images = read_folder(tmp_path, 2)
    assert images.shape == (2, 1, 8, 8) and images.dtype == torch.uint8
    assert images[0].unique().tolist() == [200] and images[1].unique().tolist() == [255]


def test_commands_unpack_the_config_for_the_ood_data():
    """load_set takes the data section, not the whole DDPMConfig; a model decides --size/--channels."""
    from ddpm_hf.commands.common import data_settings

    opts = data_settings(DDPMConfig(size=64, channels=3, image_column="img"), keep_format=False)
    assert opts == DataSettings(size=None, channels=None, image_column="img")
    assert "replace(cfg" not in (LIBRARY / "ood" / "scoring.py").read_text()


def test_docs_defects_stay_fixed():
    readme = (REPO / "README.md").read_text()
    docs = "\n".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    assert "(pending)" not in docs and "(pending)" not in readme
    assert "2-minute demo" not in readme
    assert "only **one** process" in readme  # accelerate launch --cpu --num_processes 2
    assert "0.9612080000000001" not in readme + docs
    assert "disk" not in "".join(
        line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("#")
    )


def test_sample_progress_bar_ticks_once_per_denoising_step(tmp_path, monkeypatch):
    """One tick per UNet call on a batch (2 batches x 3 steps = 6), not one per batch."""
    from ddpm_hf.commands import sample
    from ddpm_hf.diffusion.sampling import make_noise_scheduler, make_sampler
    from ddpm_hf.models.unet import build_unet

    bars = []

    class Bar:
        def __init__(self, total=None, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            self.n += n

        def set_postfix_str(self, text):
            pass

    monkeypatch.setattr(sample, "tqdm", Bar)
    tiny = dict(
        model_channels=32, channel_mult=[1, 1], num_res_blocks=1, attention_resolutions=[2], num_head_channels=32
    )
    unet = build_unet(ModelSettings(**tiny), 1, 8).eval()
    config = make_noise_scheduler(10, 1e-4, 0.02).config
    loaded = types.SimpleNamespace(unet=unet, vae=None, scheduler_config=dict(config))
    cfg = DDPMConfig(batch_size=2, scheduler="ddim", sample_timesteps=3, fid=True)
    todo = sample.pending_batches(tmp_path, 3, 2, resume=True)
    sample._sample_pngs(cfg, loaded, "cpu", make_sampler("ddim", config), 3, todo, "retry")
    assert [(b.total, b.n) for b in bars] == [(6, 6)]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["0.png", "1.png", "2.png"]
    assert sample.pending_batches(tmp_path, 3, 2, resume=True) == []  # a rerun of --fid adds nothing
