"""benchmarks/ood_nfe.py: AUROC against NFE per image, on a tiny random model (seconds, not the study)."""

import json
import sys

import pytest
from conftest import REPO
from test_ood import random_pipeline

sys.path.insert(0, str(REPO / "benchmarks"))
import ood_nfe  # noqa: E402


@pytest.mark.slow  # ~1 min on 2 idle cores: six tiny OOD runs
def test_study_runs_reuses_skips_and_recommends(tmp_path):
    model = random_pipeline(tmp_path / "model")
    common = [
        "--checkpoint",
        str(model),
        "--max_samples",
        "4",
        "--stats_samples",
        "4",
        "--bootstrap",
        "20",
        "--factors",
        "0.2",
        "0.5",
        "--work_dir",
        str(tmp_path / "runs"),
        "--output",
        str(tmp_path / "r.json"),
    ]
    ood_nfe.main([*common, "--steps", "10", "5"])
    first = json.loads((tmp_path / "r.json").read_text())
    rows = {(r["mode"], r["sample_timesteps"]): r for r in first["settings"]}
    assert set(rows) == {("single", 10), ("single", 5), ("multi", 10), ("multi", 5)}
    assert rows["single", 10]["reference"] and rows["single", 10]["nfe_per_image"] == 5  # t* = 49: 5 of the 10 steps
    assert rows["multi", 5]["nfe_per_image"] > rows["single", 5]["nfe_per_image"]  # the 0.2 level adds its steps
    assert all(r["counts"]["in"] == r["counts"]["out"] == 4 and not r["reused"] for r in rows.values())
    assert rows["multi", 10]["counts"]["stats"] == 4 and rows["single", 5]["delta_auroc_se"] >= 0
    # the default report: every test image of both registry sets
    assert first["default_report"]["in"] == 1000 and first["default_report"]["out"] == 2000
    assert first["recommendation"]["recommended"]["nfe_per_image"] <= 5
    assert (tmp_path / "r.png").stat().st_size > 0

    # Again with one more S and no budget: the measured settings are reused, the new one is skipped, and said so.
    ood_nfe.main([*common, "--steps", "10", "5", "2", "--reuse", "--budget_minutes", "0"])
    second = {(r["mode"], r["sample_timesteps"]): r for r in json.loads((tmp_path / "r.json").read_text())["settings"]}
    assert all(second[k]["reused"] and second[k]["auroc"] == rows[k]["auroc"] for k in rows)
    assert "auroc" not in second["single", 2] and "budget" in second["single", 2]["skipped"]
    assert second["multi", 2]["skipped"].startswith(
        "impossible: recon factor 0.2"
    )  # t* = 19 is below the grid's first step
