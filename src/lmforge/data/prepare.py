"""`prepare`: sources -> tokenizer -> train/val token shards + meta.json + manifest.json, written atomically.

The folder's format (names, version, fingerprint, reading it back) is folder.py's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.encode import (
    EncodePool,
    ProgressBar,
    default_workers,
    serial_tokenizers,
)
from lmforge.data.errors import DataError
from lmforge.data.files import DEFAULT_TEXT_FIELD, Skips
from lmforge.data.folder import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    META_FILE,
    SPLITS,
    TOKENIZER_FILE,
    fingerprint,
)
from lmforge.data.mixture import SourceSpec, parse_sources
from lmforge.data.outdir import check_out_dir, install, remove_stale_temps, temp_dir_for, write_json
from lmforge.data.passes import (
    DocStream,
    Progress,
    Scan,
    ShardFeeder,
    scan_documents,
    split_single,
    val_score,
)
from lmforge.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, dtype_for_vocab
from lmforge.data.tokenizer import Tokenizer, file_sha256, tokenizer_id, train_tokenizer
from lmforge.data.tokenizer_cache import cached_tokenizer
from lmforge.data.tokenizer_kinds import gpt2_files, is_tokenizer_file, is_trained, load_pretrained
from lmforge.errors import LmforgeError
from lmforge.safewrite import DiskWriteError, io_errno, write_failure
from lmforge.words import counted

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
    if isinstance(sources, str):
        sources = [sources]  # a lone string would otherwise be read character by character
    job = _Job(
        list(sources), Path(out_dir).expanduser().absolute(), tokenizer, vocab_size, val_fraction, max_docs,
        max_tokens, seq_len, stride, text_field, tuple(special_tokens), progress or (lambda _msg: None),
    )  # fmt: skip
    if not job.sources:
        raise DataError("no sources given: pass at least one --source (a file, a folder, or builtin:stdlib)")
    _check_args(val_fraction, tokenizer_sample_bytes, max_tokens, seq_len, stride, workers)
    specs = parse_sources(job.sources)
    check_out_dir(job.out_dir)
    # GPT-2 is encoded by tiktoken in the pool; its `tokenizers` object only writes tokenizer.json,
    # so it is built in the background while the documents are encoded.
    deferred = tokenizer == "gpt2" and not special_tokens and importlib.util.find_spec("tiktoken") is not None
    if deferred:
        gpt2_files()  # fails here, before any reading, when the vocabulary package is missing
    tok = None if deferred else _resolve_tokenizer(tokenizer, special_tokens)

    job.log(f"reading {', '.join(job.sources)}")
    stream = DocStream(specs, max_docs, text_field, job.log)
    scan = scan_documents(stream, val_fraction, tokenizer_sample_bytes if is_trained(tokenizer) else 0)
    if scan.documents == 0:
        _no_documents(job, stream)
    if is_trained(tokenizer):
        sample_mb = sum(len(t) for t in scan.sample) / 1e6
        job.log(f"training {tokenizer} tokenizer (vocab {vocab_size}) on {sample_mb:.1f}M characters")
        tok = train_tokenizer(
            scan.sample, kind=tokenizer, vocab_size=vocab_size, special_tokens=special_tokens
        )
        if tok.vocab_size < vocab_size:
            job.log(
                f"note: the tokenizer learned {tok.vocab_size:,} tokens of the {vocab_size:,} asked for: its "
                "sample holds no more to learn (more or more varied text gives more)"
            )
    scan.sample = []  # free the sample before the long tokenization pass
    meta = _write_folder(job, specs, stream, scan, tok, workers or default_workers(), console)
    job.log(_summary(job.out_dir, meta))
    return meta


def _summary(out_dir: Path, meta: dict) -> str:
    """prepare's last line: what it wrote."""
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    return (
        f"wrote {out_dir}: train {counted(train['tokens'], 'token')} ({counted(train['documents'], 'doc')}), "
        f"val {counted(val['tokens'], 'token')} ({counted(val['documents'], 'doc')}), vocab {meta['vocab_size']:,}, "
        f"{meta['val_bytes_per_token']:.2f} bytes/token"
    )


@dataclass
class _Job:
    """What one prepare call was asked for."""

    sources: list[str]
    out_dir: Path
    tokenizer: str
    vocab_size: int
    val_fraction: float
    max_docs: int | None
    max_tokens: int | None
    seq_len: int | None
    stride: int | None
    text_field: str
    special_tokens: tuple[str, ...]
    log: Progress


