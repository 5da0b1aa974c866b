"""`prepare`: sources -> tokenizer -> train/val token shards + meta.json + manifest.json, written atomically.

The folder's format (names, version, fingerprint, reading it back) is folder.py's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data.encode import (
    CHUNK_CHARS,
    CHUNK_DOCS,
    EncodePool,
    ProgressBar,
    default_workers,
    serial_tokenizers,
)
from lmforge.data.errors import DataError
from lmforge.data.files import DEFAULT_TEXT_FIELD, Document, Skips
from lmforge.data.folder import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    META_FILE,
    SPLITS,
    TOKENIZER_FILE,
    fingerprint,
)
from lmforge.data.mixture import SourceSpec, mix, parse_sources
from lmforge.data.outdir import check_out_dir, install, remove_stale_temps, temp_dir_for, write_json
from lmforge.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, dtype_for_vocab
from lmforge.data.sources import iter_documents
from lmforge.data.tokenizer import Tokenizer, file_sha256, tokenizer_id, train_tokenizer
from lmforge.data.tokenizer_cache import cached_tokenizer
from lmforge.data.tokenizer_kinds import gpt2_files, is_tokenizer_file, is_trained, load_pretrained
from lmforge.errors import LmforgeError
from lmforge.safewrite import DiskWriteError, io_errno, write_failure

Progress = Callable[[str], None]


def _val_score(name: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document name."""
    # Hashing the name (not the position) keeps a document in the same split when other
    # files are added to the corpus, so validation numbers stay comparable across runs.
    # surrogatepass: a name that still holds a lone surrogate hashes instead of crashing, and every
    # other name gives exactly its UTF-8 bytes, so splits are unchanged.
    data = name.encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2.0**64


def _split_single(text: str, val_fraction: float) -> tuple[str, str] | None:
    """Cut one document into (train head, val tail) at a line break, or None if too short."""
    cut = len(text) - max(1, int(len(text) * val_fraction))
    newline = text.rfind("\n", 0, cut)
    if newline > 0:
        cut = newline + 1
    head, tail = text[:cut], text[cut:]
    return (head, tail) if head.strip() and tail.strip() else None


@dataclass
class _Stream:
    """One pass over the sources: unique documents, with skips and duplicates counted per source."""

    specs: list[SourceSpec]
    max_docs: int | None
    text_field: str
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
class _Scan:
    """What the first pass over the sources learns."""

    documents: int = 0
    complete: bool = True  # False when the pass stopped early (enough seen for a big corpus)
    overrides: dict[str, str] = field(default_factory=dict)
    single: str | None = None  # name of the only document, when there is exactly one
    sample: list[str] = field(default_factory=list)


def _scan(stream: _Stream, val_fraction: float, sample_bytes: int) -> _Scan:
    """First pass: count documents, fix the split fallback and collect the tokenizer sample.

    It stops as soon as the sample is full and both splits have a document: then nothing
    else it could learn matters, and a streamed corpus of any size is read only once more.
    """
    scan = _Scan()
    min_train: tuple[float, str] | None = None  # the train document the val fallback takes
    max_val: tuple[float, str] | None = None  # the val document the train fallback takes
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
    elif scan.documents >= 2 and scan.complete:
        # Deterministic fallback so that both splits are never empty: move the extreme
        # document by hash, which is the one closest to the other side of the threshold.
        if counts["val"] == 0 and min_train is not None:
            scan.overrides[min_train[1]] = "val"
        elif counts["train"] == 0 and max_val is not None:
            scan.overrides[max_val[1]] = "train"
    moved = {name for name, split in scan.overrides.items() if split == "val"}
    scan.sample = [text for name, text in sample if name not in moved]
    return scan


class _Writer:
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
_EXPECTED_SKIPS = ("duplicate", "mostly_data", "empty_module")


def _problem_summary(skips: Skips) -> str:
    """Skips.summary() without the expected skips (duplicates, builtin:stdlib's data tables)."""
    problems = Skips()
    for reason, count in skips.items():
        if reason not in _EXPECTED_SKIPS:
            for name in skips.examples.get(reason, []):
                problems.add(reason, name, 0)
            problems[reason] = count
    return problems.summary()


