"""The two passes of `prepare` over the document stream: the scan (count, sample for the tokenizer, pick
the validation documents) and the writer (encode in the pool, append to each split's shards in order)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from lmforge.data.encode import CHUNK_CHARS, CHUNK_DOCS, EncodePool, ProgressBar
from lmforge.data.files import Document, RecordFormat, Skips
from lmforge.data.folder import SPLITS
from lmforge.data.mixture import SourceSpec, mix
from lmforge.data.shards import ShardWriter
from lmforge.data.sources import iter_documents

Progress = Callable[[str], None]


def val_score(name: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document name."""
    # Hashing the name (not the position) keeps a document in the same split when other
    # files are added to the corpus, so validation numbers stay comparable across runs.
    # surrogatepass: a name that still holds a lone surrogate hashes instead of crashing, and every
    # other name gives exactly its UTF-8 bytes, so splits are unchanged.
    data = name.encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2.0**64


def split_single(text: str, val_fraction: float) -> tuple[str, str] | None:
    """Cut one document into (train head, val tail) at a line break, or None if too short."""
    cut = len(text) - max(1, int(len(text) * val_fraction))
    newline = text.rfind("\n", 0, cut)
    if newline > 0:
        cut = newline + 1
    head, tail = text[:cut], text[cut:]
    return (head, tail) if head.strip() and tail.strip() else None


