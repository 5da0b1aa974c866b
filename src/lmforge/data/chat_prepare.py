"""`prepare --chat`: conversations -> the base model's tokenizer with the chat tokens -> packed windows with
loss masks (train/val), tokenizer.json, manifest.json and meta.json, written atomically as prepare writes.

Records are read and counted by chat_records.py, rendered by the chat template in the encoding workers,
packed by packing.py; the folder's format is folder.py's (meta.json "kind": "chat") and chat_loader.py
reads it. The document stream, the split by name and the skip report are prepare's own.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data.chat_records import ChatRecords, render_chunk
from lmforge.data.chat_template import TEMPLATE_NAME, with_chat_tokens
from lmforge.data.encode import (
    CHUNK_CHARS,
    CHUNK_DOCS,
    EncodePool,
    ProgressBar,
    default_workers,
    serial_tokenizers,
)
from lmforge.data.errors import DataError
from lmforge.data.files import Document, Skips
from lmforge.data.folder import FORMAT_VERSION, MANIFEST_FILE, META_FILE, SPLITS, TOKENIZER_FILE, fingerprint
from lmforge.data.mixture import SourceSpec, parse_sources
from lmforge.data.outdir import check_out_dir, install, remove_stale_temps, temp_dir_for, write_json
from lmforge.data.packing import PackStats, WindowPacker
from lmforge.data.passes import DocStream, Progress, Scan, scan_documents, val_score
from lmforge.data.prepare import _resolve_tokenizer, _save_tokenizer, report_skips
from lmforge.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, dtype_for_vocab
from lmforge.data.tokenizer import Tokenizer, tokenizer_id
from lmforge.data.tokenizer_kinds import is_tokenizer_file, is_trained
from lmforge.errors import LmforgeError
from lmforge.run_dir import RunDir
from lmforge.safewrite import DiskWriteError, io_errno, write_failure
from lmforge.words import counted


@dataclass
class _ChatJob:
    """What one `prepare --chat` call was asked for."""

    sources: list[str]
    out_dir: Path
    tokenizer: str
    seq_len: int
    val_fraction: float
    max_docs: int | None
    log: Progress


def base_tokenizer(spec: str) -> tuple[Tokenizer, int | None]:
    """The tokenizer of the model to fine-tune and, when ``spec`` is its run directory, its seq_len."""
    if is_trained(spec):
        raise DataError(
            f"prepare --chat uses the tokenizer of the model it fine-tunes, it does not train a new "
            f"'{spec}' one: pass --tokenizer RUN_DIR (the base run), gpt2, tiktoken:NAME or a tokenizer.json"
        )
    run = RunDir(Path(spec).expanduser())
    if is_tokenizer_file(spec) and not run.path.exists():
        raise DataError(
            f"--tokenizer '{spec}' does not exist: pass the base run's directory, gpt2, tiktoken:NAME or a "
            "tokenizer.json"
        )
    if run.path.is_dir() and run.looks_like_run():
        if not run.tokenizer.is_file():
            raise DataError(f"run directory '{spec}' has no {TOKENIZER_FILE}: pass its data's tokenizer.json")
        model = run.read_config().get("model") or {}
        seq_len = model.get("seq_len") or model.get("context_len")
        return Tokenizer.load(run.tokenizer), seq_len if isinstance(seq_len, int) and seq_len > 0 else None
    tok = _resolve_tokenizer(spec, ())
    assert tok is not None  # only trained kinds give None, refused above
    return tok, None


def _check_args(val_fraction: float, seq_len: int | None, workers: int | None, max_docs: int | None) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if workers is not None and workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if seq_len is not None and seq_len < 2:
        raise DataError(f"seq_len must be >= 2 for conversations, got {seq_len}")
    if max_docs is not None and max_docs < 0:
        raise DataError(f"max_docs must be >= 0, got {max_docs}")


def prepare_chat(
    sources: list[str],
    out_dir: str | Path,
    tokenizer: str,
    *,
    seq_len: int | None = None,
    val_fraction: float = 0.01,
    max_docs: int | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    console=None,
) -> dict:
    """Conversations of ``sources`` packed into windows of ``seq_len + 1`` tokens with loss masks in
    ``out_dir``; ``tokenizer`` is the base run's directory (its tokenizer, and its seq_len by default), or
    a ready tokenizer (gpt2, tiktoken:NAME, a tokenizer.json). Returns meta.json."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    _check_args(val_fraction, seq_len, workers, max_docs)
    if not sources:
        raise DataError(
            "no sources given: pass at least one --source (conversation files or builtin:stdlib-chat)"
        )
    base, run_seq_len = base_tokenizer(tokenizer)
    seq_len = seq_len or run_seq_len
    if seq_len is None:
        raise DataError(
            f"--tokenizer {tokenizer} is not a run directory, so the window length is unknown: pass --seq-len "
            "(the seq_len of the model you will fine-tune)"
        )
    log = progress or (lambda _msg: None)
    job = _ChatJob(
        sources, Path(out_dir).expanduser().absolute(), tokenizer, seq_len, val_fraction, max_docs, log
    )
    specs = parse_sources(sources)
    check_out_dir(job.out_dir)
    tok = with_chat_tokens(base)
    log(f"reading conversations from {', '.join(sources)}")
    stream = DocStream(specs, max_docs, ChatRecords(), log)
    scan = scan_documents(stream, val_fraction, 0)
    if scan.documents < 2:
        _too_few(job, stream, scan.documents)
    meta = _write_folder(
        job, specs, stream, scan, tok, base.vocab_size, workers or default_workers(), console
    )
    log(summary(job.out_dir, meta))
    return meta