def _save_tokenizer(tok: Tokenizer, folder: Path) -> str:
    """Write ``folder/tokenizer.json``; return the digest of what a reader will load from it.

    Taken from the saved file, not the object in memory: Unigram scores, for one, are floats
    whose JSON text can change on the first save.
    """
    tok.save(folder / TOKENIZER_FILE)
    return file_sha256(folder / TOKENIZER_FILE)


def _save_gpt2(folder: Path) -> tuple[int, int, str]:
    """GPT-2's tokenizer.json in ``folder``, built or from the cache: (vocabulary size, EOS id, digest)."""

    def build(folder: Path) -> tuple[int, int, str]:
        tok = _resolve_tokenizer("gpt2", ())
        assert tok is not None
        return tok.vocab_size, tok.eos_id, _save_tokenizer(tok, folder)

    return cached_tokenizer("gpt2", list(gpt2_files()), folder, build)


def _resolve_tokenizer(spec: str, special_tokens: Sequence[str]) -> Tokenizer | None:
    """A ready tokenizer (gpt2, tiktoken:NAME, a tokenizer.json), or None for a kind to train."""
    if is_trained(spec):
        return None
    hf = load_pretrained(spec)
    if special_tokens:
        hf.add_special_tokens(list(special_tokens))
    return Tokenizer(hf)


def _check_args(
    val_fraction: float,
    tokenizer_sample_bytes: int,
    max_tokens: int | None,
    seq_len: int | None,
    stride: int | None,
    workers: int | None,
) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if tokenizer_sample_bytes < 1:
        raise DataError(f"tokenizer_sample_bytes must be >= 1, got {tokenizer_sample_bytes}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be >= 1, got {max_tokens}")
    if workers is not None and workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if stride is not None and seq_len is None:
        raise DataError("--stride needs --seq-len: the stride is a step between windows of seq_len tokens")
    if seq_len is not None and seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if stride is not None and seq_len is not None and not 1 <= stride <= seq_len:
        raise DataError(f"stride must be between 1 and seq_len={seq_len}, got {stride}")


