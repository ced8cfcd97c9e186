"""Training end to end in subprocesses: pipeline folder, grids, logs, checkpoints, resume, 2 processes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_TRAIN, run_script
from diffusers import DDIMPipeline, DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file


def test_trained_output_is_a_standard_pipeline(trained_pipeline):
    pipe = DiffusionPipeline.from_pretrained(trained_pipeline)
    assert isinstance(pipe, DDIMPipeline)
    sched = pipe.scheduler.config
    assert sched.num_train_timesteps == 100 and sched.timestep_spacing == "trailing"
    assert sched.set_alpha_to_one and not sched.clip_sample and sched.beta_schedule == "linear"
    assert pipe.unet.config.in_channels == 1 and pipe.unet.config.sample_size == 16
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=2, num_inference_steps=5, eta=0.0, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 1) and 0 <= images.min() and images.max() <= 1
    assert (trained_pipeline / "unet" / "diffusion_pytorch_model.safetensors").exists()
    config = json.loads((trained_pipeline / "ddpm_hf_config.json").read_text())
    assert config["dataset"] == "mnist5k" and config["trained_steps"] == 8 and config["timesteps"] == 100
    assert config["mixed_precision"] is None and config["mixed_precision_used"] == "no"  # the flag, and what ran


def test_saved_unet_holds_the_ema_weights(trained_pipeline):
    """The pipeline's weights are the EMA of the final checkpoint, not the raw model."""
    saved = load_file(trained_pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    checkpoint = trained_pipeline / "checkpoints" / "checkpoint-8"
    raw, ema = load_file(checkpoint / "model.safetensors"), load_file(checkpoint / "ema.safetensors")
    assert set(saved) == set(ema)
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    # 8 steps at ema_rate 0.999 from the initial weights: far from the raw weights, close to the start.
    assert not torch.equal(saved["conv_in.weight"], raw["conv_in.weight"])
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["ema"]["decay"] == 0.999 and state["ema"]["optimization_step"] == 8


def test_log_grid_and_checkpoints(trained_pipeline):
    lines = [json.loads(row) for row in (trained_pipeline / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [2, 4, 6, 8]
    assert all({"step", "epoch", "loss", "lr", "images_per_sec"} <= set(row) for row in lines)
    assert all(row["loss"] > 0 and row["images_per_sec"] > 0 for row in lines)
    # One-cycle LR: warm-up from 1e-6 towards --lr (warm-up of 10 epochs is longer than these 8 steps).
    assert lines[0]["lr"] < lines[-1]["lr"] <= 1e-3
    grid = Image.open(trained_pipeline / "samples" / "epoch_0001.png")
    assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 4 samples, 2x2 with 2 px padding
    assert sorted(p.name for p in (trained_pipeline / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(trained_pipeline, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(trained_pipeline, out)
    proc = run_script(
        "train_ddpm.py",
        *TINY_TRAIN,
        "--max_train_steps",
        "12",
        "--checkpointing_steps",
        "4",
        "--output_dir",
        out,
        "--resume_from_checkpoint",
        "latest",
    )
    assert "resumed from" in proc.stdout + proc.stderr and "checkpoint-8" in proc.stdout + proc.stderr
    steps = [json.loads(row)["step"] for row in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]  # continued at 9: nothing replayed
    assert json.loads((out / "ddpm_hf_config.json").read_text())["trained_steps"] == 12


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(tmp_path):
    out = tmp_path / "ddp"
    # accelerate 1.15 runs `launch --cpu --num_processes 2` as one process (its multi-CPU path wants MPI);
    # torchrun through --multi_gpu with ACCELERATE_USE_CPU=1 gives two gloo processes.
    cmd = [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29533",
        str(REPO / "train_ddpm.py"),
    ]
    proc = subprocess.run(
        [
            sys.executable,
            *cmd,
            *TINY_TRAIN,
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "4",
            "--output_dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(row) for row in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [2, 4]  # written once, by the main process
    # 256 images, batch 32 per process: 4 batches per process per epoch, 64 images per step.
    assert all(row["epoch"] == 0 for row in lines)
    ckpt = out / "checkpoints" / "checkpoint-4"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    assert isinstance(DiffusionPipeline.from_pretrained(out), DDIMPipeline)
