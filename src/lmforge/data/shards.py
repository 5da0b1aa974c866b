"""Token shards: raw little-endian token arrays on disk, written in order and read by offset.

Their names and meta.json are the data folder's format (folder.py).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np

from lmforge.data.errors import DataError
from lmforge.data.folder import META_FILE, mask_glob, mask_name, read_meta_file, shard_glob, shard_name

DEFAULT_SHARD_TOKENS = 2**27
# Explicit little-endian dtypes: shards are raw bytes with no header, so the byte order
# must not depend on the machine that wrote them.
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
MASK_DTYPE = np.dtype("u1")  # loss-mask shards (conversations): one byte per token


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest shard dtype name ("uint16" or "uint32") that holds every token id."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def numpy_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype for a shard dtype name."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise DataError(f"unknown shard dtype '{name}': expected one of {', '.join(_DTYPES)}") from None


class ShardWriter:
    """Appends token ids to ``{split}_{index:06d}.bin`` files of at most ``shard_tokens`` tokens; with
    ``masks``, loss-mask bytes to ``{split}_{index:06d}.mask`` files (``dtype`` is then unused)."""

    def __init__(
        self,
        out_dir: str | Path,
        split: str,
        dtype: str | np.dtype,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        masks: bool = False,
    ) -> None:
        if shard_tokens < 1:
            raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.split = split
        self._file_name = mask_name if masks else shard_name
        self.dtype = (
            MASK_DTYPE if masks else numpy_dtype(dtype if isinstance(dtype, str) else np.dtype(dtype).name)
        )
        self.shard_tokens = int(shard_tokens)
        self.tokens = 0
        # Hashes are computed while writing so the dataset fingerprint never needs a
        # second pass over possibly many GB of shards.
        self.sha256: dict[str, str] = {}
        self._names: list[str] = []
        self._file = None
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self._closed = False

    def _open_next(self) -> None:
        name = self._file_name(self.split, len(self._names))
        self._names.append(name)
        # A large buffer keeps the many small per-document writes cheap.
        self._file = open(self.out_dir / name, "wb", buffering=1 << 20)  # noqa: SIM115 - open across write() calls
        self._hash = hashlib.sha256()
        self._in_shard = 0

    def _finish_current(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        # fsync so that a meta.json written after close() never describes shards that a
        # crash could still lose.
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.sha256[self._names[-1]] = self._hash.hexdigest()

    def write(self, ids: np.ndarray | list[int]) -> None:
        """Append token ids, starting a new shard file whenever the current one is full."""
        if self._closed:
            raise DataError(f"ShardWriter for split '{self.split}' is already closed")
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.dtype != self.dtype:
            # Range-check before narrowing: a silent wrap-around would corrupt the data.
            limit = np.iinfo(self.dtype).max
            if arr.min() < 0 or arr.max() > limit:
                raise DataError(
                    f"token id out of range for {self.dtype.name} shards (0..{limit}): "
                    "the tokenizer vocabulary does not match the shard dtype"
                )
            arr = arr.astype(self.dtype)
        start = 0
        while start < arr.size:
            if self._file is None or self._in_shard >= self.shard_tokens:
                self._finish_current()
                self._open_next()
            take = min(arr.size - start, self.shard_tokens - self._in_shard)
            data = arr[start : start + take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._in_shard += take
            self.tokens += take
            start += take

    def close(self) -> list[str]:
        """Finish the last shard and return the names of all files written, in order."""
        if not self._closed:
            self._finish_current()
            self._closed = True
        return list(self._names)

    def abort(self) -> None:
        """Close the open file without finishing it (for error paths)."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self._file.close()
            self._file = None
        self._closed = True


class TokenShards:
    """Read-only view of all tokens of one split, concatenated across its shard files; with ``masks``, of
    the loss-mask bytes of a folder of conversations."""

    def __init__(
        self, data_dir: str | Path, split: str, meta: dict | None = None, masks: bool = False
    ) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        meta = read_meta_file(data_dir) if meta is None else meta
        self.dtype = MASK_DTYPE if masks else numpy_dtype(meta.get("dtype", ""))
        names = sorted(p.name for p in self.data_dir.glob(mask_glob(split) if masks else shard_glob(split)))
        splits = meta.get("splits", {})
        if split not in splits:
            raise DataError(
                f"split '{split}' not found in '{data_dir}': available splits are "
                f"{', '.join(sorted(splits)) or 'none'}"
            )
        expected = splits[split].get("mask_shards" if masks else "shards")
        if masks and expected is None:
            raise DataError(f"'{data_dir}' has no loss masks: prepare it again with `lmforge prepare --chat`")
        if expected is not None and sorted(expected) != names:
            raise DataError(
                f"shards of split '{split}' in '{data_dir}' do not match {META_FILE} "
                f"(expected {len(expected)}, found {len(names)}): re-run lmforge prepare"
            )
        self.names = names
        itemsize = self.dtype.itemsize
        sizes = []
        for name in names:
            nbytes = (self.data_dir / name).stat().st_size
            if nbytes % itemsize:
                raise DataError(
                    f"shard '{self.data_dir / name}' is truncated ({nbytes} bytes is not a multiple "
                    f"of {itemsize}): re-run lmforge prepare"
                )
            sizes.append(nbytes // itemsize)
        # offsets[k] is the global index of the first token of shard k; the last entry is
        # the total, so bisect finds the shard of any token in O(log shards).
        self._offsets = [0]
        for size in sizes:
            self._offsets.append(self._offsets[-1] + size)
        declared = splits[split].get("tokens")
        if declared is not None and declared != self._offsets[-1]:
            raise DataError(
                f"split '{split}' in '{data_dir}' has {self._offsets[-1]} tokens but {META_FILE} "
                f"says {declared}: re-run lmforge prepare"
            )
        # Memory maps are opened on first use: a split may have thousands of shards and a
        # short evaluation touches only a few.
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self._offsets[-1]

    def _shard(self, k: int) -> np.memmap:
        mm = self._maps.get(k)
        if mm is None:
            mm = np.memmap(self.data_dir / self.names[k], dtype=self.dtype, mode="r")
            self._maps[k] = mm
        return mm

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as a fresh int64 array, across shard boundaries."""
        total = len(self)
        if start < 0 or length < 0 or start + length > total:
            raise IndexError(f"read({start}, {length}) is outside split '{self.split}' of {total} tokens")
        out = np.empty(length, dtype=np.int64)
        done = 0
        k = bisect.bisect_right(self._offsets, start) - 1
        while done < length:
            local = start + done - self._offsets[k]
            take = min(length - done, self._offsets[k + 1] - self._offsets[k] - local)
            out[done : done + take] = self._shard(k)[local : local + take]
            done += take
            k += 1
        return out