def prepare(
    sources: list[str],
    out_dir: str | Path,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    max_docs: int | None = None,
    tokenizer_sample_bytes: int = 20_000_000,
    progress: Progress | None = None,
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    special_tokens: Sequence[str] = (),
    workers: int | None = None,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    stride: int | None = None,
    console=None,
) -> dict:
    """Tokenize ``sources`` into train/val shards, tokenizer.json, manifest.json and meta.json in ``out_dir``.

    ``sources`` entries may end in ``:WEIGHT`` to mix them in proportion; ``workers`` processes
    encode in parallel (default: all cores) with identical output for any count; ``console``
    (a rich Console) shows a live progress bar.
    """
    log: Progress = progress or (lambda _msg: None)
    if isinstance(sources, str):
        sources = [sources]  # a lone string would otherwise be read character by character
    sources = list(sources)
    if not sources:
        raise DataError("no sources given: pass at least one --source (a file, a folder, or builtin:stdlib)")
    _check_args(val_fraction, tokenizer_sample_bytes, max_tokens, seq_len, stride, workers)
    workers = workers or default_workers()
    specs = parse_sources(sources)
    out_dir = Path(out_dir).expanduser().absolute()
    check_out_dir(out_dir)
    # GPT-2 is encoded by tiktoken in the pool; its `tokenizers` object only writes tokenizer.json,
    # so it is built in the background while the documents are encoded.
    deferred = tokenizer == "gpt2" and not special_tokens and importlib.util.find_spec("tiktoken") is not None
    if deferred:
        gpt2_files()  # fails here, before any reading, when the vocabulary package is missing
    tok = None if deferred else _resolve_tokenizer(tokenizer, special_tokens)

    log(f"reading {', '.join(sources)}")
    stream = _Stream(specs, max_docs, text_field, log)
    scan = _scan(stream, val_fraction, tokenizer_sample_bytes if is_trained(tokenizer) else 0)
    if scan.documents == 0:
        skips = Skips()
        for per_source in stream.skips:
            for reason, count in per_source.items():
                skips.add(reason, (per_source.examples.get(reason) or [""])[0], count)
        found = f" (skipped: {skips.summary()})" if skips else ""
        raise DataError(
            f"no usable documents in {', '.join(sources)}{found}: need non-empty UTF-8 text "
            f"(.txt/.md, or records with a '{text_field}' field in .json/.jsonl/.parquet/.csv)"
        )
    if is_trained(tokenizer):
        sample_mb = sum(len(t) for t in scan.sample) / 1e6
        log(f"training {tokenizer} tokenizer (vocab {vocab_size}) on {sample_mb:.1f}M characters")
        tok = train_tokenizer(
            scan.sample, kind=tokenizer, vocab_size=vocab_size, special_tokens=special_tokens
        )
    scan.sample = []  # free the sample before the long tokenization pass

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    tmp = temp_dir_for(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writers: dict[str, ShardWriter] = {}
    pool: EncodePool | None = None
    bar = ProgressBar(console)
    try:
        with serial_tokenizers():
            pool = EncodePool(tok, workers, tokenizer if not special_tokens else None)
            if tok is None:
                vocab, eos_id = pool.fast_vocab()
                # One worker builds, saves and hashes GPT-2's tokenizer.json (~0.5 s; a copy when
                # cached) while the others encode: in its own process, it never holds up this one.
                saved = pool.call(_save_gpt2, tmp)
            else:
                vocab, eos_id = tok.vocab_size, tok.eos_id
            dtype = dtype_for_vocab(vocab)
            writers = {split: ShardWriter(tmp, split, dtype, DEFAULT_SHARD_TOKENS) for split in SPLITS}
            out = _Writer(pool, writers, len(specs), eos_id, max_tokens, bar)
            seen = 0
            for source, doc in stream:
                if out.full:
                    break
                seen += 1
                if scan.single is not None:
                    parts = _split_single(doc.text, val_fraction)
                    if parts is not None:
                        out.add("train", source, parts[0])
                        out.add("val", source, parts[1])
                    else:
                        out.add("train", source, doc.text)
                    continue
                split = scan.overrides.get(doc.name) or (
                    "val" if _val_score(doc.name) < val_fraction else "train"
                )
                out.add(split, source, doc.text)
            out.finish()
        bar.close()
        if scan.complete and not out.full and seen != scan.documents:
            raise DataError(
                f"sources changed while preparing ({scan.documents} documents, then {seen}): run prepare again"
            )
        shards = {split: writers[split].close() for split in SPLITS}
        shard_sha = {name: sha for w in writers.values() for name, sha in w.sha256.items()}
        if tok is None:
            saved_vocab, saved_eos, tokenizer_sha = saved.result()
            if (saved_vocab, saved_eos) != (vocab, eos_id):  # tiktoken and tokenizers disagree: a bug
                raise DataError(
                    f"tokenizer '{tokenizer}': tiktoken has {vocab} ids (EOS {eos_id}), tokenizer.json "
                    f"{saved_vocab} (EOS {saved_eos}); report this with your tiktoken and tokenizers versions"
                )
        else:
            tokenizer_sha = _save_tokenizer(tok, tmp)
        splits = {
            split: {
                "tokens": writers[split].tokens,
                "documents": out.stats[split]["documents"],
                "bytes": out.stats[split]["bytes"],
                "shards": shards[split],
            }
            for split in SPLITS
        }
        if not splits["train"]["tokens"] or not splits["val"]["tokens"]:
            raise DataError(
                f"max_tokens={max_tokens} stopped before both splits got a document: raise --max-tokens"
            )
        skipped: dict[str, int] = {}
        for per_source in stream.skips:
            for reason, count in per_source.items():
                skipped[reason] = skipped.get(reason, 0) + count
        problems = {r: c for r, c in skipped.items() if r not in _EXPECTED_SKIPS}
        if problems:
            summary = "; ".join(_problem_summary(s) for s in stream.skips if any(r in problems for r in s))
            log(f"warning: skipped {sum(problems.values()):,} unusable inputs: {summary}")
        if skipped.get("mostly_data"):
            log(
                f"note: left out {skipped['mostly_data']:,} modules that are mostly data tables (mostly_data)"
            )
        if stream.exhausted and specs[0].weight is not None:
            log(f"note: the mixture stopped when '{stream.exhausted}' ran out (to keep the proportions)")
        truncated = "max_tokens" if out.full else ("max_docs" if max_docs is not None else None)
        val_tokens = splits["val"]["tokens"]
        identity = fingerprint(tokenizer_sha, shard_sha)
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": identity,
            "sources": [
                {
                    "source": spec.source,
                    "weight": spec.weight,
                    **out.sources[i],
                    "duplicates": stream.skips[i].get("duplicate", 0),
                    "skipped": dict(sorted(stream.skips[i].items())),
                    "skipped_examples": dict(sorted(stream.skips[i].examples.items())),
                }
                for i, spec in enumerate(specs)
            ],
            "skipped": dict(sorted(skipped.items())),
            "truncated_by": truncated,
            "files": {
                TOKENIZER_FILE: hashlib.sha256((tmp / TOKENIZER_FILE).read_bytes()).hexdigest(),
                **dict(sorted(shard_sha.items())),
            },
        }
        write_json(tmp / MANIFEST_FILE, manifest)
        meta = {
            "format_version": FORMAT_VERSION,
            "vocab_size": vocab,
            "dtype": dtype,
            "eos_id": eos_id,
            "tokenizer": "file" if is_tokenizer_file(tokenizer) else tokenizer,
            "tokenizer_file": str(Path(tokenizer).expanduser()) if is_tokenizer_file(tokenizer) else None,
            "tokenizer_sha256": tokenizer_sha,  # of the file: the dataset fingerprint is built on it
            "tokenizer_id": tokenizer_id(tmp / TOKENIZER_FILE),  # of what it does: resume compares this
            "special_tokens": list(special_tokens),
            "sources": sources,
            "text_field": text_field,
            "max_docs": max_docs,
            "max_tokens": max_tokens,
            "val_fraction": val_fraction,
            # Single-document corpora get their tail as validation; say so, it is unusual.
            "val_split": "document_hash" if scan.single is None else "single_document_tail",
            # Overlapping validation windows for evaluation: seq_len tokens every stride tokens.
            "val_windows": None if seq_len is None else {"seq_len": seq_len, "stride": stride or seq_len},
            "splits": splits,
            # EOS tokens carry no text bytes but are predicted, so they count as tokens.
            "val_bytes_per_token": splits["val"]["bytes"] / val_tokens if val_tokens else None,
            "skipped": dict(sorted(skipped.items())),
            "shard_sha256": shard_sha,
            "fingerprint": identity,
        }
        # meta.json is written last: a folder with meta.json always has complete shards.
        write_json(tmp / META_FILE, meta)
        install(tmp, out_dir)
    except BaseException as e:
        # BaseException too: Ctrl-C during a long run must not leave a half-written temp folder.
        bar.close()
        if pool is not None:
            pool.close()  # a worker may be writing tokenizer.json into tmp: let it finish first
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if io_errno(e) is not None and not isinstance(e, LmforgeError):  # a full disk, say: one line
            raise DiskWriteError(
                write_failure("the prepared data", tmp, e, then=f"; {out_dir} is unchanged")
            ) from e
        raise
    finally:
        if pool is not None:
            pool.close()
    log(
        f"wrote {out_dir}: train {splits['train']['tokens']:,} tokens ({splits['train']['documents']:,} docs), "
        f"val {val_tokens:,} tokens ({splits['val']['documents']:,} docs), vocab {vocab:,}, "
        f"{meta['val_bytes_per_token']:.2f} bytes/token"
    )
    return meta
