"""Token generation with a KV cache: prefill the prompts once, then decode one token at a time.

A batch of prompts of different lengths is left-padded so that every row writes its next token to the
same cache slot; a key mask hides the padding and each row counts positions from its own first token,
so a prompt gives the same greedy tokens alone or inside a padded batch (tests/test_generate.py).

The engine decodes a model in whatever layout it is given: the faster CPU layout (`layout.py`) is applied
by whoever owns the model for inference (`LLM.load`), never here, since training samples through this
engine too and must keep its weights as they are.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..model import GPT
from .layout import pack_for_decoding
from .sampling import SamplingParams, sample_rows
from .step import StaticDecoder, decode_step


def fit_prompt(prompt: list[int], max_new_tokens: int, context: int, warn: bool = True) -> list[int]:
    """The context-full policy: cut the prompt from the left so max_new_tokens (at least 1) still fit."""
    room = max(1, min(max_new_tokens, context - 1))
    keep = context - room
    if len(prompt) <= keep:
        return prompt
    if warn:
        warnings.warn(
            f"prompt of {len(prompt)} tokens cut to its last {keep} to leave room for {room} new tokens "
            f"in the context of {context}",
            stacklevel=3,
        )
    return prompt[-keep:]


# New tokens from which a generation on a GPU records its decode step as a CUDA graph: recording costs
# about two eager steps, which a replay saves back within a few tokens.
GRAPH_MIN_TOKENS = 16


def graphs_by_default(device: torch.device, max_new_tokens: int) -> bool:
    """Whether a generation decodes through a CUDA graph when not told: on a GPU, for GRAPH_MIN_TOKENS or
    more new tokens, unless the environment sets LMFORGE_CUDA_GRAPHS=0."""
    return (
        device.type == "cuda"
        and max_new_tokens >= GRAPH_MIN_TOKENS
        and os.environ.get("LMFORGE_CUDA_GRAPHS", "1") != "0"
    )


@dataclass(frozen=True)
class ControlIds:
    """Token ids with a meaning of their own during a generation, besides end-of-text (which always ends a
    row): `stop` ends a row where one is sampled (a chat template's end of turn), and is never text;
    `banned` are never sampled (a chat template's role tokens, which may not appear inside a reply)."""

    stop: frozenset[int] = frozenset()
    banned: frozenset[int] = frozenset()

    @classmethod
    def of(cls, stop: Collection[int] = (), banned: Collection[int] = ()) -> ControlIds:
        """ControlIds from any collections of ids."""
        return cls(frozenset(int(i) for i in stop), frozenset(int(i) for i in banned))


NO_CONTROL = ControlIds()


def _left_padded(
    prompts: Sequence[list[int]], total: int, pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P), key_mask (B, total)): the prompts padded on the left with `pad`, so that every row ends
    at slot P-1 (P: the longest prompt), and which of the `total` cache slots hold real tokens."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad, dtype=torch.long, device=device)
    key_mask = torch.zeros((B, total), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        key_mask[i, P - len(p) : P] = True
    return ids, key_mask


class BatchDecoder:
    """Decodes a batch of token prompts together, one step at a time, with one preallocated KV cache.

    step() returns each row's new token (None for rows already finished); finish(i) stops row i early
    (a stop string). A row finishes by itself at eos_id or one of control.stop, or after max_new_tokens;
    control.banned ids get no probability at any step.

    cuda_graph: decode through `StaticDecoder`, whose step is recorded once as a CUDA graph on a GPU and
    replayed for every token. None (default): `graphs_by_default`; True forces its fixed-shape step
    anywhere (eagerly off the GPU; for tests); False never.
    """

    def __init__(
        self,
        model: GPT,
        prompts: Sequence[list[int]],
        max_new_tokens: int,
        params: SamplingParams | None = None,
        seed: int | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        cuda_graph: bool | None = None,
        control: ControlIds = NO_CONTROL,
    ) -> None:
        if not prompts:
            raise ValueError("no prompts: give at least one")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt is empty: give at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        self.model, self.params, self.eos_id = model, params or SamplingParams(), eos_id
        self.stop_ids = control.stop | ({eos_id} if eos_id is not None else set())
        context = model.cfg.context_len
        self.prompts = [fit_prompt(list(p), max_new_tokens, context) for p in prompts]
        self.max_new_tokens = max_new_tokens
        device = model.wte.weight.device
        B, P = len(self.prompts), max(len(p) for p in self.prompts)
        self.total = min(context, P + max_new_tokens)  # cache slots: padding + prompt + new tokens
        ids, self.key_mask = _left_padded(self.prompts, self.total, 0 if eos_id is None else eos_id, device)
        self.padded = any(len(p) < P for p in self.prompts)
        self.lengths = torch.tensor([len(p) for p in self.prompts], device=device)  # next position per row
        positions = (self.key_mask[:, :P].long().cumsum(1) - 1).clamp(min=0)  # (B, P)
        # Rows draw from their own generator, all seeded alike: a prompt samples the same in any batch.
        self.generators = None
        if seed is not None:
            self.generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(B)]
        vocab = model.cfg.vocab_size
        self.seen = None
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros((B, vocab), dtype=torch.bool, device=device)
            self.seen.scatter_(1, ids, self.key_mask[:, :P])
        self.counts = None  # (B, vocab) each row's generated tokens, counted (frequency/presence penalty)
        if self.params.counts_tokens:
            self.counts = torch.zeros((B, vocab), dtype=torch.float32, device=device)
        self.banned = None  # (n,) ids whose logits are -inf before every draw
        if control.banned:
            self.banned = torch.tensor(sorted(control.banned), dtype=torch.long, device=device)
        self.done = [False] * B
        self.generated: list[list[int]] = [[] for _ in range(B)]
        self.finish_reasons: list[str | None] = [None] * B
        self.use_cache = use_cache
        if use_cache:  # CPU inference layers get their packed weights where the rows take them
            pack_for_decoding(model, B)
        if cuda_graph is None:
            cuda_graph = graphs_by_default(device, max_new_tokens)
        static = use_cache and cuda_graph and not model.training
        self.cache = model.new_cache(B, max_len=self.total, zeroed=static) if use_cache else None
        self.static = None
        if static:  # the padded rows' key mask is updated in place by step(), which the graph reads
            self.static = StaticDecoder(model, self.cache, self.key_mask if self.padded else None)
        self.ids, self.positions = ids, positions  # kept whole only without a cache
        self.slot = P  # the cache slot the next token goes to
        self._logits = self._forward(ids, positions, P)

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor | None, end: int) -> torch.Tensor:
        mask = self.key_mask[:, :end] if self.padded else None
        pos = positions if self.padded else None
        if self.cache is None:  # reference path: the whole sequence again
            ids, pos, mask = self.ids, (self.positions if self.padded else None), mask
        elif ids.size(1) == 1 and not self.model.training:  # a decode step: the one-token fast path
            if self.static is not None:
                return self.static(ids, pos)
            return decode_step(self.model, ids, self.cache, pos, mask)
        return self.model(ids, cache=self.cache, positions=pos, key_mask=mask, last_only=True)[:, -1]

    @property
    def finished(self) -> bool:
        """True when every row has stopped."""
        return all(self.done)

    def finish(self, i: int, reason: str = "stop") -> None:
        """Stop row i (its later tokens are computed with the batch but never returned)."""
        if not self.done[i]:
            self.done[i], self.finish_reasons[i] = True, reason

    @torch.no_grad()
    def step(self) -> list[int | None]:
        """Sample one token for every unfinished row and feed it back; None marks finished rows."""
        if self.finished:
            return [None] * len(self.done)
        logits = self._logits  # (B, vocab)
        if self.banned is not None:  # a copy: the static decoder's logits tensor is its own
            logits = logits.index_fill(1, self.banned, float("-inf"))
        nxt = sample_rows(logits, self.params, self.seen, self.generators, self.counts)  # (B,)
        out: list[int | None] = []
        for i, token in enumerate(nxt.tolist()):
            if self.done[i]:
                out.append(None)
                continue
            out.append(token)
            self.generated[i].append(token)
            if token in self.stop_ids:
                self.finish(i, "stop")
            elif len(self.generated[i]) >= self.max_new_tokens:
                self.finish(i, "length")
        if self.seen is not None:
            self.seen.scatter_(1, nxt[:, None], True)
        if self.counts is not None:
            self.counts[torch.arange(len(self.done), device=nxt.device), nxt] += 1
        if self.slot >= self.total:  # the context is full
            for i in range(len(self.done)):
                self.finish(i, "length")
        if self.finished:
            return out
        B = len(self.done)
        positions = None  # rows of one length count positions from the cache slot
        if self.padded or self.cache is None:
            self.key_mask[:, self.slot] = True
            positions = self.lengths.view(B, 1).clone()  # (B, 1): each row's own next position
            self.lengths += 1
        self.slot += 1
        if self.cache is None:
            self.ids = torch.cat([self.ids, nxt.view(B, 1)], dim=1)
            self.positions = torch.cat([self.positions, positions], dim=1)
        self._logits = self._forward(nxt.view(B, 1), positions, self.slot)
        return out


