"""Language-model metrics: loss, perplexity, bits per byte, and the log-likelihood of continuations."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..device import autocast


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Tokenizer-independent loss: nats/token -> bits/byte (divide by ln 2 and by bytes per token)."""
    return loss_nats_per_token / (math.log(2) * bytes_per_token)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str = "fp32",
) -> tuple[float, int]:
    """Mean next-token loss (nats) over the batches, weighted by tokens; also the token count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            loss = model(x, y)
        n = int((y != -1).sum())
        total += loss.item() * n
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("no validation tokens to evaluate on")
    return total / count, count


def loss_report(loss: float, bytes_per_token: float | None) -> dict[str, float]:
    """val_loss, val_ppl and (when bytes per token are known) val_bpb."""
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if bytes_per_token:
        out["val_bpb"] = bits_per_byte(loss, bytes_per_token)
    return out


def score_windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (start, end, first_scored) over `length` targets; each target is scored exactly once.

    Target t is token t+1 of the sequence, predicted from tokens [start, t+1). The first window scores
    its whole span; each later one slides by `stride` and scores only the `stride` new targets at its
    end, so they see at least window - stride tokens of left context (stride == window: disjoint chunks).
    """
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"stride={stride}: must be between 1 and the window ({window})")
    spans, scored = [], 0
    while scored < length:
        end = min(length, window if scored == 0 else scored + stride)
        spans.append((max(0, end - window), end, scored))
        scored = end
    return spans


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module,
    ids: torch.Tensor,
    window: int,
    stride: int | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """Per-target nll (nats), top-1 and top-5 hits for ids[1:] given their left context (sliding windows).

    ids is a 1-D token sequence; the returned tensors have len(ids) - 1 entries, target t being ids[t+1].
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    n = ids.numel() - 1
    spans = score_windows(n, window, stride or window)
    nll = torch.empty(n, device=device)
    top1 = torch.empty(n, dtype=torch.bool, device=device)
    top5 = torch.empty(n, dtype=torch.bool, device=device)
    # Windows of the same length go through the model together.
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            x = torch.stack([ids[s:e] for s, e, _ in chunk])  # (B, T)
            y = torch.stack([ids[s + 1 : e + 1] for s, e, _ in chunk])  # (B, T)
            with autocast(device, precision):
                logits = model(x)
            logits = logits.float()  # (B, T, V)
            token_nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
            k = min(5, logits.size(-1))
            best = logits.topk(k, dim=-1).indices  # (B, T, k)
            hit = best == y[..., None]
            for row, (s, e, first) in enumerate(chunk):
                keep = slice(first - s, length)
                nll[first:e] = token_nll[row, keep]
                top1[first:e] = hit[row, keep, 0]
                top5[first:e] = hit[row, keep].any(-1)
    return {"nll": nll.cpu(), "top1": top1.cpu(), "top5": top5.cpu()}


def summarize_scores(scores: dict[str, torch.Tensor], n_bytes: float | None = None) -> dict[str, float]:
    """loss, ppl, top-1/top-5 accuracy and (given the bytes the scored tokens cover) bits per byte."""
    n = scores["nll"].numel()
    if n == 0:
        raise ValueError("no tokens to score")
    total = float(scores["nll"].double().sum())
    out = {
        "loss": total / n,
        "ppl": math.exp(min(total / n, 50.0)),
        "top1_acc": float(scores["top1"].float().mean()),
        "top5_acc": float(scores["top5"].float().mean()),
        "tokens": n,
    }
    if n_bytes:
        out["bpb"] = total / (math.log(2) * n_bytes)
    return out


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    window: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(summed log-probability, greedy) of each continuation after its context, for (context, continuation)
    token pairs: greedy is True when every continuation token is the argmax of its prediction.

    A pair longer than `window` + 1 tokens (default: the model's context) loses tokens from the left of the
    context, as lm-evaluation-harness cuts them. Pairs go through the model batch_size at a time, longest
    first, right-padded: a causal model's scores at a position never see the padding after it.
    """
    window = window or model.cfg.context_len
    device = next(model.parameters()).device
    for context, cont in pairs:
        if not context or not cont or len(cont) > window:
            raise ValueError(f"a pair needs a context and 1..{window} continuation tokens")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [[*pairs[i][0], *pairs[i][1]][-(window + 1) :] for i in chunk]
        x = torch.zeros(len(rows), max(len(r) for r in rows) - 1, dtype=torch.long)  # (B, T)
        for row, seq in enumerate(rows):
            x[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        logp = F.log_softmax(model(x.to(device)).float(), dim=-1)  # (B, T, V)
        for row, (i, seq) in enumerate(zip(chunk, rows, strict=True)):
            n, end = len(pairs[i][1]), len(seq) - 1
            targets = torch.tensor(seq[-n:], device=device)
            scores = logp[row, end - n : end]  # (n, V): the predictions of the continuation's tokens
            total = scores.gather(-1, targets[:, None]).sum()
            out[i] = (float(total), bool((scores.argmax(-1) == targets).all()))
        if on_batch is not None:
            on_batch(len(chunk))
    return out
