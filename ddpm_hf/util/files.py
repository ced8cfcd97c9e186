"""Every file the tools write or read back, with one-line failures (README, section reliability).

Writing: `writing(folder, what)` turns any failed write (a full disk above all) into one `DDPMError`
line that names the folder and what was being written, after removing the partial files it was
given; `atomic_write` writes a file under a temporary name and renames it, so a failure never
leaves a truncated file under its final name; `append_line` undoes a half-written line.
Reading: `read_json` and `safetensors_problem` name the damaged file instead of a traceback.
Untrusted folders: an output folder may hold links planted by whoever shared it. Nothing is written
through one: appends and the lock open with O_NOFOLLOW (`open_own`), atomic writes rename over a
link instead of writing into it, sub-folders are made by `make_subdir`, which refuses a linked one,
and a path built from model or data metadata is checked with `inside` (its name parts with `safe_name`).

The tests simulate a full disk from outside (tests/faults.py): nothing here reads a test variable.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Optional

from .errors import DDPMError, UsageError, first_line, short

NEARLY_FULL = 64 << 20  # a write that fails with less free space than this failed for want of space
_DISK_FULL_TEXT = ("No space left", "os error 28", "code: 28", "StorageFull", "Disk quota exceeded")
RETRY = "free some space (or choose another --output_dir) and run the command again"


def link_error(path) -> DDPMError:
    return DDPMError(
        f"{path} is a symbolic link; the tools never write through a link in an output folder: remove the link "
        f"(or choose another --output_dir)"
    )


def refuse_link(path) -> None:
    """One line instead of writing through a link planted where a file or folder of ours goes."""
    if Path(path).is_symlink():
        raise link_error(path)


def open_own(path, flags: int, mode: int = 0o644) -> int:
    """os.open that never follows a link at `path` (O_NOFOLLOW) and refuses a file that is not only ours:
    not a regular file, or a hard link that other names share (writing would change the file behind them)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise link_error(path) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        kind = "not a regular file" if not stat.S_ISREG(info.st_mode) else f"a hard link ({info.st_nlink} names)"
        raise DDPMError(f"{path} is {kind}; the tools only write files of their own there: remove it")
    return fd


def make_subdir(folder, *names) -> Path:
    """`folder/names...`, each level created if missing; a level that is a link is refused (writing
    into it would put our files wherever it points)."""
    path = Path(folder)
    for name in names:
        path = path / name
        refuse_link(path)
        path.mkdir(exist_ok=True)
    return path


def safe_name(value, fallback: str = "unknown", limit: int = 64) -> str:
    """A file-name part from metadata (a model's or data set's config): only [A-Za-z0-9._-], no leading
    dot (so never '..' or a hidden name), at most `limit` characters."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).lstrip(".")[:limit]
    return text or fallback


def is_inside(root, path) -> bool:
    """Whether `path` resolves (links followed) to `root` or below it."""
    real_root, real = Path(root).resolve(), Path(path).resolve()
    return real == real_root or real_root in real.parents


def inside(root, path) -> Path:
    """`path` when it resolves inside `root`; one line otherwise. For every path built from model or
    data metadata, so a crafted value (or a link on the way) never leads out of `root`."""
    if not is_inside(root, path):
        real = Path(path).resolve()
        raise DDPMError(
            f"{path} leads outside {root} (to {real}); the model's or data's metadata, or a link in {root}, "
            f"points elsewhere: remove the link, or fix the metadata"
        )
    return Path(path)


def existing_parent(path) -> Path:
    """`path` or its nearest ancestor that exists."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _name_limits(folder: Path) -> tuple:
    """(longest name, longest path) in bytes on the file system of `folder` (POSIX defaults elsewhere)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        return 255, 4096


def _first_existing(path: Path) -> Path:
    """The nearest ancestor of `path` that exists, never stat-ing a name too long to stat (ENAMETOOLONG)."""
    for candidate in (path, *path.parents):
        try:
            if candidate.exists():
                return candidate
        except OSError:
            continue
    return Path(path.anchor or ".")


def check_name_lengths(out, flag: str = "--output_dir") -> None:
    """A path longer than the file system allows fails before anything is created (mkdir -p would make
    the levels above the long name first), in a line that stays short, naming the flag to change."""
    out = Path(out)
    name_max, path_max = _name_limits(_first_existing(out.absolute()))
    long_name = next((part for part in out.parts if len(os.fsencode(part)) > name_max), None)
    # + 64: the tools' own names below it (checkpoints/checkpoint-N.partial, .NAME.PID.tmp)
    if long_name is not None or len(os.fsencode(str(out.absolute()))) + 64 > path_max:
        what = (
            f"a name of {len(os.fsencode(long_name))} bytes ({short(long_name, 24)}), "
            f"over the {name_max} a name may have"
            if long_name is not None
            else f"a path of {len(os.fsencode(str(out.absolute())))} bytes, near the {path_max} a path may have"
        )
        raise UsageError(f"{flag} {short(out, 60)} has {what} on this file system; choose a shorter {flag}")


def check_writable(out) -> None:
    """Refuse an output folder that cannot be created or written, creating nothing."""
    check_name_lengths(out)
    existing = existing_parent(out)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"output folder {out} is not writable ({existing} is not a writable folder); choose another --output_dir"
        )


def make_output_dir(out) -> Path:
    """Create the output folder and prove it writable (one line otherwise)."""
    out = Path(out)
    check_writable(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        remove(probe)  # a file or link left there: O_EXCL below creates a new file, never opens one
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        probe.unlink()
    except OSError as err:
        raise UsageError(f"output folder {out} is not writable ({err.strerror}); choose another --output_dir") from None
    return out


def free_bytes(folder) -> int:
    """Free space of the file system that holds (or will hold) `folder`."""
    return shutil.disk_usage(existing_parent(Path(folder).absolute())).free


def _reason(err: BaseException, folder) -> str:
    """Why a write failed, in words. torch.save and safetensors report a full disk in their own
    terms (a RuntimeError about positions, a SafetensorError), so a nearly full disk decides."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if isinstance(err, OSError) and err.errno == errno.EFBIG:
        return "file too large for this file system"
    try:
        full = any(text in str(err) for text in _DISK_FULL_TEXT) or free_bytes(folder) < NEARLY_FULL
    except OSError:
        full = False
    if full:
        return "no space left on device"
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    first = first_line(err, 160)
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def remove(*paths) -> None:
    """Delete partial files or folders, ignoring those already gone."""
    for path in paths:
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def move_in(staging, out, last: str = "") -> None:
    """Move every entry of the folder `staging` into `out` (the entry named `last` after the others), then
    remove `staging`. What is there under the same name is replaced: a folder of ours is deleted, a link is
    removed (never followed: a planted `out/unet` link would have the new files written wherever it points)."""
    staging, out = Path(staging), Path(out)
    for entry in sorted(staging.iterdir(), key=lambda e: e.name == last):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.is_symlink():
            target.unlink()
        os.replace(entry, target)
    staging.rmdir()


