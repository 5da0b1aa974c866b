"""Writes into a run directory that fail cleanly.

A full disk (or a quota, a read-only mount, missing permissions) while writing any file of a run becomes
one line: what could not be written, why, how much room it needed and how much is free where that is
known, and what to do. Whatever was half-written is removed first, so the run directory holds only
complete files and the previous checkpoint stays the resume point.

safetensors reports a failed write as a `SafetensorError` whose message ends in "(os error N)"; that
errno is read back so the line says "No space left on device" like an OSError would.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from .errors import LmforgeError

# What a person can do about each kind of failed write; anything else is a sick disk.
_ADVICE = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space or raise the disk quota",
    errno.EROFS: "the file system is read-only: use a writable --out",
    errno.EACCES: "fix the permissions or use another --out",
    errno.EPERM: "fix the permissions or use another --out",
}
_OS_ERROR = re.compile(r"os error (\d+)")
RESUME = ", then run the same command again (it resumes from the last checkpoint, if any)"


class DiskWriteError(LmforgeError):
    """A file of a run could not be written; the message says which, why, and what to do."""


def io_errno(exc: BaseException) -> int | None:
    """The errno of a failed write (0 when it has none), or None when `exc` is not an I/O failure."""
    if isinstance(exc, OSError):
        return exc.errno or 0
    if isinstance(exc, SafetensorError):
        found = _OS_ERROR.search(str(exc))
        if found:
            return int(found.group(1))
        return 0 if "I/O error" in str(exc) else None
    return None


def human_size(n: int) -> str:
    """Bytes as a short human-readable size (1.5 MB)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # unreachable


def free_bytes(path: Path) -> int | None:
    """Free space on the file system holding `path` (or its nearest existing parent), None if unknown."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def write_failure(
    what: str, path: Path, exc: BaseException, needed: int | None = None, then: str = ""
) -> str:
    """One line for a failed write of `what` at `path`: reason, room needed and free, advice, `then`."""
    code = io_errno(exc)
    reason = os.strerror(code) if code else (getattr(exc, "strerror", None) or str(exc))
    room = ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        parts = [f"needs about {human_size(needed)}"] if needed else []
        free = free_bytes(Path(path).parent)
        if free is not None:
            parts.append(f"{human_size(free)} free there")
        room = f" ({', '.join(parts)})" if parts else ""
    advice = _ADVICE.get(code, "check the disk (see the system log)")
    return f"could not write {what} {path}: {reason}{room}: {advice}{then}"


def remove_quietly(path: Path) -> None:
    """Delete a file or directory tree if it exists; a failure here must not hide the first one."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_writable(path: Path) -> None:
    """Fail now, not after the work, where a file cannot be written at `path` (its missing folders made
    then): create and remove a temporary file in the nearest folder that exists on the way to it. An
    OSError names the path (or the temporary one, in the folder that refuses it); a folder at `path` is
    an IsADirectoryError, a file where a folder is needed a NotADirectoryError."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder, not a file", str(path))
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(path))
    probe = folder / f".{path.name}.tmp-{os.getpid()}"
    with open(probe, "wb"):
        pass
    probe.unlink()


@contextlib.contextmanager
def failing_cleanly(
    what: str,
    path: Path,
    needed: int | None = None,
    then: str = RESUME,
    remove: Iterable[Path] = (),
    error: type[LmforgeError] = DiskWriteError,
) -> Iterator[None]:
    """Turn a failed write inside the block into one `error` line, after deleting the `remove` paths."""
    try:
        yield
    except BaseException as e:
        for p in remove:  # first, so the free space reported counts what they held
            remove_quietly(Path(p))
        if io_errno(e) is None or isinstance(e, LmforgeError):
            raise
        raise error(write_failure(what, path, e, needed, then)) from e


def write_atomic(path: Path, data: str | bytes, what: str, then: str = RESUME, durable: bool = True) -> None:
    """Write a whole file through a temporary one and a rename: the old file or the new, never half.

    durable=False skips the fsync, for a file rewritten every few seconds that a crash may leave stale.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    with failing_cleanly(what, path, len(raw), then, remove=[tmp]):
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)


def copy_atomic(src: Path, dst: Path, what: str, then: str = RESUME) -> None:
    """Copy a small file (a tokenizer) through a temporary one and a rename."""
    write_atomic(dst, Path(src).read_bytes(), what, then)


class LineFile:
    """An append-only file of text lines (metrics.jsonl, train.log): each line lands whole or not at all.

    Unbuffered, so a failed write leaves no pending bytes for a later flush (or the garbage collector) to
    retry; a torn line is cut off again before the error is raised.
    """

    def __init__(self, path: Path, what: str, then: str = RESUME) -> None:
        self.path, self.what, self.then = Path(path), what, then
        self._f = None
        with failing_cleanly(what, self.path, then=then):
            self._f = open(self.path, "ab", buffering=0)  # noqa: SIM115 (closed in close())

    def append(self, text: str) -> None:
        """Append `text` (whole lines, newline included)."""
        if self._f is None:
            return
        data = memoryview(text.encode("utf-8"))
        start = os.fstat(self._f.fileno()).st_size
        try:
            while data:
                data = data[self._f.write(data) :]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._f.fileno(), start)  # no torn line for a reader or the next append
            self.close()
            raise DiskWriteError(write_failure(self.what, self.path, e, len(text), self.then)) from e

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
            self._f = None
