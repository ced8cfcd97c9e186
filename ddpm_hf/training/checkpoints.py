"""The checkpoint store: atomic saves with a manifest, rotation, and loading with a fallback; and the
state a checkpoint holds besides Accelerate's files (`TrainerState`, the EMA, the LR schedule).

A checkpoint is `OUTPUT_DIR/checkpoints/checkpoint-N/`: Accelerate's `save_state` files (model,
optimiser, RNG states) of the training parts (parts.py), the EMA weights (ema.safetensors), the
run's progress and schedule (trainer_state.json), and last a manifest listing every file with its
size. It is written as `checkpoint-N.partial` and renamed when complete, so a
kill mid-save never leaves a `checkpoint-N` that `latest` would pick; old ones are renamed before
they are deleted, for the same reason.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..util.errors import DDPMError, UsageError, first_line
from ..util.files import read_json, remove, safetensors_problem, writing
from ..util.logs import get_logger

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".partial"
DISCARD_SUFFIX = ".discard"
MANIFEST = "ddpm_hf_checkpoint.json"  # written last; lists every file with its size
EMA_FILE = "ema.safetensors"
TRAINER_STATE = "trainer_state.json"  # data position, counters, EMA and LR-schedule state


@dataclasses.dataclass
class TrainerState:
    """Where a run stands: what a checkpoint restores besides Accelerate's model/optimiser/RNG files
    and the EMA (the step itself is the checkpoint's name)."""

    global_step: int = 0
    epoch: int = 0  # the epoch being read
    batches: int = 0  # batches of it consumed, skipped non-finite ones included (they consumed data)
    skipped_nonfinite: int = 0
    loss_sum: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))  # since the last log line
    loss_count: int = 0

    @classmethod
    def on(cls, device) -> "TrainerState":
        """A new run's state, its running loss on `device` (where the step's losses are)."""
        return cls(loss_sum=torch.zeros((), device=device))

    def progress(self) -> dict:
        """The JSON of trainer_state.json's "progress" (without the step, which names the checkpoint)."""
        return dict(
            epoch=self.epoch,
            batches=self.batches,
            skipped_nonfinite=self.skipped_nonfinite,
            loss_sum=self.loss_sum.item(),
            loss_count=self.loss_count,
        )

    def restore(self, progress: dict) -> None:
        self.epoch, self.batches = progress["epoch"], progress["batches"]
        self.skipped_nonfinite, self.loss_count = progress["skipped_nonfinite"], progress["loss_count"]
        self.loss_sum.fill_(progress["loss_sum"])


@dataclasses.dataclass
class Resumed:
    """What load_checkpoint read besides what it restored into the parts."""

    state: TrainerState  # its global_step is the checkpoint's
    planned_steps: int  # the LR schedule's length when the checkpoint was saved


def is_checkpoint_name(name: str) -> bool:
    """checkpoint-N, N the step (Accelerate's and diffusers' names; an interrupted save carries a suffix)."""
    return name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit()


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def resolve_checkpoint(resume: Optional[str], checkpoint_root: Path) -> Optional[str]:
    """--resume_from_checkpoint as given, or in diffusers' form: a bare `checkpoint-N`, or diffusers' layout
    OUTPUT_DIR/checkpoint-N, -> checkpoint_root/checkpoint-N (another run's path is never redirected)."""
    if not resume or resume == "latest" or Path(resume).is_dir():
        return resume
    path = Path(resume)
    numbered = is_checkpoint_name(path.name)
    if numbered and (path.name == resume or path.parent.resolve() == checkpoint_root.parent.resolve()):
        return str(checkpoint_root / path.name)
    return resume


def _numbered(checkpoint_root: Path) -> list:
    """Entries named checkpoint-N (N digits): the run's checkpoints, or links planted under their names."""
    if not checkpoint_root.is_dir():
        return []
    return [p for p in checkpoint_root.iterdir() if is_checkpoint_name(p.name)]


def list_checkpoints(checkpoint_root: Path) -> list:
    """Checkpoints under their final name, oldest first (interrupted saves carry a suffix). A link under
    such a name is none: `latest` would resume from wherever it points."""
    found = [p for p in _numbered(checkpoint_root) if p.is_dir() and not p.is_symlink()]
    return sorted(found, key=checkpoint_step)


def _warn_linked(checkpoint_root: Path) -> None:
    for link in sorted((p for p in _numbered(checkpoint_root) if p.is_symlink()), key=checkpoint_step):
        logger.warning(
            f"warning: ignoring {link}, a symbolic link (to {os.path.realpath(link)}); a run resumes only from "
            f"checkpoint folders of its own"
        )


