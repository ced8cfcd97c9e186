"""One run per output folder (README, section reliability).

`lock_output_dir(folder, command)` takes `folder/.ddpm_hf.lock`: an advisory `flock` on that file,
which the kernel releases when the process ends however it ends, plus the holder's pid, host,
command and start time written in it. A second run into a folder whose lock is held is refused in
one line naming the holder; a lock file left by a process that died (kill -9, power cut) is not
held, so the next run takes it over with a notice. Under `accelerate launch` only the main process
locks. Locks are released when the command ends (`errors.run_cli`; no atexit hook: importing the package
registers nothing process-wide); a library caller's at `release_all()`, or by the kernel at exit. The lock file is
opened with O_NOFOLLOW and must be a regular file of one name (`files.open_own`): a link planted as
`.ddpm_hf.lock` is refused in one line instead of having its target truncated.

`waiting_lock(path)` is the other kind: processes that share a cache file (data/cache.py) wait for
each other instead of being refused.
"""

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from .errors import DDPMError, at_command_end
from .files import open_own
from .logs import get_logger

logger = get_logger(__name__)

LOCK_NAME = ".ddpm_hf.lock"
_held = []


def _describe(info: dict) -> str:
    if not info:
        return "a process that left no details"
    host = f" on {info['host']}" if info.get("host") and info.get("host") != socket.gethostname() else ""
    return f"process {info.get('pid', '?')}{host} ({info.get('command', '?')}, started {info.get('started', '?')})"


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _flock(fd: int) -> bool:
    """True when this process now holds the lock; False when another one does."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


def _in_use(folder: Path, info: dict) -> DDPMError:
    return DDPMError(
        f"{folder} is in use by another run: {_describe(info)}; wait until it ends, or choose another --output_dir"
    )


def _ours(folder) -> Optional["OutputLock"]:
    return next((held for held in _held if held.folder.resolve() == Path(folder).resolve()), None)


def ensure_not_in_use(folder) -> None:
    """Refuse at once when a live run holds `folder`, creating nothing (the lock itself is taken
    later, when the folder is created)."""
    if _ours(folder):
        return
    path = Path(folder) / LOCK_NAME
    try:
        fd = open_own(path, os.O_RDONLY)  # a planted link is refused here, before anything is created
    except OSError:
        return  # no lock file (or none readable): nothing to wait for
    try:
        if not _flock(fd):
            raise _in_use(Path(folder), _read(fd))
    except OSError:
        return  # a file system without flock: the lock is best effort
    finally:
        os.close(fd)  # closing drops a lock taken here


class OutputLock:
    def __init__(self, folder, command: str):
        self.folder, self.command = Path(folder), command
        self.path, self.fd = self.folder / LOCK_NAME, None

    def acquire(self) -> "OutputLock":
        while True:
            fd = open_own(self.path, os.O_RDWR | os.O_CREAT)  # truncated below: never through a link
            try:
                held = _flock(fd)
            except OSError as err:  # e.g. a network file system without flock
                os.close(fd)
                logger.warning(
                    f"notice: cannot lock {self.folder} ({err.strerror}); make sure no other run writes into it"
                )
                return self
            if not held:
                info = _read(fd)
                os.close(fd)
                raise _in_use(self.folder, info)
            try:  # the holder may have removed the file between our open and flock: lock the current one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        stale = _read(fd)
        if stale:
            logger.warning(
                f"notice: taking over the lock of {self.folder} left by {_describe(stale)}, which is no longer running"
            )
        info = dict(
            pid=os.getpid(),
            host=socket.gethostname(),
            command=self.command,
            started=datetime.datetime.now().isoformat(timespec="seconds"),
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        _held.append(self)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self in _held:
            _held.remove(self)


def lock_output_dir(folder, command: Optional[str] = None) -> OutputLock:
    """Hold `folder` (which must exist) for this process until the command ends."""
    held = _ours(folder)
    if held:  # a library caller running twice into one folder
        return held
    command = command or Path(sys.argv[0]).name or "python"
    return OutputLock(folder, command).acquire()


@contextlib.contextmanager
def waiting_lock(path):
    """Hold the `flock` of the file `path` (created if missing, never through a link) for the block,
    waiting while another process holds it: the processes building one shared cache file take turns."""
    import fcntl

    fd = open_own(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # a file system without flock: each process builds on its own (renames stay atomic)
            logger.warning(
                f"cannot lock {path} ({err.strerror}); processes may build it twice", main_process_only=False
            )
        yield
    finally:
        os.close(fd)  # closing drops the lock


def release_all() -> None:
    for held in list(_held):
        held.release()


at_command_end(release_all)  # run_cli releases them as the command ends (errors.py)
