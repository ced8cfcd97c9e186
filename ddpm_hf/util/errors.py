"""User-facing failures: one line on stderr and a non-zero exit, never a traceback.

Library code raises `UsageError` (the user asked for something impossible: exit 2)
or `DDPMError` (a runtime failure such as an unreachable dataset: exit 1). The
scripts wrap their `main` in `run_cli`, which turns these into one line.
"""

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
        finally:
            for cleanup in _AT_COMMAND_END:
                cleanup()  # e.g. lock.release_all: the output folders this command held

    return wrapper
