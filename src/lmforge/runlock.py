"""One writer per run: `lmforge train` holds an OS lock on RUN_DIR/.lock for as long as it runs.

A second `lmforge train` on the same directory is refused, in one line naming the holder (pid, host, since
when), before it reads or writes anything there. The lock is flock(2): it belongs to the open file and the
kernel drops it when the holder exits, however it exits (kill -9 and out-of-memory kills included), so a
lock file left by a dead run is simply taken over. A run that ends normally deletes the file.
Read-only commands (eval, generate, serve, export, status, plot) never take it.

Limits: the lock is advisory (it stops another `lmforge train`, not `rm` or a copy), and it is only as good
as the file system's locking. On a network file system, two hosts are kept apart only where the server
supports locks; where the kernel refuses to lock at all, the run goes on with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from .errors import LmforgeError
from .run_dir import RunDir
from .safewrite import failing_cleanly

LOCK_FILE = RunDir.lock
_ATTEMPTS = 5  # a holder may delete the file between our open and our lock: then open the new one
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLockedError(LmforgeError):
    """Another process is training into the same run directory."""


class RunLock:
    """The lock of one run directory: `acquire()` takes it or refuses, `release()` gives it back."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = RunDir(run_dir).lock
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self, say: Callable[[str], None] = print) -> None:
        """Take the lock, or raise RunLockedError naming its holder; notes and warnings go to `say`."""
        if self._fd is not None:
            return
        self._created_dir = not self.run_dir.exists()
        with failing_cleanly("the run's lock file", self.path, then=""):
            fd = self._open_locked(say)
        if fd is None:
            return
        previous = _read_record(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        with contextlib.suppress(OSError):  # the record only informs a refused run; the lock holds without it
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        if previous:
            say(f"note: took over {self.path} from {_describe(previous)}, which ended without releasing it")

    def _open_locked(self, say: Callable[[str], None]) -> int | None:
        for _ in range(_ATTEMPTS):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_record(fd)
                os.close(fd)
                if e.errno in _UNSUPPORTED:
                    say(
                        f"warning: could not lock {self.path} ({os.strerror(e.errno)}): this file system does "
                        f"not support locks, so nothing stops a second `lmforge train` from writing here"
                    )
                    return None
                if e.errno not in _BUSY:
                    raise
                raise RunLockedError(
                    f"{self.run_dir} is in use by another `lmforge train` ({_describe(holder)}): wait for it to "
                    f"end or stop it, or pass another --out"
                ) from None
            if _same_file(fd, self.path):
                return fd
            os.close(fd)  # its holder deleted it as it ended: lock the file that is there now
        raise RunLockedError(f"could not lock {self.path}: it keeps being replaced; run the command again")

    def release(self) -> None:
        """Delete the lock file and drop the lock; remove the run directory if this run made it and it is empty."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # while still held: a waiting run then opens a fresh file
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only succeeds when a failed start wrote nothing

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_record(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "its details are not written yet"
    since = record.get("since")
    when = "?"
    if isinstance(since, float | int):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    return f"pid {record['pid']} on {record.get('host', '?')}, since {when}"
