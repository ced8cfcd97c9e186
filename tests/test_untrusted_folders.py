"""Security: folders that others prepared (a shared output folder, a downloaded model, a folder
to push) never make the tools write, delete or upload outside them. Each case is one line on stderr and
a non-zero exit, the planted target unchanged (docs/bad-inputs.md, section "Untrusted folders")."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_TRAIN, run_script, tiny_unet, without_startup_notices

from ddpm_hf.diffusion.sampling import make_noise_scheduler, make_sampler
from ddpm_hf.models.pipeline import save_pipeline
from ddpm_hf.util.errors import DDPMError
from ddpm_hf.util.files import append_line, atomic_write, inside, make_subdir, safe_name
from ddpm_hf.util.lock import lock_output_dir, release_all

ENV = {"OMP_NUM_THREADS": "1"}
VICTIM_TEXT = "a file of someone else's, outside the output folder\n"


def _error_lines(stderr: str) -> list:
    return without_startup_notices([line for line in stderr.splitlines() if line.strip()])


def _one_line(proc, *parts, code=1) -> str:
    lines = _error_lines(proc.stderr)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM_TEXT)
    return path


def _plant(out: Path, name: str, target: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    link = out / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


# ---- 1. links planted in an output folder ---------------------------------------------------------------


def test_lock_link_is_refused_not_truncated(tmp_path, victim):
    out = tmp_path / "out"
    _plant(out, ".ddpm_hf.lock", victim)
    with pytest.raises(DDPMError, match=r"\.ddpm_hf\.lock is a symbolic link; .* remove the link"):
        lock_output_dir(out, "test")
    release_all()
    assert victim.read_text() == VICTIM_TEXT


def test_lock_hard_link_is_refused(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    os.link(victim, out / ".ddpm_hf.lock")
    with pytest.raises(DDPMError, match=r"is a hard link \(2 names\)"):
        lock_output_dir(out, "test")
    release_all()
    assert victim.read_text() == VICTIM_TEXT


def test_append_refuses_a_link_and_atomic_write_replaces_one(tmp_path, victim):
    out = tmp_path / "out"
    _plant(out, "train_log.jsonl", victim)
    with pytest.raises(DDPMError, match="train_log.jsonl is a symbolic link"):
        append_line(out / "train_log.jsonl", '{"step": 1}\n')
    _plant(out, "fid.json", victim)
    _plant(out, ".grid.png.%d.tmp" % os.getpid(), victim)  # the temporary name, planted too
    atomic_write(out / "fid.json", lambda tmp: Path(tmp).write_text("{}"))
    assert not (out / "fid.json").is_symlink() and (out / "fid.json").read_text() == "{}"
    atomic_write(out / "grid.png", lambda tmp: Path(tmp).write_text("png"))
    assert victim.read_text() == VICTIM_TEXT


def test_write_probe_never_opens_a_planted_link(tmp_path, victim):
    from ddpm_hf.util.files import make_output_dir

    link = _plant(tmp_path / "out", f".write_test_{os.getpid()}", victim)
    make_output_dir(tmp_path / "out")
    assert victim.read_text() == VICTIM_TEXT and not link.is_symlink()


def test_linked_subfolder_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _plant(tmp_path / "out", "samples", elsewhere)
    with pytest.raises(DDPMError, match="samples is a symbolic link"):
        make_subdir(tmp_path / "out", "samples")
    assert make_subdir(tmp_path / "out", "a", "b") == tmp_path / "out" / "a" / "b"


@pytest.mark.parametrize("name", [".ddpm_hf.lock", "train_log.jsonl", "samples"])
def test_training_refuses_a_planted_link(tmp_path, victim, name):
    out = tmp_path / "out"
    _plant(out, name, victim if name != "samples" else tmp_path)
    proc = run_script("train_ddpm.py", *TINY_TRAIN, "--max_train_steps", "1", "--output_dir", out, check=False, env=ENV)
    _one_line(proc, f"{out / name} is a symbolic link", "remove the link")
    assert victim.read_text() == VICTIM_TEXT
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing else was created


def test_overwrite_keeps_grids_behind_a_linked_samples_folder(tmp_path):
    from ddpm_hf.util.files import clear_earlier_run

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "epoch_0001.png").write_bytes(b"not ours")
    _plant(tmp_path / "out", "samples", elsewhere)
    clear_earlier_run(tmp_path / "out")
    assert (elsewhere / "epoch_0001.png").read_bytes() == b"not ours"


# ---- 2. paths built from an untrusted model's metadata ------------------------------------------------


def _pipeline(folder: Path, **train_config) -> Path:
    noise = make_noise_scheduler(10, 1e-4, 0.02)
    config = {"timesteps": 10, "dataset": "mnist5k", **train_config}
    save_pipeline(folder, tiny_unet(), make_sampler("ddim", noise.config), config)
    return folder


def test_safe_name_and_inside(tmp_path):
    assert safe_name("../../x") == "_.._x"
    assert safe_name("..") == "unknown" and safe_name("a b/c") == "a_b_c" and safe_name("ok-1.0_x") == "ok-1.0_x"
    assert inside(tmp_path, tmp_path / "a" / "b") == tmp_path / "a" / "b"
    with pytest.raises(DDPMError, match="leads outside"):
        inside(tmp_path / "a", tmp_path / "a" / ".." / "b")


SAMPLE_FID = ["--fid", "--num_samples", "2", "--batch_size", "2", "--sample_timesteps", "2"]


def test_fid_folder_from_a_crafted_model_config_stays_inside_output_dir(tmp_path):
    outside = tmp_path / "escape"
    pipe = _pipeline(tmp_path / "pipe", trained_epochs="1/../../../escape", dataset="../../..")
    out = tmp_path / "work" / "samples"
    run_script("sample_ddpm.py", "--checkpoint", pipe, *SAMPLE_FID, "--output_dir", out, env=ENV)
    assert not outside.exists()
    (folder,) = (out / "fid_samples").glob("*/*")
    assert folder.parent.name == "dataset" and folder.name == "ddpm_1.0_timesteps_2_ep1_.._.._.._escape"
    assert sorted(p.name for p in folder.glob("*.png")) == ["0.png", "1.png"]


def test_fid_overwrite_never_deletes_outside_output_dir(tmp_path):
    """The old code let trained_epochs "../../../victim" make --overwrite_output_dir empty a folder elsewhere."""
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    for name in ("0.png", "1.png", "fid.json"):
        (victim_dir / name).write_bytes(b"someone else's")
    pipe = _pipeline(tmp_path / "pipe", trained_epochs="1/../../../../victim")
    out = tmp_path / "samples"
    args = ["--checkpoint", pipe, *SAMPLE_FID, "--output_dir", out, "--overwrite_output_dir", "--seed", "3"]
    run_script("sample_ddpm.py", *args, env=ENV)
    assert all((victim_dir / n).read_bytes() == b"someone else's" for n in ("0.png", "1.png", "fid.json"))


def test_fid_folder_through_a_planted_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pipe = _pipeline(tmp_path / "pipe", trained_epochs=1)
    out = tmp_path / "samples"
    _plant(out, "fid_samples", elsewhere)
    proc = run_script("sample_ddpm.py", "--checkpoint", pipe, *SAMPLE_FID, "--output_dir", out, check=False, env=ENV)
    _one_line(proc, "leads outside", "remove the link")
    assert list(elsewhere.iterdir()) == []


def test_metadata_csv_naming_files_outside_the_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("L", (8, 8), i * 100).save(images / f"{i}.png")
    (tmp_path / "secret.png").write_bytes((images / "0.png").read_bytes())
    (images / "metadata.csv").write_text("file_name,label\n0.png,0\n../secret.png,1\n")
    proc = run_script("train_ddpm.py", *TINY_TRAIN, "--dataset", images, "--output_dir", tmp_path / "o", check=False)
    _one_line(proc, "names 1 file(s) outside", "../secret.png", code=2)


# ---- 3. python -m ddpm_hf.commands.push: links and the token ------------------------------------------

TOKEN = "hf_dummyTestToken0123456789abcdef"


@pytest.fixture(scope="module")
def hub():
    from hub_server import HubServer

    server = HubServer().start()
    yield server
    server.stop()


def _push(hub, folder: Path, repo: str, hf_home: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_TOKEN=TOKEN)
    args = [sys.executable, "-m", "ddpm_hf.commands.push", str(folder), "--hub_model_id", repo]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert TOKEN not in proc.stdout + proc.stderr
    return proc


def _token_file(tmp_path) -> Path:
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    (hf_home / "token").write_text(TOKEN)
    return hf_home


def test_push_skips_links_and_says_so(hub, tmp_path, victim):
    hf_home = _token_file(tmp_path)
    run = _pipeline(tmp_path / "run", trained_epochs=1)
    _plant(run, "unet/cache.bin", hf_home / "token")  # the token, linked in under a binary name
    _plant(run, "train_log.jsonl", victim)
    proc = _push(hub, run, "tester/links", hf_home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "notice: not uploading 2 symlinks: unet/cache.bin, train_log.jsonl" in proc.stderr.splitlines()
    uploaded = hub.state.files("tester/links")
    assert "unet/cache.bin" not in uploaded and "train_log.jsonl" not in uploaded
    assert "model_index.json" in uploaded and not any(TOKEN.encode() in data for data in uploaded.values())


def test_push_refuses_a_token_in_a_binary_file(hub, tmp_path):
    hf_home = _token_file(tmp_path)
    run = _pipeline(tmp_path / "run", trained_epochs=1)
    (run / "unet" / "cache.bin").write_bytes(b"\x00\xff" * 100 + TOKEN.encode() + b"\x00")
    proc = _push(hub, run, "tester/binary", hf_home)
    _one_line(proc, "unet/cache.bin contains your Hub token", "nothing was uploaded")
    assert "tester/binary" not in hub.state.repos


def test_token_scan_finds_a_token_across_blocks(tmp_path, monkeypatch):
    from ddpm_hf.hub import upload

    monkeypatch.setattr(upload, "SCAN_CHUNK", 16)
    path = tmp_path / "weights.safetensors"
    for start in range(0, 40):  # every position relative to the 16-byte blocks
        path.write_bytes(b"x" * start + TOKEN.encode() + b"y" * 7)
        assert upload._contains(path, TOKEN.encode()), start
    path.write_bytes(b"x" * 30 + TOKEN.encode()[:-1] + b"y" * 30)
    assert not upload._contains(path, TOKEN.encode())


def test_linked_component_folder_is_not_uploaded(tmp_path):
    from ddpm_hf.hub.upload import upload_plan

    run = _pipeline(tmp_path / "run", trained_epochs=1)
    elsewhere = tmp_path / "elsewhere"
    (run / "scheduler").rename(elsewhere)
    (run / "scheduler").symlink_to(elsewhere)
    files, links = upload_plan(run)
    assert links == ["scheduler/scheduler_config.json"] and not any(k.startswith("scheduler/") for k in files)


# ---- 4. YAML configs: aliases, and values shown in errors ----------------------------------------------

# 7 levels of 9 aliases each: 9**7 = 4.8 million "lol"s (hundreds of MB once built) from 254 bytes.
BOMB = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdef", "bcdefg")
)


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    proc = run_script("train_ddpm.py", "--config", config, check=False, timeout=60)
    line = _one_line(proc, code=2)
    assert line == f"error: config file {config}: YAML aliases (*a) are not supported; write the values out"


def test_yaml_merge_key_alias_is_refused(tmp_path):
    from ddpm_hf.config.options import load_yaml
    from ddpm_hf.util.errors import UsageError

    config = tmp_path / "merge.yaml"
    config.write_text("base: &defaults {lr: 0.001}\n<<: *defaults\n")
    with pytest.raises(UsageError, match=r"YAML aliases \(\*defaults\) are not supported; write the values out"):
        load_yaml(config)
    config.write_text("lr: &x 0.001\n")  # an anchor that no alias uses expands nothing: accepted
    assert load_yaml(config) == {"lr": 0.001}


def test_config_errors_show_at_most_60_characters_of_a_value(tmp_path):
    config = tmp_path / "long.yaml"
    config.write_text("dataset: [" + ", ".join(["x" * 5000] * 100) + "]\n")
    proc = run_script("train_ddpm.py", "--config", config, check=False, timeout=60)
    line = _one_line(proc, "'dataset' must be str, got ['xxx", "…", code=2)
    assert len(line) < 200


# ---- 5. more planted links: convert, the tracker, checkpoints, the final pipeline, data, detectors, caches -----


def test_convert_replaces_links_planted_in_its_output_folder(tmp_path, victim, capsys):
    from test_convert import FIXTURE, cli_flags, fixture_config

    from ddpm_hf.commands import convert

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    _plant(out, "unet", elsewhere)
    _plant(out, "ddpm_hf_config.json", victim)
    convert.main(
        ["--checkpoint", str(FIXTURE.with_suffix(".pt")), "--output_dir", str(out), *cli_flags(fixture_config())]
    )
    assert capsys.readouterr().err == ""
    assert list(elsewhere.iterdir()) == [] and victim.read_text() == VICTIM_TEXT
    assert not (out / "unet").is_symlink() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (out / "ddpm_hf_config.json").is_symlink() and not (out / ".pipeline.partial").exists()


@pytest.mark.parametrize("name", ["logs", "logs/DDPM"])
def test_training_refuses_a_linked_tracker_folder(tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    _plant(out, name, elsewhere)
    args = [*TINY_TRAIN, "--max_train_steps", "1", "--report_to", "tensorboard", "--output_dir", out]
    args.remove("--no_wandb")
    proc = run_script("train_ddpm.py", *args, check=False, env=ENV)
    _one_line(proc, f"error: {out / name} is a symbolic link; the tools never write through a link")
    assert list(elsewhere.iterdir()) == []


def test_resume_skips_linked_checkpoints_and_replaces_links_at_final_names(trained_pipeline, tmp_path):
    """checkpoint-99 links to a checkpoint elsewhere (latest would have resumed from it), checkpoint-12 is a
    dangling link where the run saves its next checkpoint, and unet/ links to a folder elsewhere where the
    final pipeline goes: the run resumes from its own checkpoint-8 and writes only inside its folder."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(trained_pipeline, out, symlinks=True)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "checkpoints" / "checkpoint-8", elsewhere / "checkpoint-99")
    (out / "unet").rename(elsewhere / "unet")
    _plant(out, "unet", elsewhere / "unet")
    _plant(out, "checkpoints/checkpoint-99", elsewhere / "checkpoint-99")
    _plant(out, "checkpoints/checkpoint-12", tmp_path / "nowhere")
    before = {p: p.stat().st_mtime_ns for p in elsewhere.rglob("*")}
    args = [*TINY_TRAIN, "--checkpointing_steps", "4", "--max_train_steps", "12", "--output_dir", out]
    proc = run_script("train_ddpm.py", *args, "--resume_from_checkpoint", "latest", check=False, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith(("warning", "error"))]
    assert warnings == [
        f"warning: ignoring {out / 'checkpoints' / name}, a symbolic link (to {target}); a run resumes only from "
        f"checkpoint folders of its own"
        for name, target in (("checkpoint-12", tmp_path / "nowhere"), ("checkpoint-99", elsewhere / "checkpoint-99"))
    ]
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-8'}" in proc.stdout
    assert not (out / "checkpoints" / "checkpoint-12").is_symlink() and not (out / "unet").is_symlink()
    assert (out / "checkpoints" / "checkpoint-12" / "ema.safetensors").is_file() and not (tmp_path / "nowhere").exists()
    assert {p: p.stat().st_mtime_ns for p in elsewhere.rglob("*")} == before


