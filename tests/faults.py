"""Fault injection for the tests, from outside the library: the library reads no test variable, so a
variable left in a user's shell can never kill or corrupt a real run.

    python tests/faults.py [FAULTS] -- SCRIPT ARGS...   (conftest.run_script(..., faults=[...]))
    faults.install(parse(FAULTS))                        (a forked row of test_bad_inputs.py's harness)

patches the library's collaborators (os.replace, os.fdopen, Accelerate's save_state, diffusers'
save_pretrained, the Trainer's step hooks) in this process, then runs SCRIPT as `python SCRIPT ARGS`
would. FAULTS:

  --nan_at_step N           the loss of optimiser step N is NaN (once)
  --kill_at_step N          SIGKILL after optimiser step N (its checkpoint and log line written)
  --kill_during_save N      SIGKILL halfway through saving checkpoint N (Accelerate's files written,
                            not the trainer's nor the manifest)
  --sigterm_at_final_save   a SIGTERM as the final save starts
  --disk_full POINT[:N]     the N-th write (default the first) at POINT fails with ENOSPC after part
                            of it is on disk, as a full disk would. POINTs: log, config, checkpoint,
                            pipeline, grid, png, fid_origin, fid_json, ood_results.
"""

import argparse
import errno
import functools
import itertools
import os
import re
import runpy
import signal
import sys
from pathlib import Path

ATOMIC_TMP = re.compile(r"^\..+\.\d+\.tmp$")  # util/files.py atomic_write's temporary names: .NAME.PID.tmp
EPOCH_GRID = re.compile(r"^epoch_\d+\.png$")  # training's sample grids (training/monitoring.py)


def full_disk() -> OSError:
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (simulated by tests/faults.py)")


