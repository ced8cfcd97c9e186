"""The pluggable OOD scores, their density, and the detector fitted once and deployed (API and CLI)."""

import csv
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image
from test_ood import random_pipeline, random_unet

from ddpm_hf.models.pipeline import LoadedModel
from ddpm_hf.ood.density import Density
from ddpm_hf.ood.detector import MANIFEST, PARAMS, OODDetector, empirical_p_values
from ddpm_hf.ood.network import ScoreModel
from ddpm_hf.ood.run import evaluate
from ddpm_hf.ood.scores import SCORES, build_score
from ddpm_hf.ood.scoring import ood_metrics
from ddpm_hf.ood.settings import OODSettings
from ddpm_hf.util.errors import DDPMError, UsageError
from ood_ddpm import main as ood_main

FAST = dict(sample_timesteps=10, batch_size=16, recon_factors=[0.3, 0.6], nll_timesteps=4, path_steps=4, msma_levels=4)


def half_bright(n, seed, top=True, size=16):
    """Images bright in one half and dark in the other, with pixel noise: flipping them keeps every global moment."""
    rng = np.random.RandomState(seed)
    x = rng.randint(0, 40, (n, 1, size, size))
    rows = slice(0, size // 2) if top else slice(size // 2, size)
    x[:, :, rows] += 180
    return torch.from_numpy(np.clip(x, 0, 255).astype(np.uint8))


class GaussianDenoiser(torch.nn.Module):
    """The exact noise predictor of Gaussian data N(mean, sigma^2 I) in [-1, 1]: E[eps | x_t] =
    sqrt(1-a) (x_t - sqrt(a) mean) / (a sigma^2 + 1 - a). A model whose in-distribution is known."""

    def __init__(self, mean: torch.Tensor, sigma: float, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.scale = torch.nn.Parameter(torch.ones(()))  # weights to hash
        self.sigma, self.alphas = sigma, alphas_cumprod.float()
        self.config = SimpleNamespace(in_channels=mean.shape[0], sample_size=mean.shape[-1])

    def forward(self, x, t):
        a = self.alphas[torch.as_tensor(t).long().reshape(-1)].reshape(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mean) / (a * self.sigma**2 + 1 - a)
        return SimpleNamespace(sample=eps * self.scale)


SIGMA = 0.1  # in [-1, 1] units


def template(size=16):
    """The in-distribution mean: bright top half, dark bottom half (in [-1, 1])."""
    m = torch.full((1, size, size), -0.8)
    m[:, : size // 2] = 0.8
    return m


def gaussian_images(n, seed, flip=False, size=16):
    """uint8 draws of N(template, SIGMA^2) (flip: of the template upside down: the same pixel histogram)."""
    m = template(size).flip(1) if flip else template(size)
    x = m + SIGMA * torch.randn((n, *m.shape), generator=torch.Generator().manual_seed(seed))
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@pytest.fixture(scope="module")
def oracle():
    from ddpm_hf.diffusion.sampling import make_noise_scheduler

    noise = make_noise_scheduler(100, 1e-4, 0.02)
    unet = GaussianDenoiser(template(), SIGMA, noise.alphas_cumprod)
    return LoadedModel(unet, dict(noise.config), None, {}, "gaussian oracle")


@pytest.fixture(scope="module")
def fitted(oracle, tmp_path_factory):
    """A recon detector of the Gaussian oracle fitted on its in-distribution draws (and saved)."""
    det = OODDetector.fit(oracle, gaussian_images(40, 0), score="recon", **FAST)
    return det, det.save(tmp_path_factory.mktemp("det") / "recon")


def dark(n, seed, size=16):
    return torch.from_numpy(np.random.RandomState(seed).randint(0, 40, (n, 1, size, size)).astype(np.uint8))


def bright_noise(n, seed, size=16):
    return torch.from_numpy(np.random.RandomState(seed).randint(120, 256, (n, 1, size, size)).astype(np.uint8))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return random_pipeline(tmp_path_factory.mktemp("det") / "pipe", channels=1, size=16)


@pytest.fixture(scope="module")
def pipe_detector(pipe, tmp_path_factory):
    """A recon detector of the tiny pipeline folder (its manifest names the folder), saved."""
    return OODDetector.fit(str(pipe), dark(30, 0), score="recon", **FAST).save(tmp_path_factory.mktemp("det") / "d")


# ---- the density ---------------------------------------------------------------------------


def test_density_ranks_gaussian_data_by_its_likelihood():
    rng = np.random.RandomState(0)
    train = rng.normal(0, 1, (400, 2)) * [1.0, 3.0] + [5.0, -2.0]
    density = Density.fit(train)
    probes = np.array([[5.0, -2.0], [6.0, -2.0], [5.0, 4.0], [9.0, -2.0]])  # the mode, then rarer and rarer
    nll = density.nll(probes)
    assert nll[0] < nll[1] < nll[2] < nll[3]
    # the analytic density of a Gaussian: the mixture's nll at the mode is close to log(2 pi sx sy)
    assert nll[0] == pytest.approx(np.log(2 * np.pi * 1.0 * 3.0), abs=0.15)  # the density of the features


def test_density_picks_several_components_for_two_clusters_and_round_trips():
    rng = np.random.RandomState(1)
    train = np.r_[rng.normal(-4, 0.5, (200, 3)), rng.normal(4, 0.5, (200, 3))]
    density = Density.fit(train)
    assert density.describe()["components"] >= 2  # held-out likelihood prefers the two clusters
    between, cluster = density.nll(np.zeros((1, 3)))[0], density.nll(np.full((1, 3), 4.0))[0]
    assert between > cluster + 10  # the empty middle is the anomaly, though it is the data's mean
    arrays = density.to_arrays()
    again = Density.from_arrays(arrays, density.describe()["covariance_type"])
    probes = rng.normal(0, 3, (20, 3))
    np.testing.assert_allclose(again.nll(probes), density.nll(probes), rtol=1e-12)


def test_density_needs_a_few_images():
    with pytest.raises(UsageError, match="at least 4 in-distribution training images"):
        Density.fit(np.zeros((3, 2)))


# ---- every score on data with a known answer -----------------------------------------------


NETWORK_ONLY = {"hidden"}  # reads a UNet's decoder activations: the analytic oracle has none


@pytest.mark.parametrize("name", sorted(set(SCORES) - NETWORK_ONLY))
def test_each_score_ranks_images_by_the_known_distribution(oracle, name):
    """With the exact denoiser of N(template, SIGMA^2), draws of it are in-distribution; draws of the
    template upside down (the same pixel histogram) and uniform noise are not."""
    settings = OODSettings(score=name, stats_samples=40, **FAST)
    score = build_score(name, ScoreModel(oracle, batch_size=16), settings)
    sets = {"stats": gaussian_images(40, 0), "in": gaussian_images(12, 1), "out": gaussian_images(6, 2, flip=True)}
    sets["out"] = torch.cat([sets["out"], bright_noise(6, 3)])
    run = evaluate(score, sets)
    assert run.metrics["auroc"] >= 0.95, run.metrics
    assert run.features["in"].shape == (12, len(run.columns))
    expected = {"recon": 9, "nll": 4, "both": 13, "path": 4, "msma": 4, "fused": 17, "patch": 3}
    assert run.nfe_per_image == expected[name]


@pytest.mark.parametrize("name", ["patch", "hidden"])
def test_position_aware_score_sees_a_flip_that_global_moments_keep(pipe, name):
    """Flipped half-bright images have the same pixel histogram: only where things are tells them apart."""
    from ddpm_hf.models.loader import load_model

    model = ScoreModel(load_model(str(pipe)), batch_size=16)
    sets = {"stats": half_bright(40, 0), "in": half_bright(16, 1), "out": half_bright(16, 2, top=False)}
    assert abs(sets["in"].float().mean() - sets["out"].float().mean()) < 3  # the same brightness, another place
    run = evaluate(build_score(name, model, OODSettings(score=name, **FAST)), sets)
    assert run.metrics["auroc"] >= 0.95


def test_hidden_score_reads_the_middle_decoder_block_at_its_levels(pipe):
    """One network evaluation per level; per level, every channel of the middle up block on grid x grid patches."""
    from ddpm_hf.models.loader import load_model
    from ddpm_hf.ood.network import hidden_block

    model = ScoreModel(load_model(str(pipe)), batch_size=16)
    score = build_score("hidden", model, OODSettings(score="hidden", hidden_levels=[0.1, 0.5], hidden_grid=3))
    channels = hidden_block(model.unet).resnets[-1].out_channels
    features = score.features(dark(5, 0), "in")
    assert score.nfe_per_image == 2 and features.shape == (5, 2 * channels * 9) == (5, len(score.columns))
    np.testing.assert_array_equal(features, score.features(dark(5, 0), "in"))  # seeded: the same noise again
    assert not np.allclose(features[:, : channels * 9], features[:, channels * 9 :])  # two levels, two maps
    with pytest.raises(UsageError, match="--hidden_levels must all be in"):
        OODSettings(score="hidden", hidden_levels=[1.0])


# ---- the detector: fit, save, load, score ----------------------------------------------------


def test_round_trip_gives_the_same_scores(fitted, oracle):
    det, folder = fitted
    probe = torch.cat([gaussian_images(5, 7), bright_noise(5, 8)])
    scores, p_values, flags = det.score(probe)
    again = OODDetector.load(folder, oracle)
    scores2, p2, flags2 = again.score(probe)
    np.testing.assert_allclose(scores2, scores, rtol=0, atol=1e-6)
    assert p2.tolist() == p_values.tolist() and flags2.tolist() == flags.tolist()
    assert flags[5:].all() and p_values[5:].max() <= 1 / (1 + len(det.heldout_scores))  # bright noise: rarest
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["score"] == "recon" and manifest["precision"] == "no"
    assert len(manifest["model"]["weights_sha256"]) == 64 and manifest["model"]["scheduler"]["num_train_timesteps"]
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, PARAMS]  # no pickle


def test_threshold_accepts_the_chosen_share_of_held_out_images(fitted):
    det, _ = fitted
    held = det.heldout_scores
    assert np.mean(held <= det.threshold) >= 0.95 and det.manifest["tpr"] == 0.95


def test_p_values_are_empirical_ranks():
    reference = np.array([1.0, 2.0, 3.0, 4.0])
    p = empirical_p_values(np.array([0.5, 2.0, 3.5, 9.0]), reference)
    np.testing.assert_allclose(p, [5 / 5, 4 / 5, 2 / 5, 1 / 5])  # (1 + #{reference >= s}) / (1 + n)


@pytest.mark.parametrize("name", ["path", "fused", "hidden"])
def test_density_scores_round_trip(pipe, tmp_path, name):
    det = OODDetector.fit(str(pipe), dark(30, 0), score=name, **FAST)
    probe = torch.cat([dark(4, 3), bright_noise(4, 4)])
    again = OODDetector.load(det.save(tmp_path / name))  # the model from the manifest's source folder
    np.testing.assert_allclose(again.score(probe)[0], det.score(probe)[0], rtol=0, atol=1e-6)


def test_stock_diffusers_ddpm_pipeline(tmp_path):
    """A DDPMPipeline saved by diffusers itself (not by ddpm-hf), as a folder and as an object."""
    from diffusers import DDPMPipeline, DDPMScheduler

    pipeline = DDPMPipeline(unet=random_unet(channels=1, size=16), scheduler=DDPMScheduler(num_train_timesteps=50))
    pipeline.save_pretrained(tmp_path / "stock")
    from_folder = OODDetector.fit(str(tmp_path / "stock"), dark(30, 0), score="msma", **FAST)
    from_object = OODDetector.fit(pipeline, dark(30, 0), score="msma", **FAST)
    probe = torch.cat([dark(4, 5), bright_noise(4, 6)])
    np.testing.assert_allclose(from_folder.score(probe)[0], from_object.score(probe)[0], atol=1e-6)
    assert OODDetector.load(from_folder.save(tmp_path / "det")).manifest["model"]["scheduler"]["_class_name"]
    hidden = OODDetector.fit(str(tmp_path / "stock"), dark(30, 0), score="hidden", **FAST)  # a stock UNet's decoder
    assert np.isfinite(hidden.score(probe)[0]).all()


# ---- bad inputs: one line, nothing written ----------------------------------------------------


def test_detector_of_another_model_is_refused(pipe_detector, pipe):
    from ddpm_hf.models.loader import load_model

    loaded = load_model(str(pipe))  # the same model with one weight tensor changed a little
    with torch.no_grad():
        next(loaded.unet.parameters()).add_(0.01)
    with pytest.raises(UsageError, match="fitted for another model"):
        OODDetector.load(pipe_detector, loaded)
    OODDetector.load(pipe_detector, str(pipe))  # the model it was fitted for: accepted


def test_damaged_or_foreign_detector_folders(fitted, tmp_path):
    _, folder = fitted
    broken = shutil.copytree(folder, tmp_path / "broken")
    (broken / MANIFEST).write_text("{not json")
    with pytest.raises(DDPMError, match="is damaged"):
        OODDetector.load(broken)
    future = shutil.copytree(folder, tmp_path / "future")
    manifest = json.loads((future / MANIFEST).read_text())
    (future / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(UsageError, match="format version 99"):
        OODDetector.load(future)
    no_params = shutil.copytree(folder, tmp_path / "no_params")
    (no_params / PARAMS).write_bytes(b"garbage")
    with pytest.raises(DDPMError, match="missing or damaged"):
        OODDetector.load(no_params)
    with pytest.raises(UsageError, match="not a detector folder"):
        OODDetector.load(tmp_path)


def test_images_of_another_format_are_refused_by_the_api(fitted):
    det, _ = fitted
    with pytest.raises(UsageError, match=r"do not match the model's \(1, 16, 16\)"):
        det.score(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def test_precision_other_than_the_fit_gets_a_notice(pipe_detector, caplog):
    OODDetector.load(pipe_detector, mixed_precision="bf16")
    assert "notice: scoring in precision bf16, the detector was fitted in no" in caplog.text


# ---- the command: --fit, --detector ------------------------------------------------------------


def _write_pngs(folder, images):
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy()).save(folder / f"{i:02d}.png")
    return folder


def test_cli_fit_and_score_a_folder(pipe, tmp_path, capsys):
    det = tmp_path / "det"
    common = ["--sample_timesteps", "10", "--batch_size", "16", "--path_steps", "4"]
    fit = ["--checkpoint", str(pipe), "--dataset", "mnist5k", "--fit", "--score", "path", "--stats_samples", "30"]
    ood_main([*fit, "--max_samples", "10", *common, "--output_dir", str(det)])
    assert "fitted on 30 mnist5k training images" in capsys.readouterr().out
    images = _write_pngs(tmp_path / "imgs", torch.cat([dark(3, 0, size=20), bright_noise(3, 1, size=20)]))
    ood_main(["--detector", str(det), "--images", str(images), "--output_dir", str(tmp_path / "scores")])
    captured = capsys.readouterr()
    assert "has 20 px images; shrunk to the model's 16 px" in captured.err
    assert captured.out.startswith("6 images, ") and "flagged as out-of-distribution" in captured.out
    with open(tmp_path / "scores" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "score", "p_value", "flagged"] and len(rows) == 6
    assert all(0 < float(r["p_value"]) <= 1 for r in rows)
    assert Image.open(tmp_path / "scores" / "anomalies.png").size[0] > 300


def test_cli_bad_inputs_write_nothing(pipe_detector, tmp_path):
    folder = pipe_detector
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="holds no images"):
        ood_main.__wrapped__(["--detector", str(folder), "--images", str(tmp_path / "empty"), "--output_dir", str(out)])
    with pytest.raises(UsageError, match="matches no image file"):
        ood_main.__wrapped__(["--detector", str(folder), "--images", str(tmp_path / "*.png"), "--output_dir", str(out)])
    with pytest.raises(UsageError, match="unknown --score nope"):
        ood_main.__wrapped__(["--checkpoint", "x", "--score", "nope"])
    assert not out.exists()
    proc = run_script("ood_ddpm.py", "--detector", tmp_path / "empty", "--images", tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a detector folder" in proc.stderr


def test_metrics_of_a_run_match_its_scores(pipe):
    from ddpm_hf.models.loader import load_model

    score = build_score("msma", ScoreModel(load_model(str(pipe)), batch_size=16), OODSettings(score="msma", **FAST))
    run = evaluate(score, {"stats": dark(20, 0), "in": dark(6, 1), "out": bright_noise(6, 2)})
    assert run.metrics == ood_metrics(run.scores["in"], run.scores["out"])
    assert run.counts() == {"in": 6, "out": 6, "stats": 20, "scored": 32} and run.timings["images_per_s"] > 0
