"""GPT-2's byte-level BPE for prepare's workers, with ASCII text pre-tokenized in numpy.

tiktoken spends most of its time in its regular expression, one pre-token at a time, and
runs BPE again for every repeat of a word. Source code and English prose repeat a few ten
thousand pre-tokens (words, indentation, operators) over and over. So for ASCII text this
module finds GPT-2's pre-token boundaries with whole-array numpy operations, looks every
pre-token up in a table of the ids seen before (exact keys: a pre-token of up to 16
characters is its own 128-bit key in a numpy hash table; longer ones go through a dict), and
asks tiktoken only for pre-tokens it has not seen. BPE never merges across pre-tokens, so
the ids are exactly tiktoken's (tested against tiktoken on random text and the builtin
corpus). Text with non-ASCII characters is cut at safe line breaks and only the non-ASCII
lines go to tiktoken.
"""

from __future__ import annotations

import re
from collections import ChainMap
from collections.abc import Mapping
from itertools import chain

import numpy as np

# GPT-2's pre-tokenizer, '(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+,
# sorts each ASCII character into one class: letters (\p{L}: A-Za-z), digits (\p{N}: 0-9),
# white space (\s: tab, LF, VT, FF, CR, space) and everything else. SEP (0x80), a byte that
# ASCII text never holds, separates the texts of a batch and acts as the end of a text.
_LETTER, _DIGIT, _OTHER, _SPACE, _SEP = 0, 1, 2, 3, 4
SEP = "\x80"
_CLASS = np.full(256, _OTHER, dtype=np.uint8)
for _lo, _hi, _cls in (("A", "Z", _LETTER), ("a", "z", _LETTER), ("0", "9", _DIGIT)):
    _CLASS[ord(_lo) : ord(_hi) + 1] = _cls
_CLASS[[9, 10, 11, 12, 13, 32]] = _SPACE
_CLASS[ord(SEP)] = _SEP
# Contractions, tried first by the pattern: ' then s, d, m or t, or ' then ll, ve or re.
_ONE_LETTER = np.zeros(256, dtype=bool)
_ONE_LETTER[[ord(c) for c in "sdmt"]] = True
_TWO_LETTERS = {(ord(a), ord(b)) for a, b in ("ll", "ve", "re")}

_SHORT = 16  # pre-tokens up to this many characters get an exact key: their bytes and length in 2 x 64 bits
_MASK = np.array([(1 << (8 * n)) - 1 for n in range(9)], dtype=np.uint64)  # the low n bytes
# The length (1-16) in the free top bits of the first five bytes: ASCII leaves bit 7 of every byte
# free, so "a" and "a\x00" get different keys.
_LENGTH_BITS = np.array(
    [sum(((n >> j) & 1) << (8 * j + 7) for j in range(5)) for n in range(_SHORT + 1)], dtype=np.uint64
)
# Where a non-ASCII text may be cut with no pre-token crossing the cut: before a newline that
# follows a character that is not white space (see encode.pieces); its ASCII parts are then
# encoded here and only the others by tiktoken.
_SAFE_CUT = re.compile(r"(?<=\S)(?=\n)")
# Pre-tokens longer than this are encoded for the batch that holds them and not kept, so the table's
# memory stays bounded (2^18 entries of at most 64 characters).
_LONGEST_KEPT = 64
# Pre-token entries kept per process. 2^18 covers a large code or prose corpus (builtin:stdlib has
# ~50k distinct pre-tokens) in ~20 MB; past that the table starts over, so memory stays bounded
# on a stream of any size.
MAX_ENTRIES = 1 << 18
# Characters per numpy pass: one of prepare's chunks (500k) fits; larger arrays fall out of the CPU
# caches and run slower per byte.
_BATCH_CHARS = 1_000_000