@dataclass
class DocStream:
    """One pass over the sources: unique documents, with skips and duplicates counted per source."""

    specs: list[SourceSpec]
    max_docs: int | None
    text_field: str | RecordFormat  # a field name (plain text), or how records are read (conversations)
    log: Progress
    skips: list[Skips] = field(default_factory=list)
    exhausted: str | None = None  # the mixture source that ran out first, if any

    def __iter__(self) -> Iterator[tuple[int, Document]]:
        self.skips = [Skips() for _ in self.specs]
        streams = [
            iter_documents(spec.source, None, self.skips[i], self.text_field, self.log)
            for i, spec in enumerate(self.specs)
        ]
        weights = None if self.specs[0].weight is None else [float(s.weight) for s in self.specs]

        def exhausted(index: int) -> None:
            self.exhausted = self.specs[index].source

        seen: set[bytes] = set()
        kept = 0
        for index, doc in mix(streams, weights, exhausted):
            if self.max_docs is not None and kept >= self.max_docs:
                return
            # Exact duplicates are dropped by a 128-bit hash of the text: 16 bytes per
            # document keeps the set small enough for streams of tens of millions of documents.
            digest = hashlib.blake2b(doc.text.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                self.skips[index].add("duplicate", doc.name)
                continue
            seen.add(digest)
            kept += 1
            yield index, doc


@dataclass
class Scan:
    """What the first pass over the sources learns."""

    documents: int = 0
    complete: bool = True  # False when the pass stopped early (enough seen for a big corpus)
    overrides: dict[str, str] = field(default_factory=dict)
    single: str | None = None  # name of the only document, when there is exactly one
    sample: list[str] = field(default_factory=list)


def scan_documents(stream: DocStream, val_fraction: float, sample_bytes: int) -> Scan:
    """First pass: count documents, fix the split fallback and collect the tokenizer sample.

    It stops as soon as the sample is full and both splits have a document: then nothing
    else it could learn matters, and a streamed corpus of any size is read only once more.
    """
    scan = Scan()
    min_train: tuple[float, str] | None = None  # the train document the val fallback takes
    max_val: tuple[float, str] | None = None  # the val document the train fallback takes
    max_val_text = ""  # its text: the tokenizer learns from it when it becomes the train split
    counts = {"train": 0, "val": 0}
    sample: list[tuple[str, str]] = []
    budget = sample_bytes
    first: Document | None = None
    for _, doc in stream:
        if budget <= 0 and counts["train"] and counts["val"]:
            scan.complete = False
            break
        scan.documents += 1
        first = first or doc
        score = val_score(doc.name)
        if score < val_fraction:
            counts["val"] += 1
            if max_val is None or (score, doc.name) > max_val:
                max_val, max_val_text = (score, doc.name), doc.text
            continue
        counts["train"] += 1
        min_train = min(min_train or (score, doc.name), (score, doc.name))
        if budget > 0:
            data = doc.text.encode("utf-8")
            if len(data) > budget:
                # Cut on a byte budget; a split multi-byte character at the end is dropped.
                data = data[:budget]
            budget -= len(data)
            sample.append((doc.name, data.decode("utf-8", errors="ignore")))
    if scan.documents == 1 and first is not None:
        scan.single = first.name
        parts = split_single(first.text, val_fraction)
        # Train the tokenizer on the train head only, as for any other val document.
        head = first.text if parts is None else parts[0]
        sample = [(first.name, head.encode("utf-8")[:sample_bytes].decode("utf-8", errors="ignore"))]
        sample = sample if sample_bytes > 0 else []
    elif scan.documents >= 2 and scan.complete:
        # Deterministic fallback so that both splits are never empty: move the extreme
        # document by hash, which is the one closest to the other side of the threshold.
        if counts["val"] == 0 and min_train is not None:
            scan.overrides[min_train[1]] = "val"
        elif counts["train"] == 0 and max_val is not None:
            scan.overrides[max_val[1]] = "train"
            if sample_bytes > 0:  # the whole train split: the tokenizer's sample
                head = max_val_text.encode("utf-8")[:sample_bytes].decode("utf-8", errors="ignore")
                sample = [(max_val[1], head)]
    moved = {name for name, split in scan.overrides.items() if split == "val"}
    scan.sample = [text for name, text in sample if name not in moved]
    return scan


class ShardFeeder:
    """Second pass: chunks of documents through the pool into one ShardWriter per split."""

    def __init__(
        self,
        pool: EncodePool,
        writers: dict[str, ShardWriter],
        n_sources: int,
        eos_id: int,
        max_tokens: int | None,
        bar: ProgressBar,
    ) -> None:
        self.pool = pool
        self.writers = writers
        self.max_tokens = max_tokens
        self.bar = bar
        self.stats = {split: {"documents": 0, "bytes": 0} for split in SPLITS}
        self.sources = [{"documents": 0, "tokens": 0, "bytes": 0} for _ in range(n_sources)]
        self.full = False  # max_tokens reached: everything after this document is dropped
        self._texts: list[str] = []
        self._tags: list[tuple[str, int, int]] = []  # (split, source index, bytes) per text
        self._chars = 0
        self._eos = np.array([eos_id], dtype=np.uint32)

    @property
    def tokens(self) -> int:
        return sum(w.tokens for w in self.writers.values())

    def add(self, split: str, source: int, text: str) -> None:
        self._texts.append(text)
        self._tags.append((split, source, len(text.encode("utf-8"))))
        self._chars += len(text)
        if self._chars >= CHUNK_CHARS or len(self._texts) >= CHUNK_DOCS:
            self.flush()

    def flush(self) -> None:
        if self._texts:
            done = self.pool.submit(self._texts, self._tags)
            self._texts, self._tags, self._chars = [], [], 0
            for tags, lengths, ids in done:
                self._write(tags, lengths, ids)

    def finish(self) -> None:
        self.flush()
        for tags, lengths, ids in self.pool.drain():
            self._write(tags, lengths, ids)

    def _write(self, tags: list[tuple[str, int, int]], lengths: np.ndarray, ids: np.ndarray) -> None:
        start = 0
        for (split, source, nbytes), length in zip(tags, lengths.tolist(), strict=True):
            if self.full:
                return
            # The EOS after every document is what separates documents in the stream.
            self.writers[split].write(np.concatenate([ids[start : start + length], self._eos]))
            start += length
            self.stats[split]["documents"] += 1
            self.stats[split]["bytes"] += nbytes
            self.sources[source]["documents"] += 1
            self.sources[source]["tokens"] += length + 1
            self.sources[source]["bytes"] += nbytes
            if self.max_tokens is not None and self.tokens >= self.max_tokens:
                self.full = True
        docs = sum(s["documents"] for s in self.stats.values())
        self.bar.update(docs, sum(s["bytes"] for s in self.stats.values()), self.tokens)


# Skip reasons that are by design rather than a problem with the input: no warning for them.
