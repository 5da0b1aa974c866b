"""Where documents come from: one source string -> its documents, whatever kind of source it names.

A source is a local file or folder (files.py), `builtin:stdlib` (stdlib_corpus.py), or a remote dataset:
hf:NAME, kaggle:OWNER/DATASET or a named shortcut (hub.py). Every kind yields `Document`s (files.py);
this module only tells the kinds apart, so none of them imports it. Conversations (`prepare --chat`) come
the same way, read with a chat record format (chat_records.py), and `builtin:stdlib-chat` is
stdlib_chat.py's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from lmforge.data import hub
from lmforge.data.errors import DataError
from lmforge.data.files import DEFAULT_TEXT_FIELD, Log, RecordFormat, iter_local, text_records
from lmforge.data.files import Document as Document  # re-exported: what every source yields
from lmforge.data.files import Skips as Skips
from lmforge.data.stdlib_corpus import iter_stdlib

BUILTIN_SOURCES = ("builtin:stdlib", "builtin:stdlib-chat")
# The built-ins of each record kind: plain text, and conversations (`prepare --chat`).
_BUILTIN_OF_KIND = {"text": "builtin:stdlib", "chat": "builtin:stdlib-chat"}
# A scheme needs at least two letters so that Windows drive letters ("C:\\...") stay paths.
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")


def _iter_builtin(source: str, skipped: dict[str, int] | None, records: RecordFormat) -> Iterator[Document]:
    if source not in BUILTIN_SOURCES:
        raise DataError(
            f"unknown built-in source '{source}': supported built-ins are {', '.join(BUILTIN_SOURCES)}"
        )
    if source != _BUILTIN_OF_KIND.get(records.kind):
        raise DataError(
            f"'{source}' holds conversations: prepare it with --chat"
            if source == "builtin:stdlib-chat"
            else f"'{source}' is plain text, not conversations: with --chat use builtin:stdlib-chat"
        )
    if source == "builtin:stdlib":
        yield from iter_stdlib(skipped)
        return
    from lmforge.data.chat_records import chat_document
    from lmforge.data.stdlib_chat import iter_stdlib_chat

    for name, messages in iter_stdlib_chat(skipped):
        doc = chat_document(name, messages, skipped)
        if doc is not None:
            yield doc


def _iter_source(
    source: str, skipped: dict[str, int] | None, records: RecordFormat, log: Log
) -> Iterator[Document]:
    if source.startswith("builtin:"):
        yield from _iter_builtin(source, skipped, records)
        return
    path = Path(source).expanduser()
    if path.exists():
        yield from iter_local(source, path, skipped, records)
        return
    if hub.is_hub_source(source):
        yield from hub.iter_hub_source(source, skipped, records, log)
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
    text_field: str | RecordFormat = DEFAULT_TEXT_FIELD,
    log: Log | None = None,
) -> Iterator[Document]:
    """Yield the non-empty documents of one source in a deterministic order.

    ``text_field`` names the field records hold their text in, or is a RecordFormat (conversations).

    ``skipped``, when given, is filled with counts of what was passed over, by reason
    (binary, invalid_utf8, unreadable, not_a_regular_file, too_large, bad_json, json_too_deep,
    bad_csv, no_text_field, empty, unsupported_extension, and mostly_data for builtin:stdlib);
    a ``Skips`` also keeps the first offenders' names.
    """
    if max_docs is not None and max_docs < 0:
        raise DataError(f"max_docs must be >= 0, got {max_docs}")
    # Validate the source eagerly so a typo fails at the call, not at the first next().
    records = text_field if isinstance(text_field, RecordFormat) else text_records(text_field)
    documents = _iter_source(source, skipped, records, log or (lambda _msg: None))
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