def test_resume_through_a_linked_checkpoint_is_refused(tmp_path, capsys):
    from ddpm_hf.training.output import check_output_dir
    from ddpm_hf.util.errors import UsageError

    elsewhere = tmp_path / "elsewhere" / "checkpoint-5"
    elsewhere.mkdir(parents=True)
    link = _plant(tmp_path / "out", "checkpoints/checkpoint-5", elsewhere)
    with pytest.raises(UsageError) as err:
        check_output_dir(tmp_path / "out", False, str(link), {})
    assert err.value.exit_code == 2 and str(err.value) == (
        f"--resume_from_checkpoint {link} is a symbolic link (to {elsewhere}); a run never resumes through a link: "
        f"pass the folder itself"
    )


def _image_folder_with_links(tmp_path, victim) -> Path:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("L", (16, 16), 60 * i).save(images / f"{i}.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "private.png")
    (images / "passwd.png").symlink_to("/etc/passwd")
    (images / "x_private.png").symlink_to(tmp_path / "private.png")
    return images


def test_image_folder_links_outside_are_skipped_in_one_line(tmp_path, victim):
    images = _image_folder_with_links(tmp_path, victim)
    args = [*TINY_TRAIN, "--dataset", images, "--max_train_steps", "1", "--output_dir", tmp_path / "out"]
    proc = run_script("train_ddpm.py", *args, check=False, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith(("warning", "error"))]
    assert warnings == [
        f"warning: skipping 2 file(s) of {images} that link outside it (passwd.png, x_private.png); copy them into "
        "the folder to use them"
    ]
    assert f"data: {images}, 3 images" in proc.stdout


def test_image_folder_of_only_links_outside_is_refused(tmp_path, victim):
    from ddpm_hf.data.images import load_split
    from ddpm_hf.util.errors import UsageError

    images = tmp_path / "images"
    images.mkdir()
    (images / "passwd.png").symlink_to("/etc/passwd")

    class Options:
        image_column = dataset_config_name = medmnist_root = output_dir = None

    with pytest.raises(UsageError) as err:
        load_split(str(images), "train", Options())
    assert err.value.exit_code == 2
    assert (
        str(err.value)
        == f"image folder {images} holds only links leading outside it (passwd.png); copy the images into it"
    )


@pytest.mark.parametrize("name", ["detector.json", "params.safetensors"])
def test_detector_files_linking_outside_are_refused(tmp_path, capsys, name):
    from ddpm_hf.commands.ood_cli import main as ood_main

    det = tmp_path / "det"
    det.mkdir()
    (det / "detector.json").write_text("{}")
    (det / name).unlink(missing_ok=True)
    (det / name).symlink_to("/etc/passwd")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(SystemExit) as exc:
        ood_main(["--detector", str(det), "--images", str(tmp_path / "imgs"), "--output_dir", str(tmp_path / "o")])
    lines = _error_lines(capsys.readouterr().err)
    assert exc.value.code == 2 and lines == [
        f"error: {det / name} is a link leading outside {det} (to /etc/passwd); a detector folder holds its own files: "
        "copy the file in, or fit the detector again with ood_ddpm.py --fit"
    ]
    assert not (tmp_path / "o").exists()


def test_linked_fid_cache_entry_is_not_read_and_is_replaced(tmp_path, victim, caplog):
    from ddpm_hf.metrics import fid

    entry = _plant(tmp_path / "cache", "mnist5k_test_16px_1ch_0123.safetensors", victim)
    assert fid._read_reference_cache(entry, {"any": "key"}) is None
    warnings = [line for line in caplog.messages if line.startswith("warning:")]
    assert warnings == [f"warning: ignoring the FID cache entry {entry}, a symbolic link; recomputing it"]
    import torch

    fid._write_reference_cache(entry, {"sum": torch.zeros(2)}, {"ddpm_hf": "{}"})
    assert not entry.is_symlink() and victim.read_text() == VICTIM_TEXT


def test_sample_replaces_linked_outputs_and_never_deletes_through_them(tmp_path, victim, capsys):
    from ddpm_hf.commands import sample_cli

    pipe = _pipeline(tmp_path / "pipe", trained_epochs=1)
    out = tmp_path / "samples"
    _plant(out, "grid.png", victim)
    _plant(out, "0.png", victim)
    argv = ["--checkpoint", str(pipe), "--num_samples", "2", "--batch_size", "2", "--sample_timesteps", "2"]
    sample_cli.main([*argv, "--output_dir", str(out), "--overwrite_output_dir"])
    assert "error" not in capsys.readouterr().err
    assert victim.read_text() == VICTIM_TEXT
    assert not (out / "grid.png").is_symlink() and not (out / "0.png").is_symlink() and (out / "1.png").is_file()
