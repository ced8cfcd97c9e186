"""Crash and resume: a run killed at any moment and resumed with `--resume_from_checkpoint latest`
ends with the EMA weights of the same run never interrupted (CPU, fp32, max |diff| <= 1e-6).

Kills land where the test chooses through tests/faults.py, which patches the library from outside:
--kill_at_step N and --kill_during_save N make the process SIGKILL itself; --nan_at_step N makes
one loss NaN. SIGTERM/SIGINT come from outside.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY_MODEL, run_script
from PIL import Image
from safetensors.torch import load_file

from ddpm_hf.training.checkpoints import MANIFEST, checkpoint_problem

# Every test here trains, kills and resumes: `make test-all` (CI) runs them, `make test` does not.
pytestmark = pytest.mark.slow

# 48 images in batches of 8: 6 steps per epoch, 12 steps = 2 epochs, a checkpoint every 3 steps.
# One thread: identical arithmetic in every run and no fight for the shared cores.
ENV = {"OMP_NUM_THREADS": "1"}
RUN = [
    "--dataset",
    "animalmnist",
    "--max_train_samples",
    "48",
    "--batch_size",
    "8",
    "--timesteps",
    "100",
    "--sample_timesteps",
    "5",
    "--num_samples",
    "2",
    "--no_wandb",
    "--logging_steps",
    "1",
    *TINY_MODEL,
    "--max_train_steps",
    "12",
    "--checkpointing_steps",
    "3",
]
RESUME = ["--resume_from_checkpoint", "latest"]


def train(out, *extra, faults=(), check=True):
    return run_script("train_ddpm.py", *RUN, "--output_dir", out, *extra, env=ENV, check=check, faults=faults)


def ema_weights(out):
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def log_records(out):
    """The log without its wall-clock column."""
    return [
        {k: v for k, v in json.loads(line).items() if k != "images_per_sec"}
        for line in (out / "train_log.jsonl").read_text().splitlines()
    ]


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def assert_same_run(reference, resumed):
    diff = max_abs_diff(ema_weights(reference), ema_weights(resumed))
    assert diff <= 1e-6, f"EMA weights differ by {diff}"
    # Same loss at every step: the same batches, noise and timesteps, none replayed or skipped.
    assert log_records(resumed) == log_records(reference)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run never interrupted."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    train(out)
    assert [r["step"] for r in log_records(out)] == list(range(1, 13))
    return out


def test_kill_mid_epoch_then_resume_is_exact(reference, tmp_path):
    out = tmp_path / "run"
    killed = train(out, faults=["--kill_at_step", 5], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoints(out) == ["checkpoint-3"]  # step 3 of the 6 of epoch 0: a mid-epoch resume
    assert [r["step"] for r in log_records(out)] == [1, 2, 3, 4, 5]
    resumed = train(out, *RESUME)
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-3'}" in resumed.stdout
    assert_same_run(reference, out)  # also: the log lines of steps 4-5 written before the kill were replaced


def test_kill_during_save_and_damaged_checkpoint_fall_back(reference, tmp_path):
    out = tmp_path / "run"
    killed = train(out, faults=["--kill_during_save", 9], check=False)
    assert killed.returncode == -signal.SIGKILL
    # The interrupted save never got its final name (nor its manifest).
    assert checkpoints(out) == ["checkpoint-3", "checkpoint-6", "checkpoint-9.partial"]
    assert not (out / "checkpoints" / "checkpoint-9.partial" / MANIFEST).exists()
    assert checkpoint_problem(out / "checkpoints" / "checkpoint-6") is None
    # Damage the newest complete checkpoint too: `latest` must say so and fall back to checkpoint-3.
    weights = out / "checkpoints" / "checkpoint-6" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    resumed = train(out, *RESUME)
    notices = [line for line in resumed.stderr.splitlines() if "checkpoint-9.partial" in line or "checkpoint-6" in line]
    assert notices == [
        f"notice: removing {out / 'checkpoints' / 'checkpoint-9.partial'}, a checkpoint whose save was interrupted",
        f"warning: checkpoint {out / 'checkpoints' / 'checkpoint-6'} is damaged or incomplete "
        f"(model.safetensors has {size // 2} bytes instead of {size}); falling back to an older one",
    ]
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-3'}" in resumed.stdout
    assert_same_run(reference, out)
    assert checkpoints(out) == ["checkpoint-12", "checkpoint-3", "checkpoint-6", "checkpoint-9"]
    assert all(checkpoint_problem(out / "checkpoints" / name) is None for name in checkpoints(out))


def _wait_for_log(proc, log, lines, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= lines:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before writing {lines} log lines")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_step_saves_and_resumes_exactly(sig, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train_ddpm.py"), *RUN, "--output_dir", str(out)],
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_log(proc, out / "train_log.jsonl", 2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    step = log_records(out)[-1]["step"]  # the step in progress was finished, then saved
    assert 2 <= step < 12
    assert (
        f"stopped at step {step}; checkpoint saved to {out / 'checkpoints' / f'checkpoint-{step}'}. Resume "
        "with the same "
        f"command plus --resume_from_checkpoint latest" in stdout
    )
    assert f"{sig.name}: stopping after this step and saving a checkpoint" in stderr
    assert checkpoint_problem(out / "checkpoints" / f"checkpoint-{step}") is None
    assert not (out / "model_index.json").exists()
    if sig == signal.SIGTERM:  # the same code path for both signals: resume one of them
        train(out, *RESUME)
        assert_same_run(reference, out)


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    out = tmp_path / "run"
    proc = train(out, faults=["--nan_at_step", 5], check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == [
        f"error: the loss became non-finite at step 5; the last good checkpoint {out / 'checkpoints' / 'checkpoint-3'} "
        "is kept; lower --lr, use --mixed_precision no, or pass --skip_nonfinite_steps to skip such updates"
    ]
    assert checkpoints(out) == ["checkpoint-3"]
    assert checkpoint_problem(out / "checkpoints" / "checkpoint-3") is None
    assert not (out / "model_index.json").exists()


def test_skip_nonfinite_steps_counts_and_resumes_exactly(tmp_path):
    nan, short = ["--nan_at_step", 2], ("--skip_nonfinite_steps", "--max_train_steps", "8")
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, *short, faults=nan)
    records = log_records(a)
    # 9 batches for 8 steps: the run goes on into epoch 1 until it has trained --max_train_steps.
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["skipped_nonfinite"] for r in records] == [0] + [1] * 7
    assert all(r["loss"] == r["loss"] for r in records)  # finite: the NaN update was never applied
    # The skipped batch consumed data without a step: a resume must still land on the right batch.
    killed = train(b, *short, faults=[*nan, "--kill_at_step", 5], check=False)
    assert killed.returncode == -signal.SIGKILL
    train(b, *short, *RESUME)
    assert_same_run(a, b)


def test_resuming_a_finished_run_trains_nothing_more(reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    proc = train(out, *RESUME)
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-12'}" in proc.stdout
    assert max_abs_diff(ema_weights(reference), ema_weights(out)) == 0
    assert log_records(out) == log_records(reference)


def _pngs(folder):
    return sorted(folder.glob("*.png"), key=lambda p: int(p.stem))


def test_interrupted_fid_sampling_resumes_where_it_stopped(reference, tmp_path):
    args = [
        sys.executable,
        str(REPO / "sample_ddpm.py"),
        "--checkpoint",
        str(reference),
        "--fid",
        "--num_samples",
        "16",
        "--batch_size",
        "4",
        "--sample_timesteps",
        "20",
        "--ddpm",
        "1.0",
    ]
    env = {**os.environ, **ENV}
    whole = subprocess.run(
        [*args, "--output_dir", str(tmp_path / "whole")], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    (expected_dir,) = (tmp_path / "whole" / "fid_samples").glob("*/*")

    proc = subprocess.Popen(
        [*args, "--output_dir", str(tmp_path / "cut")],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "cut").glob("fid_samples/*/*/*.png"))
        if len(found) >= 4:
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    (folder,) = (tmp_path / "cut" / "fid_samples").glob("*/*")
    done = _pngs(folder)
    assert 4 <= len(done) < 16, "the kill should land while sampling"
    for path in done:  # every PNG under a final name is whole (written to a temporary name, then renamed)
        with Image.open(path) as img:
            img.load()
    complete_batches = sum(all((folder / f"{i}.png").exists() for i in range(b * 4, b * 4 + 4)) for b in range(4))

    again = subprocess.run(
        [*args, "--output_dir", str(tmp_path / "cut")], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"wrote {16 - 4 * complete_batches} new image(s) ({4 * complete_batches} already there)" in again.stdout
    assert [p.name for p in _pngs(folder)] == [f"{i}.png" for i in range(16)]
    for path in _pngs(expected_dir):  # the same images as the run never interrupted
        assert (folder / path.name).read_bytes() == path.read_bytes(), path.name
