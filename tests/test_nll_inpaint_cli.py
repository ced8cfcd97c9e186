"""sample_ddpm.py --nll / --inpaint and ood_ddpm.py --score: outputs, determinism, bad values.

A tiny random pipeline (T = 20, 16 px) keeps every run to seconds; what the numbers mean is
tested against exact answers in test_likelihood.py."""

import json
import types

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image
from test_ood import random_pipeline, read_csv

from ddpm_hf.config.options import FIELDS
from ddpm_hf.config.sections import DataSettings
from ddpm_hf.diffusion.inpaint import make_masks
from ddpm_hf.diffusion.likelihood import refuse_latent
from ddpm_hf.diffusion.prediction import to_epsilon, to_x0
from ddpm_hf.ood.scoring import ood_metrics
from ddpm_hf.util.errors import UsageError
from ood_ddpm import main as ood_main
from sample_ddpm import main as sample_main

NEW_FLAGS = (
    "nll",
    "nll_timesteps",
    "score",
    "inpaint",
    "mask",
    "jump_length",
    "jump_n_sample",
    "fid_feature_extractor",
    "dinov2_model",
)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return random_pipeline(tmp_path_factory.mktemp("random") / "pipe", timesteps=20)


def test_every_new_flag_has_help_and_a_default():
    from ddpm_hf.config.options import DDPMConfig

    defaults = DDPMConfig()
    for name in NEW_FLAGS:
        assert len(FIELDS[name].metadata["help"]) > 20
    assert (defaults.nll, defaults.nll_timesteps, defaults.score, defaults.inpaint) == (False, None, "recon", False)
    assert (defaults.mask, defaults.jump_length, defaults.jump_n_sample) == ("random_box", 10, 10)
    assert (defaults.fid_feature_extractor, defaults.dinov2_model) == ("inception", "facebook/dinov2-base")


def test_prediction_type_conversions_round_trip():
    x0, eps, a = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3), torch.tensor([0.9, 0.5, 0.1, 0.01])
    ab = a.view(-1, 1, 1, 1)
    x_t, v = ab.sqrt() * x0 + (1 - ab).sqrt() * eps, ab.sqrt() * eps - (1 - ab).sqrt() * x0
    for kind, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        torch.testing.assert_close(to_x0(out, x_t, a, kind), x0)
        torch.testing.assert_close(to_epsilon(out, x_t, a, kind), eps, atol=1e-4, rtol=1e-4)


def test_nll_json_exact_and_subsampled(pipe, tmp_path):
    base = ["--checkpoint", str(pipe), "--nll", "--dataset", "mnist5k", "--num_samples", "6", "--batch_size", "6"]
    sample_main([*base, "--output_dir", str(tmp_path / "exact")])
    exact = json.loads((tmp_path / "exact" / "nll.json").read_text())
    assert exact["exact"] and exact["T"] == exact["timesteps_evaluated"] == 20 and exact["num_images"] == 6
    assert len(exact["bpd"]) == 6 and exact["timestep_se_mean"] == 0 and len(exact["terms_bpd_mean"]) == 20
    assert exact["bpd_mean"] == pytest.approx(sum(exact["terms_bpd_mean"]) + exact["prior_bpd_mean"])
    assert exact["decoder_bpd_mean"] == pytest.approx(exact["terms_bpd_mean"][0])
    sample_main([*base, "--nll_timesteps", "5", "--output_dir", str(tmp_path / "k5")])
    sample_main([*base, "--nll_timesteps", "5", "--output_dir", str(tmp_path / "k5b")])
    k5 = json.loads((tmp_path / "k5" / "nll.json").read_text())
    assert not k5["exact"] and k5["timesteps_evaluated"] == 5 and k5["timestep_se_mean"] > 0
    assert k5["bpd"] == json.loads((tmp_path / "k5b" / "nll.json").read_text())["bpd"]  # seeded
    assert abs(k5["bpd_mean"] - exact["bpd_mean"]) < 5 * k5["timestep_se_mean"] + 5 * exact["bpd_mean_se"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nll", "--nll_timesteps", "2"], "at least 3"),
        (["--nll", "--nll_timesteps", "21"], "between 3 .* T = 20"),
        (["--nll", "--fid"], "pass only one of them"),
        (["--inpaint", "--nll"], "pass only one of them"),
        (["--inpaint", "--mask", "triangle"], "--mask must be one of"),
        (["--inpaint", "--jump_length", "0"], "--jump_length must be a positive integer"),
        (["--inpaint", "--jump_n_sample", "-1"], "--jump_n_sample must be a positive integer"),
    ],
)
def test_bad_values_fail_in_one_line(pipe, args, message):
    with pytest.raises(UsageError, match=message):
        sample_main.__wrapped__(["--checkpoint", str(pipe), "--dataset", "mnist5k", *args])


