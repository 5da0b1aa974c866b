"""`prepare`: documents -> tokenizer -> train/val token shards + meta.json, written atomically."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data.errors import DataError
from lmforge.data.outdir import check_out_dir, install, remove_stale_temps, temp_dir_for, write_json
from lmforge.data.shards import (
    DEFAULT_SHARD_TOKENS,
    META_FILE,
    ShardWriter,
    dtype_for_vocab,
    read_meta_file,
)
from lmforge.data.sources import Document, iter_documents
from lmforge.data.tokenizer import TOKENIZER_FILE, TOKENIZER_KINDS, Tokenizer, train_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Long documents are cut into pieces of about this many characters before encoding, so a
# single huge .txt file is still spread over all cores and never held as one giant list.
_PIECE_CHARS = 100_000
# One encode_batch call gets about this much text: big enough to keep many cores busy,
# small enough that the Encoding objects it returns stay at a few hundred MB.
_BATCH_CHARS = 4_000_000
_BATCH_PIECES = 4096
_REQUIRED_META = ("format_version", "vocab_size", "dtype", "eos_id", "splits", "fingerprint")

Progress = Callable[[str], None]


def _val_score(name: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document name."""
    # Hashing the name (not the position) keeps a document in the same split when other
    # files are added to the corpus, so validation numbers stay comparable across runs.
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


@dataclass
class _Scan:
    """What the first pass over the sources learns."""

    documents: int = 0
    overrides: dict[str, str] = field(default_factory=dict)
    single: str | None = None  # name of the only document, when there is exactly one
    sample: list[str] = field(default_factory=list)


def _tokenizer_file(tokenizer: str) -> Path | None:
    """The tokenizer.json to load, or None when ``tokenizer`` names a kind to train."""
    if tokenizer in TOKENIZER_KINDS:
        return None
    path = Path(tokenizer).expanduser()
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        return path / TOKENIZER_FILE
    if path.is_file():
        return path
    raise DataError(
        f"tokenizer '{tokenizer}' is neither a known kind ({', '.join(TOKENIZER_KINDS)}) nor an "
        f"existing {TOKENIZER_FILE} or folder containing one"
    )


def _iter_all(sources: list[str], max_docs: int | None, skipped: dict[str, int] | None) -> Iterator[Document]:
    remaining = max_docs
    for source in sources:
        if remaining is not None and remaining <= 0:
            return
        for doc in iter_documents(source, remaining, skipped):
            yield doc
            if remaining is not None:
                remaining -= 1


def _split_single(text: str, val_fraction: float) -> tuple[str, str] | None:
    """Cut one document into (train head, val tail) at a line break, or None if too short."""
    cut = len(text) - max(1, int(len(text) * val_fraction))
    newline = text.rfind("\n", 0, cut)
    if newline > 0:
        cut = newline + 1
    head, tail = text[:cut], text[cut:]
    return (head, tail) if head.strip() and tail.strip() else None


def _scan(sources: list[str], max_docs: int | None, val_fraction: float, sample_bytes: int) -> _Scan:
    """First pass: count documents, fix the split fallback and collect the tokenizer sample."""
    scan = _Scan()
    min_train: tuple[float, str] | None = None  # the train document the val fallback takes
    max_val: tuple[float, str] | None = None  # the val document the train fallback takes
    counts = {"train": 0, "val": 0}
    sample: list[tuple[str, str]] = []
    budget = sample_bytes
    first: Document | None = None
    for doc in _iter_all(sources, max_docs, None):
        scan.documents += 1
        first = first or doc
        score = _val_score(doc.name)
        if score < val_fraction:
            counts["val"] += 1
            max_val = max(max_val or (score, doc.name), (score, doc.name))
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
        parts = _split_single(first.text, val_fraction)
        # Train the tokenizer on the train head only, as for any other val document.
        head = first.text if parts is None else parts[0]
        sample = [(first.name, head.encode("utf-8")[:sample_bytes].decode("utf-8", errors="ignore"))]
        sample = sample if sample_bytes > 0 else []
    elif scan.documents >= 2:
        # Deterministic fallback so that both splits are never empty: move the extreme
        # document by hash, which is the one closest to the other side of the threshold.
        if counts["val"] == 0 and min_train is not None:
            scan.overrides[min_train[1]] = "val"
        elif counts["train"] == 0 and max_val is not None:
            scan.overrides[max_val[1]] = "train"
    moved = {name for name, split in scan.overrides.items() if split == "val"}
    scan.sample = [text for name, text in sample if name not in moved]
    return scan


