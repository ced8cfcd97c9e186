"""The decoded training images on disk (ddpm_hf/data/cache.py): peak memory and training speed.

    .venv/bin/python benchmarks/data_cache.py --json benchmarks/results/data_cache.json

Memory: train_ddpm.py (tiny UNet without attention, 64 px RGB, batch 32, --max_train_steps 5) on folders of 10,000 and
100,000 synthetic PNGs, each run in its own process, twice per folder: the first run decodes the
folder into the cache, the second reuses it. The peak RSS of each run (os.wait4's ru_maxrss) should
not grow with the dataset: target 100k within 10 % of 10k. For contrast, `load_images` (the in-memory
tensor, what training used before) on the 10,000 images, in its own process.
Speed: the Trainer's step (Trainer.for_step) on the mapped cache against the in-memory tensor of the
same 10,000 images, interleaved one step at a time in one process: target within 5 %; and the loader
alone (shuffled epochs normalised to [-1, 1], 3 per arm, interleaved; the median).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
TINY = ["--model_channels", "32", "--channel_mult", "1", "2", "--num_res_blocks", "1", "--attention_resolutions", "4"]


def write_pngs(args) -> None:
    import numpy as np
    from PIL import Image

    folder, start, stop = args
    for i in range(start, stop):
        base = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth, distinct images
        Image.fromarray(base).resize((SIZE, SIZE), Image.BILINEAR).save(folder / f"{i:06d}.png", compress_level=1)


def make_folder(folder: Path, n: int) -> float:
    start = time.perf_counter()
    folder.mkdir(parents=True)
    step = 5000
    with Pool(2) as pool:
        pool.map(write_pngs, [(folder, i, min(i + step, n)) for i in range(0, n, step)])
    return round(time.perf_counter() - start, 1)


def peak_rss_run(cmd, env, log: Path) -> dict:
    """Run `cmd`; its peak RSS (ru_maxrss, MB) and wall time."""
    start = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[1]} exited {proc.returncode}: {log.read_text()[-1500:]}")
    return dict(peak_rss_mb=round(usage.ru_maxrss / 1024, 1), seconds=round(time.perf_counter() - start, 1))


def train_run(folder: Path, scratch: Path, env, tag: str) -> dict:
    cmd = [
        sys.executable,
        str(REPO / "train_ddpm.py"),
        "--dataset",
        str(folder),
        "--size",
        str(SIZE),
        "--channels",
        "3",
        *TINY,
        "--batch_size",
        "32",
        "--timesteps",
        "100",
        "--sample_timesteps",
        "4",
        "--num_samples",
        "4",
        "--max_train_steps",
        "5",
        "--sample_and_save_freq",
        "100000",
        "--no_wandb",
        "--cache_dir",
        str(scratch / "image_cache"),
        "--output_dir",
        str(scratch / f"run_{tag}"),
    ]
    return peak_rss_run(cmd, env, scratch / f"{tag}.stderr.txt")


IN_MEMORY = """
import sys
from ddpm_hf.config.options import DDPMConfig
from ddpm_hf.data.images import load_images
images = load_images(sys.argv[1], "train", DataSettings(dataset=sys.argv[1]), 64, 3, progress=False).images
print(images.shape)
"""


def memory_section(scratch: Path, sizes, env) -> dict:
    out = {}
    for n in sizes:
        folder = scratch / f"pngs_{n}"
        entry = dict(images=n, write_pngs_seconds=make_folder(folder, n))
        entry["first_run_builds_cache"] = train_run(folder, scratch, env, f"{n}_build")
        entry["second_run_reuses_cache"] = train_run(folder, scratch, env, f"{n}_reuse")
        cache = next((scratch / "image_cache").glob(f"pngs-{n}_*.u8"))
        entry["cache_file_mb"] = round(cache.stat().st_size / 2**20, 1)
        out[str(n)] = entry
        print(json.dumps({n: entry}), file=sys.stderr)
    small = scratch / f"pngs_{sizes[0]}"
    cmd = [sys.executable, "-c", IN_MEMORY, str(small)]
    out[f"in_memory_load_images_{sizes[0]}"] = peak_rss_run(cmd, env, scratch / "in_memory.stderr.txt")
    first, last = out[str(sizes[0])], out[str(sizes[-1])]
    for run in ("first_run_builds_cache", "second_run_reuses_cache"):
        ratio = last[run]["peak_rss_mb"] / first[run]["peak_rss_mb"]
        out[f"peak_rss_ratio_{sizes[-1]}_vs_{sizes[0]}_{run}"] = round(ratio, 3)
    return out


def speed_section(folder: Path, scratch: Path, steps: int) -> dict:
    import torch
    from accelerate import Accelerator

    from ddpm_hf.config.options import DDPMConfig
    from ddpm_hf.config.sections import validate
    from ddpm_hf.data.cache import cached_images
    from ddpm_hf.data.images import batch_loader, load_images, to_model_range
    from ddpm_hf.models.unet import build_unet
    from ddpm_hf.training.checkpoints import TrainerState
    from ddpm_hf.training.parts import PART_SECTIONS, build_parts
    from ddpm_hf.training.train_step import after_update, model_input, train_step

    cfg = DDPMConfig(
        dataset=str(folder),
        size=SIZE,
        channels=3,
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[4],
        batch_size=32,
        timesteps=100,
        sample_timesteps=10,
        max_train_steps=10**6,
        cache_dir=str(scratch / "image_cache"),
    )
    sections = validate(cfg)
    arms = {
        "cache": cached_images(str(folder), "train", sections.data, progress=False).images,
        "in_memory": load_images(str(folder), "train", sections.data, progress=False).images,
    }
    assert torch.equal(arms["cache"], arms["in_memory"])
    loader_seconds = {name: [] for name in arms}
    for epoch in range(3):  # the loader alone: shuffled epochs normalised as the step does, interleaved
        for name, images in arms.items():
            start = time.perf_counter()
            for (batch,) in batch_loader(images, 32, seed=epoch):
                to_model_range(batch)
            loader_seconds[name].append(time.perf_counter() - start)
    loader_seconds = {name: statistics.median(t) for name, t in loader_seconds.items()}
    parts, states, batches, times = {}, {}, {}, {name: [] for name in arms}
    for name, images in arms.items():
        torch.manual_seed(0)
        unet = build_unet(sections.model, 3, SIZE)
        parts[name] = build_parts(Accelerator(cpu=True), unet, images, **sections.pick(*PART_SECTIONS))
        parts[name].unet.train()
        states[name] = TrainerState.on(parts[name].accelerator.device)
        batches[name] = iter(parts[name].loader)
    for step in range(steps + 2):  # interleaved one step at a time (the Trainer's step); two warm-up steps
        for name, part in parts.items():
            (batch,) = next(batches[name])
            start = time.perf_counter()
            flags = train_step(part, states[name], model_input(part, batch))
            if flags[0] == 0 and part.accelerator.sync_gradients:
                after_update(part, states[name])
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    rate = {name: round(32 / statistics.median(t), 1) for name, t in times.items()}
    n = len(arms["cache"])
    return dict(
        images=n,
        steps_per_arm=steps,
        train_img_per_s_median=rate,
        train_cache_vs_in_memory=round(rate["cache"] / rate["in_memory"], 3),
        loader_epoch_img_per_s={name: round(n / s, 0) for name, s in loader_seconds.items()},
        loader_cache_vs_in_memory=round(loader_seconds["in_memory"] / loader_seconds["cache"], 3),
    )


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    rows = info.read_text().splitlines() if info.exists() else []
    return next((r.split(":", 1)[1].strip() for r in rows if r.startswith("model name")), platform.processor())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--speed_steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="ddpm-hf-data-cache-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.update(HF_HOME=str(scratch / "hf_home"), HF_DATASETS_CACHE=str(scratch / "datasets_cache"))
    os.environ.update(env)
    sys.path.insert(0, str(REPO))
    doc = dict(
        command="python benchmarks/data_cache.py " + " ".join(sys.argv[1:]),
        machine=dict(
            cpu=cpu_name(),
            cores=os.cpu_count(),
            load_average_start=[round(x, 2) for x in os.getloadavg()],
            note="shared with other jobs",
        ),
    )
    doc["memory"] = memory_section(scratch, args.sizes, env)
    doc["speed"] = speed_section(scratch / f"pngs_{args.sizes[0]}", scratch, args.speed_steps)
    doc["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["targets"] = dict(
        peak_rss_within_10_percent=all(v <= 1.10 for k, v in doc["memory"].items() if k.startswith("peak_rss_ratio")),
        train_speed_within_5_percent=doc["speed"]["train_cache_vs_in_memory"] >= 0.95,
    )
    text = json.dumps(doc, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    subprocess.run(["rm", "-rf", str(scratch)], check=False)


if __name__ == "__main__":
    main()
