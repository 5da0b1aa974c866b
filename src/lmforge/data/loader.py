"""Batches of (input, target) token windows for training and evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmforge.data.errors import DataError
from lmforge.data.folder import load_meta
from lmforge.data.shards import TokenShards


def _open_split(data_dir: str | Path, split: str, seq_len: int) -> tuple[TokenShards, int]:
    """The split's tokens and how many (seq_len + 1)-token windows fit at stride seq_len."""
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    shards = TokenShards(data_dir, split, meta=load_meta(data_dir))
    tokens = len(shards)
    if tokens < seq_len + 1:
        raise DataError(
            f"split '{split}' of '{data_dir}' has only {tokens} tokens, fewer than seq_len + 1 = "
            f"{seq_len + 1}: use a smaller seq_len or prepare more data"
        )
    # Window i covers tokens [i*seq_len, i*seq_len + seq_len + 1): the extra token is the
    # last target, and consecutive windows share exactly one token.
    return shards, (tokens - 1) // seq_len


def _batch(shards: TokenShards, windows: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([shards.read(i * seq_len, seq_len + 1) for i in windows])
    data = torch.from_numpy(rows)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


LOADER_ORDERS = ("random", "sequential")


class TokenLoader:
    """Endless training batches; the order is a pure function of (seed, epoch, rank, world size, position).

    ``order="random"`` reads the split's windows in a fresh shuffled order every epoch;
    ``order="sequential"`` packs them in stream order (rank r reads windows r, r + world, ...),
    so consecutive batches continue the same documents.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        order: str = "random",
    ) -> None:
        if order not in LOADER_ORDERS:
            raise DataError(f"loader order '{order}' is unknown: choose one of {', '.join(LOADER_ORDERS)}")
        if micro_batch_size < 1:
            raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.order = order
        self._shards, self.windows = self._open()
        # Every rank gets the same number of windows per epoch (the permutation's tail of
        # fewer than world_size windows is dropped) so ranks change epoch in lockstep and
        # one rank's state_dict is valid on all of them.
        self.windows_per_rank = self.windows // self.world_size
        if self.windows_per_rank == 0:
            raise DataError(
                f"split '{split}' of '{data_dir}' has {self.windows} windows of {self.seq_len + 1} tokens, "
                f"fewer than world_size={self.world_size}: use a smaller seq_len or prepare more data"
            )
        self._epoch = 0
        self._position = 0  # windows of the current epoch this rank has consumed
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _open(self) -> tuple[TokenShards, int]:
        """What the windows are read from, and how many there are (a packed layout overrides this)."""
        return _open_split(self.data_dir, self.split, self.seq_len)

    def _read(self, windows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of these windows (a packed layout overrides this)."""
        return _batch(self._shards, windows, self.seq_len)

    @property
    def epoch(self) -> int:
        """Number of completed passes over the split (0 during the first one)."""
        return self._epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        # Memoised only for speed; the value depends on nothing but (seed, epoch).
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
            self._perm_epoch = epoch
        return self._perm

    def window_index(self, epoch: int, position: int) -> int:
        """The window this rank reads at ``position`` of ``epoch``."""
        if self.order == "sequential":
            return self.rank + position * self.world_size
        return int(self._permutation(epoch)[self.rank + position * self.world_size])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) pair, each int64 of shape (micro_batch_size, seq_len); y is x shifted by one."""
        windows = []
        for _ in range(self.micro_batch_size):
            if self._position >= self.windows_per_rank:
                self._epoch += 1
                self._position = 0
            windows.append(self.window_index(self._epoch, self._position))
            self._position += 1
        return self._read(windows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """JSON-serialisable position in the stream; load_state_dict() resumes from it exactly."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "rank": self.rank,
            "world_size": self.world_size,
            "windows": self.windows,
            "order": self.order,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; seq_len, world_size and the data must match, rank is kept."""
        if int(state["seq_len"]) != self.seq_len or int(state["world_size"]) != self.world_size:
            raise DataError(
                f"loader state is for seq_len={state['seq_len']}, world_size={state['world_size']} but "
                f"this run has seq_len={self.seq_len}, world_size={self.world_size}: keep them equal to resume"
            )
        if "windows" in state and int(state["windows"]) != self.windows:
            raise DataError(
                f"loader state is for a split of {state['windows']} windows, '{self.data_dir}' has "
                f"{self.windows}: the data changed since the checkpoint; resume with the same data"
            )
        if state.get("order", "random") != self.order:
            raise DataError(
                f"loader state is for order={state.get('order', 'random')} but this run has "
                f"order={self.order}: keep the data order equal to resume"
            )
        position = int(state["position"])
        if not 0 <= position <= self.windows_per_rank:
            raise DataError(f"loader state position {position} is outside 0..{self.windows_per_rank}")
        # Rank is deliberately not taken from the state: ranks move in lockstep, so rank 0's
        # saved state can be loaded on every rank and each keeps its own slice.
        self.seed = int(state["seed"])
        self._epoch = int(state["epoch"])
        self._position = position
        self._perm_epoch = -1


def iter_eval_batches(
    data_dir: str | Path, split: str, seq_len: int, batch_size: int, max_batches: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential non-overlapping windows from the start of ``split``, the same on every call."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    shards, windows = _open_split(data_dir, split, seq_len)
    # Drop the last partial batch so every batch weighs the same in an average, unless
    # it is all there is (tiny validation sets still get evaluated).
    full = windows // batch_size
    batches = [(b * batch_size, batch_size) for b in range(full)] or [(0, windows)]
    if max_batches is not None:
        batches = batches[: max(0, max_batches)]
    # A separate generator so bad arguments and missing data fail at the call, not at next().
    return _eval_batches(shards, batches, seq_len)


def _eval_batches(
    shards: TokenShards, batches: list[tuple[int, int]], seq_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start, count in batches:
        yield _batch(shards, list(range(start, start + count)), seq_len)