def _cut_point(text: str, start: int, end: int) -> int:
    """Where to end the piece text[start:...], at most at ``end``."""
    # Best: just before a newline that follows a non-space character. The byte-level
    # pre-tokenizer (GPT-2 regex) always has a pre-token boundary there and matches on
    # either side never look across it, and BPE merges never cross pre-tokens, so the
    # pieces encode to exactly the ids of the whole document.
    low = start + (end - start) // 2
    pos = end
    while (i := text.rfind("\n", low, pos)) > start:
        if not text[i - 1].isspace():
            return i
        pos = i
    i = text.rfind("\n", low, end)
    return i + 1 if i >= 0 else end


def _pieces(text: str) -> list[str]:
    """Cut text into pieces of at most _PIECE_CHARS characters, at token-preserving points if possible."""
    pieces = []
    start = 0
    while len(text) - start > _PIECE_CHARS:
        end = _cut_point(text, start, start + _PIECE_CHARS)
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


class _Encoder:
    """Second pass: batches documents through the tokenizer into one ShardWriter per split."""

    def __init__(self, tok: Tokenizer, writers: dict[str, ShardWriter], progress: Progress) -> None:
        self.tok = tok
        self.writers = writers
        self.progress = progress
        self.stats = {split: {"documents": 0, "bytes": 0} for split in SPLITS}
        self._docs: list[tuple[str, int]] = []  # (split, number of pieces)
        self._pieces: list[str] = []
        self._chars = 0
        self._eos = np.array([tok.eos_id], dtype=np.int64)
        self._next_report = 0

    def add(self, split: str, text: str) -> None:
        pieces = _pieces(text)
        self._docs.append((split, len(pieces)))
        self._pieces.extend(pieces)
        self._chars += len(text)
        self.stats[split]["documents"] += 1
        self.stats[split]["bytes"] += len(text.encode("utf-8"))
        if self._chars >= _BATCH_CHARS or len(self._pieces) >= _BATCH_PIECES:
            self.flush()

    def flush(self) -> None:
        if not self._pieces:
            return
        ids = self.tok.encode_batch(self._pieces)
        index = 0
        for split, count in self._docs:
            parts = [np.asarray(ids[index + k], dtype=np.int64) for k in range(count)]
            index += count
            # The EOS after every document is what separates documents in the stream.
            self.writers[split].write(np.concatenate([*parts, self._eos]))
        self._docs, self._pieces, self._chars = [], [], 0
        total = sum(w.tokens for w in self.writers.values())
        if total >= self._next_report:
            docs = sum(s["documents"] for s in self.stats.values())
            self.progress(f"tokenized {docs:,} documents, {total:,} tokens")
            self._next_report = total + 10_000_000


def _fingerprint(tokenizer_sha: str, shard_sha: dict[str, str]) -> str:
    """Dataset identity: sha256 over the tokenizer digest and every shard's name and digest."""
    digest = hashlib.sha256(f"lmforge-data-v{FORMAT_VERSION}\ntokenizer {tokenizer_sha}\n".encode())
    for name in sorted(shard_sha):
        digest.update(f"{name} {shard_sha[name]}\n".encode())
    return digest.hexdigest()


