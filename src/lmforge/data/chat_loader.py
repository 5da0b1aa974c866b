"""Batches from a folder of conversations: its packed windows, with y = -1 wherever the loss mask is 0.

`prepare --chat` packs conversations into windows of seq_len + 1 tokens, each stored whole, one after the
other, with a parallel loss-mask shard (folder.py). Window i is tokens [i * (seq_len + 1), (i + 1) *
(seq_len + 1)); x is its first seq_len tokens and y its last seq_len, so they overlap by all but one, and
y is -1 where the mask of that token is 0: prompts, role tokens and padding are read but never learned.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmforge.data.errors import DataError
from lmforge.data.folder import load_meta
from lmforge.data.loader import TokenLoader
from lmforge.data.shards import TokenShards

Batch = tuple[torch.Tensor, torch.Tensor]


def masked_targets(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The targets of windows (..., seq_len + 1): token t + 1 where its mask is 1, else -1 (no loss)."""
    return np.where(mask[..., 1:] != 0, tokens[..., 1:], -1)


class PackedWindows:
    """The packed windows of one split of a folder of conversations: their tokens and loss masks."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, meta: dict | None = None) -> None:
        meta = load_meta(data_dir) if meta is None else meta
        packed = meta.get("seq_len")
        if packed != seq_len:
            raise DataError(
                f"data folder '{data_dir}' holds conversations packed into windows for seq_len={packed}, "
                f"this run has seq_len={seq_len}: train with --model.seq_len={packed}, or prepare the data "
                f"again with `lmforge prepare --chat --seq-len {seq_len}`"
            )
        self.seq_len = seq_len
        self.width = seq_len + 1  # tokens per stored window: x and y overlap in all but one
        self.tokens = TokenShards(data_dir, split, meta)
        self.masks = TokenShards(data_dir, split, meta, masks=True)
        if len(self.masks) != len(self.tokens) or len(self.tokens) % self.width:
            raise DataError(
                f"split '{split}' of '{data_dir}' has {len(self.tokens)} tokens and {len(self.masks)} mask "
                f"bytes, not whole windows of {self.width}: prepare it again with `lmforge prepare --chat`"
            )
        self.count = len(self.tokens) // self.width
        if self.count == 0:
            raise DataError(f"split '{split}' of '{data_dir}' has no windows: prepare more conversations")

    def __len__(self) -> int:
        return self.count

    def batch(self, windows: list[int]) -> Batch:
        """(x, y) of these windows, int64 (len(windows), seq_len); y = -1 where the mask is 0."""
        rows = np.stack([self.tokens.read(i * self.width, self.width) for i in windows])
        mask = np.stack([self.masks.read(i * self.width, self.width) for i in windows])
        x = np.ascontiguousarray(rows[:, :-1])
        return torch.from_numpy(x), torch.from_numpy(masked_targets(rows, mask))


class ChatLoader(TokenLoader):
    """TokenLoader's order, rank sharding, epochs and exact resume over packed conversation windows."""

    def _open(self) -> tuple[PackedWindows, int]:
        windows = PackedWindows(self.data_dir, self.split, self.seq_len)
        return windows, len(windows)

    def _read(self, windows: list[int]) -> Batch:
        return self._shards.batch(windows)


def iter_chat_eval_batches(
    data_dir: str | Path, meta: dict, seq_len: int, batch_size: int, max_batches: int | None
) -> Iterator[Batch]:
    """The val windows in order, ``batch_size`` at a time, the same on every call."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    windows = PackedWindows(data_dir, "val", seq_len, meta)
    # As for token streams: whole batches only, unless the split is smaller than one.
    starts = list(range(0, len(windows) - batch_size + 1, batch_size))
    batches = [(s, batch_size) for s in starts] or [(0, len(windows))]
    if max_batches is not None:
        batches = batches[: max(0, max_batches)]
    return (windows.batch(list(range(start, start + count))) for start, count in batches)
