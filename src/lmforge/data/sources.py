"""Where documents come from: one source string -> its documents, whatever kind of source it names.

A source is a local file or folder (files.py), `builtin:stdlib` (stdlib_corpus.py), or a remote dataset:
hf:NAME, kaggle:OWNER/DATASET or a named shortcut (hub.py). Every kind yields `Document`s (files.py);
this module only tells the kinds apart, so none of them imports it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from lmforge.data import hub
from lmforge.data.errors import DataError
from lmforge.data.files import DEFAULT_TEXT_FIELD, Log, iter_local, text_fields
from lmforge.data.files import Document as Document  # re-exported: what every source yields
from lmforge.data.files import Skips as Skips
from lmforge.data.stdlib_corpus import iter_stdlib

BUILTIN_SOURCES = ("builtin:stdlib",)
# A scheme needs at least two letters so that Windows drive letters ("C:\\...") stay paths.
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")


def _iter_source(
    source: str, skipped: dict[str, int] | None, text_field: str, log: Log
) -> Iterator[Document]:
    fields = text_fields(text_field)
    if source.startswith("builtin:"):
        if source == "builtin:stdlib":
            yield from iter_stdlib(skipped)
            return
        raise DataError(
            f"unknown built-in source '{source}': supported built-ins are {', '.join(BUILTIN_SOURCES)}"
        )
    path = Path(source).expanduser()
    if path.exists():
        yield from iter_local(source, path, skipped, fields)
        return
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
    (binary, invalid_utf8, unreadable, not_a_regular_file, too_large, bad_json, json_too_deep,
    bad_csv, no_text_field, empty, unsupported_extension, and mostly_data for builtin:stdlib);
    a ``Skips`` also keeps the first offenders' names.
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