class TextStream:
    """Turns a stream of token ids into text pieces, holding back bytes that do not yet form a character.

    With stop strings, text that could be the start of one is held back too, and push() reports when one
    appears; the text before it is the last piece.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.whole = 0  # ids[:whole] are in text (they end on a whole character)
        self.before = 0  # ids[before:whole]: the tokens that ended the text last time
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the new printable text (possibly empty).

        Decodes only the tokens since the text last ended on a whole character, after the tokens that
        ended it (a decoder may treat a sequence's first token apart, e.g. drop its space, so the new
        text is what they add to those): each token costs the same, however long the reply."""
        self.ids.append(token)
        window = self.decode(self.ids[self.before :])
        if window.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        ended = self.decode(self.ids[self.before : self.whole]) if self.whole > self.before else ""
        if window.startswith(ended):
            text = self.text + window[len(ended) :]
        else:  # a decoder that rewrote what came before the new tokens: decode them all
            text = self.decode(self.ids)
        self.before, self.whole = self.whole, len(self.ids)
        self.text = text
        if self.stop:
            start = max(0, self.emitted - max(map(len, self.stop)))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped, self.text = True, text[:end]
                piece, self.emitted = text[self.emitted : end], end
                return piece
            safe = len(text) - max(_prefix_overlap(text, s) for s in self.stop)
        else:
            safe = len(text)
        piece, self.emitted = text[self.emitted : safe], max(self.emitted, safe)
        return piece

    def flush(self) -> str:
        """The text held back at the end (a partial stop string that never completed)."""
        piece, self.emitted = self.text[self.emitted :], len(self.text)
        return piece


