"""FID on every process (ddpm_hf/metrics/sharded.py): `sample_ddpm.py --fid` under `accelerate launch
--num_processes 2 --cpu` splits the batches between the processes (seeded by global batch index), gathers
the features in image order, and gives the images and the FID of one process for the same seed."""

import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import REPO, run_script, tiny_unet
from test_fid import TinyFeatures

from ddpm_hf.metrics.sharded import SingleProcess, gather_in_order, image_indices, my_batches


class Share:
    """The process state of process `index` of `count` (what my_batches reads)."""

    def __init__(self, index, count):
        self.process_index, self.num_processes = index, count


def test_shares_cover_every_batch_once_and_gather_restores_the_order():
    shares = [my_batches(10, 4, Share(r, 2)) for r in range(2)]
    assert shares == [[0, 2], [1]]
    indices = [image_indices(s, 10, 4) for s in shares]
    assert indices[0].tolist() == [0, 1, 2, 3, 8, 9] and indices[1].tolist() == [4, 5, 6, 7]
    assert my_batches(4, 4, Share(1, 2)) == [] and image_indices([], 4, 4).shape == (0,)
    both = torch.cat(indices)
    features = both[:, None].float().expand(-1, 3)  # feature row i holds i
    assert gather_in_order(features, both, SingleProcess())[:, 0].tolist() == list(range(10))


@pytest.fixture(scope="module")
def pipeline_and_weights(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler

    tmp = tmp_path_factory.mktemp("mp")
    DDPMPipeline(unet=tiny_unet(size=8), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(tmp / "p")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(TinyFeatures().eval()).save(str(tmp / "features.pt"))
    return tmp / "p", tmp / "features.pt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(pipeline, weights, tmp_path, out):
    return [
        "sample_ddpm.py",
        "--checkpoint",
        pipeline,
        "--fid",
        "--num_samples",
        10,
        "--batch_size",
        4,
        "--sample_timesteps",
        3,
        "--fid_reference",
        "mnist5k",
        "--fid_reference_max",
        40,
        "--inception_weights",
        weights,
        "--fid_cache_dir",
        tmp_path / "cache",
        "--output_dir",
        tmp_path / out,
    ]


@pytest.mark.slow
def test_two_processes_give_the_images_and_fid_of_one(pipeline_and_weights, tmp_path):
    pipeline, weights = pipeline_and_weights
    run_script(*_args(pipeline, weights, tmp_path, "one"), timeout=300)
    # configs/accelerate/multi_cpu.yaml: torchrun's launcher with gloo (plain `--cpu --num_processes 2` starts one
    # process with accelerate 1.15); a free port, since other test runs may hold the file's.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        REPO / "configs/accelerate/multi_cpu.yaml",
    ]
    launch += ["--main_process_port", free_port()]
    args = _args(pipeline, weights, tmp_path, "two")
    proc = subprocess.run(
        [*map(str, launch), str(REPO / args[0]), *map(str, args[1:])],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("FID ") == 1  # the main process reports, once
    (one,), (two,) = (list((tmp_path / d).rglob("fid.json")) for d in ("one", "two"))
    for i in range(10):  # the same seeded images, whichever process drew them
        assert (one.parent / f"{i}.png").read_bytes() == (two.parent / f"{i}.png").read_bytes(), i
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["num_processes"] == 1 and b["num_processes"] == 2 and b["num_generated"] == 10
    print(f"\nFID 1 process {a['fid']!r}, 2 processes {b['fid']!r}; KID {a['kid_mean']!r}, {b['kid_mean']!r}")
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
