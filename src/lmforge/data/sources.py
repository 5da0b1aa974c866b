"""Reading raw text documents from files, folders and the built-in corpus."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.errors import DataError

TEXT_EXTENSIONS = (".txt", ".md")
JSON_EXTENSIONS = (".json", ".jsonl", ".jsonl.gz")
TABLE_EXTENSIONS = (".parquet", ".csv")
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + JSON_EXTENSIONS + TABLE_EXTENSIONS
BUILTIN_SOURCES = ("builtin:stdlib",)
TEXT_FIELDS = ("text", "content")
DEFAULT_TEXT_FIELD = "text"
# How many offenders per skip reason are kept by name for the warning.
_EXAMPLES_PER_REASON = 3
# Rows read from a parquet file at a time: bounded memory whatever the file size.
_PARQUET_BATCH_ROWS = 1024

Log = Callable[[str], None]

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


class Skips(dict):
    """Counts of skipped inputs by reason (a plain dict), plus the first few offenders of each."""

    def __init__(self) -> None:
        super().__init__()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, name: str, count: int = 1) -> None:
        """Count ``count`` skips of ``reason``; remember ``name`` if it is among the first few."""
        self[reason] = self.get(reason, 0) + count
        names = self.examples.setdefault(reason, [])
        if len(names) < _EXAMPLES_PER_REASON and name not in names:
            names.append(name)

    def summary(self) -> str:
        """One line: each reason with its count and first offenders, e.g. ``binary 2 (a.bin, b.png)``."""
        parts = []
        for reason in sorted(self):
            names = self.examples.get(reason, [])
            more = ", ..." if self[reason] > len(names) else ""
            shown = f" ({', '.join(names)}{more})" if names else ""
            parts.append(f"{reason} {self[reason]:,}{shown}")
        return "; ".join(parts)


def _count(skipped: dict[str, int] | None, reason: str, name: str = "") -> None:
    if isinstance(skipped, Skips):
        skipped.add(reason, name)
    elif skipped is not None:
        skipped[reason] = skipped.get(reason, 0) + 1


def _decode(data: bytes, skipped: dict[str, int] | None, name: str = "") -> str | None:
    """Bytes -> str, or None (counted) for binary or non-UTF-8 content."""
    if b"\x00" in data[:_BINARY_SNIFF_BYTES]:
        _count(skipped, "binary", name)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        _count(skipped, "invalid_utf8", name)
        return None
    # Editors on Windows like to prepend a BOM; it is not part of the text.
    return text[1:] if text.startswith("\ufeff") else text


def text_fields(text_field: str) -> tuple[str, ...]:
    """Fields tried in order: the default 'text' falls back to 'content'; any other name stands alone."""
    return TEXT_FIELDS if text_field == DEFAULT_TEXT_FIELD else (text_field,)


def record_text(record: Any, fields: tuple[str, ...] = TEXT_FIELDS) -> str | None:
    """The text of one record: a bare string, or the first of ``fields`` that holds a string."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for field in fields:
            value = record.get(field)
            if isinstance(value, str):
                return value
    return None


def make_doc(name: str, text: str | None, skipped: dict[str, int] | None) -> Document | None:
    """A Document, or None (counted as no_text_field or empty) when there is no usable text."""
    if text is None:
        _count(skipped, "no_text_field", name)
        return None
    if not text.strip():
        _count(skipped, "empty", name)
        return None
    return Document(name, text)


def _read_bytes(path: Path, skipped: dict[str, int] | None, name: str = "") -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        _count(skipped, "unreadable", name)
        return None


def _iter_jsonl(
    path: Path, name: str, skipped: dict[str, int] | None, fields: tuple[str, ...]
) -> Iterator[Document]:
    gz = path.name.lower().endswith(".gz")
    try:
        handle = gzip.open(path, "rb") if gz else path.open("rb")  # noqa: SIM115 - closed by the with below
    except OSError:
        _count(skipped, "unreadable", name)
        return
    with handle:
        lineno = 0
        lines = iter(handle)
        # Stream line by line: .jsonl corpora are often far larger than memory.
        while True:
            try:
                raw = next(lines, None)
            except (OSError, EOFError, zlib.error):
                # A corrupt or truncated .gz: keep what was read, count the rest as unreadable.
                _count(skipped, "unreadable", name)
                return
            if raw is None:
                return
            lineno += 1
            if not raw.strip():
                continue
            line_name = f"{name}#{lineno}"
            line = _decode(raw, skipped, line_name)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                _count(skipped, "bad_json", line_name)
                continue
            doc = make_doc(line_name, record_text(record, fields), skipped)
            if doc is not None:
                yield doc


