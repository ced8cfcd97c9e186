"""The installable package: the lazy public API, one list of dependencies."""

import subprocess
import sys

import pytest

from conftest import REPO


def test_import_is_lazy():
    code = ("import sys, ddpm_hf\n"
            "cfg = ddpm_hf.DDPMConfig(dataset='mnist5k')\n"
            "ddpm_hf.validate(cfg)\n"
            "print(ddpm_hf.__version__, sorted(m for m in ('torch', 'diffusers', 'accelerate', 'datasets') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split(" ", 1)[1].strip() == "[]"  # neither the import nor the config loaded torch


def test_public_api_resolves():
    import ddpm_hf

    missing = [name for name in ddpm_hf.__all__ if getattr(ddpm_hf, name, None) is None]
    assert not missing
    assert ddpm_hf.train.__module__ == "ddpm_hf.training" and ddpm_hf.load_model.__module__ == "ddpm_hf.pipeline"
    assert ddpm_hf.__version__.count(".") == 2


def test_unknown_names_raise_attribute_error():
    import ddpm_hf

    try:
        ddpm_hf.no_such_name
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("ddpm_hf.no_such_name did not raise")
    assert "train" in dir(ddpm_hf)


def test_dependencies_come_from_requirements_txt_alone():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "dependencies" in project["project"]["dynamic"] and "dependencies" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    pins = dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    assert pins["torch"] == "2.14.1" and pins["diffusers"] == "0.42.1" and pins["accelerate"] == "1.15.0"
    # setuptools reads the file as a plain list: no pip options, and animal-mnist stays out (it declares tensorflow).
    assert not any(line.startswith("-") for line in lines)
    assert not any(line.lower().startswith("animal") for line in lines)