def _discard(path: Path) -> None:
    """Rename, then delete: a kill halfway through never leaves a half-deleted checkpoint-N."""
    doomed = path.with_name(path.name + DISCARD_SUFFIX)
    remove(doomed)  # remove(), not rmtree: a link is unlinked, never followed
    os.replace(path, doomed)
    remove(doomed)


def _write_manifest(folder: Path, step: int) -> None:
    """Written last: the list of every file of the checkpoint with its size."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps(dict(step=step, files=files), indent=1))


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be trusted (None when its manifest matches its files)."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: its save did not finish"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
    return _content_problem(folder, files)


def _content_problem(folder: Path, files: dict) -> Optional[str]:
    """A checkpoint file of the right size whose content is damaged: safetensors headers and JSON are parsed."""
    for name in files:
        if name.endswith(".safetensors") and safetensors_problem(folder / name):
            return f"{name} is damaged ({safetensors_problem(folder / name)})"
        if name.endswith(".json"):
            try:
                read_json(folder / name)
            except DDPMError:
                return f"{name} is not valid JSON"
    return None


def save_checkpoint(parts, state: TrainerState, checkpoint_root: Path, limit=None) -> Path:
    """The training parts' save_state, the EMA and `state` (+ the manifest) into `checkpoint-N.partial`,
    then rename: a kill mid-save never leaves a checkpoint-N that `latest` would pick."""
    accelerator, step = parts.accelerator, state.global_step
    final = checkpoint_root / f"{CHECKPOINT_PREFIX}{step}"
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process:
        remove(partial)  # a planted link is unlinked (rmtree would leave it, and save_state write through it)
    accelerator.wait_for_everyone()
    kept = list_checkpoints(checkpoint_root)
    advice = (
        (
            "its partial files were removed and the earlier checkpoints are intact (latest: "
            f"{kept[-1].name}); free some space, "
            f"then continue with the same command plus --resume_from_checkpoint latest"
        )
        if kept
        else "its partial files were removed; free some space and run the command again"
    )
    with writing(checkpoint_root, f"the checkpoint {final.name}", cleanup=[partial], advice=advice):
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_trainer_state(partial, parts, state)
            _write_manifest(partial, step)
    if accelerator.is_main_process:
        if final.exists() or final.is_symlink():  # a link there (dangling too) is renamed away, never followed
            _discard(final)
        os.replace(partial, final)
        if limit:
            for old in list_checkpoints(checkpoint_root)[:-limit]:
                logger.debug(f"removing {old}: --checkpoints_total_limit {limit}")
                _discard(old)
        logger.debug(f"saved the checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(parts, checkpoint_root: Path, resume: str) -> Optional[Resumed]:
    """Restore checkpoint `resume` (a folder, or "latest" under `checkpoint_root`) into the training
    parts (weights, optimiser, RNG, EMA, LR schedule); return the run's state it was saved with, None
    when "latest" finds none. With "latest", a damaged checkpoint is reported in one line and the
    next older one is tried."""
    accelerator = parts.accelerator
    if resume == "latest":
        if accelerator.is_main_process:
            _remove_interrupted(checkpoint_root)
            _warn_linked(checkpoint_root)
        accelerator.wait_for_everyone()
        candidates = list_checkpoints(checkpoint_root)[::-1]
        if not candidates:
            logger.info(f"no checkpoint in {checkpoint_root}; starting a new run")
            return None
    else:
        candidates = [Path(resume)]
    for path in candidates:
        problem = checkpoint_problem(path)
        resumed, problem = (None, problem) if problem else _load(parts, path, checkpoint_root.parent)
        if problem is None:
            _warn_rng_state(path, accelerator.process_index)
            logger.info(f"resumed from {path}")
            resumed.state.global_step = checkpoint_step(path)
            return resumed
        message = f"checkpoint {path} is damaged or incomplete ({problem})"
        if resume != "latest":
            raise DDPMError(f"{message}; resume from another checkpoint or 'latest'")
        logger.warning(f"warning: {message}; falling back to an older one")
    raise DDPMError(
        f"no loadable checkpoint in {checkpoint_root}; remove the damaged ones or start without "
        "--resume_from_checkpoint"
    )


def _remove_interrupted(checkpoint_root: Path) -> None:
    """Saves and deletions a kill interrupted (their folders carry a suffix)."""
    if not checkpoint_root.is_dir():
        return
    for stale in sorted(checkpoint_root.glob(f"{CHECKPOINT_PREFIX}*{PARTIAL_SUFFIX}")):
        logger.warning(f"notice: removing {stale}, a checkpoint whose save was interrupted")
        remove(stale)  # a link is unlinked, never followed
    for stale in checkpoint_root.glob(f"{CHECKPOINT_PREFIX}*{DISCARD_SUFFIX}"):
        remove(stale)


def _load(parts, path: Path, out: Path) -> tuple:
    """Load one checkpoint: (what it read, None), or (None, why it could not be loaded); a UsageError,
    a flag mistake, is raised."""
    try:
        resumed = _read_trainer_state(path, parts, out)
        parts.accelerator.load_state(str(path))
    except UsageError:
        raise
    except Exception as err:
        return None, f"{type(err).__name__}: {first_line(err, 120) or 'cannot be loaded'}"
    return resumed, None


def _model_config(model) -> dict:
    return {k: v for k, v in json.loads(json.dumps(dict(model.config), default=str)).items() if not k.startswith("_")}


def _write_trainer_state(folder: Path, parts, state: TrainerState) -> None:
    """Besides Accelerate's files: the EMA (weights as safetensors, the rest as JSON: nothing is
    unpickled on resume), the data position and counters, the LR schedule."""
    names = [name for name, _ in parts.model.named_parameters()]
    save_file({n: p.detach().cpu().contiguous() for n, p in zip(names, parts.ema.shadow_params)}, folder / EMA_FILE)
    ema_scalars = {k: v for k, v in parts.ema.state_dict().items() if k != "shadow_params"}
    (folder / TRAINER_STATE).write_text(
        json.dumps(
            dict(
                progress=state.progress(),
                ema=ema_scalars,
                lr_scheduler=parts.lr_scheduler.state_dict(),
                lr_total_steps=parts.max_steps,
                model_config=_model_config(parts.model),
            ),
            indent=1,
        )
    )


def _read_trainer_state(folder: Path, parts, out: Path) -> Resumed:
    """The EMA and LR schedule restored into the parts; the progress and planned length returned
    (a checkpoint of another model is refused, naming `out`'s record of the run's flags)."""
    saved = json.loads((folder / TRAINER_STATE).read_text())
    model_config = _model_config(parts.model)
    if saved["model_config"] != model_config:
        differ = sorted(k for k in saved["model_config"] if saved["model_config"][k] != model_config.get(k))
        raise UsageError(
            f"checkpoint {folder} is of a different model ({', '.join(differ)} differ); resume with the "
            f"flags of the run that wrote it (see {out / 'train_config.json'})"
        )
    shadow = load_file(str(folder / EMA_FILE))
    with torch.no_grad():
        for (name, _), p in zip(parts.model.named_parameters(), parts.ema.shadow_params):
            p.copy_(shadow[name])
    parts.ema.load_state_dict(saved["ema"])
    planned = saved.get("lr_total_steps", saved["lr_scheduler"].get("total_steps", parts.max_steps))
    _restore_lr_schedule(parts.lr_scheduler, saved["lr_scheduler"], parts.max_steps)
    state = TrainerState.on(parts.accelerator.device)
    state.restore(saved["progress"])
    return Resumed(state, planned)


def _restore_lr_schedule(lr_scheduler, schedule: dict, max_steps: int) -> None:
    if "total_steps" in schedule and schedule["total_steps"] != max_steps:
        # OneCycleLR keeps its length in its state: a longer or shorter run keeps the position, takes the new length
        # (get_scheduler's schedules take the new length from their re-made lambda).
        schedule = {
            **schedule,
            "total_steps": lr_scheduler.total_steps,
            "_schedule_phases": lr_scheduler._schedule_phases,
        }
    lr_scheduler.load_state_dict(schedule)


def _warn_rng_state(folder: Path, process_index: int) -> None:
    """Accelerate's load_state skips RNG states it cannot restore with only an INFO log line; say so,
    since the resumed run then draws other noise than the uninterrupted one."""
    import random

    import numpy as np
    from accelerate.utils import load

    path = folder / f"random_states_{process_index}.pkl"
    try:
        states = load(path, weights_only=True)  # as load_state reads it
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
    except Exception as err:
        logger.warning(  # each process restores its own random states: each one says so
            f"warning: cannot restore the random states from {path} ({type(err).__name__}); training goes on, "
            "but the resume is no "
            f"longer bit-exact (other noise and timesteps than an uninterrupted run)",
            main_process_only=False,
        )
