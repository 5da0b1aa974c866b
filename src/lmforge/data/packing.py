"""Packing conversations into training windows of a fixed number of tokens, with their loss masks.

A window holds whole conversations one after another, then padding (the end-of-text id, mask 0) to its
end: a conversation that fits in a window is never split across two. Packing is best-fit decreasing
(Johnson et al., 1974, "Worst-case performance bounds for simple one-dimensional packing algorithms"):
the longest conversation first, each into the open window it leaves the least room in, a new window when
none has room; on a buffer of many conversations it wastes a few per cent (benchmarks/chat_packing.py).
A conversation longer than a window is cut to the window's length (its start: the prompt and the first
part of the answer are what can be learned), flagged and counted. The windows depend only on the order
of the conversations, so the output is the same for any number of encoding workers.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lmforge.data.shards import ShardWriter

# Conversations are packed this many tokens at a time (ids and masks, about 100 MB held): memory stays
# bounded whatever the corpus, and a buffer holds tens of thousands of conversations, enough for
# best-fit to find a partner for nearly every gap.
BUFFER_TOKENS = 2**24
_CUT_EXAMPLES = 3


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: bins (lists of item indices, ascending) of total length <= ``capacity``, in
    the order they were opened. An item longer than ``capacity`` fills a bin alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Free room -> a heap of the bins with exactly that much (ties go to the first bin opened); `rooms` is
    # the sorted list of the keys, so the best fit for an item is the first room >= its length.
    by_room: dict[int, list[int]] = {}
    rooms: list[int] = []
    for item in order:
        need = min(lengths[item], capacity)
        k = bisect_left(rooms, need)
        if k < len(rooms):
            room = rooms[k]
            index = heapq.heappop(by_room[room])
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            room, index = capacity, len(bins)
            bins.append([])
        bins[index].append(item)
        left = room - need
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                insort(rooms, left)
            heapq.heappush(by_room[left], index)
    return [sorted(b) for b in bins]


@dataclass
class PackStats:
    """What packing one split did."""

    conversations: int = 0
    windows: int = 0
    tokens: int = 0  # conversation tokens in the windows (the rest is padding)
    targets: int = 0  # tokens in the loss (mask 1)
    cut: int = 0  # conversations longer than a window, cut to it
    cut_tokens: int = 0  # the tokens cut off them
    cut_examples: list[str] = field(default_factory=list)

    def fill(self, width: int) -> float:
        """Share of the window tokens that are conversation tokens."""
        return self.tokens / (self.windows * width) if self.windows else 0.0

    def as_dict(self, width: int) -> dict:
        """The stats as meta.json records them."""
        return {
            "conversations": self.conversations,
            "windows": self.windows,
            "conversation_tokens": self.tokens,
            "loss_tokens": self.targets,
            "fill": round(self.fill(width), 6),
            "cut": self.cut,
            "cut_tokens": self.cut_tokens,
        }


class WindowPacker:
    """Collects one split's rendered conversations and writes them packed into windows of ``width``
    tokens: the tokens to ``tokens``, the masks to ``masks`` (parallel shards)."""

    def __init__(
        self,
        tokens: ShardWriter,
        masks: ShardWriter,
        width: int,
        pad_id: int,
        buffer_tokens: int | None = None,
    ) -> None:
        self.tokens, self.masks = tokens, masks
        self.width, self.pad_id = width, pad_id
        self.buffer_tokens = buffer_tokens or BUFFER_TOKENS  # read at run time: a test can make it small
        self.stats = PackStats()
        self._ids: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._held = 0

    def add(self, name: str, ids: np.ndarray, mask: np.ndarray) -> bool:
        """Queue one conversation; False (nothing queued) when it is cut before anything to learn."""
        if ids.size > self.width:
            # Position 0 of a window is never a target: the cut part must leave a learned token after it.
            if not mask[1 : self.width].any():
                return False
            self.stats.cut += 1
            self.stats.cut_tokens += ids.size - self.width
            if len(self.stats.cut_examples) < _CUT_EXAMPLES:
                self.stats.cut_examples.append(name)
            ids, mask = ids[: self.width], mask[: self.width]
        self._ids.append(ids)
        self._masks.append(mask)
        self._held += ids.size
        self.stats.conversations += 1
        self.stats.tokens += ids.size
        self.stats.targets += int(mask.sum())
        if self._held >= self.buffer_tokens:
            self.flush()
        return True

    def flush(self) -> None:
        """Pack and write everything queued."""
        if not self._ids:
            return
        bins = best_fit([a.size for a in self._ids], self.width)
        ids = np.full((len(bins), self.width), self.pad_id, dtype=np.uint32)
        mask = np.zeros((len(bins), self.width), dtype=np.uint8)
        for row, items in enumerate(bins):
            at = 0
            for item in items:
                size = self._ids[item].size
                ids[row, at : at + size] = self._ids[item]
                mask[row, at : at + size] = self._masks[item]
                at += size
        self.tokens.write(ids.reshape(-1))
        self.masks.write(mask.reshape(-1))
        self.stats.windows += len(bins)
        self._ids, self._masks, self._held = [], [], 0