def _iter_json(
    path: Path, name: str, skipped: dict[str, int] | None, fields: tuple[str, ...]
) -> Iterator[Document]:
    data = _read_bytes(path, skipped, name)
    text = None if data is None else _decode(data, skipped, name)
    if text is None:
        return
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        _count(skipped, "bad_json", name)
        return
    if isinstance(payload, list):
        for index, record in enumerate(payload):
            doc = make_doc(f"{name}#{index}", record_text(record, fields), skipped)
            if doc is not None:
                yield doc
    else:
        doc = make_doc(name, record_text(payload, fields), skipped)
        if doc is not None:
            yield doc


def _iter_parquet(
    path: Path, name: str, skipped: dict[str, int] | None, fields: tuple[str, ...]
) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq  # optional, heavy: only parquet sources need it
    except ImportError:
        raise DataError(f"'{name}' is parquet, which needs pyarrow: pip install 'lmforge[parquet]'") from None

    try:
        table = pq.ParquetFile(path)
    except Exception:  # pyarrow raises ArrowInvalid/OSError subclasses for non-parquet bytes
        _count(skipped, "unreadable", name)
        return
    with table:
        column = next((f for f in fields if f in table.schema_arrow.names), None)
        if column is None:
            rows = table.metadata.num_rows
            if rows and isinstance(skipped, Skips):
                skipped.add("no_text_field", name, rows)
            elif rows and skipped is not None:
                skipped["no_text_field"] = skipped.get("no_text_field", 0) + rows
            return
        row = 0
        try:
            # Row batches of one column keep memory bounded for files of any size.
            for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
                for value in batch.column(0).to_pylist():
                    doc = make_doc(f"{name}#{row}", value if isinstance(value, str) else None, skipped)
                    row += 1
                    if doc is not None:
                        yield doc
        except OSError:
            _count(skipped, "unreadable", name)


def _iter_csv(
    path: Path, name: str, skipped: dict[str, int] | None, fields: tuple[str, ...]
) -> Iterator[Document]:
    try:
        with path.open("rb") as probe:
            head = probe.read(_BINARY_SNIFF_BYTES)
        handle = path.open(encoding="utf-8", newline="")
    except OSError:
        _count(skipped, "unreadable", name)
        return
    if b"\x00" in head:
        handle.close()
        _count(skipped, "binary", name)
        return
    # Text fields of real corpora are far longer than csv's 128 KiB default limit.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with handle:
        try:
            reader = csv.DictReader(handle)
            for row, record in enumerate(reader, start=1):
                doc = make_doc(f"{name}#{row}", record_text(record, fields), skipped)
                if doc is not None:
                    yield doc
        except UnicodeDecodeError:
            _count(skipped, "invalid_utf8", name)
        except csv.Error:
            _count(skipped, "bad_csv", name)


def _suffix(path: Path) -> str:
    """The file type: '.jsonl.gz' counts as one suffix."""
    lower = path.name.lower()
    return ".jsonl.gz" if lower.endswith(".jsonl.gz") else path.suffix.lower()


def _iter_file(
    path: Path, name: str, skipped: dict[str, int] | None, fields: tuple[str, ...] = TEXT_FIELDS
) -> Iterator[Document]:
    suffix = _suffix(path)
    if suffix in (".jsonl", ".jsonl.gz"):
        yield from _iter_jsonl(path, name, skipped, fields)
    elif suffix == ".json":
        yield from _iter_json(path, name, skipped, fields)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, name, skipped, fields)
    elif suffix == ".csv":
        yield from _iter_csv(path, name, skipped, fields)
    else:
        data = _read_bytes(path, skipped, name)
        text = None if data is None else _decode(data, skipped, name)
        if text is not None:
            doc = make_doc(name, text, skipped)
            if doc is not None:
                yield doc


