"""Token generation with a KV cache: prefill the prompt once, then decode one token at a time."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from ..model import GPT
from .sampling import SamplingParams, sample_next


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one by one (a stream). Same seed, same output.

    A prompt that leaves no room in the context is cut from the left, with a warning; generation stops
    at eos_id, after max_new_tokens, or when the context is full.
    """
    params = params or SamplingParams()
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    context = model.cfg.context_len
    room = max(1, min(max_new_tokens, context - 1))
    if len(prompt) + room > context:
        keep = context - room
        warnings.warn(
            f"prompt of {len(prompt)} tokens cut to its last {keep} to leave room in the context",
            stacklevel=2,
        )
        prompt = prompt[-keep:]
    device = model.wte.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    cache = model.new_cache(1, max_len=min(context, len(prompt) + max_new_tokens)) if use_cache else None
    logits = model(ids, cache=cache)[:, -1]  # (1, vocab)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, params, ids[0], generator)  # (1,)
        token = int(nxt.item())
        yield token
        if token == eos_id:
            return
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        if ids.size(1) >= context or (cache is not None and cache.pos >= cache.max_len):
            return
        logits = model(nxt.view(1, 1), cache=cache)[:, -1] if cache is not None else model(ids)[:, -1]


class TextStream:
    """Turns a stream of token ids into text pieces, holding back bytes that do not yet form a character."""

    def __init__(self, decode) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        """Add a token; return the new printable text (possibly empty)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def stream_text(
    model: GPT,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    params: SamplingParams | None = None,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces; an empty prompt starts a new document."""
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    stream = TextStream(tokenizer.decode)
    for token in generate_ids(model, prompt_ids, max_new_tokens, params, seed, tokenizer.eos_id):
        if token == tokenizer.eos_id:
            return
        piece = stream.push(token)
        if piece:
            yield piece
