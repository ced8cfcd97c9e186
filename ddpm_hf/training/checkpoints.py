"""The checkpoint store: atomic saves with a manifest, rotation, and loading with a fallback.

A checkpoint is `OUTPUT_DIR/checkpoints/checkpoint-N/`: Accelerate's `save_state` files (model,
optimiser, RNG states) plus whatever the trainer adds (`write_extra`), and last a manifest listing
every file with its size. It is written as `checkpoint-N.partial` and renamed when complete, so a
kill mid-save never leaves a `checkpoint-N` that `latest` would pick; old ones are renamed before
they are deleted, for the same reason.
"""

import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from ..util.errors import DDPMError, UsageError, first_line
from ..util.files import read_json, remove, safetensors_problem, writing
from ..util.logs import get_logger

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".partial"
DISCARD_SUFFIX = ".discard"
MANIFEST = "ddpm_hf_checkpoint.json"  # written last; lists every file with its size


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
        print(
            f"warning: ignoring {link}, a symbolic link (to {os.path.realpath(link)}); a run resumes only from "
            f"checkpoint folders of its own",
            file=sys.stderr,
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


def save_checkpoint(accelerator, checkpoint_root: Path, step: int, limit=None, write_extra=None) -> Path:
    """save_state (+ `write_extra(folder)`, + the manifest) into `checkpoint-N.partial`, then
    rename: a kill mid-save never leaves a checkpoint-N that `latest` would pick."""
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
            if write_extra:
                write_extra(partial)
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


def load_checkpoint(accelerator, checkpoint_root: Path, resume: str, read_extra=None) -> int:
    """Restore checkpoint `resume` (a folder, or "latest" under `checkpoint_root`; `read_extra(folder)`
    restores what save_checkpoint's `write_extra` wrote); return the optimiser step it was saved at,
    0 when "latest" finds none. With "latest", a damaged checkpoint is reported in one line and the
    next older one is tried."""
    if resume == "latest":
        if accelerator.is_main_process:
            _remove_interrupted(checkpoint_root)
            _warn_linked(checkpoint_root)
        accelerator.wait_for_everyone()
        candidates = list_checkpoints(checkpoint_root)[::-1]
        if not candidates:
            logger.info(f"no checkpoint in {checkpoint_root}; starting a new run")
            return 0
    else:
        candidates = [Path(resume)]
    for path in candidates:
        problem = checkpoint_problem(path) or _load(accelerator, path, read_extra)
        if problem is None:
            _warn_rng_state(path, accelerator.process_index)
            logger.info(f"resumed from {path}")
            return checkpoint_step(path)
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


def _load(accelerator, path: Path, read_extra) -> Optional[str]:
    """Load one checkpoint; None, or why it could not be loaded (a UsageError, a flag mistake, is raised)."""
    try:
        if read_extra:
            read_extra(path)
        accelerator.load_state(str(path))
    except UsageError:
        raise
    except Exception as err:
        return f"{type(err).__name__}: {first_line(err, 120) or 'cannot be loaded'}"
    return None


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
