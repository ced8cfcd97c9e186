"""Interleaved timing (A B A B ...): ratios that survive a shared, noisy machine.

Each arm is called in turn, round after round, so a burst of load from other processes hits all
arms alike; a speed-up is the ratio of the arms' median times, with its min-max over rounds
(pairs). Wall and CPU seconds are both kept: on a loaded machine the CPU-time ratio is the
steadier one (threads wait less for a core than the wall clock does).
"""

import multiprocessing
import statistics
import sys
import time
import traceback

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed_call(fn, device="cpu") -> tuple:
    """(wall, CPU) seconds of one call of `fn`, in this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _serve(conn, factory, args, kwargs) -> None:
    """A ProcessArm's worker: build the arm, then time one call per request until told to stop."""
    try:
        arm = factory(*args, **kwargs)
        conn.send(("ready", None))
        while conn.recv() == "run":
            conn.send(("times", timed_call(arm, kwargs.get("device", "cpu"))))
    except Exception:  # the parent raises it with the worker's traceback
        conn.send(("error", traceback.format_exc()))


class ProcessArm:
    """An arm built by `factory(*args, **kwargs)` and run in a worker process of its own (spawned),
    so process-wide settings (the allocator, threads) and memory apply to that arm alone, as when
    its program runs; interleave() asks it for one call at a time while the other arms wait."""

    def __init__(self, factory, *args, **kwargs):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, factory, args, kwargs), daemon=True)
        self.process.start()
        self._reply()

    def _reply(self):
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"benchmark worker failed:\n{value}")
        return value

    def timed(self) -> tuple:
        """(wall, CPU) seconds of one call, measured in the worker."""
        self.conn.send("run")
        return self._reply()

    def __call__(self):
        self.timed()

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send("stop")
            self.process.join(timeout=30)


def interleave(arms: dict, rounds: int, warmup: int = 1, device="cpu", label: str = "") -> dict:
    """{arm: {"wall": [s, ...], "cpu": [s, ...]}} of `rounds` calls of every arm, in turn, after
    `warmup` each (a ProcessArm is timed in its worker: its own CPU time, not this process's)."""
    for fn in arms.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: {"wall": [], "cpu": []} for name in arms}
    for r in range(rounds):
        for name, fn in arms.items():
            wall, cpu = fn.timed() if isinstance(fn, ProcessArm) else timed_call(fn, device)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
        log(f"{label} round {r + 1}/{rounds}: " + ", ".join(f"{n} {t['wall'][-1]:.2f}s" for n, t in times.items()))
    return times


def rate(times: dict, work: float) -> dict:
    """Work per second (images, image-steps): at the median, best and worst wall time, and by CPU time."""
    wall, cpu = times["wall"], times["cpu"]
    return dict(
        median=round(work / statistics.median(wall), 3),
        best=round(work / min(wall), 3),
        worst=round(work / max(wall), 3),
        cpu_median=round(work / statistics.median(cpu), 3),
        rounds=len(wall),
    )


def speedup(ours: dict, base: dict) -> dict:
    """How many times faster `ours` is than `base` (same work per call): ratio of median wall times,
    min-max of the per-round (pair) ratios, and the ratio of median CPU times."""
    pairs = [b / o for b, o in zip(base["wall"], ours["wall"])]
    return dict(
        ratio_of_medians=round(statistics.median(base["wall"]) / statistics.median(ours["wall"]), 3),
        pair_min=round(min(pairs), 3),
        pair_max=round(max(pairs), 3),
        cpu_time_ratio=round(statistics.median(base["cpu"]) / statistics.median(ours["cpu"]), 3),
    )
