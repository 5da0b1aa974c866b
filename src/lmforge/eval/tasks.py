"""Zero-shot multiple choice from a local JSONL in HellaSwag's format, scored by log-likelihood.

Each line: {"ctx": "...", "endings": ["...", ...], "label": 2}, or "ctx_a"/"ctx_b" instead of "ctx"
(HellaSwag's own files have all three). Every ending is scored as the sum of the log-probabilities of
its tokens after the context (" " + ending, as the sentence continues). acc picks the ending with the
highest sum; acc_norm divides each sum by the ending's length in UTF-8 bytes first, so long endings are
not penalised for having more tokens (the byte normalisation of Gao et al.'s lm-evaluation-harness).
HellaSwag's WikiHow items carry markup such as "[header]" and "[title]"; in items of HellaSwag's own
layout (with its `ctx_a`, `activity_label` or `source_id` fields) it is removed before scoring, as that
harness does, so a user's numbers are comparable with published ones. Any other item is scored exactly
as written: brackets, indentation and runs of spaces are content in code or math items.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LmforgeError


class TaskError(LmforgeError, ValueError):
    """A task file is missing, unreadable or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Choice:
    """One multiple-choice item: a context, its candidate endings and the index of the right one."""

    context: str
    endings: tuple[str, ...]
    label: int


def read_multiple_choice(path: str | Path) -> list[Choice]:
    """Items of a HellaSwag-style JSONL file; TaskError naming the line for anything malformed."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TaskError(
            f"task file '{path}' does not exist: give a JSONL file in HellaSwag's format"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"cannot read task file '{path}' ({e}): it must be UTF-8 JSONL") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise TaskError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TaskError(f"{where}: expected a JSON object with ctx, endings and label")
        items.append(_choice(row, where))
    if not items:
        raise TaskError(f"task file '{path}' has no items")
    return items


# Fields only HellaSwag's own files have: their items get its WikiHow clean-up, no other item does.
HELLASWAG_FIELDS = frozenset({"ctx_a", "activity_label", "source_id"})


def clean(text: str) -> str:
    """Text without HellaSwag's WikiHow markup: " [title]" ends a sentence, other [tags] go, spaces collapse."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return re.sub(r"  +", " ", text).strip()


def _choice(row: dict, where: str) -> Choice:
    if isinstance(row.get("ctx"), str):
        context = row["ctx"]
    elif isinstance(row.get("ctx_a"), str):
        context = (row["ctx_a"] + " " + str(row.get("ctx_b", ""))).strip()
    else:
        raise TaskError(f"{where}: no context: give a string field 'ctx' (or 'ctx_a' and 'ctx_b')")
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise TaskError(f"{where}: 'endings' must be a list of at least two strings")
    try:
        label = int(row.get("label"))  # HellaSwag stores it as a string in some releases
    except (TypeError, ValueError):
        raise TaskError(f"{where}: 'label' must be an integer index into 'endings'") from None
    if not 0 <= label < len(endings):
        raise TaskError(f"{where}: label {label} is outside 0..{len(endings) - 1}")
    if not HELLASWAG_FIELDS.intersection(row):
        return Choice(context, tuple(endings), label)
    return Choice(clean(context), tuple(clean(e) for e in endings), label)


@torch.no_grad()
def ending_logprobs(model: torch.nn.Module, tokenizer, item: Choice) -> list[tuple[float, int]]:
    """(sum of log-probabilities, UTF-8 bytes) of each ending of `item` after its context."""
    device = next(model.parameters()).device
    context_len = model.cfg.context_len
    ctx_ids = tokenizer.encode(item.context) if item.context else []
    rows, spans = [], []
    for ending in item.endings:
        cont = tokenizer.encode(" " + ending)
        if not cont:
            raise TaskError(f"an ending of '{item.context[:40]}...' is empty")
        seq = [tokenizer.eos_id, *ctx_ids, *cont][-(context_len + 1) :]  # keep the ending, cut the left
        rows.append(seq)
        spans.append(len(cont))
    width = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, seq in enumerate(rows):
        x[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        y[i, : len(seq) - 1] = torch.tensor(seq[1:])
    logp = F.log_softmax(model(x.to(device)).float(), dim=-1).cpu()  # (n_endings, width, V)
    out = []
    for i, (seq, n) in enumerate(zip(rows, spans, strict=True)):
        end = len(seq) - 1
        targets = y[i, end - n : end]
        total = logp[i, end - n : end].gather(-1, targets[:, None]).sum()
        out.append((float(total), len((" " + item.endings[i]).encode("utf-8"))))
    return out


def evaluate_multiple_choice(model: torch.nn.Module, tokenizer, items: list[Choice]) -> dict[str, float]:
    """acc (highest summed log-likelihood) and acc_norm (highest per byte) over the items."""
    correct = correct_norm = 0
    for item in items:
        scores = ending_logprobs(model, tokenizer, item)
        best = max(range(len(scores)), key=lambda i: scores[i][0])
        best_norm = max(range(len(scores)), key=lambda i: scores[i][0] / scores[i][1])
        correct += best == item.label
        correct_norm += best_norm == item.label
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "items": n}
