"""ood_ddpm.py: metrics, the shared multi-level reconstruction, LPIPS, format mismatches, outputs."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image
from tqdm import tqdm

from ddpm_hf.config.options import DDPMConfig
from ddpm_hf.config.sections import ModelSettings
from ddpm_hf.diffusion.sampling import make_noise_scheduler, make_sampler
from ddpm_hf.models.loader import model_format
from ddpm_hf.models.pipeline import LoadedModel, save_pipeline
from ddpm_hf.models.unet import build_unet
from ddpm_hf.ood.scoring import (
    Scorer,
    combine,
    load_lpips,
    lpips_distance,
    ood_metrics,
    plan_levels,
    reconstruct,
    snap_notices,
)
from ddpm_hf.ood.settings import OODSettings
from ddpm_hf.util.errors import DDPMError, UsageError
from ood_ddpm import main as ood_main

FIXTURE = Path(__file__).parent / "fixtures" / "gzoo_unet_a"
TINY_UNET = dict(
    model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], num_head_channels=32
)
OFFLINE_SETS = ["--dataset", "mnist5k", "--out_dataset", "animalmnist"]


def random_unet(channels=1, size=16, seed=0):
    """A tiny UNet with random (not zero-initialised) outputs: reconstructions depend on the input."""
    torch.manual_seed(seed)
    unet = build_unet(ModelSettings(**TINY_UNET), channels, size)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return unet.eval()


def random_pipeline(path, channels=1, size=16, timesteps=100):
    noise = make_noise_scheduler(timesteps, 1e-4, 0.02)
    save_pipeline(
        path, random_unet(channels, size), make_sampler("ddim", noise.config), DDPMConfig(**TINY_UNET).to_dict()
    )
    return path


def image_folder(path, n, size, seed=0):
    """n distinct random RGB PNGs of size x size."""
    path.mkdir(parents=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---- metrics against hand-computed values --------------------------------------------------


def test_metrics_hand_computed_symmetric_case():
    m = ood_metrics([0.1, 0.2, 0.3, 0.4], [0.35, 0.5, 0.6, 0.7])
    assert m["auroc"] == pytest.approx(15 / 16)  # 0.35 beats three of four in-distribution scores
    assert m["fpr95"] == pytest.approx(0.25)  # catching all OOD (>= 0.35) flags 0.4
    assert m["fpr95_in_positive"] == pytest.approx(0.25)  # keeping all in-dist. (<= 0.4) accepts 0.35
    assert m["aupr_out"] == pytest.approx((1 + 1 + 1 + 4 / 5) / 4)  # OOD at ranks 1, 2, 3, 5
    assert m["aupr_in"] == pytest.approx((1 + 1 + 1 + 4 / 5) / 4)


def test_metrics_two_fpr95_conventions_differ():
    inside = np.arange(1, 11, dtype=float)  # 1..10
    outside = np.array([5.5, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    m = ood_metrics(inside, outside)
    assert m["auroc"] == pytest.approx((5 + 90) / 100)
    # The original's: catch >= 95% of OOD (all ten, threshold 5.5) -> in-distribution 6..10 flagged.
    assert m["fpr95"] == pytest.approx(0.5)
    # The usual: keep >= 95% of in-distribution (all ten, <= 10) -> OOD 5.5 accepted.
    assert m["fpr95_in_positive"] == pytest.approx(0.1)
    assert m["aupr_out"] == pytest.approx((9 + 10 / 15) / 10)
    assert m["aupr_in"] == pytest.approx((5 + 6 / 7 + 7 / 8 + 8 / 9 + 9 / 10 + 10 / 11) / 10)


def test_metrics_ties_and_perfect_separation():
    assert ood_metrics([0.5, 0.5], [0.5, 0.5])["auroc"] == pytest.approx(0.5)
    m = ood_metrics([0, 1, 2], [3, 4, 5])
    assert (m["auroc"], m["fpr95"], m["fpr95_in_positive"], m["aupr_in"], m["aupr_out"]) == (1, 0, 0, 1, 1)


def test_combine_single_level_adds_lpips_and_multi_level_averages_z_scores():
    scores = {"recon_error": np.array([[1.0, 3.0]]), "lpips": np.array([[0.5, 0.25]])}
    assert combine(scores, None).tolist() == [1.5, 3.25]  # the original: error + LPIPS, unweighted
    scores = {"recon_error": np.array([[1.0, 3.0], [10.0, 10.0]])}
    stats = {"recon_error": np.array([[0.0, 2.0], [8.0, 12.0]])}  # means 1, 10; stds sqrt(2), sqrt(8)
    expected = [(0 + 0) / 2, (2 / np.sqrt(2) + 0) / 2]
    assert combine(scores, stats) == pytest.approx(expected)


def test_report_prints_metrics_to_four_decimals():
    """The original's `AUC score: X FPR95: Y` line shows 4 decimals, not a raw float (0.9612080000000001)."""
    from ddpm_hf.commands.ood import format_report

    results = {
        "auroc": 0.9612080000000001,
        "fpr95": 0.212,
        "fpr95_in_positive": 0.176,
        "aupr_in": 0.955,
        "aupr_out": 0.967,
        "per_level": [{}],
        "counts": {"in": 500, "out": 500, "scored": 1000},
        "settings": {"dataset": "mnist5k", "out_dataset": "animalmnist"},
        "score": "huber reconstruction error",
        "cost": {"nfe_per_image": 10, "model_calls_per_batch": 10},
        "timing": {"images_per_s": 38.5, "score_s": 26.0},
    }
    lines = format_report(results).splitlines()
    assert lines[1] == "AUC score: 0.9612 FPR95: 0.2120"
    assert "AUROC (OOD positive):" in lines[2] and lines[2].endswith(" 0.9612")