@dataclass
class _Encoded:
    """The second pass's results: shards per split, their digests, the tokenizer file's digest."""

    vocab: int
    eos_id: int
    dtype: str
    writer: ShardFeeder
    shards: dict[str, list[str]]
    shard_sha: dict[str, str]
    tokenizer_sha: str


def _no_documents(job: _Job, stream: DocStream) -> None:
    skips = Skips()
    for per_source in stream.skips:
        for reason, count in per_source.items():
            skips.add(reason, (per_source.examples.get(reason) or [""])[0], count)
    found = f" (skipped: {skips.summary()})" if skips else ""
    raise DataError(
        f"no usable documents in {', '.join(job.sources)}{found}: need non-empty UTF-8 text "
        f"(.txt/.md, or records with a '{job.text_field}' field in .json/.jsonl/.parquet/.csv)"
    )


def _write_folder(
    job: _Job,
    specs: list[SourceSpec],
    stream: DocStream,
    scan: Scan,
    tok: Tokenizer | None,
    workers: int,
    console,
) -> dict:
    """Encode into a temporary folder, write manifest.json and meta.json (last), and rename it into place.

    Whatever fails (Ctrl-C included) removes the temporary folder; a full disk is one line.
    """
    out_dir = job.out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    tmp = temp_dir_for(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writers: dict[str, ShardWriter] = {}
    bar = ProgressBar(console)
    pool: EncodePool | None = None
    try:
        with serial_tokenizers():
            pool = EncodePool(tok, workers, job.tokenizer if not job.special_tokens else None)
            encoded = _encode(job, specs, stream, scan, tok, pool, writers, bar, tmp)
        meta = _write_meta(job, specs, stream, scan, encoded, tmp)
        install(tmp, out_dir)
        return meta
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


def _encode(
    job: _Job,
    specs: list[SourceSpec],
    stream: DocStream,
    scan: Scan,
    tok: Tokenizer | None,
    pool: EncodePool,
    writers: dict[str, ShardWriter],
    bar: ProgressBar,
    tmp: Path,
) -> _Encoded:
    """The second pass: every document to its split's shards, in order, through the pool."""
    if tok is None:
        vocab, eos_id = pool.fast_vocab()
        # One worker builds, saves and hashes GPT-2's tokenizer.json (~0.5 s; a copy when
        # cached) while the others encode: in its own process, it never holds up this one.
        saved = pool.call(_save_gpt2, tmp)
    else:
        vocab, eos_id = tok.vocab_size, tok.eos_id
    dtype = dtype_for_vocab(vocab)
    writers.update({split: ShardWriter(tmp, split, dtype, DEFAULT_SHARD_TOKENS) for split in SPLITS})
    out = ShardFeeder(pool, writers, len(specs), eos_id, job.max_tokens, bar)
    seen = 0
    for source, doc in stream:
        if out.full:
            break
        seen += 1
        if scan.single is not None:
            parts = split_single(doc.text, job.val_fraction)
            if parts is not None:
                out.add("train", source, parts[0])
                out.add("val", source, parts[1])
            else:
                out.add("train", source, doc.text)
            continue
        split = scan.overrides.get(doc.name) or ("val" if val_score(doc.name) < job.val_fraction else "train")
        out.add(split, source, doc.text)
    out.finish()
    bar.close()
    if scan.complete and not out.full and seen != scan.documents:
        raise DataError(
            f"sources changed while preparing ({scan.documents} documents, then {seen}): run prepare again"
        )
    shards = {split: writers[split].close() for split in SPLITS}
    shard_sha = {name: sha for w in writers.values() for name, sha in w.sha256.items()}
    if tok is not None:
        return _Encoded(vocab, eos_id, dtype, out, shards, shard_sha, _save_tokenizer(tok, tmp))
    saved_vocab, saved_eos, tokenizer_sha = saved.result()
    if (saved_vocab, saved_eos) != (vocab, eos_id):  # tiktoken and tokenizers disagree: a bug
        raise DataError(
            f"tokenizer '{job.tokenizer}': tiktoken has {vocab} ids (EOS {eos_id}), tokenizer.json "
            f"{saved_vocab} (EOS {saved_eos}); report this with your tiktoken and tokenizers versions"
        )
    return _Encoded(vocab, eos_id, dtype, out, shards, shard_sha, tokenizer_sha)


def report_skips(log: Progress, specs: list[SourceSpec], stream: DocStream) -> dict[str, int]:
    """Skips summed over the sources; a warning for the problems, notes for what is left out by design."""
    skipped: dict[str, int] = {}
    for per_source in stream.skips:
        for reason, count in per_source.items():
            skipped[reason] = skipped.get(reason, 0) + count
    problems = {r: c for r, c in skipped.items() if r not in _EXPECTED_SKIPS}
    if problems:
        summary = "; ".join(_problem_summary(s) for s in stream.skips if any(r in problems for r in s))
        log(f"warning: skipped {sum(problems.values()):,} unusable inputs: {summary}")
    if skipped.get("mostly_data"):
        log(f"note: left out {skipped['mostly_data']:,} modules that are mostly data tables (mostly_data)")
    if stream.exhausted and specs[0].weight is not None:
        log(f"note: the mixture stopped when '{stream.exhausted}' ran out (to keep the proportions)")
    return skipped


def _write_meta(
    job: _Job, specs: list[SourceSpec], stream: DocStream, scan: Scan, enc: _Encoded, tmp: Path
) -> dict:
    """manifest.json, then meta.json (last: a folder with meta.json always has complete shards)."""
    out = enc.writer
    splits = {
        split: {
            "tokens": out.writers[split].tokens,
            "documents": out.stats[split]["documents"],
            "bytes": out.stats[split]["bytes"],
            "shards": enc.shards[split],
        }
        for split in SPLITS
    }
    if not splits["train"]["tokens"] or not splits["val"]["tokens"]:
        raise DataError(
            f"max_tokens={job.max_tokens} stopped before both splits got a document: raise --max-tokens"
        )
    skipped = report_skips(job.log, specs, stream)
    identity = fingerprint(enc.tokenizer_sha, enc.shard_sha)
    write_json(tmp / MANIFEST_FILE, _manifest(job, specs, stream, enc, skipped, identity, tmp))
    val_tokens = splits["val"]["tokens"]
    tokenizer_file = is_tokenizer_file(job.tokenizer)
    meta = {
        "format_version": FORMAT_VERSION,
        "vocab_size": enc.vocab,
        "dtype": enc.dtype,
        "eos_id": enc.eos_id,
        "tokenizer": "file" if tokenizer_file else job.tokenizer,
        "tokenizer_file": str(Path(job.tokenizer).expanduser()) if tokenizer_file else None,
        "tokenizer_sha256": enc.tokenizer_sha,  # of the file: the dataset fingerprint is built on it
        "tokenizer_id": tokenizer_id(tmp / TOKENIZER_FILE),  # of what it does: resume compares this
        "special_tokens": list(job.special_tokens),
        "sources": job.sources,
        "text_field": job.text_field,
        "max_docs": job.max_docs,
        "max_tokens": job.max_tokens,
        "val_fraction": job.val_fraction,
        # Single-document corpora get their tail as validation; say so, it is unusual.
        "val_split": "document_hash" if scan.single is None else "single_document_tail",
        # Overlapping validation windows for evaluation: seq_len tokens every stride tokens.
        "val_windows": None
        if job.seq_len is None
        else {"seq_len": job.seq_len, "stride": job.stride or job.seq_len},
        "splits": splits,
        # EOS tokens carry no text bytes but are predicted, so they count as tokens.
        "val_bytes_per_token": splits["val"]["bytes"] / val_tokens if val_tokens else None,
        "skipped": dict(sorted(skipped.items())),
        "shard_sha256": enc.shard_sha,
        "fingerprint": identity,
    }
    write_json(tmp / META_FILE, meta)
    return meta


def _manifest(
    job: _Job,
    specs: list[SourceSpec],
    stream: DocStream,
    enc: _Encoded,
    skipped: dict,
    identity: str,
    tmp: Path,
) -> dict:
    """manifest.json: per source what was read and skipped, why the stream stopped, every file's sha256."""
    out = enc.writer
    return {
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
        "truncated_by": "max_tokens" if out.full else ("max_docs" if job.max_docs is not None else None),
        "files": {
            TOKENIZER_FILE: hashlib.sha256((tmp / TOKENIZER_FILE).read_bytes()).hexdigest(),
            **dict(sorted(enc.shard_sha.items())),
        },
    }
