"""The fast paths of docs/performance.md compute what the plain paths compute: bf16
autocast, the fused optimiser, the lerp EMA, the batch-indexed loader, --streaming (split across
processes with split_dataset_by_node) and the shipped Accelerate configs. No timing here:
benchmarks/run.py measures speed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_MODEL
from diffusers import DDIMPipeline, DiffusionPipeline, UNet2DModel
from diffusers.training_utils import EMAModel
from PIL import Image

from ddpm_hf.config.options import DDPMConfig
from ddpm_hf.config.sections import DataSettings, Sections, validate
from ddpm_hf.data.images import StreamingBatches, batch_loader, stream_images
from ddpm_hf.diffusion.sampling import make_noise_scheduler, make_sampler, sample_batch
from ddpm_hf.models.unet import unet_kwargs
from ddpm_hf.training.ema import PlainEMA
from ddpm_hf.training.steps import diffusion_loss, make_optimizer
from ddpm_hf.util.errors import UsageError
from ddpm_hf.util.precision import inference_autocast

TINY = DDPMConfig(
    model_channels=32,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_resolutions=[2],
    num_head_channels=32,
    timesteps=100,
)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(**unet_kwargs(Sections.of(TINY).model, 1, 16))  # random init: non-zero outputs and gradients


def test_bf16_step_runs_and_matches_fp32_loosely():
    unet, scheduler = tiny_unet(), make_noise_scheduler(100, 1e-4, 0.02)
    x0 = torch.rand(8, 1, 16, 16) * 2 - 1
    losses, grads = {}, {}
    for name, autocast in (("fp32", None), ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        torch.manual_seed(1)  # the same noise and timesteps for both
        unet.zero_grad()
        loss = (
            diffusion_loss(unet, scheduler, x0, TINY.loss_type, autocast=autocast)
            if autocast
            else diffusion_loss(unet, scheduler, x0)
        )
        loss.backward()
        losses[name], grads[name] = loss.item(), torch.cat([p.grad.flatten() for p in unet.parameters()])
    assert losses["fp32"] > 0 and abs(losses["bf16"] - losses["fp32"]) < 0.02 * losses["fp32"]
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cosine > 0.99


def test_diffusion_loss_draws_noise_then_timesteps_as_the_trainer_did():
    """The extracted function keeps the trainer's RNG order (exact resume compares losses)."""
    unet, scheduler = tiny_unet(), make_noise_scheduler(100, 1e-4, 0.02)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    torch.manual_seed(3)
    loss = diffusion_loss(unet, scheduler, x0)  # huber, the seed default
    torch.manual_seed(3)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 100, (4,))
    expected = torch.nn.functional.smooth_l1_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
    assert torch.allclose(loss, expected)


def test_plain_ema_lerp_is_the_original_rule():
    unet = tiny_unet()
    ema = PlainEMA(unet.parameters(), decay=0.9, min_decay=0.9, use_ema_warmup=False, foreach=True)
    stock = EMAModel(unet.parameters(), decay=0.9, min_decay=0.9, use_ema_warmup=False)
    stock.get_decay = lambda step: 0.9  # the same rule from step 1
    expected = [p.detach().clone() for p in unet.parameters()]
    for _ in range(3):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.step(unet.parameters())
        stock.step(unet.parameters())
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, unet.parameters())]
    assert ema.optimization_step == 3 and ema.cur_decay_value == 0.9
    for s, t, e in zip(ema.shadow_params, stock.shadow_params, expected):
        assert torch.allclose(s, e, atol=1e-6) and torch.allclose(s, t, atol=1e-6)


