"""Zero-shot multiple choice from a local JSONL file, scored by log-likelihood.

Three layouts are read, told apart by the fields of a file's first item (`detect_format`):
- HellaSwag: {"ctx": "...", "endings": ["...", ...], "label": 2}, or "ctx_a"/"ctx_b" instead of "ctx"
  (HellaSwag's own files have all three);
- ARC (as Hugging Face's ai2_arc writes it): {"question": "...", "choices": {"text": [...], "label":
  ["A", ...]}, "answerKey": "A"};
- MMLU (as cais/mmlu writes it): {"question": "...", "choices": [...], "answer": 1} (an index or a letter).
ARC and MMLU items become the cloze form "Question: ...\nAnswer:" followed by each choice's text: a model
too small to answer with a letter still ranks the answers themselves (lm-evaluation-harness's ARC prompt).
`builtin:NAME` is a task made here rather than read (stdlib_task.py).

Every ending is scored as the sum of the log-probabilities of its tokens after the context (" " + ending,
as the sentence continues; an item may name another separator). acc picks the ending with the highest
sum; acc_norm divides each sum by the ending's length in UTF-8 bytes first, so long endings are not
penalised for having more tokens (the byte normalisation of Gao et al.'s lm-evaluation-harness).
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
    # What joins the context and an ending: a space for prose; "" where each ending brings its own
    # start (the stdlib task's endings begin with the newline and indentation of a line of code).
    separator: str = " "


BUILTIN_PREFIX = "builtin:"
FORMATS = ("hellaswag", "arc", "mmlu")
EXPECTED_FIELDS = (
    "HellaSwag (ctx or ctx_a + ctx_b, endings, label), ARC (question, choices: {text, label}, answerKey) "
    "or MMLU (question, choices list, answer)"
)


def read_multiple_choice(path: str | Path) -> list[Choice]:
    """Items of a task: a JSONL file in one of FORMATS, or `builtin:NAME`; TaskError naming the line for
    anything malformed."""
    if str(path).startswith(BUILTIN_PREFIX):
        from .stdlib_task import builtin_task  # the stdlib is read only when a builtin task is asked for

        return builtin_task(str(path))
    path = Path(path)
    rows = _read_rows(path)
    parse = _PARSERS[detect_format(path, rows[0][1])]
    return [parse(row, where) for where, row in rows]


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(file:line, object) of each non-empty line."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise TaskError(
            f"task file '{path}' does not exist: give a JSONL file in HellaSwag's, ARC's or MMLU's format"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"cannot read task file '{path}' ({e}): it must be UTF-8 JSONL") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise TaskError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TaskError(f"{where}: expected a JSON object with the fields of {EXPECTED_FIELDS}")
        rows.append((where, row))
    if not rows:
        raise TaskError(f"task file '{path}' has no items")
    return rows


def detect_format(path: str | Path, row: dict) -> str:
    """The format (one of FORMATS) whose fields the item `row` of the file `path` has."""
    if {"ctx", "ctx_a", "endings"} & row.keys():
        return "hellaswag"
    if "answerKey" in row:
        return "arc"
    if "question" in row and ("answer" in row or isinstance(row.get("choices"), list)):
        return "mmlu"
    fields = ", ".join(sorted(map(str, row))) or "none"
    raise TaskError(
        f"task file '{path}': its first item's fields ({fields}) match no known format: expected {EXPECTED_FIELDS}"
    )


# Fields only HellaSwag's own files have: their items get its WikiHow clean-up, no other item does.
HELLASWAG_FIELDS = frozenset({"ctx_a", "activity_label", "source_id"})


def clean(text: str) -> str:
    """Text without HellaSwag's WikiHow markup: " [title]" ends a sentence, other [tags] go, spaces collapse."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return re.sub(r"  +", " ", text).strip()