def pretoken_starts(data: np.ndarray) -> np.ndarray:
    """Start offsets of GPT-2's pre-tokens in ``data`` (ASCII bytes, texts separated by 0x80).

    Equal to where the pattern's matches start, text by text: the separators come out as
    pre-tokens of their own, which callers drop.
    """
    n = data.size
    cls = _CLASS[data]
    starts = np.ones(n, dtype=bool)  # a pre-token starts where the class changes...
    np.not_equal(cls[1:], cls[:-1], out=starts[1:])
    # ...and at the last character of a run of white space that a letter, digit or other
    # character follows: \s+(?!\S) stops one short of such a character. That last character
    # is a pre-token of its own, unless it is a space: then ` ?` takes it into the next one.
    last_space = np.zeros(n, dtype=bool)
    last_space[:-1] = starts[1:] & (cls[:-1] == _SPACE) & (cls[1:] != _SEP)
    starts |= last_space
    starts[1:] &= ~(last_space[:-1] & (data[:-1] == 32))
    # A contraction where a pre-token starts with ': it ends after its one or two letters and
    # the letters that follow start the next pre-token.
    padded = np.concatenate([data, np.zeros(2, dtype=np.uint8)])
    quotes = np.flatnonzero(starts & (data == 39))
    if quotes.size:
        one = _ONE_LETTER[padded[quotes + 1]]
        two = np.array(
            [
                (a, b) in _TWO_LETTERS
                for a, b in zip(padded[quotes + 1].tolist(), padded[quotes + 2].tolist(), strict=True)
            ],
            dtype=bool,
        )
        quotes, width = quotes[one | two], np.where(one, 1, 2)[one | two]
        starts[quotes + 1] = False
        after = quotes + 1 + width
        starts[after[after < n]] = True
    return np.flatnonzero(starts)