def test_fused_adamw_on_cpu_matches_foreach():
    a, b = tiny_unet(), tiny_unet()
    fused = make_optimizer(a.parameters(), TINY.lr, TINY.decay)
    assert fused.defaults["fused"] is True
    foreach = torch.optim.AdamW(b.parameters(), lr=TINY.lr, weight_decay=TINY.decay, foreach=True)
    for step in range(3):
        torch.manual_seed(step)
        grads = [torch.randn_like(p) for p in a.parameters()]
        for model, opt in ((a, fused), (b, foreach)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


def test_batch_loader_serves_a_tensor_datasets_batches():
    images = torch.randint(0, 256, (300, 1, 4, 4), dtype=torch.uint8)
    plain = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    ours = list(batch_loader(images, 64, seed=5))
    assert len(ours) == 5 and ours[-1][0].shape == (44, 1, 4, 4)
    assert all(torch.equal(p, q) for (p,), (q,) in zip(ours, plain))


def test_bf16_sampling_is_close_to_fp32():
    unet = tiny_unet().eval()
    sampler = make_sampler("ddim", make_noise_scheduler(100, 1e-4, 0.02).config)
    fp32 = sample_batch(unet, sampler, 2, 5, 0.0, torch.Generator().manual_seed(0))
    with inference_autocast("bf16", "cpu"):
        bf16 = sample_batch(unet, sampler, 2, 5, 0.0, torch.Generator().manual_seed(0))
    assert bf16.dtype == torch.float32 and 0 < (bf16 - fp32).abs().max() < 0.1


@pytest.fixture
def image_folder(tmp_path):
    """12 gray 8x10 PNGs, image i filled with the value 20 * i (so a pixel names its image)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((8, 10), 20 * i, np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def ids(stream):
    return [int(ex["pixels"][0, 0, 0]) // 20 for ex in stream.dataset]


def test_streaming_splits_a_shuffled_stream_across_processes(image_folder):
    data = DataSettings(dataset=str(image_folder), streaming=True, shuffle_buffer_size=4)
    parts = [stream_images(str(image_folder), data, 0, rank, 2) for rank in (0, 1)]
    assert (parts[0].channels, parts[0].size) == (1, 8)  # the first image's format; shorter side, centre crop
    first, second = ids(parts[0]), ids(parts[1])
    assert sorted(first + second) == list(range(12)) and not set(first) & set(second)
    whole = stream_images(str(image_folder), data, 0, 0, 1)
    assert ids(whole) == ids(stream_images(str(image_folder), data, 0, 0, 1))  # seeded: the same order every time
    assert sorted(ids(whole)) == list(range(12)) and ids(whole) != list(range(12))  # buffer-shuffled
    assert ex_shape(whole) == (1, 8, 8)


def ex_shape(stream):
    return next(iter(stream.dataset))["pixels"].shape


def test_streaming_batches_cycle_the_stream_and_skip_on_resume(image_folder):
    data = DataSettings(dataset=str(image_folder), streaming=True, shuffle_buffer_size=4)
    batches = StreamingBatches(stream_images(str(image_folder), data), batch_size=5, num_batches=4)
    batches.set_epoch(0)
    sizes = [b.shape[0] for (b,) in batches]
    assert sizes == [5, 5, 2, 5] and batches.passes == 1  # a pass of 12 images ends in a partial batch; the next begins
    batches.set_epoch(1)
    assert len(list(batches)) == 4
    resumed = StreamingBatches(stream_images(str(image_folder), data), batch_size=5, num_batches=4)
    resumed.set_epoch(1)
    assert len(list(resumed.skip(3))) == 1 and resumed.passes > 1  # resumed on a reshuffled stream, not replayed


def test_streaming_needs_max_train_steps_and_no_latent_cache():
    with pytest.raises(UsageError, match="--max_train_steps"):
        validate(DDPMConfig(streaming=True))
    with pytest.raises(UsageError, match="--cache_latents"):
        validate(DDPMConfig(streaming=True, max_train_steps=10, cache_latents=True))


ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 2 and config.distributed_type in ("MULTI_GPU", "DEEPSPEED")
    assert {p.name for p in ACCELERATE_CONFIGS} >= {"multi_cpu.yaml", "multi_node_gpu.yaml", "deepspeed_zero2.yaml"}


@pytest.mark.slow
def test_streaming_training_with_two_processes(tmp_path):
    """`accelerate launch --config_file configs/accelerate/multi_cpu.yaml`: two gloo processes, each
    streaming its half of mnist5k; the result is a standard pipeline."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs/accelerate/multi_cpu.yaml"),
        str(REPO / "train_ddpm.py"),
        "--dataset",
        "mnist5k",
        "--streaming",
        "--max_train_samples",
        "128",
        "--shuffle_buffer_size",
        "64",
        "--batch_size",
        "16",
        "--max_train_steps",
        "4",
        "--n_epochs",
        "2",
        "--timesteps",
        "100",
        "--sample_timesteps",
        "5",
        "--num_samples",
        "2",
        "--no_wandb",
        "--logging_steps",
        "2",
        "--checkpointing_steps",
        "4",
        "--output_dir",
        str(out),
        *TINY_MODEL,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "streamed images of 1x16x16" in proc.stdout
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and [r["epoch"] for r in log] == [0, 1]  # 2 virtual epochs of 2 steps
    assert (out / "checkpoints" / "checkpoint-4" / "random_states_1.pkl").exists()  # two processes
    assert isinstance(DiffusionPipeline.from_pretrained(out), DDIMPipeline)


