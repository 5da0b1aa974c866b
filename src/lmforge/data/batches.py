"""The batch sources a training run reads, chosen by what its data folder holds.

A batch source yields `(x, y)` int64 tensors of shape (micro_batch_size, seq_len); `y` holds -1 at the
positions outside the loss (the model ignores them). It counts `epoch`s and has `state_dict()` /
`load_state_dict()`, so a resumed run continues at the exact next batch. The training loop knows only
this interface: a new kind of training data is one more source here, keyed by the `kind` its data
folder's meta.json records, not a new loop.

    tokens   a token stream (`prepare`): windows of seq_len + 1 tokens at stride seq_len (loader.py)
    chat     conversations packed into windows with a loss mask (`prepare --chat`): y = -1 on prompts
             and padding (chat_loader.py)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from lmforge.data.chat_loader import ChatLoader, iter_chat_eval_batches
from lmforge.data.errors import DataError
from lmforge.data.loader import TokenLoader, iter_eval_batches

Batch = tuple[torch.Tensor, torch.Tensor]  # (x, y), each (micro_batch_size, seq_len); y = -1: no loss

# meta.json's "kind" -> how a run trains and evaluates on it. Folders written before the key existed
# hold plain token streams.
KINDS = ("tokens", "chat")


class BatchSource(Protocol):
    """Endless training batches with a resumable position."""

    @property
    def epoch(self) -> int:
        """Completed passes over the split."""

    def next_batch(self) -> Batch:
        """The next (x, y)."""

    def state_dict(self) -> dict:
        """JSON-able position; load_state_dict() continues from it exactly."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position."""


def data_kind(data_dir: str | Path, meta: dict) -> str:
    """The kind of data a folder holds; one line naming it when this version cannot train on it."""
    kind = meta.get("kind", "tokens")
    if kind not in KINDS:
        raise DataError(
            f"data folder '{data_dir}' holds {kind!r} data, which this version of lmforge cannot train on "
            f"(it knows {', '.join(KINDS)}): upgrade lmforge, or prepare the data again"
        )
    return kind


def training_batches(
    data_dir: str | Path,
    meta: dict,
    seq_len: int,
    micro_batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    order: str = "random",
) -> BatchSource:
    """This rank's training batches from the folder's train split."""
    loader = ChatLoader if data_kind(data_dir, meta) == "chat" else TokenLoader
    return loader(data_dir, "train", seq_len, micro_batch_size, seed, rank, world_size, order=order)


def eval_batches(
    data_dir: str | Path, meta: dict, seq_len: int, batch_size: int, max_batches: int | None
) -> Iterator[Batch]:
    """The same validation batches on every call (the first windows of the val split)."""
    if data_kind(data_dir, meta) == "chat":
        return iter_chat_eval_batches(data_dir, meta, seq_len, batch_size, max_batches)
    return iter_eval_batches(data_dir, "val", seq_len, batch_size, max_batches)
