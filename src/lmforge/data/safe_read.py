"""Reading files nobody checked: regular files only, bounded memory, JSON that cannot crash the reader.

Everything here either returns what it read or raises ``Unusable`` with the skip reason the
caller counts (the folder walk returns the reasons with the paths); nothing blocks on a FIFO,
grows without bound on a device, recurses with a folder tree, or lets a hostile JSON document
end the process.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, AnyStr

# One document (a text file, a .jsonl line, a record's text) is at most this many bytes:
# 64 MiB is some twenty copies of War and Peace, far beyond any useful training document, and
# keeps the memory of a reader and of an encoding worker bounded whatever the input.
MAX_DOCUMENT_BYTES = 64 * 2**20
# A .json file is parsed whole (its records are not known before the end), so it has its own,
# larger cap; a bigger corpus belongs in .jsonl, which is streamed line by line.
MAX_JSON_FILE_BYTES = 2**30
# int() refuses numbers over 4,300 digits (sys.get_int_max_str_digits); stay below that.
_MAX_INT_DIGITS = 4000
# What an over-long line is drained in: large enough to be fast, small enough to stay bounded.
_DRAIN_CHUNK = 2**20
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")


class Unusable(Exception):
    """An input that is skipped; ``reason`` is the name it is counted under (too_large, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def display_name(name: str) -> str:
    """A file name that can be printed, hashed and written to JSON.

    A name that is not valid UTF-8 reaches Python with surrogate escapes; its bad bytes are
    shown as ``\\xff`` instead, so the name stays stable and readable.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """Open a regular file for reading; ``Unusable('not_a_regular_file')`` for FIFOs, devices, sockets.

    Symlinks are followed, so a link counts as what it points to. OSError for what cannot be opened.
    """
    # stat first so that a device is never opened (opening some has side effects), then
    # fstat the opened file so a swap between the two calls cannot slip a FIFO through.
    # O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer.
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise Unusable("not_a_regular_file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Unusable("not_a_regular_file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(handle: IO[bytes], cap: int) -> bytes:
    """All of ``handle``, or ``Unusable('too_large')`` past ``cap`` bytes (never more is held)."""
    data = handle.read(cap + 1)
    if len(data) > cap:
        raise Unusable("too_large")
    return data


def capped_lines(handle: IO[AnyStr], cap: int) -> Iterator[AnyStr | None]:
    """The lines of ``handle`` (bytes or text); None in place of a line longer than ``cap``.

    ``for line in handle`` would hold a whole line in memory, and a file without newlines is
    one line of any size.
    """
    while True:
        line = handle.readline(cap + 1)
        if not line:
            return
        if len(line) <= cap or line[-1:] in (b"\n", "\n"):
            yield line
            continue
        while True:  # drain the rest of the over-long line, a bounded chunk at a time
            rest = handle.readline(_DRAIN_CHUNK)
            if not rest or rest[-1:] in (b"\n", "\n"):
                break
        yield None


def _parse_int(digits: str) -> int | float:
    # Numbers are never text here; a huge one becomes a float (inf) instead of an error.
    return int(digits) if len(digits) <= _MAX_INT_DIGITS else float(digits)


def load_json(text: str) -> Any:
    """``json.loads`` that cannot crash on hostile input.

    ``Unusable('json_too_deep')`` for nesting deeper than the parser allows, ``Unusable('bad_json')``
    for anything that is not JSON; numbers of any size parse.
    """
    try:
        return json.loads(text, parse_int=_parse_int)
    except RecursionError:
        # The C parser recurses once per level and stops cleanly at the interpreter's recursion
        # limit (about 1,000 levels; real records nest a few). Measuring the depth first
        # would cost more than the parse itself on a large array of records.
        raise Unusable("json_too_deep") from None
    except ValueError:  # JSONDecodeError, and any other value the parser refuses
        raise Unusable("bad_json") from None


def clean_text(text: str) -> str:
    """``text`` with lone surrogates (which JSON's \\ud800 escapes can produce) replaced by U+FFFD.

    They cannot be encoded as UTF-8, so every later step (hashing, tokenizing) would fail on them.
    """
    if text.isascii() or not _SURROGATE_RE.search(text):  # isascii: a fast answer for most text
        return text
    return _SURROGATE_RE.sub("\ufffd", text)


def utf8_size_over(text: str, cap: int) -> bool:
    """Whether ``text`` takes more than ``cap`` bytes as UTF-8, encoding it only when in doubt."""
    if len(text) > cap:  # at least one byte per character
        return True
    if len(text) * 4 <= cap:  # at most four bytes per character
        return False
    return len(text.encode("utf-8", errors="surrogatepass")) > cap


def walk_sorted(root: Path, skip_dirs: frozenset[str]) -> list[tuple[str, str, str | None]]:
    """Everything under root as (relative posix path, path, skip reason or None), sorted by relative path.

    A folder that cannot be listed comes back with the reason ``unreadable``, a symlink to a
    folder (not followed: it could loop or leave the tree) with ``not_a_regular_file``.
    """
    found: list[tuple[str, str, str | None]] = []
    # An explicit stack, not recursion: a tree nested a thousand folders deep is still a tree.
    pending = [("", os.fspath(root))]
    while pending:
        rel_dir, folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            found.append((rel_dir.rstrip("/") or ".", folder, "unreadable"))
            continue
        for entry in entries:
            # Hidden and excluded trees (.git, .venv, ...) are never entered.
            if entry.name.startswith("."):
                continue
            rel = rel_dir + entry.name
            try:
                is_dir = entry.is_dir()
                is_link = entry.is_symlink()
            except OSError:
                is_dir = is_link = False  # it will be counted as unreadable when opened
            if not is_dir:
                found.append((rel, entry.path, None))
            elif entry.name in skip_dirs:
                continue
            elif is_link:
                found.append((rel, entry.path, "not_a_regular_file"))
            else:
                pending.append((rel + "/", entry.path))
    # Sorting the relative paths (not listing order, which depends on the file system) is
    # what makes document order, and so the tokenizer sample, reproducible.
    found.sort(key=lambda item: item[0])
    return found