def test_mixed_precision_auto_follows_native_bf16(monkeypatch):
    from ddpm_hf.util import precision

    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        assert precision.resolve_mixed_precision("auto", "cpu") == expected
        assert precision.resolve_mixed_precision("fp16", "cpu") == "fp16"  # explicit choices pass through
        assert precision.resolve_mixed_precision(None, "cpu") is None
    monkeypatch.undo()
    with precision.inference_autocast("auto", "cpu"):
        # under the real check: bf16 autocast exactly where this CPU computes bf16 natively
        assert torch.is_autocast_enabled("cpu") == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_explicit_bf16_on_a_device_without_it_gives_one_notice_with_the_measured_slowdown(monkeypatch, caplog):
    from ddpm_hf.util import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    monkeypatch.setattr(precision, "bf16_slowdown", lambda device: 6.42)
    precision.warn_if_bf16_emulated("bf16", "cpu")
    notices = caplog.messages
    assert (
        len(notices) == 1
        and notices[0].startswith("notice: --mixed_precision bf16 is emulated here")
        and "6.4x slower than fp32" in notices[0]
    )
    caplog.clear()
    for quiet in ("auto", "no", None):
        precision.warn_if_bf16_emulated(quiet, "cpu")
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    precision.warn_if_bf16_emulated("bf16", "cpu")
    assert caplog.messages == []
    monkeypatch.undo()
    assert precision.bf16_slowdown("cpu") > 0  # the real measurement: a positive ratio


def test_ood_scores_under_bf16_stay_close_to_fp32():
    from types import SimpleNamespace

    from ddpm_hf.ood.scoring import Scorer, plan_levels
    from ddpm_hf.ood.settings import OODSettings

    unet = tiny_unet().eval()
    sc = dict(make_noise_scheduler(100, 1e-4, 0.02).config)
    loaded = SimpleNamespace(unet=unet, vae=None, train_config={}, scheduler_config=sc)
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    scores = {}
    for precision in ("no", "bf16"):
        cfg = OODSettings(sample_timesteps=10, eta=0.0, batch_size=6, mixed_precision=precision)
        sampler, levels = plan_levels([0.5], sc, cfg.sample_timesteps)
        scores[precision] = Scorer(loaded, levels, sampler, cfg).score_batch(images, torch.Generator().manual_seed(0))[
            "recon_error"
        ]
    assert scores["bf16"].dtype == torch.float64 and scores["bf16"].shape == (1, 6)
    rel = ((scores["bf16"] - scores["no"]).abs() / scores["no"]).max()
    assert 0 < rel < 0.05  # autocast really ran (not bitwise equal), and moved no score by 5%