@contextlib.contextmanager
def writing(folder, what: str, cleanup=(), advice: str = RETRY):
    """A failed write inside the block becomes one line naming `folder` and `what`; the partial
    files `cleanup` (paths, or callables that undo) are removed first."""
    try:
        yield
    except (DDPMError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        reason = _reason(err, folder)  # before the cleanup frees the space the write took
        for item in cleanup:
            item() if callable(item) else remove(item)
        raise DDPMError(f"could not write {what} to {folder} ({reason}); {advice}") from err


def atomic_write(path, write, what: Optional[str] = None, advice: str = RETRY) -> None:
    """`write(tmp_path)`, then rename to `path`: a kill or a full disk never leaves a truncated file
    under the final name (the temporary file is removed on failure). The one atomic write of the
    package: PNGs, JSON records, the FID cache and model cards go through it (a pipeline is saved into a
    partial folder that training renames into place whole)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the pid: shared folders (the FID cache) have no lock
    remove(tmp)  # a link planted under the temporary name would be written through
    with writing(path.parent, what or path.name, cleanup=[tmp], advice=advice):
        write(tmp)
        os.replace(tmp, path)


def remove_stale_temporaries(path) -> None:
    """Remove the temporary files that atomic writes of `path` killed midway left beside it; only for a
    caller that holds the file's lock (another process's write in progress would lose its file)."""
    path = Path(path)
    remove(*path.parent.glob(f".{path.name}.*.tmp"))


def write_text(path, text: str, what: Optional[str] = None, advice: str = RETRY) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), what, advice)


def write_json(path, payload, what: Optional[str] = None, advice: str = RETRY) -> None:
    """The project's JSON records (fid.json, nll.json, configs): indented, written atomically as write_text;
    values JSON has no type for (paths, dtypes) are written as text."""
    write_text(path, json.dumps(payload, indent=2, default=str) + "\n", what, advice)


def _truncate_to(path: Path, size: Optional[int]):
    def undo():
        if size is None:
            remove(path)
        else:
            with contextlib.suppress(OSError):
                os.truncate(path, size)

    return undo


def append_line(path, line: str, what: Optional[str] = None, advice: str = RETRY) -> None:
    """Append one line; a failed write is cut back off, so the file keeps only whole lines. A link
    at `path` is refused, not appended through."""
    path = Path(path)
    refuse_link(path)
    size = path.stat().st_size if path.exists() else None
    with writing(path.parent, what or path.name, cleanup=[_truncate_to(path, size)], advice=advice):
        fd = open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(line)


def read_json(path, advice: str = ""):
    """A JSON file the tools wrote (configs, states, records); a damaged one is one line naming it.
    A missing file raises FileNotFoundError for the caller to decide."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as err:
        raise DDPMError(
            f"{path} is damaged (not valid JSON: {first_line(err, 120)})" + (f"; {advice}" if advice else "")
        ) from None
    except OSError as err:
        raise DDPMError(f"cannot read {path} ({err.strerror})" + (f"; {advice}" if advice else "")) from None


def safetensors_problem(path) -> Optional[str]:
    """Why a .safetensors file cannot be read (its header is parsed and checked against the file's
    size, no tensor is loaded), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as err:
        text = first_line(err, 120)
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return None


# What a run leaves in its output folder besides the pipeline, and a model card would read back.
EARLIER_RUN = (
    "checkpoints",
    "train_log.jsonl",
    "best_fid",
    "fid.json",
    "ood_results.json",
    "scores.csv",
    "histogram.png",
    "roc.png",
)


def clear_earlier_run(out) -> list:
    """--overwrite_output_dir: remove what an earlier run left in `out` (checkpoints, log, sample grids
    samples/epoch_*.png, best_fid/, fid.json and the OOD results), so none of it mixes with the new
    run's or ends up on its model card. Returns the paths removed."""
    out = Path(out)
    doomed = [out / name for name in EARLIER_RUN if (out / name).exists() or (out / name).is_symlink()]
    samples = out / "samples"  # a link there is left alone: globbing it would delete grids elsewhere
    doomed += sorted(samples.glob("epoch_*.png")) if samples.is_dir() and not samples.is_symlink() else []
    remove(*doomed)
    return doomed
