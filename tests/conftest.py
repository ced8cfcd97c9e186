"""Shared test set-up: offline, isolated caches, tiny models, scripts run in subprocesses.

The environment is set before any library is imported: huggingface_hub reads
HF_HUB_OFFLINE at import time.
"""

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_SANDBOX = Path(tempfile.mkdtemp(prefix="ddpm-hf-tests-"))
for _name in ("HOME", "HF_HOME", "TORCH_HOME", "WANDB_DIR", "MPLCONFIGDIR"):
    os.environ[_name] = str(_SANDBOX / _name.lower())
    os.makedirs(os.environ[_name], exist_ok=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, here and in the scripts they start
    # (torch's default, a thread per core, would have four threads fight over two cores).
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A UNet small enough to train for a few steps in seconds on 2 CPU cores.
TINY_MODEL = [
    "--model_channels",
    "32",
    "--channel_mult",
    "1",
    "2",
    "--num_res_blocks",
    "1",
    "--attention_resolutions",
    "2",
    "--num_head_channels",
    "32",
    "--size",
    "16",
]
TINY_TRAIN = [
    "--dataset",
    "mnist5k",
    "--max_train_samples",
    "256",
    "--batch_size",
    "32",
    "--timesteps",
    "100",
    "--sample_timesteps",
    "10",
    "--num_samples",
    "4",
    "--no_wandb",
    "--logging_steps",
    "2",
    *TINY_MODEL,
]


def tiny_unet(size=8, channels=1, seed=0, attention=False):
    """A two-level diffusers UNet2DModel of 32 channels, seeded: for tests that build pipelines by hand."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    down, up = (
        (("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D"))
        if attention
        else (
            ("DownBlock2D", "DownBlock2D"),
            ("UpBlock2D", "UpBlock2D"),
        )
    )
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
    )


# Start-up notices of every tiny training run (T = 100 linear betas keep signal at t = T-1): tests that
# expect exactly one diagnostic line of a failure look past them.
STARTUP_NOTICES = ("notice: the noise schedule keeps",)


def without_startup_notices(lines):
    return [line for line in lines if not line.startswith(STARTUP_NOTICES)]


def run_script(script, *args, check=True, env=None, timeout=600, cwd=None, faults=()):
    """Run one of the top-level scripts in a fresh interpreter (Accelerate state is per process);
    `faults`: tests/faults.py's flags (e.g. ["--kill_at_step", 5]), injected from outside the library."""
    full_env = {**os.environ, **(env or {})}
    injector = [str(REPO / "tests" / "faults.py"), *map(str, faults), "--"] if faults else []
    proc = subprocess.run(
        [sys.executable, *injector, str(REPO / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def trained_pipeline(tmp_path_factory):
    """A tiny pipeline trained once per session on mnist5k (16 px), shared by tests that only read it."""
    out = tmp_path_factory.mktemp("trained") / "pipeline"
    run_script(
        "train_ddpm.py", *TINY_TRAIN, "--max_train_steps", "8", "--checkpointing_steps", "4", "--output_dir", out
    )
    return out


@pytest.fixture(autouse=True)
def unconfigured_logging():
    """Each test starts with logging as a program that never configured it has it: a command run in-process
    (setup_logging) leaves neither its handler and level nor the Hugging Face libraries' verbosity behind."""
    import logging

    from ddpm_hf.util.logs import FOLLOWERS, LIBRARY_LOGGER

    logger = logging.getLogger(LIBRARY_LOGGER)
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    variables = {variable: os.environ.get(variable) for variable in FOLLOWERS.values()}
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)  # setLevel, not .level =: it also clears the loggers' cached levels
    logger.propagate = propagate
    for package, variable in FOLLOWERS.items():
        value = variables[variable]
        if os.environ.get(variable) == value:
            continue
        if value is None:
            del os.environ[variable]
        else:
            os.environ[variable] = value
        if package in sys.modules:
            library_logging = importlib.import_module(f"{package}.utils.logging")
            library_logging.set_verbosity(getattr(logging, (value or "warning").upper()))