def test_bad_values_exit_2_from_the_scripts(pipe):
    for script, args in (
        ("sample_ddpm.py", ["--nll", "--nll_timesteps", "1"]),
        ("ood_ddpm.py", ["--score", "likelihood"]),
        ("sample_ddpm.py", ["--inpaint", "--mask", "nope.png"]),
    ):
        proc = run_script(script, "--checkpoint", pipe, *args, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:")


def test_latent_models_are_refused():
    with pytest.raises(UsageError, match="--inpaint needs a pixel-space model; m is a latent model"):
        refuse_latent(types.SimpleNamespace(vae=object(), source="m"), "--inpaint")


def test_ood_score_nll_and_both(pipe, tmp_path):
    base = [
        "--checkpoint",
        str(pipe),
        "--dataset",
        "mnist5k",
        "--out_dataset",
        "animalmnist",
        "--max_samples",
        "6",
        "--batch_size",
        "6",
        "--sample_timesteps",
        "10",
        "--nll_timesteps",
        "4",
        "--stats_samples",
        "6",
    ]
    ood_main([*base, "--score", "nll", "--output_dir", str(tmp_path / "nll")])
    ood_main([*base, "--score", "both", "--output_dir", str(tmp_path / "both")])
    ood_main([*base, "--output_dir", str(tmp_path / "recon")])
    nll, both = (json.loads((tmp_path / d / "ood_results.json").read_text()) for d in ("nll", "both"))
    recon = json.loads((tmp_path / "recon" / "ood_results.json").read_text())
    # nll is the bound alone; both reports its parts next to itself
    assert "per_score" not in nll and set(both["per_score"]) == {"recon", "nll", "both"}
    assert both["auroc"] == both["per_score"]["both"]["auroc"] and nll["cost"]["nfe_per_image"] == 4
    assert both["per_score"]["recon"]["auroc"] == recon["auroc"]  # the reconstruction part is today's score
    assert set(both["likelihood"]["sets"]) == {"in", "out", "stats"} and both["counts"]["stats"] == 6
    assert "per_score" not in recon and recon["settings"]["score"] == "recon" and both["settings"]["score"] == "both"
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == [
        "histogram.png",
        "ood_results.json",
        "roc.png",
        "scores.csv",
    ]
    rows = read_csv(tmp_path / "nll" / "scores.csv")
    assert list(rows[0]) == ["set", "index", "nll_bpd", "nll_se", "score"]
    assert all(float(r["score"]) == float(r["nll_bpd"]) for r in rows)

    def scores(s):
        return [float(r["nll_bpd"]) for r in rows if r["set"] == s]

    assert ood_metrics(scores("in"), scores("out"))["auroc"] == pytest.approx(nll["auroc"])
    # the same images, noise and timesteps give the same bits/dim in both runs
    assert [r["nll_bpd"] for r in read_csv(tmp_path / "both" / "scores.csv")] == [r["nll_bpd"] for r in rows]


def test_masks():
    left, centre = make_masks("left_half", 2, 8, 0), make_masks("center", 1, 8, 0)
    assert left.shape == (2, 1, 8, 8) and left[..., :4].sum() == 0 and left[..., 4:].min() == 1
    assert centre[0, 0, 2:6, 2:6].sum() == 0 and centre.sum() == 64 - 16
    boxes = make_masks("random_box", 6, 16, 3)
    assert torch.equal(boxes, make_masks("random_box", 6, 16, 3)) and not torch.equal(
        boxes, make_masks("random_box", 6, 16, 4)
    )
    holes = (1 - boxes).flatten(1).sum(1)
    assert (holes >= 16).all() and (holes <= 64).all() and len(set(holes.tolist())) > 1


def test_inpaint_outputs_keep_the_known_pixels(pipe, tmp_path):
    mask = np.full((16, 16), 255, np.uint8)
    mask[4:12, :8] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")
    args = [
        "--checkpoint",
        str(pipe),
        "--inpaint",
        "--dataset",
        "mnist5k",
        "--num_samples",
        "3",
        "--batch_size",
        "2",
        "--mask",
        str(tmp_path / "mask.png"),
        "--sample_timesteps",
        "10",
        "--jump_length",
        "2",
        "--jump_n_sample",
        "2",
    ]
    sample_main([*args, "--output_dir", str(tmp_path / "a")])
    sample_main([*args, "--output_dir", str(tmp_path / "b")])
    a = tmp_path / "a"
    assert {"inpaint_grid.png", "inpaint.json", "inpainted_0.png", "mask_2.png"} <= {p.name for p in a.iterdir()}
    info = json.loads((a / "inpaint.json").read_text())
    assert info["num_images"] == 3 and info["model_calls_per_batch"] == 10 + 4 * 2 and len(info["hole_mse"]) == 3
    from ddpm_hf.data.images import load_images

    originals = load_images("mnist5k", "test", DataSettings(), size=16, channels=1, limit=3, progress=False).images
    for i in range(3):
        out = np.asarray(Image.open(a / f"inpainted_{i}.png"))
        assert np.array_equal(out, np.asarray(Image.open(tmp_path / "b" / f"inpainted_{i}.png")))  # seeded
        keep = mask >= 128
        assert (
            np.abs(out[keep].astype(int) - originals[i, 0].numpy()[keep]).max() <= 1
        )  # RePaint keeps the known region
        assert np.array_equal(np.asarray(Image.open(a / f"mask_{i}.png")) >= 128, keep)
    with Image.open(a / "inpaint_grid.png") as grid:
        assert grid.size == (3 * 18 + 2, 3 * 18 + 2)  # 3 columns, rows original | masked | inpainted
