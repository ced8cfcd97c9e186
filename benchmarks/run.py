"""Benchmark suite of ddpm-hf on this machine; the last line of its output is one JSON document.

    .venv/bin/python benchmarks/run.py --quick              # ~8 minutes on 2 CPU cores (batches 32 and 128)
    .venv/bin/python benchmarks/run.py --json bench.json    # the full suite (docs/performance.md)
    .venv/bin/python benchmarks/run.py --sections fid --json benchmarks/results/fid_speed.json  # one section

The targets printed (`targets`) are those of the machine: bf16 ones where bf16 is native, fp32 ones
elsewhere. Sections (all on the seed's default model, 1x32x32, 6,469,889 parameters):
  train     ddpm-hf's training step (train_step.py on build_parts: uint8 batches, micro-batches of 32 on
            a CPU, fused AdamW, foreach EMA, host_memory.py's allocator policy) in fp32 (and bf16 where
            native), at batch 32 and the seed's 128, against the original GenerativeZoo step and a naive
            step written as diffusers' train_unconditional.py does it (benchmarks/naive.py); each arm in
            its own worker process (as its program runs), interleaved one step at a time; peak RSS
  sample    `sample_batch` (fp32, bf16 autocast) against a stock `DDIMPipeline` call, interleaved
  ood       `ddpm_hf.ood.scoring.Scorer` for the default single level and a multi-level score
  data      our input pipeline (decoded once, batches normalised) against per-item PIL transforms
  roofline  measured matmul GFLOP/s and the model's FLOPs (torch.utils.flop_counter)
  components  AdamW (default/foreach/fused) and EMA (stock/foreach/lerp) update times
  leak      RSS of the real trainer (train_ddpm.py, tiny model) over --leak_steps steps
  fid       FID feature extraction (ddpm_hf.metrics.fid's fast Inception) against the plain TorchScript on
            torch-fidelity's resize (the code before it), interleaved with fp32 matmuls; Inception's
            FLOPs and the fraction of that roofline reached
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
# naive.py and timing.py sit next to this script (sys.path[0] when run as python benchmarks/run.py).
try:
    import ddpm_hf  # noqa: F401  (installed: pip install -e .)
except ImportError:  # a checkout without the install, run as python benchmarks/run.py from the repo root
    sys.path.insert(0, str(REPO))

# One scratch folder per run, shared with the run's worker processes (timing.ProcessArm).
SCRATCH = Path(os.environ.setdefault("DDPM_HF_BENCH_SCRATCH", tempfile.mkdtemp(prefix="ddpm-hf-bench-")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HF_DATASETS_CACHE"] = str(SCRATCH / "datasets_cache")  # imagefolder caches stay out of ~/.cache

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import DDIMPipeline, UNet2DModel  # noqa: E402
from naive import NaiveStep, OriginalStep, per_item_loader  # noqa: E402
from timing import ProcessArm, interleave, log, rate, speedup, sync  # noqa: E402

from ddpm_hf.config.options import DDPMConfig  # noqa: E402
from ddpm_hf.config.sections import (  # noqa: E402
    DataSettings,  # noqa: E402
    Sections,
    validate,
)
from ddpm_hf.data.images import batch_loader, load_images, to_model_range  # noqa: E402
from ddpm_hf.diffusion.sampling import make_noise_scheduler, make_sampler, sample_batch  # noqa: E402
from ddpm_hf.models.unet import build_unet, count_parameters, unet_kwargs  # noqa: E402
from ddpm_hf.training.checkpoints import TrainerState  # noqa: E402
from ddpm_hf.training.ema import PlainEMA  # noqa: E402
from ddpm_hf.training.parts import CPU_MICRO_BATCH, PART_SECTIONS, build_parts  # noqa: E402
from ddpm_hf.training.train_step import after_update, model_input, train_step  # noqa: E402
from ddpm_hf.util import host_memory  # noqa: E402
from ddpm_hf.util.precision import inference_autocast, native_bf16  # noqa: E402

QUICK = dict(
    train_batches=[32, 128],
    train_rounds=2,
    sample_batches=[16],
    sample_steps=3,
    sample_rounds=2,
    ood_images=8,
    ood_sample_timesteps=30,
    data_rounds=2,
    matmul_n=1024,
    component_rounds=5,
    leak_steps=0,
    fid_batch=16,
    fid_rounds=2,
    fid_inputs=["1x28"],
)
FULL = dict(
    train_batches=[32, 128],
    train_rounds=4,
    sample_batches=[16, 128],
    sample_steps=5,
    sample_rounds=3,
    ood_images=8,
    ood_sample_timesteps=300,
    data_rounds=3,
    matmul_n=2048,
    component_rounds=10,
    leak_steps=1000,
    fid_batch=64,
    fid_rounds=5,
    fid_inputs=["1x28", "3x32"],
)
MULTI_LEVEL = [0.1, 0.2, 0.3, 0.4, 0.5]


# ---- machine -------------------------------------------------------------------------------


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def rss_mb(field: str = "VmRSS", pid="self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def machine(device, threads) -> dict:
    name = (
        next(
            (
                row.split(":", 1)[1].strip()
                for row in Path("/proc/cpuinfo").read_text().splitlines()
                if row.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    info = dict(
        cpu=name,
        cores=os.cpu_count(),
        threads=threads,
        device=str(device),
        torch=torch.__version__,
        bf16=native_bf16(device),
        cpu_bf16_flags=sorted({"avx512_bf16", "amx_bf16", "amx_tile"} & cpu_flags()),
        load_average_start=[round(x, 2) for x in os.getloadavg()],
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---- models and data ---------------------------------------------------------------------


def seed_model(cfg, init="original") -> UNet2DModel:
    """The seed's default UNet; `init="random"` skips the original's zero init (non-trivial outputs for sampling)."""
    torch.manual_seed(0)
    model = Sections.of(cfg).model
    return build_unet(model, 1, 32) if init == "original" else UNet2DModel(**unet_kwargs(model, 1, 32))


class Inputs:
    """The 5,000 mnist5k digits (28 px) written once as PNG files, as a folder or Hub dataset delivers
    them; `decoded()` is our pipeline's one-time decode of them to uint8 32 px (timed), `png_dataset()`
    the `datasets` view that the per-item baseline transforms."""

    def __init__(self, cfg, written: bool = False):
        """`written`: the PNG files are already there (a worker process of the same run)."""
        import datasets

        datasets.disable_progress_bars()
        self.cfg, self.folder = cfg, SCRATCH / "mnist5k_png"
        if not written:
            self._write()
        self.count, self._decoded, self.decode_seconds = len(list(self.folder.glob("*.png"))), None, None

    def _write(self) -> None:
        from PIL import Image

        self.folder.mkdir(exist_ok=True)
        raw = torch.cat(
            [
                load_images("mnist5k", split, Sections.of(self.cfg).data, size=28, channels=1, progress=False).images
                for split in ("train", "test")
            ]
        )
        for i, a in enumerate(raw):
            Image.fromarray(a[0].numpy()).save(self.folder / f"{i:05d}.png")

    def png_dataset(self):
        import datasets

        return datasets.load_dataset("imagefolder", data_dir=str(self.folder), split="train")

    def decoded(self) -> torch.Tensor:
        if self._decoded is None:
            start = time.perf_counter()
            data = Sections.of(self.cfg).data
            self._decoded = load_images(str(self.folder), "train", data, size=32, channels=1, progress=False).images
            self.decode_seconds = time.perf_counter() - start
        return self._decoded


class OurStep:
    """ddpm-hf's training step, the Trainer's own: the parts `build_parts` makes for `images` and the
    step of train_step.py (uint8 batch -> `to_model_range`, `diffusion_loss` under the autocast of
    `precision`, backward, fused AdamW, then `after_update`: the one-cycle LR, the foreach EMA). One
    Accelerator per process, so the bf16 arms enter their own autocast, as Accelerate's does under
    --mixed_precision bf16."""

    def __init__(self, unet, images: torch.Tensor, cfg: DDPMConfig, precision: str, device, channels_last=False):
        device = torch.device(device)
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        sections = validate(dataclasses.replace(cfg, max_train_steps=10**6))  # the LR schedule never runs out
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
        self.parts = build_parts(accelerator, unet, images, **sections.pick(*PART_SECTIONS))
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        self.parts.autocast = (
            (lambda: torch.autocast(device.type, dtype=dtype)) if precision != "no" else contextlib.nullcontext
        )
        self.parts.unet.train()
        self.channels_last, self.state = channels_last, TrainerState.on(device)
        self.batches = self._endless()

    def _endless(self):
        while True:
            for (batch,) in self.parts.loader:
                yield batch

    def compile(self, mode=None) -> None:
        """torch.compile the UNet (`mode`: torch.compile's, e.g. "max-autotune" or "reduce-overhead")."""
        self.parts.unet = torch.compile(self.parts.unet, mode=mode)

    def __call__(self):
        x0 = model_input(self.parts, next(self.batches))
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        flags = train_step(self.parts, self.state, x0)
        if flags[0] == 0 and self.parts.accelerator.sync_gradients:
            after_update(self.parts, self.state)


# ---- sections ------------------------------------------------------------------------------


def bench_train(cfg, s, device, bf16, args, inputs) -> dict:
    """Every batch size of s["train_batches"]: the original's step, the naive one and ours, interleaved."""
    return {f"batch_{batch}": train_arms(cfg, s, batch, device, bf16, args, inputs) for batch in s["train_batches"]}


def train_arm(
    kind: str,
    batch: int,
    threads: int,
    device: str,
    precision="no",
    micro_batch_size=None,
    channels_last=False,
    compiled=False,
    keep_freed_memory=True,
):
    """One training arm, built in its own worker process (timing.ProcessArm) on the same seeded model:
    "original" and "naive" as their programs run (glibc's allocator as it comes), "ours" as
    train_ddpm.py runs (the Trainer's step, its allocator policy: ddpm_hf/util/host_memory.py)."""
    torch.set_num_threads(threads)
    cfg = DDPMConfig()
    inputs, base = Inputs(cfg, written=True), seed_model(cfg)
    if kind in ("original", "naive"):
        return (OriginalStep if kind == "original" else NaiveStep)(base, inputs.png_dataset(), 32, batch, device=device)
    if keep_freed_memory:  # as train_ddpm.py sets it at its start (commands/common.py start_command)
        host_memory.keep_freed_memory(device)
    step = OurStep(
        base,
        inputs.decoded(),
        DDPMConfig(batch_size=batch, micro_batch_size=micro_batch_size),
        precision,
        device,
        channels_last=channels_last,
    )
    if compiled:
        step.compile()
        step()
        step()  # the backward graph and any recompilation
    return step


def train_arm_plan(batch: int, device, bf16: bool, args) -> dict:
    """{arm name: train_arm keyword arguments} for one batch size."""
    plan = {"original_fp32": dict(kind="original"), "naive_fp32": dict(kind="naive"), "ours_fp32": dict(kind="ours")}
    if batch > CPU_MICRO_BATCH and device.type == "cpu":  # what --micro_batch_size auto replaces
        plan["ours_fp32_one_pass"] = dict(kind="ours", micro_batch_size=0)
    if device.type == "cpu" and args.allocator_arm:  # what ddpm_hf/util/host_memory.py changes
        plan["ours_fp32_glibc_default"] = dict(kind="ours", keep_freed_memory=False)
    precision, name = ("bf16", "ours_bf16") if bf16 else ("no", "ours_fp32")
    if bf16:
        plan[name] = dict(kind="ours", precision=precision)
    if args.channels_last:
        plan[f"{name}_channels_last"] = dict(kind="ours", precision=precision, channels_last=True)
    if args.compile:
        plan[f"{name}_compiled"] = dict(kind="ours", precision=precision, compiled=True)
    return plan


def train_arms(cfg, s, batch, device, bf16, args, inputs) -> dict:
    inputs.decoded()  # the PNG files exist before the workers read them
    log(
        f"train: batch {batch}: starting the arms' worker processes"
        + (" (compiling: minutes on a CPU)" if args.compile else "")
    )
    arms = {
        name: ProcessArm(train_arm, batch=batch, threads=args.threads, device=str(device), **kw)
        for name, kw in train_arm_plan(batch, device, bf16, args).items()
    }
    # The roofline's matmuls run interleaved with the training steps: both see the same machine load.
    matmuls = {
        f"matmul_{name}": matmul_arm(s["matmul_n"], dtype, device)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        if name == "fp32" or bf16
    }
    log(f"train: batch {batch}, arms {', '.join(arms)} (and {', '.join(matmuls)}), each in its own process")
    try:
        # Three warm-up steps each: a fresh process's first steps are slower (the original's took up to
        # 1.7x its later ones while glibc's allocator adapted); the rounds compare steady states.
        times = interleave(
            {**arms, **{k: v[0] for k, v in matmuls.items()}},
            s["train_rounds"],
            warmup=3,
            device=device,
            label=f"train {batch}",
        )
        peak_rss = {name: rss_mb("VmHWM", arm.process.pid) for name, arm in arms.items()}  # data, model, optimiser, EMA
    finally:
        for arm in arms.values():
            arm.close()
    result = {name: rate(times[name], batch) for name in arms}
    result["speedup_vs_original"] = {
        name: speedup(times[name], times["original_fp32"]) for name in arms if name.startswith("ours")
    }
    result["speedup_vs_naive"] = {
        name: speedup(times[name], times["naive_fp32"]) for name in arms if name.startswith("ours")
    }
    result["interleaved_matmul_gflops"] = {name: rate(times[name], flops / 1e9) for name, (_, flops) in matmuls.items()}
    result["peak_rss_mb"] = peak_rss
    result["arms"] = "each in its own worker process, interleaved one step at a time"
    return result


def bench_sample(cfg, s, device, bf16) -> dict:
    unet = seed_model(cfg, init="random").to(device).eval()
    noise_scheduler = make_noise_scheduler(cfg.timesteps, cfg.beta_start, cfg.beta_end)
    pipe = DDIMPipeline(unet=unet, scheduler=make_sampler("ddim", noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    steps, out = s["sample_steps"], {}
    for n in s["sample_batches"]:

        def ours(precision, n=n):
            sampler = make_sampler("ddim", noise_scheduler.config)
            with inference_autocast(precision, device):
                return sample_batch(unet, sampler, n, steps, 1.0, torch.Generator().manual_seed(0))

        arms = {
            "stock_ddim_pipeline": lambda n=n: pipe(
                batch_size=n,
                num_inference_steps=steps,
                eta=1.0,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ),
            "ours_fp32": lambda: ours("no"),
        }
        if bf16:
            arms["ours_bf16"] = lambda: ours("bf16")
        log(f"sample: batch {n}, {steps} DDIM steps")
        times = interleave(arms, s["sample_rounds"], warmup=1, device=device, label=f"sample {n}")
        result = {name: rate(t, n * steps) for name, t in times.items()}
        result["speedup_vs_stock"] = {
            name: speedup(times[name], times["stock_ddim_pipeline"]) for name in arms if name != "stock_ddim_pipeline"
        }
        if bf16:  # same noise: how far bf16 moves the samples (images in [-1, 1])
            result["bf16_max_abs_diff_vs_fp32"] = round(float((ours("bf16") - ours("no")).abs().max()), 4)
        out[f"batch_{n}"] = result
    out["steps"] = steps
    return out


def bench_ood(cfg, s, device, inputs) -> dict:
    from ddpm_hf.ood.scoring import Scorer, plan_levels
    from ddpm_hf.ood.settings import OODSettings

    unet = seed_model(cfg, init="random").to(device).eval()
    rows = []
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    noise_scheduler = make_noise_scheduler(cfg.timesteps, cfg.beta_start, cfg.beta_end)
    loaded = SimpleNamespace(unet=unet, vae=None, train_config={}, scheduler_config=dict(noise_scheduler.config))
    images = inputs.decoded()[: s["ood_images"]]
    ood_cfg = OODSettings(sample_timesteps=s["ood_sample_timesteps"], batch_size=len(images))
    out = dict(images=len(images), sample_timesteps=s["ood_sample_timesteps"], timesteps=cfg.timesteps)
    for name, factors in (("default", ood_cfg.recon_factors), ("multi_level", MULTI_LEVEL)):
        sampler, levels = plan_levels(factors, loaded.scheduler_config, ood_cfg.sample_timesteps)
        scorer = Scorer(loaded, levels, sampler, ood_cfg, device=device)
        rows.clear()
        log(f"ood {name}: recon factors {factors}, {len(images)} images")
        start = time.perf_counter()
        scorer.score_batch(images, torch.Generator().manual_seed(0))
        sync(device)
        elapsed = time.perf_counter() - start
        out[name] = dict(
            recon_factors=factors,
            images_per_sec=round(len(images) / elapsed, 4),
            network_evaluations_per_image=sum(rows) / len(images),
            model_calls_per_batch=len(rows),
            model_calls_if_levels_ran_one_by_one=sum(len(level.timesteps) for level in levels),
        )
    handle.remove()
    return out


def bench_data(cfg, s, inputs) -> dict:
    """Epochs over the 5,000 mnist5k images stored as PNG files (how a Hub or folder dataset arrives)."""
    n, batch = inputs.count, 128
    loader = batch_loader(inputs.decoded(), batch, seed=0)
    baseline = per_item_loader(inputs.png_dataset(), 32, 1, batch)

    def ours_epoch():
        for (b,) in loader:
            to_model_range(b)

    def per_item_epoch():
        for b in baseline:
            b["input"]

    log(f"data: {n} images, batch {batch}")
    times = interleave({"per_item_pil": per_item_epoch, "ours": ours_epoch}, s["data_rounds"], warmup=1, label="data")
    result = {name: rate(t, n) for name, t in times.items()}
    result["speedup_vs_per_item_pil"] = speedup(times["ours"], times["per_item_pil"])
    result["ours_decode_once_seconds"] = round(inputs.decode_seconds, 2)
    result["ours_first_epoch_images_per_sec"] = round(
        n / (inputs.decode_seconds + statistics.median(times["ours"]["wall"])), 1
    )
    result["images"] = n
    return result


def matmul_gflops(n: int, dtype, device, repeats=5) -> dict:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    flops = 2 * n**3
    return dict(best=round(flops / min(times) / 1e9, 1), median=round(flops / statistics.median(times) / 1e9, 1))


def matmul_arm(n: int, dtype, device, seconds: float = 1.0):
    """(a call doing about `seconds` of n x n matmuls, its FLOPs)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    start = time.perf_counter()
    a @ b
    sync(device)
    repeats = max(1, round(seconds / max(time.perf_counter() - start, 1e-4)))

    def run():
        for _ in range(repeats):
            a @ b

    return run, 2 * n**3 * repeats


def model_flops(cfg, device) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    unet = seed_model(cfg).to(device)
    x, t = torch.randn(2, 1, 32, 32, device=device), torch.randint(0, cfg.timesteps, (2,), device=device)
    with FlopCounterMode(display=False) as counter:
        unet(x, t).sample.sum().backward()
    train = counter.get_total_flops() / 2
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t)
    return dict(train_flops_per_image=int(train), inference_flops_per_image=int(counter.get_total_flops() / 2))


def bench_components(cfg, s, device) -> dict:
    """Update times of the optimiser and the EMA over the default model's parameters."""
    from diffusers.training_utils import EMAModel

    base = seed_model(cfg).to(device)
    for p in base.parameters():
        p.data.normal_(0, 0.02)
    models = {k: copy.deepcopy(base) for k in ("default", "foreach", "fused")}
    kinds = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opts = {k: torch.optim.AdamW(models[k].parameters(), lr=1e-3, weight_decay=1e-5, **kinds[k]) for k in models}
    for m in models.values():
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    params = list(base.parameters())
    emas = {
        "ema_stock": EMAModel(params, decay=0.999),
        "ema_stock_foreach": EMAModel(params, decay=0.999, foreach=True),
        "ema_ours_lerp": PlainEMA(params, decay=0.999, min_decay=0.999, use_ema_warmup=False),
    }
    for e in emas.values():
        e.to(device)
    arms = {f"adamw_{k}": (lambda k=k: opts[k].step()) for k in opts}
    arms.update({k: (lambda e=e: e.step(params)) for k, e in emas.items()})
    times = interleave(arms, s["component_rounds"], warmup=1, device=device, label="components")
    return {
        k: dict(
            median_ms=round(1000 * statistics.median(t["wall"]), 2),
            best_ms=round(1000 * min(t["wall"]), 2),
            cpu_median_ms=round(1000 * statistics.median(t["cpu"]), 2),
        )
        for k, t in times.items()
    }


def bench_leak(steps: int, threads: int) -> dict:
    """RSS of train_ddpm.py (tiny model, mnist5k) sampled at every logged step of a `steps`-step run."""
    out = SCRATCH / "leak_run"
    log_every = max(steps // 40, 1)
    cmd = [
        sys.executable,
        str(REPO / "train_ddpm.py"),
        "--dataset",
        "mnist5k",
        "--max_train_samples",
        "512",
        "--batch_size",
        "32",
        "--size",
        "16",
        "--model_channels",
        "32",
        "--channel_mult",
        "1",
        "2",
        "--num_res_blocks",
        "1",
        "--attention_resolutions",
        "2",
        "--timesteps",
        "100",
        "--sample_timesteps",
        "10",
        "--num_samples",
        "4",
        "--max_train_steps",
        str(steps),
        "--logging_steps",
        str(log_every),
        "--checkpointing_steps",
        str(max(steps // 2, 1)),
        "--sample_and_save_freq",
        "100000",
        "--no_wandb",
        "--output_dir",
        str(out),
        "--overwrite_output_dir",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    log(f"leak: train_ddpm.py, tiny model, {steps} steps")
    errors = SCRATCH / "leak_stderr.txt"  # a file, not a pipe: a full pipe would stall the trainer
    with errors.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
    samples, log_path = {}, out / "train_log.jsonl"
    while proc.poll() is None:
        try:
            lines = log_path.read_text().splitlines() if log_path.exists() else []
            step = json.loads(lines[-1])["step"] if lines else 0
            value = rss_mb(pid=proc.pid)
            if value == value:  # not NaN: the process still has memory to report
                samples[step] = value
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.2)
    if proc.returncode != 0:
        return dict(error=f"train_ddpm.py exited {proc.returncode}: {errors.read_text()[-500:]}")
    warm = max(steps // 10, log_every)  # RSS after the first 10% of steps is the reference
    after = {k: v for k, v in samples.items() if k >= warm}
    reference = after[min(after)]
    growth = max(after.values()) / reference - 1
    return dict(
        steps=steps,
        warmup_steps=warm,
        rss_mb_at_warmup=reference,
        rss_mb_max_after=max(after.values()),
        rss_mb_last=after[max(after)],
        growth_after_warmup=round(growth, 4),
        flat_within_5_percent=growth <= 0.05,
        samples={str(k): v for k, v in sorted(samples.items())},
    )


def fid_inputs(shape: str, n: int) -> torch.Tensor:
    """n uint8 images: mnist5k digits for "1x28" (FID's main use here), seeded noise otherwise
    (Inception's cost does not depend on the pixels)."""
    channels, size = map(int, shape.split("x"))
    if (channels, size) == (1, 28):
        return load_images("mnist5k", "test", DataSettings(), size=28, channels=1, limit=n, progress=False).images
    return torch.randint(
        0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def bench_fid(s, device) -> dict:
    """One batch of FID features per call, `ours` (InceptionFeatures.forward) and `old`
    (InceptionFeatures.plain), interleaved with ~1 s of fp32 matmuls for the roofline."""
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm_hf.metrics.fid import INPUT_SIZE, load_feature_extractor

    extractor = load_feature_extractor(None, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.jit.optimized_execution(False):
        extractor.net(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, device=device))
    flops = counter.get_total_flops()
    matmul, matmul_flops = matmul_arm(s["matmul_n"], torch.float32, device)
    n, out = s["fid_batch"], dict(batch=s["fid_batch"], inception_flops_per_image=flops, matmul_n=s["matmul_n"])
    for shape in s["fid_inputs"]:
        images, last = fid_inputs(shape, n).to(device), {}
        arms = {
            "old": lambda last=last, images=images: last.__setitem__("old", extractor.plain(images)),
            "ours": lambda last=last, images=images: last.__setitem__("ours", extractor(images)),
            "matmul_fp32": matmul,
        }
        log(f"fid: {n} images {shape}, old and ours")
        times = interleave(arms, s["fid_rounds"], warmup=1, device=device, label=f"fid {shape}")
        result = {name: rate(times[name], n) for name in ("old", "ours")}
        result["speedup_vs_old"] = speedup(times["ours"], times["old"])
        result["max_abs_feature_diff"] = float((last["ours"] - last["old"]).abs().max())
        peak = rate(times["matmul_fp32"], matmul_flops / 1e9)
        result["interleaved_matmul_gflops_fp32"] = peak
        for name in ("old", "ours"):  # by wall and by CPU time against the matmuls of the same rounds
            result[f"{name}_gflops"] = round(result[name]["median"] * flops / 1e9, 1)
            result[f"{name}_fraction_of_roofline"] = round(result[name]["median"] * flops / 1e9 / peak["median"], 3)
            result[f"{name}_fraction_of_roofline_cpu_time"] = round(
                result[name]["cpu_median"] * flops / 1e9 / peak["cpu_median"], 3
            )
        out[shape] = result
    return out


# ---- main ----------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="few rounds, batches 32 and 128: ~8 minutes on 2 CPU cores"
    )
    parser.add_argument("--json", help="also write the JSON document to this file")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for every arm")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sections", nargs="+", default=["train", "sample", "ood", "data", "roofline", "components", "leak", "fid"]
    )
    parser.add_argument("--train_batches", type=int, nargs="+", help="override the training batch sizes")
    parser.add_argument("--train_rounds", type=int, help="override the number of interleaved training rounds")
    parser.add_argument("--leak_steps", type=int, help="steps of the leak run (0: skip)")
    parser.add_argument("--fid_batch", type=int, help="override the FID section's images per call")
    parser.add_argument("--fid_rounds", type=int, help="override the FID section's interleaved rounds")
    parser.add_argument("--channels_last", action="store_true", help="add a channels_last training arm")
    parser.add_argument(
        "--compile", action="store_true", help="add a torch.compile training arm (compiles for minutes on a CPU)"
    )
    parser.add_argument(
        "--allocator_arm",
        action="store_true",
        help="add a training arm with glibc's allocator as it comes (DDPM_HF_KEEP_FREED_MEMORY=0)",
    )
    args = parser.parse_args()

    started = time.time()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    s = dict(QUICK if args.quick else FULL)
    for key in ("train_batches", "train_rounds", "leak_steps", "fid_batch", "fid_rounds"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    cfg = DDPMConfig()
    bf16 = native_bf16(device)  # the rule of --mixed_precision auto
    doc = dict(
        machine=machine(device, args.threads),
        settings=dict(quick=args.quick, **s),
        model=dict(shape="1x32x32", parameters=count_parameters(seed_model(cfg))),
    )
    sections = set(args.sections)
    inputs = Inputs(cfg) if sections & {"train", "ood", "data"} else None
    if "train" in sections:
        doc["train_images_per_sec"] = bench_train(cfg, s, device, bf16, args, inputs)
    if "sample" in sections:
        doc["sample_image_steps_per_sec"] = bench_sample(cfg, s, device, bf16)
    if "ood" in sections:
        doc["ood_images_per_sec"] = bench_ood(cfg, s, device, inputs)
    if "data" in sections:
        doc["data_images_per_sec"] = bench_data(cfg, s, inputs)
    if "roofline" in sections:
        log("roofline: matmul and model FLOPs")
        roof = dict(matmul_n=s["matmul_n"], matmul_gflops_fp32=matmul_gflops(s["matmul_n"], torch.float32, device))
        if bf16:
            roof["matmul_gflops_bf16"] = matmul_gflops(s["matmul_n"], torch.bfloat16, device)
        roof.update(model_flops(cfg, device))
        for batch_name, train in doc.get("train_images_per_sec", {}).items():
            if isinstance(train, dict):
                roof.update(roofline_fractions(train, roof, batch_name))
        doc["roofline"] = roof
    if "components" in sections:
        doc["components"] = bench_components(cfg, s, device)
    if "leak" in sections and s["leak_steps"]:
        doc["memory_leak"] = bench_leak(s["leak_steps"], args.threads)
    if "fid" in sections:
        doc["fid_images_per_sec"] = bench_fid(s, device)
    doc["targets"] = targets(doc)
    doc["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["seconds"] = round(time.time() - started, 1)
    text = json.dumps(doc)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(text)


def roofline_fractions(train: dict, roof: dict, batch_name: str) -> dict:
    """Each arm's GFLOP/s and fraction of the roofline: against the matmuls interleaved with the steps
    (same load), by wall and by CPU time, and the best step against the best standalone matmul."""
    interleaved, out = train.get("interleaved_matmul_gflops", {}), {}
    flops = roof["train_flops_per_image"] / 1e9
    for arm, figures in train.items():
        if not isinstance(figures, dict) or "median" not in figures or arm.startswith("matmul"):
            continue
        kind = "bf16" if "bf16" in arm else "fp32"
        peak = interleaved.get(f"matmul_{kind}", roof[f"matmul_gflops_{kind}"])
        key = f"{batch_name}_{arm}"
        out[f"{key}_gflops"] = round(figures["median"] * flops, 1)
        out[f"{key}_fraction_of_roofline"] = round(figures["median"] * flops / peak["median"], 3)
        if "cpu_median" in peak:
            out[f"{key}_fraction_of_roofline_cpu_time"] = round(figures["cpu_median"] * flops / peak["cpu_median"], 3)
        out[f"{key}_fraction_of_roofline_best"] = round(
            figures["best"] * flops / roof[f"matmul_gflops_{kind}"]["best"], 3
        )
    return out


def targets(doc) -> dict:
    """The issue's targets, checked against this run (None: not measured)."""

    def get(*keys):
        node = doc
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node

    bf16 = get("machine", "bf16")
    seed_batch = "batch_128"  # the seed's default batch, where the fp32 loss showed
    bf16_train = get("train_images_per_sec", seed_batch, "speedup_vs_naive", "ours_bf16", "ratio_of_medians")
    fp32_train = get("train_images_per_sec", seed_batch, "speedup_vs_original", "ours_fp32", "ratio_of_medians")
    samples = [
        v["speedup_vs_stock"].get("ours_bf16" if bf16 else "ours_fp32", {}).get("ratio_of_medians")
        for k, v in (get("sample_image_steps_per_sec") or {}).items()
        if isinstance(v, dict)
    ]
    data = get("data_images_per_sec", "speedup_vs_per_item_pil", "ratio_of_medians")
    leak = get("memory_leak", "flat_within_5_percent")
    fid = get("fid_images_per_sec", "1x28", "speedup_vs_old", "ratio_of_medians")
    check = lambda value, bound: None if value is None else value >= bound  # noqa: E731
    common = {
        "data_vs_per_item_pil_>=10": check(data, 10.0),
        "rss_flat_within_5%": leak,
        "fid_features_1x28_vs_old_>=3": check(fid, 3.0),
    }
    if bf16:  # the targets of a machine that computes bf16 natively (AVX512-BF16/AMX, Ampere+)
        roof = get("roofline", f"{seed_batch}_ours_bf16_fraction_of_roofline")
        return {
            "machine": "native bf16",
            "train_bf16_vs_naive_>=2.0": check(bf16_train, 2.0),
            "train_bf16_>=70%_of_bf16_matmul_roofline": check(roof, 0.7),
            "sample_bf16_vs_stock_>=1.5_every_batch": None
            if not samples or None in samples
            else all(v >= 1.5 for v in samples),
            **common,
        }
    return {
        "machine": "no native bf16: fp32 targets",
        "train_fp32_vs_original_>=1.3_at_batch_128": check(fp32_train, 1.3),
        "sample_fp32_vs_stock_>=1.0_every_batch": None
        if not samples or None in samples
        else all(v >= 1.0 for v in samples),
        **common,
    }


if __name__ == "__main__":
    main()
