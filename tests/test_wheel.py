"""The built wheel installs into a fresh environment with nothing downloaded: its dependency ranges are
met by the tested pins (requirements.txt as constraints), it carries the LICENSE, no top-level script
modules, and its console commands run."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from conftest import REPO

SOURCES = ("ddpm_hf", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "requirements.txt")


def run(*cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_wheel(tmp_path):
    """From a copy of the sources: the build's build/ and egg-info stay out of the checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(
            REPO / name,
            src / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", src)
    (wheel,) = (tmp_path / "dist").glob("ddpm_hf-*.whl")
    return wheel


def fresh_venv(tmp_path):
    """A venv without pip whose site-packages also sees this interpreter's packages (a .pth file), so the
    dependencies are there without a download."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (tmp_path / site / "_ddpm_hf_test_base.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.mark.slow
def test_wheel_installs_offline_against_the_pins(tmp_path):
    import torch

    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.split("/")[0] in ("train_ddpm.py", "sample_ddpm.py", "ood_ddpm.py")]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"ddpm_hf"}
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta and "License-File: LICENSE" in meta
    assert "Version: 0.2.0" in meta and "Provides-Extra: lpips" in meta

    python = fresh_venv(tmp_path)
    # --no-index: nothing is downloaded, so every range (and the test extra's) must be met by what is installed.
    install = run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-index",
        "-c",
        REPO / "requirements.txt",
        f"{wheel}[test]",
    )
    assert "torch" not in install.stdout.split("Successfully installed")[-1].lower()
    code = "import torch, ddpm_hf; print(torch.__version__, ddpm_hf.__file__)"
    probe = run(python, "-c", code, cwd=tmp_path).stdout.split()  # not the checkout: the installed wheel
    assert probe[0] == torch.__version__ and probe[1].startswith(str(tmp_path / "venv"))
    bin_dir = python.parent
    train = run(bin_dir / "ddpm-hf-train", "--help", cwd=tmp_path)
    assert train.stdout.startswith("usage: ddpm-hf-train [--config FILE]") and "train_ddpm.py" not in train.stdout
    top = run(bin_dir / "ddpm-hf", "--help", cwd=tmp_path)
    assert top.stdout.startswith("usage: ddpm-hf COMMAND") and "convert" in top.stdout