def summary(out_dir: Path, meta: dict) -> str:
    """prepare --chat's last line: what it wrote."""
    train, val, packing = meta["splits"]["train"], meta["splits"]["val"], meta["packing"]
    return (
        f"wrote {out_dir}: train {counted(train['conversations'], 'conversation')} in "
        f"{counted(train['windows'], 'window')}, val {val['conversations']:,} in {val['windows']:,}, windows of {meta['seq_len'] + 1} tokens, "
        f"fill {packing['fill']:.1%}, {packing['cut']:,} cut to the window, vocab {meta['vocab_size']:,}"
    )


def _too_few(job: _ChatJob, stream: DocStream, found: int) -> None:
    skips = Skips()
    for per_source in stream.skips:
        for reason, count in per_source.items():
            skips.add(reason, (per_source.examples.get(reason) or [""])[0], count)
    seen = f" (skipped: {skips.summary()})" if skips else ""
    if found == 1:
        raise DataError(
            f"only one usable conversation in {', '.join(job.sources)}{seen}: need at least two (one for "
            "the val split)"
        )
    raise DataError(
        f"no usable conversations in {', '.join(job.sources)}{seen}: need records in the OpenAI (messages), "
        "ShareGPT (conversations) or Alpaca (instruction, output) format in .json/.jsonl/.jsonl.gz/.parquet files"
    )


class _ChatFeeder:
    """The second pass: chunks of conversations rendered by the pool, then packed per split, in order."""

    def __init__(
        self, pool: EncodePool, packers: dict[str, WindowPacker], stream: DocStream, bar: ProgressBar
    ):
        self.pool, self.packers, self.stream, self.bar = pool, packers, stream, bar
        self.sources = [{"conversations": 0, "tokens": 0} for _ in stream.specs]
        self._texts: list[str] = []
        self._tags: list[tuple[str, int, str]] = []  # (split, source index, name) per conversation
        self._chars = 0
        self._bytes = 0  # of the conversations read so far, as JSON: for the progress bar

    def add(self, split: str, source: int, doc: Document) -> None:
        self._texts.append(doc.text)
        self._tags.append((split, source, doc.name))
        self._chars += len(doc.text)
        self._bytes += len(doc.text.encode("utf-8"))
        if self._chars >= CHUNK_CHARS or len(self._texts) >= CHUNK_DOCS:
            self._flush()

    def _flush(self) -> None:
        if self._texts:
            done = self.pool.submit(self._texts, self._tags)
            self._texts, self._tags, self._chars = [], [], 0
            for chunk in done:
                self._pack(*chunk)

    def finish(self) -> None:
        """Pack what is left; every split's windows are written after this."""
        self._flush()
        for chunk in self.pool.drain():
            self._pack(*chunk)
        for packer in self.packers.values():
            packer.flush()

    def _pack(self, tags: list, lengths: np.ndarray, ids: np.ndarray, masks: np.ndarray) -> None:
        start = 0
        for (split, source, name), length in zip(tags, lengths.tolist(), strict=True):
            end = start + length
            if self.packers[split].add(name, ids[start:end], masks[start:end]):
                self.sources[source]["conversations"] += 1
                self.sources[source]["tokens"] += min(length, self.packers[split].width)
            else:  # its prompt alone is longer than a window: nothing of it could be learned
                self.stream.skips[source].add("too_long", name)
            start = end
        done = sum(p.stats.conversations for p in self.packers.values())
        self.bar.update(done, self._bytes, sum(p.stats.tokens for p in self.packers.values()))