def kill_self(sig=signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


def wrap(owner, name, make):
    """Replace `owner.name` by `make(original)`."""
    original = getattr(owner, name)
    setattr(owner, name, functools.wraps(original)(make(original)))


def nth_call(nth: int):
    """A predicate true on its `nth` call only."""
    calls = itertools.count(1)
    return lambda: next(calls) == nth


# ---- the training loop ---------------------------------------------------------------------------------


def nan_at_step(step: int) -> None:
    """train_step.collective_flags sees the loss of the batch for step global_step + 1 (Trainer.run_step
    notes which step that is): make it NaN once (with --skip_nonfinite_steps the same step number comes
    again, this time finite)."""
    from ddpm_hf.training import train_step
    from ddpm_hf.training.trainer import Trainer

    fired, current = [], {}

    def make_run_step(original):
        def run_step(self, batch, stop=None):
            current["step"] = self.state.global_step + 1
            return original(self, batch, stop)

        return run_step

    def make_flags(original):
        def flags(accelerator, loss, stop_requested):
            if not fired and current.get("step") == step:
                fired.append(step)
                loss = loss * float("nan")
            return original(accelerator, loss, stop_requested)

        return flags

    wrap(Trainer, "run_step", make_run_step)
    wrap(train_step, "collective_flags", make_flags)


def kill_at_step(step: int) -> None:
    """After end_of_step of optimiser step `step` (its log line and checkpoint written), unless a
    signal stopped the run there."""
    from ddpm_hf.training.trainer import Trainer

    def make(original):
        def end_of_step(self, stop):
            stopped = original(self, stop)
            if not stopped and self.state.global_step == step:
                kill_self()
            return stopped

        return end_of_step

    wrap(Trainer, "end_of_step", make)


def sigterm_at_final_save() -> None:
    """As the final save's StopRequest(final=True) takes the signals: the save must finish first."""
    from ddpm_hf.training.trainer import StopRequest

    def make(original):
        def enter(self):
            entered = original(self)
            if self.final:
                kill_self(signal.SIGTERM)
            return entered

        return enter

    wrap(StopRequest, "__enter__", make)


def after_save_state(action) -> None:
    """`action(folder)` once Accelerate's save_state has written a checkpoint's files into `folder`
    (checkpoints.save_checkpoint then adds the trainer's files and the manifest)."""
    from accelerate import Accelerator

    def make(original):
        def save_state(self, output_dir=None, *args, **kwargs):
            saved = original(self, output_dir, *args, **kwargs)
            action(Path(output_dir))
            return saved

        return save_state

    wrap(Accelerator, "save_state", make)


def kill_during_save(step: int) -> None:
    def action(folder):
        if folder.name == f"checkpoint-{step}.partial":
            kill_self()

    after_save_state(action)


# ---- a full disk ------------------------------------------------------------------------------------------


def _is_grid(dst: Path) -> bool:
    return dst.name == "grid.png" or bool(EPOCH_GRID.match(dst.name))


# The renames that end a write at each point: atomic_write renames its temporary file over the final
# name; the OOD results are moved out of their staging folder (commands/ood.py).
RENAME_POINTS = {
    "config": lambda src, dst: ATOMIC_TMP.match(src.name) and dst.name == "train_config.json",
    "grid": lambda src, dst: ATOMIC_TMP.match(src.name) and _is_grid(dst),
    "png": lambda src, dst: ATOMIC_TMP.match(src.name) and dst.suffix == ".png" and not _is_grid(dst),
    "fid_origin": lambda src, dst: ATOMIC_TMP.match(src.name) and dst.name == "fid_origin.json",
    "fid_json": lambda src, dst: ATOMIC_TMP.match(src.name) and dst.name == "fid.json",
    "ood_results": lambda src, dst: src.parent.name == ".ood_results.partial",
}


def fail_rename(point: str, fire) -> None:
    """The file is written under its temporary name; the rename into place fails, as a full disk fails
    the write's last block."""
    matches = RENAME_POINTS[point]

    def make(original):
        def replace(src, dst, *args, **kwargs):
            if matches(Path(os.fsdecode(src)), Path(os.fsdecode(dst))) and fire():
                raise full_disk()
            return original(src, dst, *args, **kwargs)

        return replace

    wrap(os, "replace", make)


class HalfWrittenFile:
    """A text file whose first write puts half its text on disk, then fails with ENOSPC."""

    def __init__(self, file):
        self.file = file

    def write(self, text):
        self.file.write(text[: len(text) // 2])
        self.file.flush()
        raise full_disk()

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fail_log_append(fire) -> None:
    """files.append_line opens train_log.jsonl with open_own and writes through os.fdopen."""

    def make(original):
        def fdopen(fd, *args, **kwargs):
            file = original(fd, *args, **kwargs)
            name = Path(os.readlink(f"/proc/self/fd/{fd}")).name if isinstance(fd, int) else ""
            return HalfWrittenFile(file) if name == "train_log.jsonl" and fire() else file

        return fdopen

    wrap(os, "fdopen", make)


def fail_checkpoint(fire) -> None:
    """Accelerate's files are written, then the disk is full."""

    def action(folder):
        if fire():
            raise full_disk()

    after_save_state(action)


def fail_pipeline(fire) -> None:
    """diffusers' save_pretrained writes the whole pipeline into training's partial folder
    (training/output.py save_pipeline_atomically), then the disk is full."""
    from diffusers import DiffusionPipeline

    def make(original):
        def save_pretrained(self, save_directory, *args, **kwargs):
            saved = original(self, save_directory, *args, **kwargs)
            if Path(save_directory).name == ".pipeline.partial" and fire():
                raise full_disk()
            return saved

        return save_pretrained

    wrap(DiffusionPipeline, "save_pretrained", make)


def disk_full(spec: str) -> None:
    point, _, nth = spec.partition(":")
    fire = nth_call(int(nth or 1))
    if point == "log":
        fail_log_append(fire)
    elif point == "checkpoint":
        fail_checkpoint(fire)
    elif point == "pipeline":
        fail_pipeline(fire)
    elif point in RENAME_POINTS:
        fail_rename(point, fire)
    else:
        raise SystemExit(f"faults.py: unknown --disk_full point {point!r}")


# ---- the command line --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="faults.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--nan_at_step", type=int)
    p.add_argument("--kill_at_step", type=int)
    p.add_argument("--kill_during_save", type=int)
    p.add_argument("--sigterm_at_final_save", action="store_true")
    p.add_argument("--disk_full")
    return p


def parse(args) -> argparse.Namespace:
    return parser().parse_args([str(a) for a in args])


def install(faults: argparse.Namespace) -> None:
    """Patch this process for `faults` (what parse() returns)."""
    if faults.nan_at_step is not None:
        nan_at_step(faults.nan_at_step)
    if faults.kill_at_step is not None:
        kill_at_step(faults.kill_at_step)
    if faults.kill_during_save is not None:
        kill_during_save(faults.kill_during_save)
    if faults.sigterm_at_final_save:
        sigterm_at_final_save()
    if faults.disk_full:
        disk_full(faults.disk_full)


def main(argv) -> None:
    split = argv.index("--") if "--" in argv else len(argv)
    faults, (script, *args) = parse(argv[:split]), argv[split + 1 :]
    sys.path[0] = str(Path(script).resolve().parent)  # as `python SCRIPT` has it: the library of the script's tree
    install(faults)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