def _walk_sorted(root: Path, skip_dirs: frozenset[str]) -> list[tuple[str, Path]]:
    """All files under root as (relative posix path, path), sorted by relative path."""
    found: list[tuple[str, Path]] = []
    top = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(top):
        # Pruning in place keeps os.walk out of excluded and hidden trees (.git, .venv, ...).
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        # The relative folder once per folder, then plain string joins: much faster than
        # Path.relative_to on every file of a large tree.
        rel_dir = os.path.relpath(dirpath, top).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for filename in filenames:
            if filename.startswith("."):
                continue
            found.append((prefix + filename, Path(dirpath, filename)))
    # Sorting the relative paths (not walk order, which depends on the file system) is
    # what makes document order, and so the tokenizer sample, reproducible.
    found.sort(key=lambda item: item[0])
    return found


def iter_folder(
    root: Path, skipped: dict[str, int] | None, fields: tuple[str, ...] = TEXT_FIELDS, prefix: str = ""
) -> Iterator[Document]:
    """Documents of every supported file under ``root``, in sorted relative-path order."""
    for rel, path in _walk_sorted(root, frozenset()):
        if _suffix(path) not in SUPPORTED_EXTENSIONS:
            _count(skipped, "unsupported_extension", prefix + rel)
            continue
        yield from _iter_file(path, prefix + rel, skipped, fields)


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
        data = _read_bytes(path, skipped, rel)
        text = None if data is None else _decode(data, skipped, rel)
        if text is not None:
            doc = make_doc(rel, text, skipped)
            if doc is not None:
                yield doc


def _iter_source(
    source: str, skipped: dict[str, int] | None, text_field: str, log: Log
) -> Iterator[Document]:
    fields = text_fields(text_field)
    if source.startswith("builtin:"):
        if source == "builtin:stdlib":
            yield from _iter_stdlib(skipped)
            return
        raise DataError(
            f"unknown built-in source '{source}': supported built-ins are {', '.join(BUILTIN_SOURCES)}"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        yield from iter_folder(path, skipped, fields)
        return
    if path.is_file():
        if _suffix(path) not in SUPPORTED_EXTENSIONS:
            raise DataError(
                f"source '{source}' has an unsupported extension: use one of "
                f"{', '.join(SUPPORTED_EXTENSIONS)} (or a folder of them)"
            )
        yield from _iter_file(path, path.name, skipped, fields)
        return
    from lmforge.data import hub  # imports nothing heavy until a hub source is read

    if hub.is_hub_source(source):
        yield from hub.iter_hub_source(source, skipped, fields, log)
        return
    match = _SCHEME_RE.match(source)
    if match:
        raise DataError(
            f"unsupported source scheme '{match.group(1)}:' in '{source}': supported are "
            f"{', '.join(BUILTIN_SOURCES)}, hf:NAME, kaggle:OWNER/DATASET, "
            f"{', '.join(hub.SHORTCUTS)}, or a local file or folder"
        )
    raise DataError(
        f"source '{source}' does not exist: give a file, a folder, builtin:stdlib, hf:NAME, "
        f"kaggle:OWNER/DATASET or one of {', '.join(hub.SHORTCUTS)}"
    )


def iter_documents(
    source: str,
    max_docs: int | None = None,
    skipped: dict[str, int] | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    log: Log | None = None,
) -> Iterator[Document]:
    """Yield the non-empty documents of one source in a deterministic order.

    ``skipped``, when given, is filled with counts of what was passed over, by reason
    (binary, invalid_utf8, unreadable, bad_json, bad_csv, no_text_field, empty,
    unsupported_extension); a ``Skips`` also keeps the first offenders' names.
    """
    if max_docs is not None and max_docs < 0:
        raise DataError(f"max_docs must be >= 0, got {max_docs}")
    # Validate the source eagerly so a typo fails at the call, not at the first next().
    documents = _iter_source(source, skipped, text_field, log or (lambda _msg: None))
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
