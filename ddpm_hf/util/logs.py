"""How ddpm-hf speaks: every module logs through `logger = get_logger(__name__)`, Accelerate's
multi-process logger (only the main process speaks unless a call passes `main_process_only=False`).

Nothing is configured on import. A command calls `setup_logging(--log_level)` once its flags are parsed:
each line is then written as it was printed before there was logging, the message alone, an info line
on stdout (unless it is logged with `extra=ON_STDERR`), a debug, notice, warning or error line on stderr;
diffusers, transformers, datasets and huggingface_hub follow the level. A program that uses the library
without configuring logging gets Python's default: warnings (and notices, logged as warnings) on stderr.
The one-line errors of util/errors.py are not logged: they print, whatever the level.
"""

import functools
import importlib
import logging
import os
import sys

LOG_LEVELS = ("debug", "info", "warning", "error")
LIBRARY_LOGGER = "ddpm_hf"
ON_STDERR = {"on_stderr": True}  # extra= of an info line kept off stdout, which holds a command's results

# The Hugging Face libraries that follow --log_level, by their verbosity variable. At info they are left
# as they are (warning, or their own variable): their info lines (cache and download chatter) were never shown.
FOLLOWERS = {
    "diffusers": "DIFFUSERS_VERBOSITY",
    "transformers": "TRANSFORMERS_VERBOSITY",
    "datasets": "DATASETS_VERBOSITY",
    "huggingface_hub": "HF_HUB_VERBOSITY",
}
FOLLOWER_LEVELS = {"debug": "debug", "warning": "warning", "error": "error"}


class ConsoleHandler(logging.Handler):
    """A record's message alone, on stdout for info, else on stderr; above a progress bar while one is drawn.
    The stream is looked up at each line, so a redirected sys.stdout (pytest, a notebook) is honoured."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            on_stdout = record.levelno == logging.INFO and not getattr(record, "on_stderr", False)
            stream = sys.stdout if on_stdout else sys.stderr
            bar_class = getattr(sys.modules.get("tqdm"), "tqdm", None)
            if getattr(bar_class, "_instances", None):  # tqdm.write: a line of its own, never glued to a bar
                bar_class.write(text, file=stream)
            else:
                stream.write(text + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)


def setup_logging(level: str = "info") -> None:
    """The command's logging, at `level` (one of LOG_LEVELS): ddpm_hf's lines through one ConsoleHandler
    (calling it again replaces the level), and the verbosity of the Hugging Face libraries."""
    from .errors import UsageError

    if level not in LOG_LEVELS:
        raise UsageError(f"--log_level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    logger = logging.getLogger(LIBRARY_LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(ConsoleHandler())
    logger.setLevel(level.upper())
    logger.propagate = False  # a handler on the root logger would print every line twice
    if level in FOLLOWER_LEVELS:
        _set_followers(FOLLOWER_LEVELS[level])


def _set_followers(level: str) -> None:
    """A library already imported is set now; one imported later reads its variable when it sets up its
    logger (setting its logger's level before that would be overwritten). A process-wide setting: commands only."""
    for package, variable in FOLLOWERS.items():
        os.environ[variable] = level
        if package in sys.modules:
            importlib.import_module(f"{package}.utils.logging").set_verbosity(getattr(logging, level.upper()))


def get_logger(name: str) -> "LazyLogger":
    """A module's logger: `logger.info(...)`, `logger.warning(..., main_process_only=False)`. A module run as
    `python -m ddpm_hf...` is named __main__: its logger is put under ddpm_hf's all the same."""
    in_library = name == LIBRARY_LOGGER or name.startswith(LIBRARY_LOGGER + ".")
    return LazyLogger(name if in_library else f"{LIBRARY_LOGGER}.{name}")


class LazyLogger:
    """accelerate.logging.get_logger(name), made at the first call: importing Accelerate imports torch,
    which the import of a module (and a command's --help) must not."""

    def __init__(self, name: str):
        self.name = name
        self._adapter = None

    def __getattr__(self, attr):  # debug, info, warning, error, isEnabledFor, ...
        if self._adapter is None:
            from accelerate.logging import get_logger as accelerate_logger

            self._adapter = _adapter_class()(accelerate_logger(self.name).logger, {})
        return getattr(self._adapter, attr)


def _launched_rank() -> int:
    """The rank a launcher gave this process (torchrun, accelerate launch), 0 when run alone."""
    return int(os.environ.get("RANK", "0") or 0)


@functools.lru_cache(maxsize=None)
def _adapter_class():
    from accelerate.logging import MultiProcessAdapter
    from accelerate.state import PartialState

    class ProcessLogger(MultiProcessAdapter):
        """Accelerate's adapter, but its lines keep their text (no "[RANK n]" prefix), and it also works
        before any Accelerator or PartialState exists (library use, sampling, OOD scoring), where Accelerate
        raises: the launcher's RANK then tells the main process."""

        def process(self, msg, kwargs):
            kwargs.setdefault("stacklevel", 2)
            return msg, kwargs

        def log(self, level, msg, *args, **kwargs):
            if PartialState._shared_state:  # the test Accelerate's own log() makes before it refuses
                return super().log(level, msg, *args, **kwargs)
            main_process_only = kwargs.pop("main_process_only", True)
            kwargs.pop("in_order", None)
            if self.isEnabledFor(level) and (not main_process_only or _launched_rank() == 0):
                msg, kwargs = self.process(msg, kwargs)
                self.logger.log(level, msg, *args, **kwargs)

    return ProcessLogger
