"""Metrics beyond FID (ddpm_hf/metrics/features.py): precision / recall / density / coverage on constructed
sets with known answers, and the DINOv2 feature space through a tiny random Dinov2Model saved to a
temporary folder (the real facebook/dinov2-base is never downloaded in tests)."""

import json

import pytest
import torch
from conftest import run_script

from ddpm_hf.config.sections import DataSettings, FIDSettings
from ddpm_hf.data.images import load_images
from ddpm_hf.diffusion.sampling import save_png
from ddpm_hf.metrics import fid
from ddpm_hf.metrics.features import DinoV2Features, prdc
from ddpm_hf.metrics.fid import load_extractor
from ddpm_hf.util.errors import DDPMError, UsageError


def points(n, dim=8, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def clusters(count, size=6, dim=8, seed=0):
    """`count` tight clusters of `size` (= k + 1) points, 100 apart: a point's k nearest
    neighbours are exactly its cluster-mates."""
    centres = torch.eye(count, dim, dtype=torch.float64) * 100 if count <= dim else points(count, dim, seed) * 1000
    return (centres[:, None, :] + 0.01 * points(count * size, dim, seed + 1).view(count, size, dim)).reshape(-1, dim)


@pytest.mark.parametrize("exact", [True, False])
def test_identical_sets(exact):
    result = prdc(points(200), points(200), exact=exact)
    assert result["precision"] == result["recall"] == result["coverage"] == 1.0
    # each real ball holds its centre and the k-1 nearer neighbours, never the k-th on its edge: density k/k
    assert result["density"] == pytest.approx(1.0, abs=0 if exact else 0.02)
    assert result["prdc_k"] == 5 and result["prdc_num_real"] == result["prdc_num_generated"] == 200


def test_disjoint_sets():
    result = prdc(points(100), points(100, seed=1) + 1000)
    assert (result["precision"], result["recall"], result["density"], result["coverage"]) == (0, 0, 0, 0)


def test_generated_set_is_a_subset_of_the_real_modes():
    real = clusters(20)  # 120 points
    fake = real[:30]  # 5 of the 20 clusters, every point of them
    result = prdc(real, fake, equal_counts=False)
    assert result["precision"] == 1.0  # every generated point is a real point
    assert result["recall"] == result["coverage"] == 5 / 20  # only the covered modes
    assert result["density"] == 1.0  # each generated point lies in k real balls on average (its own cluster's)


def test_one_mode_collapse():
    real = clusters(8)
    fake = real[:6].repeat(8, 1)[: len(real)] + 1e-6 * points(len(real))  # every sample near one real cluster
    result = prdc(real, fake)
    assert result["precision"] == 1.0 and result["coverage"] == 1 / 8
    assert result["recall"] < 1 / 8 + 1e-9


def test_matrix_product_distances_agree_with_exact_ones():
    real, fake = points(300, 32), points(300, 32, seed=1) * 1.2 + 0.3
    exact, fast = prdc(real, fake, exact=True), prdc(real, fake, exact=False)
    for key in ("precision", "recall", "density", "coverage"):
        assert fast[key] == pytest.approx(exact[key], abs=1e-2)
    assert 0 < exact["precision"] < 1 and 0 < exact["recall"] < 1


def test_equal_counts_and_too_few_images():
    result = prdc(points(500), points(50, seed=1))
    assert result["prdc_num_real"] == result["prdc_num_generated"] == 50  # a seeded subset of the larger set
    assert prdc(points(500), points(50, seed=1)) == result
    few = prdc(points(10), points(4))
    assert few["precision"] is None and "k = 5" in few["prdc_note"]


# ---- DINOv2 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=224
    )
    path = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    Dinov2Model(config).eval().save_pretrained(path)
    return path


def _mnist(n, split="test"):
    return load_images("mnist5k", split, DataSettings(), limit=n, progress=False).images


def test_dinov2_extractor_from_a_local_folder(tiny_dinov2):
    cfg = FIDSettings(fid_feature_extractor="dinov2", dinov2_model=str(tiny_dinov2))
    extractor = load_extractor(cfg)
    assert isinstance(extractor, DinoV2Features) and extractor.num_features == 32
    images = _mnist(6)
    features = extractor(images)
    assert features.shape == (6, 32) and features.dtype == torch.float32
    torch.testing.assert_close(extractor(images.repeat(1, 3, 1, 1)), features)  # grayscale = RGB repeated
    assert torch.equal(load_extractor(cfg)(images), features)
    assert extractor.info["sha256"] == load_extractor(cfg).info["sha256"] and extractor.info["origin"] == str(
        tiny_dinov2
    )
    with pytest.raises(TypeError, match="uint8"):
        extractor(images.float())


def test_fid_json_in_dinov2_space_with_prdc(tiny_dinov2, tmp_path):
    cfg = FIDSettings(
        fid_feature_extractor="dinov2",
        dinov2_model=str(tiny_dinov2),
        fid_cache_dir=str(tmp_path / "cache"),
        fid_reference_max=40,
    )
    evaluator = fid.FIDEvaluator(cfg, DataSettings(), "mnist5k", "test", batch_size=16)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(_mnist(40)):  # the reference's own images: a perfect "model"
        save_png(image, folder / f"{i}.png")
    result = fid.evaluate_folder(evaluator, folder, 40, sampler={})
    saved = json.loads((folder / "fid.json").read_text())
    assert saved["fid"] == pytest.approx(0, abs=1e-3)
    assert saved["precision"] == saved["recall"] == saved["coverage"] == 1.0 and saved["density"] == pytest.approx(1.0)
    assert (
        saved["feature_extractor"]["name"].startswith("DINOv2 32-d")
        and saved["feature_extractor"]["num_features"] == 32
    )
    assert result["prdc_k"] == 5
    other = evaluator.evaluate(_mnist(40, "train"))  # other digits: a positive distance, imperfect overlap
    assert other["fid"] > 0 and min(other["precision"], other["recall"], other["coverage"]) < 1.0


def test_missing_dinov2_offline_fails_in_one_line(tmp_path):
    proc = run_script(
        "sample_ddpm.py",
        "--checkpoint",
        tmp_path / "none",
        "--fid",
        "--fid_reference",
        "mnist5k",
        "--fid_feature_extractor",
        "dinov2",
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "hf download facebook/dinov2-base" in proc.stderr
    assert "--dinov2_model FOLDER" in proc.stderr


def test_bad_dinov2_values_fail_with_exit_2(tmp_path):
    proc = run_script("sample_ddpm.py", "--checkpoint", "x", "--fid", "--fid_feature_extractor", "clip", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "fid_feature_extractor" in proc.stderr
    with pytest.raises(UsageError, match="neither an existing folder nor a Hub id"):
        load_extractor(FIDSettings(fid_feature_extractor="dinov2", dinov2_model=str(tmp_path / "missing")))
    with pytest.raises(DDPMError, match="not available"):
        load_extractor(FIDSettings(fid_feature_extractor="dinov2", dinov2_model="someone/not-cached"))
