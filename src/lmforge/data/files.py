"""Reading text documents from local files and folders, and the `Document` every kind of source yields.

Remote sources (hub.py) and the built-in corpus (stdlib_corpus.py) build on this module; sources.py
picks the kind of a source.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lmforge.data import safe_read
from lmforge.data.errors import DataError
from lmforge.data.safe_read import (
    Unusable,
    capped_lines,
    display_name,
    load_json,
    open_regular,
    read_capped,
    walk_sorted,
)

TEXT_EXTENSIONS = (".txt", ".md")
JSON_EXTENSIONS = (".json", ".jsonl", ".jsonl.gz")
TABLE_EXTENSIONS = (".parquet", ".csv")
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + JSON_EXTENSIONS + TABLE_EXTENSIONS
TEXT_FIELDS = ("text", "content")
DEFAULT_TEXT_FIELD = "text"
# How many offenders per skip reason are kept by name for the warning.
_EXAMPLES_PER_REASON = 3
# Rows read from a parquet file at a time: bounded memory whatever the file size.
_PARQUET_BATCH_ROWS = 1024

Log = Callable[[str], None]

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


def count_skip(skipped: dict[str, int] | None, reason: str, name: str = "", count: int = 1) -> None:
    """Count ``count`` skips of ``reason`` in ``skipped`` (a Skips, a plain dict, or None: not counted)."""
    if isinstance(skipped, Skips):
        skipped.add(reason, name, count)
    elif skipped is not None:
        skipped[reason] = skipped.get(reason, 0) + count


def _decode(data: bytes, skipped: dict[str, int] | None, name: str = "") -> str | None:
    """Bytes -> str, or None (counted) for binary or non-UTF-8 content."""
    if b"\x00" in data[:_BINARY_SNIFF_BYTES]:
        count_skip(skipped, "binary", name)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        count_skip(skipped, "invalid_utf8", name)
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


class RecordFormat:
    """What the records of .json, .jsonl, .parquet and .csv files are read as: by default, a document of
    the text of the first of ``fields`` a record holds. ChatRecords (chat_records.py) reads conversations."""

    kind = "text"
    extensions = SUPPORTED_EXTENSIONS  # the file types a folder of this kind is read from
    missing = "no_text_field"  # the skip reason of a parquet row when the file has none of the columns

    def __init__(self, fields: tuple[str, ...] = TEXT_FIELDS) -> None:
        self.fields = fields

    def for_dataset(self, text_field: str) -> RecordFormat:
        """This format for a hub dataset whose own text field is ``text_field`` (an explicit one wins)."""
        if self.fields == TEXT_FIELDS and text_field not in self.fields:
            return RecordFormat((text_field, *self.fields))
        return self

    def columns(self, available: list[str]) -> list[str]:
        """The parquet columns to read, of ``available`` (none: the file holds nothing of this kind)."""
        column = next((f for f in self.fields if f in available), None)
        return [] if column is None else [column]

    def document(self, name: str, record: Any, skipped: dict[str, int] | None) -> Document | None:
        """The document of one record, or None (counted) when it has none."""
        return make_doc(name, record_text(record, self.fields), skipped)


def text_records(text_field: str) -> RecordFormat:
    """The plain-text record format for ``--text-field``."""
    return RecordFormat(text_fields(text_field))


def make_doc(name: str, text: str | None, skipped: dict[str, int] | None) -> Document | None:
    """A Document, or None (counted as no_text_field, too_large or empty) when there is no usable text.

    Lone surrogates (JSON's \\ud800 escapes make them) become U+FFFD: they cannot be encoded as UTF-8.
    """
    if text is None:
        count_skip(skipped, "no_text_field", name)
        return None
    if safe_read.utf8_size_over(text, safe_read.MAX_DOCUMENT_BYTES):
        count_skip(skipped, "too_large", name)
        return None
    if not text.strip():
        count_skip(skipped, "empty", name)
        return None
    return Document(name, safe_read.clean_text(text))


def _read_all(handle: IO[bytes], cap: int, name: str, skipped: dict[str, int] | None) -> str | None:
    """The whole of ``handle`` as text, or None (counted: too_large, unreadable, binary, invalid_utf8)."""
    try:
        data = read_capped(handle, cap)
    except Unusable as skip:
        count_skip(skipped, skip.reason, name)
        return None
    except OSError:
        count_skip(skipped, "unreadable", name)
        return None
    return _decode(data, skipped, name)


def read_text_file(path: str | Path, name: str, skipped: dict[str, int] | None) -> str | None:
    """The text of one regular file of at most MAX_DOCUMENT_BYTES, or None (counted, by reason)."""
    try:
        with open_regular(path) as handle:
            return _read_all(handle, safe_read.MAX_DOCUMENT_BYTES, name, skipped)
    except Unusable as skip:
        count_skip(skipped, skip.reason, name)
    except OSError:
        count_skip(skipped, "unreadable", name)
    return None


_END = object()  # marks the end of a line iterator whose items may be None


def _iter_jsonl(
    handle: IO[bytes], name: str, skipped: dict[str, int] | None, records: RecordFormat
) -> Iterator[Document]:
    lineno = count = 0
    # Stream line by line, each line capped: .jsonl corpora are often far larger than memory.
    lines = capped_lines(handle, safe_read.MAX_DOCUMENT_BYTES)
    while True:
        try:
            raw = next(lines, _END)
        except (OSError, EOFError, zlib.error):
            # A corrupt or truncated .gz: keep what was read, count the rest as unreadable.
            count_skip(skipped, "unreadable", name)
            return
        if raw is _END:
            break
        lineno += 1
        line_name = f"{name}#{lineno}"
        if raw is None:
            count += 1
            count_skip(skipped, "too_large", line_name)
            continue
        if not raw.strip():
            continue
        count += 1
        line = _decode(raw, skipped, line_name)
        if line is None:
            continue
        try:
            record = load_json(line)
        except Unusable as skip:
            count_skip(skipped, skip.reason, line_name)
            continue
        doc = records.document(line_name, record, skipped)
        if doc is not None:
            yield doc
    if not count:  # a file with no records at all is counted, never passed over in silence
        count_skip(skipped, "empty", name)


def _iter_json(
    handle: IO[bytes], name: str, skipped: dict[str, int] | None, records: RecordFormat
) -> Iterator[Document]:
    text = _read_all(handle, safe_read.MAX_JSON_FILE_BYTES, name, skipped)
    if text is None:
        return
    try:
        payload = load_json(text)
    except Unusable as skip:
        count_skip(skipped, skip.reason, name)
        return
    if not isinstance(payload, list):
        doc = records.document(name, payload, skipped)
        if doc is not None:
            yield doc
        return
    if not payload:
        count_skip(skipped, "empty", name)
    for index, record in enumerate(payload):
        doc = records.document(f"{name}#{index}", record, skipped)
        if doc is not None:
            yield doc


def _iter_parquet(
    handle: IO[bytes], name: str, skipped: dict[str, int] | None, records: RecordFormat
) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq  # optional, heavy: only parquet sources need it
    except ImportError:
        raise DataError(f"'{name}' is parquet, which needs pyarrow: pip install 'lmforge[parquet]'") from None

    try:
        table = pq.ParquetFile(handle)
    except Exception:  # pyarrow raises ArrowInvalid/OSError subclasses for non-parquet bytes
        count_skip(skipped, "unreadable", name)
        return
    with table:
        rows = table.metadata.num_rows
        columns = records.columns(table.schema_arrow.names)
        if not rows or not columns:
            count_skip(skipped, records.missing if rows else "empty", name, rows or 1)
            return
        row = 0
        try:
            # Row batches of the needed columns only keep memory bounded for files of any size.
            for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                for record in batch.to_pylist():
                    doc = records.document(f"{name}#{row}", record, skipped)
                    row += 1
                    if doc is not None:
                        yield doc
        except Exception:  # OSError or an ArrowInvalid for a damaged page: the rest is unreadable
            count_skip(skipped, "unreadable", name)


def _iter_csv(
    handle: IO[bytes], name: str, skipped: dict[str, int] | None, records: RecordFormat
) -> Iterator[Document]:
    try:
        head = handle.read(_BINARY_SNIFF_BYTES)
        handle.seek(0)
    except OSError:
        count_skip(skipped, "unreadable", name)
        return
    if b"\x00" in head:
        count_skip(skipped, "binary", name)
        return
    too_long = 0

    def lines() -> Iterator[str]:
        # csv reads whole lines; each is capped, and an over-long one is counted and left out.
        nonlocal too_long
        for line in capped_lines(text, safe_read.MAX_DOCUMENT_BYTES):
            if line is None:
                too_long += 1
                count_skip(skipped, "too_large", name)
            else:
                yield line

    # Text fields of real corpora are far longer than csv's 128 KiB default limit; a field
    # spread over many lines stops at the document cap (in characters: csv counts those).
    csv.field_size_limit(safe_read.MAX_DOCUMENT_BYTES)
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
    rows = 0
    try:
        for rows, record in enumerate(csv.DictReader(lines()), start=1):  # noqa: B007 - read below
            doc = records.document(f"{name}#{rows}", record, skipped)
            if doc is not None:
                yield doc
    except UnicodeDecodeError:
        count_skip(skipped, "invalid_utf8", name)
        return
    except csv.Error as error:
        # The field limit is csv's only error about size; after either, the rest cannot be trusted.
        count_skip(skipped, "too_large" if "field larger" in str(error) else "bad_csv", name)
        return
    except OSError:
        count_skip(skipped, "unreadable", name)
        return
    finally:
        text.detach()  # the caller owns and closes the binary file
    if not rows and not too_long:
        count_skip(skipped, "empty", name)


def _suffix(path: Path) -> str:
    """The file type: '.jsonl.gz' counts as one suffix."""
    lower = path.name.lower()
    return ".jsonl.gz" if lower.endswith(".jsonl.gz") else path.suffix.lower()


# The readers of files that hold records; any other supported file is one document.
_READERS = {
    ".jsonl": _iter_jsonl,
    ".jsonl.gz": _iter_jsonl,
    ".json": _iter_json,
    ".parquet": _iter_parquet,
    ".csv": _iter_csv,
}


def _iter_file(
    path: str | Path, name: str, skipped: dict[str, int] | None, records: RecordFormat
) -> Iterator[Document]:
    """The documents of one file, by its type; a FIFO, device or socket is counted, never opened."""
    try:
        handle = open_regular(path)
    except Unusable as skip:
        count_skip(skipped, skip.reason, name)
        return
    except OSError:
        count_skip(skipped, "unreadable", name)
        return
    with handle:
        suffix = _suffix(Path(path))
        if suffix in _READERS:
            # GzipFile leaves the file it wraps open; the with above closes it.
            stream = gzip.GzipFile(fileobj=handle, mode="rb") if suffix == ".jsonl.gz" else handle
            yield from _READERS[suffix](stream, name, skipped, records)
            return
        text = _read_all(handle, safe_read.MAX_DOCUMENT_BYTES, name, skipped)
        if text is not None:
            doc = make_doc(name, text, skipped)
            if doc is not None:
                yield doc


def iter_folder(
    root: Path, skipped: dict[str, int] | None, records: RecordFormat, prefix: str = ""
) -> Iterator[Document]:
    """Documents of every file of a type ``records`` reads under ``root``, in sorted relative-path order."""
    for rel, path, reason in walk_sorted(root, frozenset()):
        name = prefix + display_name(rel)
        if reason is not None:
            count_skip(skipped, reason, name)
        elif _suffix(Path(rel)) not in records.extensions:
            count_skip(skipped, "unsupported_extension", name)
        else:
            yield from _iter_file(path, name, skipped, records)


def iter_local(
    source: str, path: Path, skipped: dict[str, int] | None, records: RecordFormat
) -> Iterator[Document]:
    """The documents of an existing local path: every supported file of a folder, or one file."""
    if path.is_dir():
        yield from iter_folder(path, skipped, records)
        return
    if path.is_file():
        if _suffix(path) not in records.extensions:
            raise DataError(
                f"source '{source}' has an unsupported extension: use one of "
                f"{', '.join(records.extensions)} (or a folder of them)"
            )
        yield from _iter_file(path, display_name(path.name), skipped, records)
        return
    # a FIFO, a device or a socket: reading it could block or never end
    raise DataError(
        f"source '{display_name(source)}' is not a regular file or a folder (a FIFO, device or "
        "socket): give a file or a folder of files"
    )
