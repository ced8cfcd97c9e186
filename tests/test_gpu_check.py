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
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny", "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "r.json").read_text())
    for arm in ("train_tiny_bf16", "train_tiny_fp32_tf32"):
        assert result[arm]["images_per_sec"] > 0 and result[arm]["parameters"] > 0
    assert result["sample_tiny_fp32_tf32"]["image_steps_per_sec"] > 0
    assert result["fid_features"]["images_per_sec"] > 0
    assert result["machine"]["tiny"] and "targets" in result
