"""Sampling as pure functions over a logits vector: penalties, filters, then a draw.

The settings, `SamplingParams`, live in params.py (no torch) and are re-exported here.
"""

from __future__ import annotations

import torch

from .params import SamplingParams

__all__ = [
    "SamplingParams",
    "draw",
    "filter_logits",
    "min_p_filter",
    "penalize_counts",
    "penalize_seen",
    "race",
    "sample_rows",
    "top_k_filter",
    "top_p_filter",
]


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


def penalize_counts(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """OpenAI's frequency and presence penalties for a batch: `counts` (B, vocab) holds how many times each
    row generated each token; a token's logit loses frequency_penalty x its count, and presence_penalty
    once it has a count (the prompt's tokens are not counted)."""
    penalty = counts * params.frequency_penalty if params.frequency_penalty else 0
    if params.presence_penalty:
        penalty = penalty + (counts > 0) * params.presence_penalty
    return logits - penalty


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, on float logits (..., vocab); temperature must be > 0."""
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    return _nucleus_and_min_p(logits, params)


def _nucleus_and_min_p(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The filters after temperature and top-k: top-p, then min-p."""
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
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token of each row of logits (B, vocab) -> (B,); row i draws from generators[i]. seen: (B,
    vocab) the tokens each row's text holds (for the repetition penalty); counts: (B, vocab) how many
    times each row generated each token (for the frequency and presence penalties).

    One generator per row makes a prompt's sample independent of the other prompts in its batch.
    """
    logits = logits.float()
    if seen is not None:
        logits = penalize_seen(logits, seen, params.repetition_penalty)
    if counts is not None:
        logits = penalize_counts(logits, counts, params)
    if params.greedy:
        return logits.argmax(-1)
    k = params.top_k
    if k is not None and k < logits.size(-1):
        # Only the k candidates can be drawn: filter and draw among them (B, k), not over the whole
        # vocabulary. The same distribution as filter_logits' path (ties at the k-th logit aside: this
        # keeps exactly k), in 0.15 ms instead of 0.86 for 8 x 4,096 logits (top-k 50) on a 2-core CPU.
        top, index = torch.topk(logits, k, dim=-1)  # sorted, largest first
        top = _nucleus_and_min_p(top / params.temperature, params)
        return index.gather(-1, draw(top.softmax(-1), generators)[:, None]).squeeze(-1)
    probs = filter_logits(logits, params).softmax(-1)  # (B, vocab)
    return draw(probs, generators)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """One index per row of probs (B, vocab), row i with probability probs[i]: the argmax of
    probs / E with E ~ Exp(1) i.i.d. (the "exponential race": index j wins with probability
    probs[j] / sum(probs)). The same distribution as torch.multinomial(probs, 1), at a fraction of its
    cost on a CPU (8 x 8,192: 0.4 ms against 1.6 ms), which matters once per decode step. E is drawn as
    -log(U), U uniform in [0, 1): torch's exponential_ is as slow as multinomial here."""
    noise = torch.empty_like(probs)
    if generators is None:
        noise.uniform_()
    else:
        for i, g in enumerate(generators):
            noise[i].uniform_(generator=g)
    return race(probs, noise)


def race(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """argmax of probs / -log(U) for U in [0, 1) (overwritten). U = 0 is clamped to the smallest normal
    float: as -log(0) = inf it would score every index 0, and argmax could then pick one of
    probability 0 (a banned token)."""
    return (probs / uniform.clamp_(min=torch.finfo(uniform.dtype).tiny).log_().neg_()).argmax(-1)
