"""benchmarks/gpu_check.sh runs end to end on the CPU with --tiny, so the first GPU run does not fail on a typo."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_gpu_check_tiny_prints_one_json_line(tmp_path):
    proc = subprocess.run(
        [
            *("bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny", "--candidates"),
            *("--json", str(tmp_path / "r.json")),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "r.json").read_text())
    peaks = result["peaks"]
    assert peaks["spec_bf16_tflops"] is None and peaks["matmul_fp32_tflops"] > 0  # a CPU: no datasheet peak
    for arm in ("train_tiny_bf16", "train_tiny_fp32_tf32", "train_tiny_bf16_channels_last", "train_tiny_bf16_batch_16"):
        r = result[arm]
        assert r["images_per_sec"] > 0 and r["parameters"] > 0 and r["train_flops_per_image"] > 0
        # utilisation is the measured rate times the counted FLOPs, against the measured matmul
        assert r["achieved_tflops"] > 0 and r["fraction_of_spec_peak"] is None
        matmul = peaks["matmul_bf16_tflops" if "bf16" in arm else "matmul_fp32_tflops"]
        assert abs(r["fraction_of_matmul"] - r["achieved_tflops"] / matmul) < 0.01
    assert result["train_tiny_bf16_batch_16"]["batch"] == 16
    assert result["train_tiny_bf16"]["train_flops_per_image"] == result["train_tiny_fp32_tf32"]["train_flops_per_image"]
    assert result["sample_tiny_fp32_tf32"]["image_steps_per_sec"] > 0
    assert result["fid_features"]["images_per_sec"] > 0
    assert result["machine"]["tiny"] and "targets" in result