class _KeyTable:
    """Open-addressing hash table from 128-bit keys (a, b) to entries; a == 0 marks an empty slot."""

    def __init__(self, capacity: int = 1 << 12) -> None:
        self.count = 0
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self._a = np.zeros(capacity, dtype=np.uint64)  # 0: empty slot
        self._b = np.zeros(capacity, dtype=np.uint64)
        self._value = np.zeros(capacity, dtype=np.int64)
        self._shift = np.uint64(64 - (capacity.bit_length() - 1))
        self._wrap = capacity - 1

    def _home(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        mixed = (a ^ (b * np.uint64(0xC2B2AE3D27D4EB4F))) * np.uint64(0x9E3779B97F4A7C15)
        return (mixed >> self._shift).astype(np.int64)

    def lookup(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The entry of each key, -1 where absent."""
        out = np.full(a.size, -1, dtype=np.int64)
        slot = self._home(a, b)
        todo = np.arange(a.size)
        while todo.size:  # linear probing: a few rounds at a load of at most 1/2
            at = slot[todo]
            stored = self._a[at]
            hit = (stored == a[todo]) & (self._b[at] == b[todo])
            out[todo[hit]] = self._value[at[hit]]
            todo = todo[~hit & (stored != 0)]
            slot[todo] = (slot[todo] + 1) & self._wrap
        return out

    def insert(self, a: np.ndarray, b: np.ndarray, value: np.ndarray) -> None:
        """Add keys that are all absent and distinct."""
        if 2 * (self.count + a.size) > self._a.size:
            old = self._a != 0
            old_a, old_b, old_value = self._a[old], self._b[old], self._value[old]
            capacity = self._a.size
            while 2 * (self.count + a.size) > capacity:
                capacity *= 2
            self._alloc(capacity)
            self.count = 0
            self.insert(old_a, old_b, old_value)
        slot = self._home(a, b)
        todo = np.arange(a.size)
        claim = np.full(self._a.size, -1, dtype=np.int64)
        while todo.size:
            at = slot[todo]
            free = self._a[at] == 0
            # Of the keys that reach the same free slot, one claims it (numpy keeps one of the
            # writes to a repeated index); the others probe on.
            claim[at[free]] = todo[free]
            won = free & (claim[at] == todo)
            self._a[at[won]], self._b[at[won]], self._value[at[won]] = (
                a[todo[won]],
                b[todo[won]],
                value[todo[won]],
            )
            todo = todo[~won]
            slot[todo] = (slot[todo] + 1) & self._wrap
        self.count += a.size


class CachedEncoder:
    """``encode_batch(texts)`` equal to ``encoding.encode_ordinary`` on each text, faster on ASCII text."""

    def __init__(self, encoding, max_entries: int = MAX_ENTRIES) -> None:
        self.encoding = encoding
        self.max_entries = max_entries
        # Only encodings with GPT-2's pattern (gpt2, r50k_base, p50k_base) split as above.
        self.cached = encoding._pat_str in _gpt2_patterns()
        self._reset()

    def _reset(self) -> None:
        self._table = _KeyTable()  # pre-tokens of up to _SHORT characters -> entry
        self._long: dict[str, int] = {}  # longer ones -> entry
        self._ids = np.empty(0, dtype=np.uint32)  # the ids of all entries, one after another
        self._entry_start = np.empty(0, dtype=np.int64)
        self._entry_len = np.empty(0, dtype=np.int64)

    def _add_entries(self, words: list[str]) -> np.ndarray:
        """Encode pre-tokens not seen before; return their new entries."""
        # A pre-token alone is one pre-token again, so encode_ordinary gives its ids.
        ids = [self.encoding.encode_ordinary(word) for word in words]
        lens = np.array([len(x) for x in ids], dtype=np.int64)
        first = self._entry_len.size
        self._entry_start = np.concatenate([self._entry_start, self._ids.size + np.cumsum(lens) - lens])
        self._entry_len = np.concatenate([self._entry_len, lens])
        self._ids = np.concatenate([self._ids, np.fromiter(chain.from_iterable(ids), dtype=np.uint32)])
        return np.arange(first, first + len(words))

    def _tiktoken(self, text: str) -> np.ndarray:
        return self.encoding.encode_to_numpy(text, disallowed_special=()).astype(np.uint32, copy=False)

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids per text, all ids concatenated as uint32); special tokens are plain text."""
        segments: list[str] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            cut = [text] if not self.cached or text.isascii() else _SAFE_CUT.split(text)
            segments.extend(cut)
            owner.extend([i] * len(cut))
        parts: list[np.ndarray] = [np.empty(0, dtype=np.uint32)] * len(segments)
        group: list[int] = []
        size = 0
        for i, segment in enumerate(segments):
            if self.cached and segment.isascii():
                group.append(i)
                size += len(segment) + 1
                if size >= _BATCH_CHARS:
                    self._encode_ascii(segments, group, parts)
                    group, size = [], 0
            else:
                parts[i] = self._tiktoken(segment)
        if group:
            self._encode_ascii(segments, group, parts)
        lengths = np.zeros(len(texts), dtype=np.int64)
        np.add.at(lengths, np.asarray(owner, dtype=np.int64), [p.size for p in parts])
        flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)
        return lengths, flat

    def _encode_ascii(self, texts: list[str], group: list[int], parts: list[np.ndarray]) -> None:
        joined = SEP.join(texts[i] for i in group)
        data = np.frombuffer(joined.encode("latin-1"), dtype=np.uint8)
        starts = pretoken_starts(data)
        ends = np.empty_like(starts)
        ends[:-1], ends[-1:] = starts[1:], data.size
        keep = data[starts] != ord(SEP)
        starts, ends = starts[keep], ends[keep]
        found = self._entries(joined, data, starts, ends)
        if found is None:  # the batch alone has more distinct pre-tokens than the table holds
            for i in group:
                parts[i] = self._tiktoken(texts[i])
            return
        entry, kept = found
        # The ids of each pre-token's entry, one pre-token after another.
        lens = self._entry_len[entry]
        ends_tok = np.cumsum(lens)
        total = int(ends_tok[-1]) if ends_tok.size else 0
        index = np.repeat(self._entry_start[entry] - (ends_tok - lens), lens) + np.arange(total)
        flat = self._ids[index]
        if self._entry_len.size > kept:  # drop this batch's entries of very long pre-tokens
            self._ids = self._ids[: int(self._entry_start[kept])]
            self._entry_start, self._entry_len = self._entry_start[:kept], self._entry_len[:kept]
        # Split per text: text k starts after k separators.
        text_starts = np.cumsum([0] + [len(texts[i]) + 1 for i in group[:-1]])
        bounds = np.append(np.concatenate([[0], ends_tok])[np.searchsorted(starts, text_starts)], total)
        for k, i in enumerate(group):
            parts[i] = flat[bounds[k] : bounds[k + 1]]

    def _entries(
        self, joined: str, data: np.ndarray, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[np.ndarray, int] | None:
        """(The entry of every pre-token, the number of entries to keep after this batch), adding
        those not seen before; None if they do not fit."""
        length = ends - starts
        short = np.flatnonzero(length <= _SHORT)
        long = np.flatnonzero(length > _SHORT)
        s_starts, s_len = starts[short], length[short]
        # The bytes of each short pre-token, in two unaligned little-endian 8-byte loads cut to its length.
        padded = np.concatenate([data, np.zeros(2 * 8, dtype=np.uint8)])
        words = np.ndarray(shape=(data.size + 8,), dtype="<u8", buffer=padded, strides=(1,))
        key_a = (words[s_starts] & _MASK[np.minimum(s_len, 8)]) | _LENGTH_BITS[s_len]
        key_b = words[s_starts + 8] & _MASK[np.clip(s_len - 8, 0, 8)]
        long_words = [joined[s:e] for s, e in zip(starts[long].tolist(), ends[long].tolist(), strict=True)]
        for attempt in range(2):
            found = self._table.lookup(key_a, key_b)
            absent = missing = np.flatnonzero(found < 0)
            if missing.size:  # one of each distinct missing key
                order = missing[np.lexsort((key_b[missing], key_a[missing]))]
                differs = np.ones(order.size, dtype=bool)
                differs[1:] = (key_a[order[1:]] != key_a[order[:-1]]) | (
                    key_b[order[1:]] != key_b[order[:-1]]
                )
                missing = order[differs]
            new_long = sorted(set(long_words).difference(self._long))
            if self._entry_len.size + missing.size + len(new_long) > self.max_entries:
                if attempt:
                    return None
                self._reset()
                continue
            if missing.size:
                spans = zip(s_starts[missing].tolist(), (s_starts + s_len)[missing].tolist(), strict=True)
                self._table.insert(
                    key_a[missing], key_b[missing], self._add_entries([joined[s:e] for s, e in spans])
                )
                found[absent] = self._table.lookup(key_a[absent], key_b[absent])
            # Very long pre-tokens (a run of "=", a blob of base64) get entries for this batch only:
            # kept, a few of them could fill the memory the table is bounded to.
            keep = [w for w in new_long if len(w) <= _LONGEST_KEPT]
            if keep:
                self._long.update(zip(keep, self._add_entries(keep).tolist(), strict=True))
            kept = self._entry_len.size
            once = [w for w in new_long if len(w) > _LONGEST_KEPT]
            lookup: Mapping[str, int] = self._long
            if once:
                lookup = ChainMap(dict(zip(once, self._add_entries(once).tolist(), strict=True)), self._long)
            entry = np.empty(starts.size, dtype=np.int64)
            entry[short] = found
            entry[long] = list(map(lookup.__getitem__, long_words))
            return entry, kept
        return None


def _gpt2_patterns() -> set[str]:
    try:
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        return set()
    # tiktoken's own spelling of GPT-2's pattern (the language the classes above follow).
    return {r50k_pat_str}
