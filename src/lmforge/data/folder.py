"""The data folder's format: the names of its files, its version, its identity, and reading its meta.json.

    DATA_DIR/
      meta.json          vocabulary, shard dtype, EOS id, tokenizer, splits (tokens, documents, bytes, shard
                         names), val_bytes_per_token, val_windows, and the dataset fingerprint. Written last:
                         a folder with meta.json has complete shards.
      manifest.json      what went in: sources, skips and the SHA-256 of every file
      tokenizer.json     the tokenizer that made the shards
      train_000000.bin   token ids as raw little-endian uint16 or uint32 (meta.json's dtype), no header
      val_000000.bin     ...

A folder of conversations (`prepare --chat`, meta.json "kind": "chat") holds the same files, its shards
cut into packed windows of seq_len + 1 tokens, plus one loss-mask shard per token shard:

      train_000000.mask  one byte per token of train_000000.bin: 1 where the token is learned (an
      val_000000.mask    assistant's text and its end of turn), 0 elsewhere (prompts, padding)

`prepare.py` (`chat_prepare.py` for conversations) writes it; `shards.py`, `loader.py`, `batches.py`, training and eval read it through this
module and never import the preparation pipeline. Imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from lmforge.data.errors import DataError

FORMAT_VERSION = 1
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"  # also the name `tokenizers` and Hugging Face folders use
SPLITS = ("train", "val")
REQUIRED_META = ("format_version", "vocab_size", "dtype", "eos_id", "splits", "fingerprint")
_SHARD_RE = re.compile(r"^[a-z]+_\d{6}\.(bin|mask)$")


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return f"{split}_{index:06d}.bin"


def shard_glob(split: str) -> str:
    """A glob matching every shard file of ``split``."""
    return f"{split}_*.bin"


def mask_name(split: str, index: int) -> str:
    """File name of the loss-mask shard that goes with token shard ``index`` of ``split``."""
    return f"{split}_{index:06d}.mask"


def mask_glob(split: str) -> str:
    """A glob matching every loss-mask shard of ``split``."""
    return f"{split}_*.mask"


def is_shard_name(name: str) -> bool:
    """Whether a file name is one `shard_name` or `mask_name` gives."""
    return _SHARD_RE.match(name) is not None


def data_tokenizer(data_dir: str | Path) -> Path:
    """The tokenizer file of a data folder."""
    return Path(data_dir) / TOKENIZER_FILE


def fingerprint(tokenizer_sha: str, shard_sha: dict[str, str]) -> str:
    """The dataset's identity: SHA-256 over the tokenizer's digest and every shard's name and digest.

    Checkpoints record it, and a resume refuses data with another one.
    """
    digest = hashlib.sha256(f"lmforge-data-v{FORMAT_VERSION}\ntokenizer {tokenizer_sha}\n".encode())
    for name in sorted(shard_sha):
        digest.update(f"{name} {shard_sha[name]}\n".encode())
    return digest.hexdigest()


def read_meta_file(data_dir: str | Path) -> dict:
    """Parse ``meta.json`` of a data folder, with a one-line DataError if it is absent or broken."""
    path = Path(data_dir) / META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"'{data_dir}' is not a prepared data folder (no {META_FILE}): "
            f"run `lmforge prepare --source ... --out {data_dir}` first"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot read '{path}' ({exc}): re-run `lmforge prepare --source ... --out {data_dir}`"
        ) from None


def load_meta(data_dir: str | Path) -> dict:
    """Read and check ``DATA_DIR/meta.json``; DataError if the folder is not a prepared data folder."""
    path = Path(data_dir)
    if path.exists() and not path.is_dir():
        raise DataError(
            f"data folder '{data_dir}' is a file: pass the folder that `lmforge prepare --out` wrote"
        )
    if not path.is_dir():
        raise DataError(
            f"data folder '{data_dir}' does not exist: run `lmforge prepare --source ... --out {data_dir}` first"
        )
    meta = read_meta_file(path)
    if not isinstance(meta, dict) or any(key not in meta for key in REQUIRED_META):
        raise DataError(
            f"'{path / META_FILE}' is incomplete: re-run `lmforge prepare --source ... --out {data_dir}`"
        )
    if meta["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"'{data_dir}' has data format {meta['format_version']}, this lmforge reads format "
            f"{FORMAT_VERSION}: re-run `lmforge prepare --source ... --out {data_dir}`"
        )
    return meta


def val_windows(meta: dict) -> tuple[int, int] | None:
    """(seq_len, stride) of the overlapping validation windows `prepare --seq-len/--stride` asked for, or
    None when it was not asked (or meta.json holds something else there)."""
    windows = meta.get("val_windows")
    if not isinstance(windows, dict):
        return None
    seq_len, stride = windows.get("seq_len"), windows.get("stride")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (seq_len, stride))
    return (seq_len, stride) if ok and stride <= seq_len else None