def prepare(
    sources: list[str],
    out_dir: str | Path,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    max_docs: int | None = None,
    tokenizer_sample_bytes: int = 20_000_000,
    progress: Progress | None = None,
) -> dict:
    """Tokenize ``sources`` into train/val shards, tokenizer.json and meta.json in ``out_dir``."""
    log: Progress = progress or (lambda _msg: None)
    if isinstance(sources, str):
        sources = [sources]  # a lone string would otherwise be read character by character
    sources = list(sources)
    if not sources:
        raise DataError("no sources given: pass at least one --source (a file, a folder, or builtin:stdlib)")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if tokenizer_sample_bytes < 1:
        raise DataError(f"tokenizer_sample_bytes must be >= 1, got {tokenizer_sample_bytes}")
    out_dir = Path(out_dir).expanduser().absolute()
    check_out_dir(out_dir)
    tokenizer_path = _tokenizer_file(tokenizer)

    log(f"reading {', '.join(sources)}")
    scan = _scan(sources, max_docs, val_fraction, tokenizer_sample_bytes if tokenizer_path is None else 0)
    if scan.documents == 0:
        raise DataError(
            f"no usable documents in {', '.join(sources)}: need non-empty UTF-8 "
            ".txt/.md/.json/.jsonl files (json records need a 'text' or 'content' field)"
        )
    if tokenizer_path is not None:
        log(f"loading tokenizer {tokenizer_path}")
        tok = Tokenizer.load(tokenizer_path)
    else:
        sample_mb = sum(len(t) for t in scan.sample) / 1e6
        log(f"training {tokenizer} tokenizer (vocab {vocab_size}) on {sample_mb:.1f}M characters")
        tok = train_tokenizer(scan.sample, kind=tokenizer, vocab_size=vocab_size)
    scan.sample = []  # free the sample before the long tokenization pass
    dtype = dtype_for_vocab(tok.vocab_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    tmp = temp_dir_for(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writers: dict[str, ShardWriter] = {}
    try:
        writers = {split: ShardWriter(tmp, split, dtype, DEFAULT_SHARD_TOKENS) for split in SPLITS}
        encoder = _Encoder(tok, writers, log)
        skipped: dict[str, int] = {}
        seen = 0
        for doc in _iter_all(sources, max_docs, skipped):
            seen += 1
            if scan.single is not None:
                parts = _split_single(doc.text, val_fraction)
                if parts is not None:
                    encoder.add("train", parts[0])
                    encoder.add("val", parts[1])
                else:
                    encoder.add("train", doc.text)
                continue
            split = scan.overrides.get(doc.name) or (
                "val" if _val_score(doc.name) < val_fraction else "train"
            )
            encoder.add(split, doc.text)
        encoder.flush()
        if seen != scan.documents:
            raise DataError(
                f"sources changed while preparing ({scan.documents} documents, then {seen}): run prepare again"
            )
        shards = {split: writers[split].close() for split in SPLITS}
        shard_sha = {name: sha for w in writers.values() for name, sha in w.sha256.items()}
        tok.save(tmp / TOKENIZER_FILE)
        tokenizer_sha = tok.sha256()
        splits = {
            split: {
                "tokens": writers[split].tokens,
                "documents": encoder.stats[split]["documents"],
                "bytes": encoder.stats[split]["bytes"],
                "shards": shards[split],
            }
            for split in SPLITS
        }
        val_tokens = splits["val"]["tokens"]
        meta = {
            "format_version": FORMAT_VERSION,
            "vocab_size": tok.vocab_size,
            "dtype": dtype,
            "eos_id": tok.eos_id,
            "tokenizer": "file" if tokenizer_path is not None else tokenizer,
            "tokenizer_file": str(tokenizer_path) if tokenizer_path is not None else None,
            "tokenizer_sha256": tokenizer_sha,
            "sources": sources,
            "max_docs": max_docs,
            "val_fraction": val_fraction,
            # Single-document corpora get their tail as validation; say so, it is unusual.
            "val_split": "document_hash" if scan.single is None else "single_document_tail",
            "splits": splits,
            # EOS tokens carry no text bytes but are predicted, so they count as tokens.
            "val_bytes_per_token": splits["val"]["bytes"] / val_tokens if val_tokens else None,
            "skipped": dict(sorted(skipped.items())),
            "shard_sha256": shard_sha,
            "fingerprint": _fingerprint(tokenizer_sha, shard_sha),
        }
        # meta.json is written last: a folder with meta.json always has complete shards.
        write_json(tmp / META_FILE, meta)
        install(tmp, out_dir)
    except BaseException:
        # BaseException too: Ctrl-C during a long run must not leave a half-written temp folder.
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"wrote {out_dir}: train {splits['train']['tokens']:,} tokens / "
        f"{splits['train']['documents']:,} docs, val {val_tokens:,} tokens / "
        f"{splits['val']['documents']:,} docs, vocab {tok.vocab_size}"
    )
    return meta


def load_meta(data_dir: str | Path) -> dict:
    """Read and check ``DATA_DIR/meta.json``; DataError if the folder is not a prepared data folder."""
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(
            f"data folder '{data_dir}' does not exist: run `lmforge prepare --source ... --out {data_dir}` first"
        )
    meta = read_meta_file(path)
    if not isinstance(meta, dict) or any(key not in meta for key in _REQUIRED_META):
        raise DataError(
            f"'{path / META_FILE}' is incomplete: re-run `lmforge prepare --source ... --out {data_dir}`"
        )
    if meta["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"'{data_dir}' has data format {meta['format_version']}, this lmforge reads format "
            f"{FORMAT_VERSION}: re-run `lmforge prepare --source ... --out {data_dir}`"
        )
    return meta
