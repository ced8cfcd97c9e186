"""notebooks/quickstart.ipynb runs top to bottom offline (nbclient), in a temporary working directory, with
settings smaller than its own so that it takes a couple of minutes on 2 CPU cores."""

import json
import math
import re

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
SMALL = {"TRAIN_STEPS": 8, "SAMPLES": 8, "FID_IMAGES": 32, "FIT_IMAGES": 120}


def parameters_cell(nb):
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return cell


def with_small_settings(nb):
    """The parameters cell with REPO pointing at this checkout and the SMALL values (its names must stay)."""
    cell = parameters_cell(nb)
    for name, value in {"REPO": f"Path({str(REPO)!r})", **SMALL}.items():
        cell.source, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", cell.source, flags=re.M)
        assert n == 1, f"the notebook's parameters cell no longer sets {name}"
    return nb


def outputs_text(nb):
    return "\n".join(
        o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


def test_quickstart_notebook_runs_offline(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="install the test extra: pip install -e '.[test]'")
    nbclient = pytest.importorskip("nbclient", reason="install the test extra: pip install -e '.[test]'")
    pytest.importorskip("ipykernel", reason="install the test extra: pip install -e '.[test]'")
    nb = with_small_settings(nbformat.read(NOTEBOOK, as_version=4))
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    nbformat.write(nb, tmp_path / "quickstart.executed.ipynb")  # to look at when an assertion below fails
    text = outputs_text(nb)
    fid = float(re.search(r"FID ([\d.]+) \((\d+) vs (\d+) images\)", text).group(1))
    assert math.isfinite(fid) and fid > 0
    verdicts = re.findall(r"p-value ([\d.]+)\s+(OUT|in)", text)
    assert len(verdicts) == 22 and all(0 < float(p) <= 1 for p, _ in verdicts)  # examples/mixed: 22 images
    assert "DDIMPipeline" in text and "(4, 16, 16, 1)" in text
    assert (tmp_path / "outputs" / "notebook" / "tiny" / "model_index.json").exists()
