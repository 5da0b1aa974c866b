"""Reading raw text documents from files, folders and the built-in corpus."""

from __future__ import annotations

import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.errors import DataError

TEXT_EXTENSIONS = (".txt", ".md")
JSON_EXTENSIONS = (".json", ".jsonl")
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + JSON_EXTENSIONS
BUILTIN_SOURCES = ("builtin:stdlib",)
TEXT_FIELDS = ("text", "content")

# Directory names that hold the stdlib's own test suites (test/, tests/, idlelib/idle_test,
# lib2to3/tests, ctypes/test, ...) or installed third-party code; the built-in corpus
# should be real library code that does not depend on what the user has pip-installed.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
# A scheme needs at least two letters so that Windows drive letters ("C:\\...") stay paths.
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
# Looking for NUL bytes in the first few KiB is how most tools tell binary from text.
_BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One text document; ``name`` is a stable identifier such as a relative path."""

    name: str
    text: str


def _count(skipped: dict[str, int] | None, reason: str) -> None:
    if skipped is not None:
        skipped[reason] = skipped.get(reason, 0) + 1


def _decode(data: bytes, skipped: dict[str, int] | None) -> str | None:
    """Bytes -> str, or None (counted) for binary or non-UTF-8 content."""
    if b"\x00" in data[:_BINARY_SNIFF_BYTES]:
        _count(skipped, "binary")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        _count(skipped, "invalid_utf8")
        return None
    # Editors on Windows like to prepend a BOM; it is not part of the text.
    return text[1:] if text.startswith("\ufeff") else text


def _record_text(record: Any) -> str | None:
    """The text of one JSON record: a bare string, or the 'text' (else 'content') field."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for field in TEXT_FIELDS:
            value = record.get(field)
            if isinstance(value, str):
                return value
    return None


def _make_doc(name: str, text: str | None, skipped: dict[str, int] | None) -> Document | None:
    if text is None:
        _count(skipped, "no_text_field")
        return None
    if not text.strip():
        _count(skipped, "empty")
        return None
    return Document(name, text)


def _read_bytes(path: Path, skipped: dict[str, int] | None) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        _count(skipped, "unreadable")
        return None


def _iter_jsonl(path: Path, name: str, skipped: dict[str, int] | None) -> Iterator[Document]:
    try:
        handle = path.open("rb")
    except OSError:
        _count(skipped, "unreadable")
        return
    with handle:
        # Stream line by line: .jsonl corpora are often far larger than memory.
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            line = _decode(raw, skipped)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                _count(skipped, "bad_json")
                continue
            doc = _make_doc(f"{name}#{lineno}", _record_text(record), skipped)
            if doc is not None:
                yield doc


def _iter_json(path: Path, name: str, skipped: dict[str, int] | None) -> Iterator[Document]:
    data = _read_bytes(path, skipped)
    text = None if data is None else _decode(data, skipped)
    if text is None:
        return
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        _count(skipped, "bad_json")
        return
    if isinstance(payload, list):
        for index, record in enumerate(payload):
            doc = _make_doc(f"{name}#{index}", _record_text(record), skipped)
            if doc is not None:
                yield doc
    else:
        doc = _make_doc(name, _record_text(payload), skipped)
        if doc is not None:
            yield doc


def _iter_file(path: Path, name: str, skipped: dict[str, int] | None) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, name, skipped)
    elif suffix == ".json":
        yield from _iter_json(path, name, skipped)
    else:
        data = _read_bytes(path, skipped)
        text = None if data is None else _decode(data, skipped)
        if text is not None:
            doc = _make_doc(name, text, skipped)
            if doc is not None:
                yield doc


def _walk_sorted(root: Path, skip_dirs: frozenset[str]) -> list[tuple[str, Path]]:
    """All files under root as (relative posix path, path), sorted by relative path."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of excluded and hidden trees (.git, .venv, ...).
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            found.append((path.relative_to(root).as_posix(), path))
    # Sorting the relative paths (not walk order, which depends on the file system) is
    # what makes document order, and so the tokenizer sample, reproducible.
    found.sort(key=lambda item: item[0])
    return found


def _iter_folder(root: Path, skipped: dict[str, int] | None) -> Iterator[Document]:
    for rel, path in _walk_sorted(root, frozenset()):
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            _count(skipped, "unsupported_extension")
            continue
        yield from _iter_file(path, rel, skipped)


def stdlib_root() -> Path:
    """The folder holding this interpreter's Python standard library sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not (root / "os.py").is_file():
        raise DataError(
            f"builtin:stdlib: no Python standard library sources at '{root}': "
            "give a file or folder as --source instead"
        )
    return root


def _iter_stdlib(skipped: dict[str, int] | None) -> Iterator[Document]:
    for rel, path in _walk_sorted(stdlib_root(), _STDLIB_EXCLUDED_DIRS):
        if not rel.endswith(".py"):
            continue
        data = _read_bytes(path, skipped)
        text = None if data is None else _decode(data, skipped)
        if text is not None:
            doc = _make_doc(rel, text, skipped)
            if doc is not None:
                yield doc


def _iter_source(source: str, skipped: dict[str, int] | None) -> Iterator[Document]:
    if source.startswith("builtin:"):
        if source == "builtin:stdlib":
            yield from _iter_stdlib(skipped)
            return
        raise DataError(
            f"unknown built-in source '{source}': supported built-ins are {', '.join(BUILTIN_SOURCES)}"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _iter_folder(path, skipped)
        return
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise DataError(
                f"source '{source}' has an unsupported extension: use one of "
                f"{', '.join(SUPPORTED_EXTENSIONS)} (or a folder of them)"
            )
        yield from _iter_file(path, path.name, skipped)
        return
    match = _SCHEME_RE.match(source)
    if match and not path.exists():
        raise DataError(
            f"unsupported source scheme '{match.group(1)}:' in '{source}': supported are "
            f"{', '.join(BUILTIN_SOURCES)}, or a local file or folder"
        )
    raise DataError(
        f"source '{source}' does not exist: give a file, a folder of .txt/.md/.json/.jsonl, or builtin:stdlib"
    )


def iter_documents(
    source: str, max_docs: int | None = None, skipped: dict[str, int] | None = None
) -> Iterator[Document]:
    """Yield the non-empty documents of one source in a deterministic order.

    ``skipped``, when given, is filled with counts of what was passed over, by reason
    (binary, invalid_utf8, unreadable, bad_json, no_text_field, empty, unsupported_extension).
    """
    if max_docs is not None and max_docs < 0:
        raise DataError(f"max_docs must be >= 0, got {max_docs}")
    # Validate the source eagerly so a typo fails at the call, not at the first next().
    documents = _iter_source(source, skipped)
    first = next(documents, None)
    if first is None or max_docs == 0:
        return iter(())
    return _limited(first, documents, max_docs)


def _limited(first: Document, rest: Iterator[Document], max_docs: int | None) -> Iterator[Document]:
    yield first
    if max_docs is None:
        yield from rest
        return
    # Stop before pulling another document so nothing beyond the limit is read or counted.
    for _ in range(max_docs - 1):
        doc = next(rest, None)
        if doc is None:
            return
        yield doc
