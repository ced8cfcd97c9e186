"""The training options beyond the original (schedules, prediction types, clipping, EMA warm-up): each
changes what it should, and the saved pipeline carries it."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, run_script
from diffusers import DDIMPipeline, DiffusionPipeline, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

from ddpm_hf.config.options import DDPMConfig
from ddpm_hf.config.sections import TrainingSettings
from ddpm_hf.diffusion.losses import min_snr_weights, prediction_target
from ddpm_hf.diffusion.sampling import make_noise_scheduler, make_sampler, noise_scheduler_from_config, sample_batch
from ddpm_hf.models.pipeline import save_pipeline
from ddpm_hf.training.ema import make_ema
from ddpm_hf.training.steps import diffusion_loss, make_lr_scheduler, random_hflip


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def test_prediction_targets():
    x0, noise, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 50, 99])
    for kind, expected in [("epsilon", noise), ("sample", x0)]:
        assert torch.equal(
            prediction_target(make_noise_scheduler(100, 1e-4, 0.02, prediction_type=kind), x0, noise, t), expected
        )
    sched = make_noise_scheduler(100, 1e-4, 0.02, prediction_type="v_prediction")
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(prediction_target(sched, x0, noise, t), a * noise - s * x0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_follow_the_paper(kind):
    sched = make_noise_scheduler(300, 1e-4, 0.02, prediction_type=kind)
    t = torch.arange(0, 300, 7)
    snr = compute_snr(sched, t)
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[kind]
    torch.testing.assert_close(min_snr_weights(sched, t, 5.0), expected)
    # High-SNR (small t) steps are down-weighted for noise prediction; low-SNR ones keep weight 1.
    if kind == "epsilon":
        assert min_snr_weights(sched, t, 5.0)[0] < 0.01 and min_snr_weights(sched, t, 5.0)[-1] == 1


def test_snr_weighted_loss_is_the_weighted_per_image_loss():
    unet, sched = _tiny_unet(), make_noise_scheduler(100, 1e-4, 0.02, prediction_type="v_prediction")
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    cfg = DDPMConfig(loss_type="l2", snr_gamma=5.0)
    torch.manual_seed(1)
    loss = diffusion_loss(unet, sched, x0, cfg.loss_type, cfg.snr_gamma)
    torch.manual_seed(1)  # the same draws, by hand
    noise = torch.randn_like(x0)
    t = torch.randint(0, 100, (6,))
    with torch.no_grad():
        pred = unet(sched.add_noise(x0, noise, t), t).sample
    per_image = ((pred - sched.get_velocity(x0, noise, t)) ** 2).flatten(1).mean(1)
    snr = compute_snr(sched, t)
    torch.testing.assert_close(loss.detach(), (per_image * torch.clamp(snr, max=5.0) / (snr + 1)).mean())
    torch.manual_seed(1)
    unweighted = diffusion_loss(unet, sched, x0, "l2")
    torch.testing.assert_close(unweighted.detach(), per_image.mean())


def test_beta_schedules_differ_and_cosine_reaches_near_zero_signal():
    linear = make_noise_scheduler(300, 1e-4, 0.02)
    cosine = make_noise_scheduler(300, 1e-4, 0.02, beta_schedule="squaredcos_cap_v2")
    scaled = make_noise_scheduler(300, 1e-4, 0.02, beta_schedule="scaled_linear")
    assert linear.alphas_cumprod[-1] > 0.04  # the seed's T=300 keeps ~22 % of the signal at t = T-1
    assert cosine.alphas_cumprod[-1] < 1e-4
    assert not torch.allclose(linear.betas, scaled.betas)
    assert noise_scheduler_from_config(cosine.config).config.beta_schedule == "squaredcos_cap_v2"


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_stock_pipeline_samples_a_saved_model_like_our_loop(tmp_path, kind):
    """prediction type, schedule and clipping travel in the saved scheduler config: stock DDIMPipeline,
    loaded with no custom code, gives the images of our own sampling loop."""
    noise = make_noise_scheduler(100, 1e-4, 0.02, "squaredcos_cap_v2", kind, clip_sample=True)
    save_pipeline(tmp_path, _tiny_unet().eval(), make_sampler("ddim", noise.config), DDPMConfig().to_dict())
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe, DDIMPipeline)
    assert (pipe.scheduler.config.prediction_type, pipe.scheduler.config.beta_schedule) == (kind, "squaredcos_cap_v2")
    assert pipe.scheduler.config.clip_sample
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(
        batch_size=2, num_inference_steps=8, eta=0.0, generator=torch.Generator().manual_seed(3), output_type="np"
    ).images
    ours = sample_batch(
        pipe.unet, make_sampler("ddim", pipe.scheduler.config), 2, 8, 0.0, torch.Generator().manual_seed(3)
    )
    np.testing.assert_allclose((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), stock, atol=1e-5)


def test_ema_warmup_follows_diffusers_rule_and_constant_decay_stays_the_default():
    unet = _tiny_unet()
    constant = make_ema(unet, 0.99)
    warm = make_ema(unet, 0.99, warmup=True, inv_gamma=1.0, power=0.75)
    decays = {"constant": [], "warm": []}
    for _ in range(6):
        for name, ema in (("constant", constant), ("warm", warm)):
            ema.step(unet.parameters())
            decays[name].append(ema.cur_decay_value)
    assert decays["constant"] == [0.99] * 6
    expected = [0.0] + [min(1 - (1 + s) ** -0.75, 0.99) for s in range(1, 6)]
    assert decays["warm"] == pytest.approx(expected)


def test_lr_schedulers():
    def curve(cfg, total=20, per_epoch=4):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched = make_lr_scheduler(opt, cfg.lr_scheduler, cfg.lr, total, cfg.lr_warmup(per_epoch))
        lrs = []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = get_scheduler("cosine", opt, num_warmup_steps=5, num_training_steps=20)
    expected = []
    for _ in range(20):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        reference.step()
    assert curve(TrainingSettings(lr=1e-3, lr_scheduler="cosine", lr_warmup_steps=5)) == pytest.approx(expected)
    assert curve(TrainingSettings(lr=1e-3, lr_scheduler="constant")) == pytest.approx([1e-3] * 20)
    # one_cycle: OneCycleLR peaks at the last step of the warm-up, --warmup epochs (2 x 4 steps) or --lr_warmup_steps.
    assert int(np.argmax(curve(TrainingSettings(lr=1e-3, warmup=2)))) == 7
    assert int(np.argmax(curve(TrainingSettings(lr=1e-3, warmup=2, lr_warmup_steps=3)))) == 2


def test_random_flip_mirrors_about_half_the_images():
    torch.manual_seed(0)
    x = torch.arange(64 * 4, dtype=torch.float32).view(64, 1, 1, 4)
    flipped = random_hflip(x)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert ((flipped == x).flatten(1).all(1) | mirrored).all() and 16 < mirrored.sum() < 48


def test_training_with_every_option_saves_a_pipeline_that_carries_them(tmp_path):
    out = tmp_path / "run"
    run_script(
        "train_ddpm.py",
        *TINY_TRAIN,
        "--max_train_steps",
        "6",
        "--output_dir",
        out,
        "--prediction_type",
        "v_prediction",
        "--beta_schedule",
        "squaredcos_cap_v2",
        "--snr_gamma",
        "5",
        "--ema_warmup",
        "--max_grad_norm",
        "1.0",
        "--random_flip",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "2",
        "--clip_sample",
    )
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["prediction_type"], sched["beta_schedule"], sched["clip_sample"]) == (
        "v_prediction",
        "squaredcos_cap_v2",
        True,
    )
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["ema"]["use_ema_warmup"] and state["lr_total_steps"] == 6
    lrs = [json.loads(line)["lr"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert lrs[-1] < max(lrs)  # cosine decay after the 2 warm-up steps
    saved = json.loads((out / "ddpm_hf_config.json").read_text())
    assert saved["snr_gamma"] == 5.0 and saved["random_flip"] and saved["max_grad_norm"] == 1.0
    images = DiffusionPipeline.from_pretrained(out)(batch_size=2, num_inference_steps=4, output_type="np").images
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--snr_gamma", "0"], "--snr_gamma must be > 0"),
        (["--max_grad_norm", "-1"], "--max_grad_norm must be > 0"),
        (["--beta_schedule", "quadratic"], "invalid choice: 'quadratic'"),
        (["--lr_scheduler", "step"], "invalid choice: 'step'"),
        (["--prediction_type", "x0"], "invalid choice: 'x0'"),
    ],
)
def test_senseless_values_are_refused_in_one_line(tmp_path, flags, message):
    proc = run_script("train_ddpm.py", *TINY_TRAIN, "--output_dir", tmp_path / "out", *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_original_checkpoint_refuses_another_prediction_type(tmp_path):
    pt = tmp_path / "model.pt"
    torch.save({}, pt)
    proc = run_script(
        "sample_ddpm.py",
        "--checkpoint",
        pt,
        "--prediction_type",
        "sample",
        "--dataset",
        "mnist5k",
        "--output_dir",
        tmp_path / "out",
        check=False,
    )
    assert proc.returncode == 2 and "original .pt checkpoint predicts the noise" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
