"""Several sources as one document stream: concatenated, or mixed in proportion to weights."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.errors import DataError
from lmforge.data.files import Document

_WEIGHT_RE = re.compile(r"^(?P<source>.+):(?P<weight>\d+(?:\.\d*)?|\.\d+)$")


@dataclass(frozen=True)
class SourceSpec:
    """One ``--source``: what to read and, in a mixture, its weight."""

    source: str
    weight: float | None = None


def parse_source(spec: str) -> SourceSpec:
    """``SRC`` or ``SRC:WEIGHT`` (a local path that exists is never read as having a weight)."""
    match = _WEIGHT_RE.match(spec)
    if match is None or Path(spec).expanduser().exists():
        return SourceSpec(spec)
    weight = float(match.group("weight"))
    if weight <= 0:
        raise DataError(f"source '{spec}': a mixture weight must be > 0, got {weight}")
    return SourceSpec(match.group("source"), weight)


def parse_sources(specs: list[str]) -> list[SourceSpec]:
    """Parse every ``--source``; weights must be given for all of them or for none."""
    parsed = [parse_source(s) for s in specs]
    weighted = [p.weight is not None for p in parsed]
    if any(weighted) and not all(weighted):
        missing = ", ".join(p.source for p in parsed if p.weight is None)
        raise DataError(f"give every --source a :WEIGHT or none of them (no weight: {missing})")
    return parsed


def mix(
    streams: list[Iterator[Document]],
    weights: list[float] | None,
    on_exhausted: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, Document]]:
    """(source index, document) pairs: the streams one after another, or mixed by UTF-8 bytes.

    With weights, the next document always comes from the source furthest below its share
    (smallest bytes taken / weight, lowest index on ties), so after every document each
    source's share of the bytes is within one document of its weight; the mixture ends when
    any source runs out, because continuing would break the proportions.
    """
    if weights is None:
        for index, stream in enumerate(streams):
            for doc in stream:
                yield index, doc
        return
    taken = [0] * len(streams)
    while True:
        index = min(range(len(streams)), key=lambda i: (taken[i] / weights[i], i))
        doc = next(streams[index], None)
        if doc is None:
            if on_exhausted is not None:
                on_exhausted(index)
            return
        taken[index] += len(doc.text.encode("utf-8"))
        yield index, doc