def _hellaswag(row: dict, where: str) -> Choice:
    if isinstance(row.get("ctx"), str):
        context = row["ctx"]
    elif isinstance(row.get("ctx_a"), str):
        context = (row["ctx_a"] + " " + str(row.get("ctx_b", ""))).strip()
    else:
        raise TaskError(f"{where}: no context: give a string field 'ctx' (or 'ctx_a' and 'ctx_b')")
    endings = _strings(row.get("endings"), where, "'endings'")
    try:
        label = int(row.get("label"))  # HellaSwag stores it as a string in some releases
    except (TypeError, ValueError):
        raise TaskError(f"{where}: 'label' must be an integer index into 'endings'") from None
    if not 0 <= label < len(endings):
        raise TaskError(f"{where}: label {label} is outside 0..{len(endings) - 1}")
    if not HELLASWAG_FIELDS.intersection(row):
        return Choice(context, endings, label)
    return Choice(clean(context), tuple(clean(e) for e in endings), label)


def _arc(row: dict, where: str) -> Choice:
    choices = row.get("choices")
    if not isinstance(choices, dict):
        raise TaskError(f"{where}: ARC's 'choices' must be an object with lists 'text' and 'label'")
    texts = _strings(choices.get("text"), where, "'choices.text'")
    labels = [str(x) for x in choices.get("label") or []]
    if len(labels) != len(texts):
        raise TaskError(f"{where}: 'choices.label' must give one label per entry of 'choices.text'")
    key = str(row.get("answerKey"))
    if key not in labels:
        raise TaskError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return Choice(_question(row, where), texts, labels.index(key))


def _mmlu(row: dict, where: str) -> Choice:
    texts = _strings(row.get("choices"), where, "MMLU's 'choices'")
    answer = row.get("answer")
    letters = "ABCDEFGHIJ"[: len(texts)]
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in letters:
        label = letters.index(answer.upper())
    elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(texts):
        label = answer
    else:
        raise TaskError(
            f"{where}: answer {answer!r} must be an index 0..{len(texts) - 1} or a letter of {letters}"
        )
    return Choice(_question(row, where), texts, label)


def _question(row: dict, where: str) -> str:
    if not isinstance(row.get("question"), str):
        raise TaskError(f"{where}: 'question' must be a string")
    return f"Question: {row['question'].strip()}\nAnswer:"


def _strings(value, where: str, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(e, str) for e in value):
        raise TaskError(f"{where}: {name} must be a list of at least two strings")
    return tuple(value)


_PARSERS = {"hellaswag": _hellaswag, "arc": _arc, "mmlu": _mmlu}


@torch.no_grad()
def ending_logprobs(model: torch.nn.Module, tokenizer, item: Choice) -> list[tuple[float, int]]:
    """(sum of log-probabilities, UTF-8 bytes) of each ending of `item` after its context."""
    device = next(model.parameters()).device
    context_len = model.cfg.context_len
    ctx_ids = tokenizer.encode(item.context) if item.context else []
    rows, spans = [], []
    for ending in item.endings:
        cont = tokenizer.encode(item.separator + ending)
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
        out.append((float(total), len((item.separator + item.endings[i]).encode("utf-8"))))
    return out


def predictions(model: torch.nn.Module, tokenizer, item: Choice) -> tuple[int, int]:
    """The ending acc picks (highest summed log-likelihood) and the one acc_norm picks (highest per byte)."""
    scores = ending_logprobs(model, tokenizer, item)
    best = max(range(len(scores)), key=lambda i: scores[i][0])
    best_norm = max(range(len(scores)), key=lambda i: scores[i][0] / scores[i][1])
    return best, best_norm


def evaluate_multiple_choice(model: torch.nn.Module, tokenizer, items: list[Choice]) -> dict[str, float]:
    """acc (highest summed log-likelihood) and acc_norm (highest per byte) over the items."""
    correct = correct_norm = 0
    for item in items:
        best, best_norm = predictions(model, tokenizer, item)
        correct += best == item.label
        correct_norm += best_norm == item.label
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "items": n}