def _write_folder(
    job: _ChatJob,
    specs: list[SourceSpec],
    stream: DocStream,
    scan: Scan,
    tok: Tokenizer,
    base_vocab: int,
    workers: int,
    console,
) -> dict:
    """Pack into a temporary folder, write manifest.json and meta.json (last), and rename it into place;
    whatever fails (Ctrl-C included) removes the temporary folder, and a full disk is one line."""
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
            pool = EncodePool(tok, workers, task=render_chunk)
            feeder = _pack_all(job, stream, scan, tok, pool, writers, bar, tmp)
        meta = _write_meta(job, specs, stream, feeder, writers, tok, base_vocab, tmp)
        install(tmp, out_dir)
        return meta
    except BaseException as e:
        bar.close()
        if pool is not None:
            pool.close()
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if io_errno(e) is not None and not isinstance(e, LmforgeError):  # a full disk, say: one line
            raise DiskWriteError(
                write_failure("the prepared conversations", tmp, e, then=f"; {out_dir} is unchanged")
            ) from e
        raise
    finally:
        if pool is not None:
            pool.close()


def _pack_all(
    job: _ChatJob,
    stream: DocStream,
    scan: Scan,
    tok: Tokenizer,
    pool: EncodePool,
    writers: dict[str, ShardWriter],
    bar: ProgressBar,
    tmp: Path,
) -> _ChatFeeder:
    """Every conversation to its split's windows, in order; the token and mask shards closed."""
    dtype = dtype_for_vocab(tok.vocab_size)
    packers = {}
    for split in SPLITS:
        writers[split] = ShardWriter(tmp, split, dtype, DEFAULT_SHARD_TOKENS)
        writers[split + ".mask"] = ShardWriter(tmp, split, dtype, DEFAULT_SHARD_TOKENS, masks=True)
        packers[split] = WindowPacker(writers[split], writers[split + ".mask"], job.seq_len + 1, tok.eos_id)
    feeder = _ChatFeeder(pool, packers, stream, bar)
    seen = 0
    for source, doc in stream:
        seen += 1
        split = scan.overrides.get(doc.name) or ("val" if val_score(doc.name) < job.val_fraction else "train")
        feeder.add(split, source, doc)
    feeder.finish()
    bar.close()
    if scan.complete and seen != scan.documents:
        raise DataError(
            f"sources changed while preparing ({scan.documents} conversations, then {seen}): run prepare again"
        )
    for writer in writers.values():
        writer.close()
    return feeder


def _split_stats(job: _ChatJob, feeder: _ChatFeeder, writers: dict[str, ShardWriter]) -> dict:
    width = job.seq_len + 1
    splits = {}
    for split in SPLITS:
        stats = feeder.packers[split].stats
        if not stats.windows:
            raise DataError(
                f"no conversation of the {split} split fits a window of {width} tokens with anything to learn: "
                "raise --seq-len or --val-fraction"
            )
        splits[split] = {
            "tokens": writers[split].tokens,
            "documents": stats.conversations,
            **stats.as_dict(width),
            "shards": writers[split].close(),
            "mask_shards": writers[split + ".mask"].close(),
        }
    return splits


