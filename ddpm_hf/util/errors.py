"""User-facing failures: one line on stderr and a non-zero exit, never a traceback.

Library code raises `UsageError` (the user asked for something impossible: exit 2)
or `DDPMError` (a runtime failure such as an unreachable dataset: exit 1). The
scripts wrap their `main` in `run_cli`, which turns these into one line.
"""

import errno
import functools
import os
import sys

_AT_COMMAND_END = []  # callables run when a command ends, however it ends (lock.py registers release_all)


def at_command_end(cleanup) -> None:
    """Run `cleanup()` when a `run_cli` command ends; lets lock.py release its folders without this
    module importing it (errors.py is the bottom of the import graph)."""
    if cleanup not in _AT_COMMAND_END:
        _AT_COMMAND_END.append(cleanup)


def short(value, limit: int = 60) -> str:
    """`value` as text of at most `limit` characters ('…' marks a cut): an error line quotes what the
    user (or an untrusted file) gave, and must stay one short line whatever that holds."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(value, limit: int = 200) -> str:
    """The first line of an exception's (or any value's) text, cut at `limit` characters; "" when it says
    nothing. Library errors (datasets, diffusers, YAML) often run to pages, and an error line quotes one."""
    text = str(value).strip()
    return text.splitlines()[0][:limit] if text else ""


class DDPMError(Exception):
    """A failure the user can fix; its message says what is wrong and how to fix it."""

    exit_code = 1


class UsageError(DDPMError):
    """Impossible flags or settings (exit code 2, like argparse)."""

    exit_code = 2


def _debug_requested(argv) -> bool:
    return "--debug" in argv or os.environ.get("DDPM_HF_DEBUG") == "1"


def _close_progress_bars() -> None:
    """End the progress bars still drawn (their last state and a newline), so the error line starts a line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:
            pass


def fail(message: str, exit_code: int) -> None:
    _close_progress_bars()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def _flag_value(argv, flag: str):
    """The value of `--flag V` or `--flag=V` in argv (the last one given), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif str(arg).startswith(flag + "="):
            value = str(arg).split("=", 1)[1]
    return value


def is_out_of_memory(err: BaseException) -> bool:
    """torch's CUDA/MPS OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", ())
    return isinstance(err, (MemoryError, *((oom,) if oom else ()))) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def resource_error(err: BaseException, argv) -> "DDPMError | None":
    """One line for a failure of the machine rather than of the code: memory ran out (naming the batch
    size to lower), or a path is longer than the file system takes. None for anything else."""
    if is_out_of_memory(err):
        batch = _flag_value(argv, "--batch_size")
        at = f"--batch_size {batch}" if batch else "the default --batch_size"
        return DDPMError(
            f"out of memory at {at} ({type(err).__name__}); lower --batch_size (or --size, or the images decoded "
            f"at once: --max_train_samples / --num_samples / --max_samples)"
        )
    if isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG:
        return UsageError(
            f"the path {short(err.filename or '', 60)} is longer than the file system allows; choose a shorter "
            f"--output_dir (or shorten the path given to the flag that names it)"
        )
    return None


def run_cli(main):
    """Run a script's `main(argv)`; known failures become one stderr line and an exit code."""

    @functools.wraps(main)
    def wrapper(argv=None, **options):  # options: e.g. prog, the name the usage line shows
        argv = sys.argv[1:] if argv is None else argv
        try:
            return main(argv, **options)
        except DDPMError as err:
            if _debug_requested(argv):
                raise
            fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            fail("interrupted by the user", 130)
        except (MemoryError, RuntimeError, OSError) as err:  # torch.OutOfMemoryError is a RuntimeError
            known = resource_error(err, argv)
            if known is None or _debug_requested(argv):
                raise
            fail(str(known), known.exit_code)
        finally:
            for cleanup in _AT_COMMAND_END:
                cleanup()  # e.g. lock.release_all: the output folders this command held

    return wrapper
