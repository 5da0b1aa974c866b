"""Language-model metrics: loss, perplexity, bits per byte."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

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
