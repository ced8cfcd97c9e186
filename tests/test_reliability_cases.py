"""Reliability beyond the one-line rows of test_bad_files.py: two live runs into one folder, a
lock left by a killed run, a full disk followed by a resume, a real full (tmpfs) disk where the
machine allows mounting one, SIGTERM during the final save, 16-bit images, YAML floats, the
--sample_timesteps rule of scripts that load a model, the --fid origin record and the sample grid cap."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_MODEL, run_script, without_startup_notices
from PIL import Image

from ddpm_hf.config.options import build_parser, load_yaml
from ddpm_hf.config.parsing import parse_config
from ddpm_hf.config.sections import DataSettings
from ddpm_hf.util.errors import DDPMError, UsageError

ENV = {"OMP_NUM_THREADS": "1"}
TRAIN = [
    "--dataset",
    "animalmnist",
    "--max_train_samples",
    "16",
    "--batch_size",
    "8",
    "--timesteps",
    "100",
    "--sample_timesteps",
    "5",
    "--num_samples",
    "2",
    "--no_wandb",
    *TINY_MODEL,
]


def _error_lines(stderr):
    return without_startup_notices(
        [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith(("error:", "notice:", "warning:"))]
    )


# ---- the output-folder lock -------------------------------------------------------------------------


@pytest.mark.slow
def test_second_live_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "train_ddpm.py"),
            *TRAIN,
            "--max_train_steps",
            "100000",
            "--checkpointing_steps",
            "2",
            "--output_dir",
            str(out),
        ],
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "checkpoints" / "checkpoint-2").exists():
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.1)
        second = run_script(
            "train_ddpm.py",
            *TRAIN,
            "--max_train_steps",
            "2",
            "--output_dir",
            out,
            "--resume_from_checkpoint",
            "latest",
            check=False,
            env=ENV,
        )
        assert second.returncode == 1 and "Traceback" not in second.stderr
        (line,) = _error_lines(second.stderr)
        assert line.startswith(f"error: {out} is in use by another run: process {first.pid} (train_ddpm.py, started ")
        assert line.endswith("); wait until it ends, or choose another --output_dir")
        sampler = run_script("sample_ddpm.py", "--checkpoint", "x", "--output_dir", out, check=False, env=ENV)
        assert sampler.returncode == 1 and f"{out} is in use by another run: process {first.pid}" in sampler.stderr
    finally:
        first.send_signal(signal.SIGKILL)  # a kill leaves its lock file behind, unlocked
        first.wait()
    assert json.loads((out / ".ddpm_hf.lock").read_text())["pid"] == first.pid
    third = run_script(
        "train_ddpm.py",
        *TRAIN,
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--output_dir",
        out,
        "--resume_from_checkpoint",
        "latest",
        env=ENV,
    )
    assert f"notice: taking over the lock of {out} left by process {first.pid} (train_ddpm.py" in third.stderr
    assert (out / "model_index.json").exists() and not (out / ".ddpm_hf.lock").exists()


def test_lock_in_process(tmp_path):
    """The library calls: a lock held by a live process refuses, one whose holder died is taken over."""
    from ddpm_hf.util.lock import LOCK_NAME, lock_output_dir, release_all

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from ddpm_hf.util.lock import lock_output_dir; lock_output_dir(sys.argv[2], 'holder.py');"
            "print('held', flush=True); time.sleep(600)",
            str(REPO),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DDPMError, match=f"is in use by another run: process {holder.pid} \\(holder.py"):
            lock_output_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    held = lock_output_dir(tmp_path, "me.py")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert lock_output_dir(tmp_path) is held  # re-entrant within a process
    release_all()
    assert not (tmp_path / LOCK_NAME).exists()


# ---- a full disk -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_disk_during_the_pipeline_save_then_resume_writes_it(tmp_path):
    out = tmp_path / "run"
    args = [*TRAIN, "--max_train_steps", "3", "--checkpointing_steps", "2", "--output_dir", out]
    failed = run_script("train_ddpm.py", *args, check=False, env=ENV, faults=["--disk_full", "pipeline"])
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert _error_lines(failed.stderr)[-1].startswith(
        f"error: could not write the pipeline to {out} (no space left on device)"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert not (out / ".pipeline.partial").exists() and not (out / "model_index.json").exists()
    resumed = run_script("train_ddpm.py", *args, "--resume_from_checkpoint", "latest", env=ENV)
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-3'}" in resumed.stdout
    assert (out / "model_index.json").exists()


def test_disk_full_error_classification(tmp_path):
    """Errors that torch.save and safetensors raise on a full disk do not say so: a nearly full disk
    decides. Other errors keep their own words."""
    from ddpm_hf.util import files

    with pytest.raises(DDPMError, match=r"could not write x to .* \(no space left on device\); free some space"):
        with files.writing(tmp_path, "x"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DDPMError, match=r"\(Permission denied\)"):
        with files.writing(tmp_path, "x"):
            raise PermissionError(errno.EACCES, "Permission denied")
    partial = tmp_path / "partial"
    partial.mkdir()
    with pytest.raises(DDPMError, match=r"\(RuntimeError: unexpected pos 1 vs 2\)"):
        with files.writing(tmp_path, "x", cleanup=[partial]):
            raise RuntimeError("unexpected pos 1 vs 2")
    assert not partial.exists()


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MB file system (tmpfs), where this machine lets the tests mount one."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_really_full_disk_training(small_disk):
    out = small_disk / "run"
    proc = run_script(
        "train_ddpm.py",
        *TRAIN,
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--output_dir",
        out,
        check=False,
        env=ENV,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = _error_lines(proc.stderr)
    assert "(no space left on device)" in line and f"to {out}" in line
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp")) and not (out / ".ddpm_hf.lock").exists()


# ---- SIGTERM during the final save; the printed hint ----------------------------------------------------


def test_sigterm_during_the_final_save_finishes_it(tmp_path):
    out = tmp_path / "my run"  # a space: the printed hint must be shell-quoted
    proc = run_script(
        "train_ddpm.py",
        *TRAIN,
        "--max_train_steps",
        "2",
        "--output_dir",
        out,
        env=ENV,
        faults=["--sigterm_at_final_save"],
    )
    assert "SIGTERM: finishing the final save first" in proc.stderr
    assert f"sample it with: python sample_ddpm.py --checkpoint '{out}'" in proc.stdout
    assert (
        f"stopped at step 2; checkpoint saved to {out / 'checkpoints' / 'checkpoint-2'}. The run had finished"
        in proc.stdout
    )
    assert (out / "model_index.json").exists()
    from ddpm_hf.training.checkpoints import checkpoint_problem

    assert checkpoint_problem(out / "checkpoints" / "checkpoint-2") is None


# ---- input sanity ---------------------------------------------------------------------------------------


def test_16_bit_grayscale_images_are_scaled_not_clipped(tmp_path):
    from ddpm_hf.data.images import load_images

    values = (np.arange(256, dtype=np.uint32) * 257).reshape(16, 16).astype(np.uint16)  # 0, 257, ..., 65535
    for i in range(2):
        Image.fromarray(values).save(tmp_path / f"{i}.png")
    assert Image.open(tmp_path / "0.png").mode == "I;16"
    data = load_images(str(tmp_path), "train", DataSettings())
    assert data.channels == 1 and data.size == 16
    assert np.array_equal(data.images[0, 0].numpy(), np.arange(256).reshape(16, 16))  # 65535 -> 255, exactly
    rgb = load_images(str(tmp_path), "train", DataSettings(), channels=3)
    assert np.array_equal(rgb.images[0, 2].numpy(), np.arange(256).reshape(16, 16))


def test_yaml_floats_without_a_dot(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\ndecay: 5E-6\nbeta_end: 2.0e-2\n")
    assert load_yaml(path) == {"lr": 0.001, "decay": 5e-6, "beta_end": 0.02}


def test_sample_timesteps_is_checked_against_the_models_T():
    """sample_ddpm.py and ood_ddpm.py take T from the model: --sample_timesteps 400 for a T=1000 pipeline
    is not refused against the default --timesteps 300; training (and an explicit --timesteps) still checks."""
    import ood_ddpm
    import sample_ddpm
    import train_ddpm

    parser = build_parser("sample_ddpm.py", "", sample_ddpm.GROUPS)
    assert parse_config(parser, ["--checkpoint", "x", "--sample_timesteps", "400"])[0].sample_timesteps == 400
    assert (
        parse_config(build_parser("ood_ddpm.py", "", ood_ddpm.GROUPS), ["--sample_timesteps", "400"])[
            0
        ].sample_timesteps
        == 400
    )
    with pytest.raises(UsageError, match="--sample_timesteps 400 is larger than --timesteps 300"):
        parse_config(parser, ["--checkpoint", "x.pt", "--sample_timesteps", "400", "--timesteps", "300"])
    with pytest.raises(UsageError, match="--sample_timesteps 400 is larger than --timesteps 300"):
        parse_config(build_parser("train_ddpm.py", "", train_ddpm.GROUPS), ["--sample_timesteps", "400"])


def test_capacity_problem():
    from ddpm_hf.commands.sample import capacity_problem

    assert capacity_problem(1000, 784, "out", 10**9, 10**9, scored=True) is None
    assert "of disk" in capacity_problem(10**6, 784, "out", 10**8, 10**12, scored=False)
    memory = capacity_problem(10**6, 784, "out", 10**12, 10**9, scored=True)
    assert memory.startswith("needs about 41.7 GB of memory to score them")
    assert capacity_problem(10**6, 784, "out", 10**12, 10**9, scored=False) is None  # no scoring: nothing held


# ---- sample_ddpm.py outputs --------------------------------------------------------------------------------


@pytest.mark.slow
def test_fid_folder_origin_same_model_other_path_and_overwrite(trained_pipeline, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained_pipeline, copy, ignore=shutil.ignore_patterns("checkpoints"))
    args = [
        "--fid",
        "--num_samples",
        "4",
        "--batch_size",
        "2",
        "--sample_timesteps",
        "5",
        "--output_dir",
        tmp_path / "s",
    ]
    run_script("sample_ddpm.py", "--checkpoint", trained_pipeline, *args, env=ENV)
    (folder,) = (tmp_path / "s" / "fid_samples").glob("*/*")
    origin = json.loads((folder / "fid_origin.json").read_text())
    assert origin["seed"] == 0 and origin["steps"] == 5 and origin["precision"] == "no" and origin["eta"] == 1.0
    before = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    # The same weights through another path are the same model: reused.
    again = run_script("sample_ddpm.py", "--checkpoint", copy, *args, env=ENV)
    assert "wrote 0 new image(s) (4 already there)" in again.stdout
    refused = run_script("sample_ddpm.py", "--checkpoint", copy, *args, "--seed", "2", check=False, env=ENV)
    assert refused.returncode == 2 and {p.name: p.read_bytes() for p in folder.glob("*.png")} == before
    replaced = run_script(
        "sample_ddpm.py", "--checkpoint", copy, *args, "--seed", "2", "--overwrite_output_dir", env=ENV
    )
    assert "wrote 4 new image(s) (0 already there)" in replaced.stdout
    assert json.loads((folder / "fid_origin.json").read_text())["seed"] == 2


@pytest.mark.slow
def test_overwrite_replaces_samples_and_the_grid_is_capped(trained_pipeline, tmp_path):
    out = tmp_path / "s"
    common = ["--checkpoint", trained_pipeline, "--output_dir", out, "--sample_timesteps", "1"]
    run_script("sample_ddpm.py", *common, "--num_samples", "300", "--batch_size", "150", env=ENV)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (16 * 18 + 2, 16 * 18 + 2)  # 256 of the 300 images, 16 x 16, 2-px padding
    assert len(list(out.glob("*.png"))) == 301
    run_script("sample_ddpm.py", *common, "--num_samples", "3", "--overwrite_output_dir", env=ENV)
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png", "grid.png"]
