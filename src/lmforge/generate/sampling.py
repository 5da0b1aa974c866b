"""Sampling as pure functions over a logits vector: penalties, filters, then a draw."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    repetition_penalty: float = 1.0
    min_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 disables it)")
        if self.min_p is not None and not 0 <= self.min_p < 1:
            raise ValueError(f"min_p={self.min_p}: must be in [0, 1)")


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al., 2019): divide positive, multiply negative logits of seen tokens."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    logits = logits.clone()
    seen = logits[..., previous.unique()]
    logits[..., previous.unique()] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits; the rest become -inf."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al., 2020): keep the smallest set whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p  # tokens after the nucleus is already full
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al., 2024): drop tokens less likely than min_p times the top token."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    cutoff = min_p * probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < cutoff, float("-inf"))


def penalize_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty for a batch: `seen` (B, vocab) marks each row's tokens so far."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, on float logits (..., vocab); temperature must be > 0."""
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p is not None:
        logits = min_p_filter(logits, params.min_p)
    return logits


def sample_rows(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Next token of each row of logits (B, vocab) -> (B,); row i draws from generators[i].

    One generator per row makes a prompt's sample independent of the other prompts in its batch.
    """
    logits = logits.float()
    if seen is not None:
        logits = penalize_seen(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)  # (B, vocab)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    previous: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose the next token id(s) from logits (..., vocab)."""
    logits = logits.float()
    if previous is not None:
        logits = apply_repetition_penalty(logits, previous, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)
    flat = probs.reshape(-1, probs.size(-1))
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