# ---- reconstruction ------------------------------------------------------------------------


def test_levels_follow_the_original_timestep_rule():
    config = make_noise_scheduler(100, 1e-4, 0.02).config
    _, levels = plan_levels([0.5, 0.35, 0.2], config, 10)  # stride 10: 99, 89, ..., 9
    # 0.35 gives t* = 34, off the grid: the images are noised to 29, where the reverse pass starts,
    # not to 34 with the first step at 29; the snap is recorded and said.
    assert [lv.t_start for lv in levels] == [49, 29, 19]
    assert [lv.t_requested for lv in levels] == [None, 34, None]
    assert [[int(t) for t in lv.timesteps] for lv in levels] == [[49, 39, 29, 19, 9], [29, 19, 9], [19, 9]]
    assert all(int(lv.timesteps[0]) == lv.t_start for lv in levels)
    (notice,) = snap_notices(levels)
    assert "t* = 34" in notice and "t* = 29" in notice
    with pytest.raises(UsageError, match="below the first sampling timestep 9"):
        plan_levels([0.05], config, 10)  # t* = 4


def test_levels_share_one_model_call_per_timestep():
    unet = random_unet()
    config = make_noise_scheduler(100, 1e-4, 0.02).config
    sampler, levels = plan_levels([0.2, 0.5, 0.35], config, 10)
    batch_sizes = []
    hook = unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    x0 = torch.rand(3, 1, 16, 16) * 2 - 1
    noise = torch.randn(3, *x0.shape, generator=torch.Generator().manual_seed(1))
    noise_scheduler = make_noise_scheduler(100, 1e-4, 0.02)
    shared = reconstruct(unet, sampler, noise_scheduler, x0, levels, 0.0, None, noise=noise)
    hook.remove()
    # 0.5 runs alone at 49, 39; 0.35 joins at 29, 0.2 at 19: five calls instead of ten.
    assert batch_sizes == [3, 3, 6, 9, 9]
    for i, level in enumerate(levels):
        alone = reconstruct(unet, sampler, noise_scheduler, x0, [level], 0.0, None, noise=noise[i : i + 1])[0]
        torch.testing.assert_close(shared[i], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(shared[0], shared[1])


def test_reconstruction_matches_the_original_code():
    """The fixture's `ddim_eta0_recon` was computed by GenerativeZoo's own outlier reconstruction."""
    convert = pytest.importorskip("ddpm_hf.models.convert_gzoo")
    from ddpm_hf.commands.common import original_flags

    if not FIXTURE.with_suffix(".pt").exists():
        pytest.skip("fixture missing")
    flags = json.loads(FIXTURE.with_suffix(".json").read_text())
    expected = torch.load(FIXTURE.with_name(FIXTURE.name + "_expected.pt"), weights_only=True)
    keys = (
        "model_channels",
        "num_res_blocks",
        "attention_resolutions",
        "channel_mult",
        "num_heads",
        "num_head_channels",
        "timesteps",
        "beta_start",
        "beta_end",
        "size",
    )
    cfg = DDPMConfig(**{k: flags[k] for k in keys}, channels=flags["in_channels"])
    loaded = convert.load_original_checkpoint(str(FIXTURE.with_suffix(".pt")), original_flags(cfg))
    sampler, levels = plan_levels([flags["recon_factor"]], loaded.scheduler_config, flags["sample_timesteps"])
    assert levels[0].t_start == int(expected["recon_t_start"])
    noise_scheduler = make_noise_scheduler(cfg.timesteps, cfg.beta_start, cfg.beta_end)
    t = torch.full((len(expected["x0"]),), levels[0].t_start)
    torch.testing.assert_close(
        noise_scheduler.add_noise(expected["x0"], expected["recon_noise"], t), expected["x_noisy"]
    )
    recon = reconstruct(
        loaded.unet, sampler, noise_scheduler, expected["x0"], levels, 0.0, None, noise=expected["recon_noise"][None]
    )[0]
    rel = (recon - expected["ddim_eta0_recon"]).abs().max() / expected["ddim_eta0_recon"].abs().max()
    assert rel < 1e-4


# ---- LPIPS ---------------------------------------------------------------------------------


def test_lpips_code_path_with_a_random_backbone():
    model = load_lpips(pnet_rand=True)  # no download: random AlexNet, the package's linear heads
    a = torch.rand(4, 1, 16, 16) * 2 - 1  # grayscale, below AlexNet's minimum size: repeated and upsampled
    same = lpips_distance(model, a, a)
    assert same.shape == (4,) and same.abs().max() < 1e-6
    other = lpips_distance(model, a, a.flip(0))
    assert (other > 0).all()

    config = make_noise_scheduler(100, 1e-4, 0.02).config
    sampler, levels = plan_levels([0.3, 0.6], config, 10)
    loaded = LoadedModel(random_unet(), dict(config))
    cfg = OODSettings(batch_size=3, eta=1.0)
    scorer = Scorer(loaded, levels, sampler, cfg, lpips_model=model)
    images = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    with tqdm(disable=True) as bar:
        first, again = scorer.score(images, "in", bar), scorer.score(images, "in", bar)
    assert set(first) == {"recon_error", "lpips"} and first["lpips"].shape == (2, 5)
    assert (first["lpips"] > 0).all() and np.isfinite(first["recon_error"]).all()
    np.testing.assert_array_equal(first["recon_error"], again["recon_error"])  # seeded per batch


@pytest.mark.slow
def test_lpips_offline_without_weights_fails_in_one_line(tmp_path):
    out = tmp_path / "res"
    proc = run_script(
        "ood_ddpm.py",
        "--checkpoint",
        tmp_path / "never-read",
        *OFFLINE_SETS,
        "--lpips",
        "--output_dir",
        out,
        check=False,
        env={"TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in lines[0]
    assert "alexnet-owt-7be5be79.pth" in lines[0] and "without --lpips" in lines[0]
    assert not out.exists() and not (tmp_path / "torch" / "hub" / "checkpoints").exists()


# ---- the script end to end -----------------------------------------------------------------

E2E_ARGS = [
    *OFFLINE_SETS,
    "--max_samples",
    "12",
    "--batch_size",
    "8",
    "--sample_timesteps",
    "10",
    "--ddpm",
    "1.0",
    "--seed",
    "3",
]


@pytest.fixture(scope="module")
def first_run(trained_pipeline, tmp_path_factory):
    """One ood_ddpm.py run on the tiny trained pipeline (the thin end-to-end path of `make test`)."""
    out = tmp_path_factory.mktemp("ood") / "a"
    return out, run_script("ood_ddpm.py", "--checkpoint", trained_pipeline, *E2E_ARGS, "--output_dir", out)


def test_end_to_end_outputs(first_run):
    a, first = first_run
    assert sorted(p.name for p in a.iterdir()) == ["histogram.png", "ood_results.json", "roc.png", "scores.csv"]
    results = json.loads((a / "ood_results.json").read_text())
    line = re.search(r"^AUC score: (\d\.\d{4}) FPR95: (\d\.\d{4})$", first.stdout, re.M)  # 4 decimals, not a raw float
    assert line and float(line[1]) == round(results["auroc"], 4) and float(line[2]) == round(results["fpr95"], 4)
    for name in ("auroc", "fpr95", "fpr95_in_positive", "aupr_in", "aupr_out"):
        assert 0 <= results[name] <= 1
    assert "Loading pipeline components" not in first.stderr
    for label in (
        "AUROC (OOD positive)",
        "FPR at 95% TPR, in-dist. positive",
        "AUPR-in",
        "AUPR-out",
        "network evaluations per image",
    ):
        assert label in first.stdout
    assert results["counts"] == {"in": 12, "out": 12, "stats": 0, "scored": 24}
    assert results["settings"]["recon_factors"] == [0.5] and results["settings"]["t_start"] == [49]
    assert results["cost"] == {"nfe_per_image": 5, "model_calls_per_batch": 5}  # T=100, stride 10: 49, 39, ..., 9
    assert results["timing"]["images_per_s"] > 0 and results["model"]["timesteps"] == 100
    assert "scoring" in first.stderr  # the progress bar over batches

    rows = read_csv(a / "scores.csv")
    assert list(rows[0]) == ["set", "index", "recon_error", "score"]  # one column per statistic the score has
    assert [r["set"] for r in rows] == ["in"] * 12 + ["out"] * 12
    assert [int(r["index"]) for r in rows[:12]] == list(range(12))
    assert all(float(r["score"]) == float(r["recon_error"]) > 0 for r in rows)
    recomputed = ood_metrics([float(r["score"]) for r in rows[:12]], [float(r["score"]) for r in rows[12:]])
    assert recomputed["auroc"] == pytest.approx(results["auroc"])
    for png in ("histogram.png", "roc.png"):
        with Image.open(a / png) as img:
            assert img.format == "PNG" and img.size[0] >= 500


@pytest.mark.slow
def test_same_command_same_scores_and_no_silent_overwrite(trained_pipeline, first_run, tmp_path):
    a = Path(shutil.copytree(first_run[0], tmp_path / "a"))  # the fixture's folder stays as it was
    args = ["--checkpoint", trained_pipeline, *E2E_ARGS]
    results = json.loads((a / "ood_results.json").read_text())
    b = tmp_path / "b"
    run_script("ood_ddpm.py", *args, "--output_dir", b)
    assert (a / "scores.csv").read_text() == (b / "scores.csv").read_text()  # same command, same scores
    for name in ("auroc", "fpr95", "fpr95_in_positive", "aupr_in", "aupr_out"):
        assert results[name] == json.loads((b / "ood_results.json").read_text())[name]

    # A rerun into the same folder refuses to overwrite; another seed gives other scores.
    with pytest.raises(UsageError, match="already holds OOD results.*--overwrite_output_dir"):
        ood_main.__wrapped__([*map(str, args), "--output_dir", str(a)])
    assert json.loads((a / "ood_results.json").read_text()) == results
    ood_main([*map(str, args), "--seed", "4", "--output_dir", str(a), "--overwrite_output_dir"])
    assert (a / "scores.csv").read_text() != (b / "scores.csv").read_text()


@pytest.mark.slow
def test_multi_level_with_lpips_in_process(trained_pipeline, tmp_path, monkeypatch, capsys):
    import ddpm_hf.ood.scoring as ood

    monkeypatch.setattr(ood, "load_lpips", lambda device="cpu": load_lpips(pnet_rand=True))
    monkeypatch.setattr("ddpm_hf.commands.ood.require_lpips_weights", lambda: None)  # random AlexNet: no weights
    ood_main(
        [
            "--checkpoint",
            str(trained_pipeline),
            *OFFLINE_SETS,
            "--max_samples",
            "6",
            "--batch_size",
            "16",
            "--sample_timesteps",
            "10",
            "--recon_factors",
            "0.2",
            "0.5",
            "--stats_samples",
            "5",
            "--lpips",
            "--recon_draws",
            "2",
            "--output_dir",
            str(tmp_path),
        ]
    )
    report = capsys.readouterr().out
    results = json.loads((tmp_path / "ood_results.json").read_text())
    assert results["counts"] == {"in": 6, "out": 6, "stats": 5, "scored": 17}
    assert [lv["recon_factor"] for lv in results["per_level"]] == [0.2, 0.5]
    assert [lv["steps"] for lv in results["per_level"]] == [2, 5]
    assert results["cost"] == {"nfe_per_image": 14, "model_calls_per_batch": 5}  # 2 draws x (2 + 5) steps
    assert (
        results["score"]
        == "mean z-score of the huber reconstruction error and LPIPS at recon_factors 0.2 0.5, each the mean of "
        "2 noise draws"
    )
    assert "recon_factor 0.2" in report and "recon_factor 0.5" in report
    rows = read_csv(tmp_path / "scores.csv")
    assert list(rows[0]) == ["set", "index", "recon_error@0.2", "lpips@0.2", "recon_error@0.5", "lpips@0.5", "score"]
    assert len(rows) == 12 and all(float(r["lpips@0.5"]) > 0 for r in rows)
    # The final score is the mean z-score: in-distribution images average near 0, not near the raw errors.
    assert abs(np.mean([float(r["score"]) for r in rows[:6]])) < 3


# ---- channel and size mismatches -----------------------------------------------------------


def test_gray_model_against_an_rgb_folder_of_another_size(tmp_path, capsys):
    model = random_pipeline(tmp_path / "gray16", channels=1, size=16)
    folder = image_folder(tmp_path / "rgb24", 5, 24)
    ood_main(
        [
            "--checkpoint",
            str(model),
            "--dataset",
            "mnist5k",
            "--out_dataset",
            str(folder),
            "--max_samples",
            "4",
            "--sample_timesteps",
            "10",
            "--output_dir",
            str(tmp_path / "res"),
        ]
    )
    err = capsys.readouterr().err
    assert f"OOD set {folder} has 3-channel images; converted to grayscale for the 1-channel model" in err
    assert f"OOD set {folder} has 24 px images; shrunk to the model's 16 px" in err
    assert "in-distribution set mnist5k has 28 px images; shrunk to the model's 16 px" in err
    results = json.loads((tmp_path / "res" / "ood_results.json").read_text())
    assert results["counts"]["out"] == 4 and results["model"]["channels"] == 1


@pytest.mark.slow
def test_rgb_model_against_gray_data_and_stats_never_scored(tmp_path, capsys):
    """A flat folder has one split: the statistics images must be the ones not evaluated."""
    model = random_pipeline(tmp_path / "rgb16", channels=3, size=16)
    folder = image_folder(tmp_path / "rgb12", 10, 12)
    ood_main(
        [
            "--checkpoint",
            str(model),
            "--dataset",
            str(folder),
            "--out_dataset",
            "mnist5k",
            "--max_samples",
            "6",
            "--sample_timesteps",
            "10",
            "--recon_factors",
            "0.3",
            "0.6",
            "--stats_samples",
            "50",
            "--output_dir",
            str(tmp_path / "res"),
        ]
    )
    err = capsys.readouterr().err
    assert "OOD set mnist5k has 1-channel images; grayscale repeated to RGB for the 3-channel model" in err
    assert f"in-distribution set {folder} has 12 px images; enlarged to the model's 16 px" in err
    results = json.loads((tmp_path / "res" / "ood_results.json").read_text())
    assert results["counts"] == {"in": 6, "out": 6, "stats": 4, "scored": 16}


def test_latent_model_scores_in_pixel_space():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        sample_size=16,
    ).eval()
    config = make_noise_scheduler(100, 1e-4, 0.02).config
    loaded = LoadedModel(random_unet(channels=4, size=8), dict(config), vae)
    assert model_format(loaded) == (3, 16)
    sampler, levels = plan_levels([0.5], config, 10)
    scorer = Scorer(loaded, levels, sampler, OODSettings(batch_size=4))
    with tqdm(disable=True) as bar:
        scores = scorer.score(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8), "out", bar)
    assert scores["recon_error"].shape == (1, 3) and (scores["recon_error"] > 0).all()


def test_bad_settings_fail_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="recon_factors must all be in"):
        ood_main.__wrapped__(["--checkpoint", "x", "--recon_factors", "0.5", "1.5"])
    with pytest.raises(DDPMError, match="stats_samples must be at least 2"):
        ood_main.__wrapped__(["--checkpoint", "x", "--stats_samples", "1"])