def _write_meta(
    job: _ChatJob,
    specs: list[SourceSpec],
    stream: DocStream,
    feeder: _ChatFeeder,
    writers: dict[str, ShardWriter],
    tok: Tokenizer,
    base_vocab: int,
    tmp: Path,
) -> dict:
    """manifest.json, then meta.json (last: a folder with meta.json always has complete shards)."""
    splits = _split_stats(job, feeder, writers)
    skipped = report_skips(job.log, specs, stream)
    total = PackStats()
    for packer in feeder.packers.values():
        for key in ("conversations", "windows", "tokens", "targets", "cut", "cut_tokens"):
            setattr(total, key, getattr(total, key) + getattr(packer.stats, key))
        total.cut_examples += packer.stats.cut_examples
    if total.cut:
        job.log(
            f"note: cut {total.cut:,} conversations longer than the window to its {job.seq_len + 1} tokens "
            f"({', '.join(total.cut_examples[:3])}{', ...' if total.cut > 3 else ''}): a larger --seq-len keeps them whole"
        )
    shard_sha = {name: sha for w in writers.values() for name, sha in w.sha256.items()}  # masks included
    tokenizer_sha = _save_tokenizer(tok, tmp)
    identity = fingerprint(tokenizer_sha, shard_sha)
    write_json(
        tmp / MANIFEST_FILE, _manifest(job, specs, stream, feeder, skipped, total, identity, shard_sha, tmp)
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "chat",
        "chat_template": TEMPLATE_NAME,
        "vocab_size": tok.vocab_size,
        "base_vocab_size": base_vocab,  # the ids from here on are the template's tokens, new to the base model
        "dtype": dtype_for_vocab(tok.vocab_size),
        "eos_id": tok.eos_id,
        "pad_id": tok.eos_id,  # padding at a window's end; its mask is 0, so its id is never learned
        "tokenizer": job.tokenizer,
        "tokenizer_sha256": tokenizer_sha,
        "tokenizer_id": tokenizer_id(tmp / TOKENIZER_FILE),
        "sources": job.sources,
        "max_docs": job.max_docs,
        "val_fraction": job.val_fraction,
        "val_split": "document_hash",
        "seq_len": job.seq_len,  # windows hold seq_len + 1 tokens: x and y overlap in all but one
        "packing": {"method": "best_fit_decreasing", **total.as_dict(job.seq_len + 1)},
        "splits": splits,
        "val_windows": None,
        "val_bytes_per_token": None,  # the loss covers only the answers: bits per byte would mislead
        "skipped": dict(sorted(skipped.items())),
        "shard_sha256": shard_sha,
        "fingerprint": identity,
    }
    write_json(tmp / META_FILE, meta)
    return meta


def _manifest(
    job: _ChatJob,
    specs: list[SourceSpec],
    stream: DocStream,
    feeder: _ChatFeeder,
    skipped: dict,
    total: PackStats,
    identity: str,
    shard_sha: dict[str, str],
    tmp: Path,
) -> dict:
    """manifest.json: per source what was read and skipped, the cut conversations, every file's sha256."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": "chat",
        "fingerprint": identity,
        "sources": [
            {
                "source": spec.source,
                "weight": spec.weight,
                **feeder.sources[i],
                "duplicates": stream.skips[i].get("duplicate", 0),
                "skipped": dict(sorted(stream.skips[i].items())),
                "skipped_examples": dict(sorted(stream.skips[i].examples.items())),
            }
            for i, spec in enumerate(specs)
        ],
        "skipped": dict(sorted(skipped.items())),
        "cut": total.cut,
        "cut_examples": total.cut_examples,
        "truncated_by": "max_docs" if job.max_docs is not None else None,
        "files": {
            TOKENIZER_FILE: hashlib.sha256((tmp / TOKENIZER_FILE).read_bytes()).hexdigest(),
            **dict(sorted(shard_sha.items())),
        },
    }
