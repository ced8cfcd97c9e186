"""Process-wide settings belong to the commands, applied once at their start (commands/common.py
start_command): importing the library or calling it (a Trainer, the tracker set-up) changes none of
them: no atexit hook, no WANDB_MODE, no glibc allocator policy. Each case runs in a fresh process."""

import json
import os
import subprocess
import sys

from conftest import REPO, TINY_TRAIN, run_script

# The libraries the package builds on register their own atexit hooks as they load: load them first,
# so that the count before and after measures the package's.
LIBRARY_CALLS = """
import atexit, importlib, json, os, pkgutil
import accelerate, datasets, diffusers, huggingface_hub, PIL.Image, safetensors.torch, torch, torchvision, tqdm, wandb
from accelerate import Accelerator

before = atexit._ncallbacks()
import ddpm_hf
from ddpm_hf.util import host_memory, lock

for module in pkgutil.walk_packages(ddpm_hf.__path__, "ddpm_hf."):
    importlib.import_module(module.name)
from diffusers import UNet2DModel
from ddpm_hf import DDPMConfig, validate
from ddpm_hf.training.parts import PART_SECTIONS, build_parts
from ddpm_hf.training.monitoring import setup_tracker

after_import = atexit._ncallbacks()
unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   norm_num_groups=4)
sections = validate(DDPMConfig(batch_size=4)).pick(*PART_SECTIONS)
parts = build_parts(Accelerator(cpu=True), unet, torch.zeros(8, 1, 8, 8, dtype=torch.uint8), **sections)
tracker = setup_tracker("wandb")  # not logged in: offline, told through wandb.init
after_calls = atexit._ncallbacks()
atexit.unregister(lock.release_all)  # drops it only if it was registered
print(json.dumps(dict(
    before=before, after_import=after_import, after_calls=after_calls, release_all=after_calls - atexit._ncallbacks(),
    wandb_mode=os.environ.get("WANDB_MODE"), host_memory=host_memory.applied(), tracker=tracker,
)))
"""


def test_the_library_changes_no_process_wide_setting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MALLOC_", "DDPM_HF_"))}
    proc = subprocess.run(
        [sys.executable, "-c", LIBRARY_CALLS],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, "HOME": str(tmp_path)},  # no ~/.netrc: wandb is not logged in
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["after_import"] == seen["before"] and seen["after_calls"] == seen["before"], seen
    assert seen["release_all"] == 0
    assert seen["wandb_mode"] is None
    assert seen["host_memory"] is None  # the Trainer on a CPU did not set the allocator policy
    assert seen["tracker"] == ["wandb", {"mode": "offline"}]
    assert "wandb is not logged in; logging offline" in proc.stderr


def test_the_train_command_keeps_freed_memory_on_a_cpu(tmp_path):
    """The allocator policy is the train command's: set at its start, reported in its log."""
    env = {k: "" for k in os.environ if k.startswith("MALLOC_") or k == "DDPM_HF_KEEP_FREED_MEMORY"}
    proc = run_script(
        "train_ddpm.py",
        *TINY_TRAIN,
        "--max_train_steps",
        "1",
        "--output_dir",
        tmp_path / "out",
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert "host memory: freed blocks up to 1024 MiB are kept" in proc.stdout