def _prefix_overlap(text: str, stop: str) -> int:
    """Length of the longest end of text that is a proper start of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


@dataclass
class Completion:
    """One finished generation: the new text, its tokens, and why it stopped ("stop" or "length")."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    # Per new token when asked for, OpenAI's logprobs entries; an end token that ended it has one too (last).
    logprobs: list[dict] | None = None


class Piece(str):
    """A streamed text piece that carries, when logprobs are asked for, the logprobs entries of the tokens
    drawn since the previous piece (a str everywhere else: it joins, prints and compares as its text)."""

    logprobs: list[dict] | None

    def __new__(cls, text: str, logprobs: list[dict] | None = None) -> Piece:
        piece = super().__new__(cls, text)
        piece.logprobs = logprobs
        return piece


Prompt = str | Sequence[int]  # text to continue, or the token ids of a prompt (a chat template's)


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The token ids of a prompt: ids as given, text encoded; an empty text starts a new document
    (<|endoftext|>)."""
    if not isinstance(prompt, str):
        return [int(i) for i in prompt]
    return tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]


def stream_texts(
    model: GPT,
    tokenizer,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    control: ControlIds = NO_CONTROL,
) -> Iterator[tuple[int, str] | list[Completion]]:
    """Yield (row, text piece) as a batch is decoded, then the list of Completions last.

    A prompt is text or token ids (`prompt_ids`). A row ends at end-of-text, at one of control.stop, at a
    stop string or after max_new_tokens; the token that ends it is never text, nor in the token ids.
    """
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    dec = BatchDecoder(model, ids, max_new_tokens, params, seed, tokenizer.eos_id, control=control)
    streams = [TextStream(tokenizer.decode, stop) for _ in prompts]
    while not dec.finished:
        for i, token in enumerate(dec.step()):
            if token is None or token in dec.stop_ids:
                continue
            piece = streams[i].push(token)
            if piece:
                yield i, piece
            if streams[i].stopped:
                dec.finish(i, "stop")
    completions = []
    for i, s in enumerate(streams):
        if not s.stopped:
            tail = s.flush()
            if tail:
                yield i, tail
        tokens = [t for t in dec.generated[i] if t not in dec.stop_ids]
        reason = dec.finish_reasons[i] or "length"
        completions.append(Completion(s.text, tokens, reason, len(dec.prompts[i])))
    yield completions


def generate_texts(
    model: GPT,
    tokenizer,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    control: ControlIds = NO_CONTROL,
) -> list[Completion]:
    """Continue every prompt of a batch (text or ids); returns one Completion per prompt, in order."""
    result: list[Completion] = []
    for event in stream_texts(model, tokenizer, prompts, max_new_tokens, params, seed, stop, control):
        if isinstance(event, list):
            result = event
    return result


def stream_text(
    model: GPT,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    params: SamplingParams | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces; an empty prompt starts a new document."""
    for event in stream_texts(model, tokenizer, [prompt], max_new_tokens, params, seed, stop):
        if isinstance(event, tuple):
            yield event[1]
