"""Files of prompts in, files of completions out; the format follows the file extension."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import LmforgeError
from ..model import GPT
from .engine import NO_CONTROL, Completion, ControlIds, Prompt, generate_texts
from .sampling import SamplingParams

INPUT_FORMATS = (".txt", ".jsonl")
OUTPUT_FORMATS = (".json", ".jsonl", ".csv", ".txt")
FIELDS = ("prompt", "completion", "finish_reason", "prompt_tokens", "completion_tokens")


class BatchFileError(LmforgeError, ValueError):
    """A prompts file or an output path that cannot be used."""


def check_output_path(path: str | Path) -> Path:
    """The output path, if its extension names a known format and its folder exists."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise BatchFileError(
            f"--output {path}: unknown format '{path.suffix}'; end the name with one of "
            f"{', '.join(OUTPUT_FORMATS)}"
        )
    if path.parent.exists() and not path.parent.is_dir():
        raise BatchFileError(f"--output {path}: '{path.parent}' is a file, not a folder; choose another path")
    if not path.parent.is_dir():
        raise BatchFileError(f"--output {path}: folder '{path.parent}' does not exist; create it first")
    return path


def read_prompts(path: str | Path, flag: str = "--input") -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or a .jsonl file ({"prompt": ...} per line).

    flag names the option the path came from, for the error messages.
    """
    path = Path(path)
    if path.suffix.lower() not in INPUT_FORMATS:
        raise BatchFileError(
            f"{flag} {path}: unknown format '{path.suffix}'; use .txt (one prompt per line) or .jsonl"
        )
    if not path.is_file():
        raise BatchFileError(f"{flag} {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a leading BOM is not text
    except (OSError, UnicodeDecodeError) as e:
        raise BatchFileError(f"{flag} {path}: cannot read it ({e}); it must be UTF-8 text") from None
    if path.suffix.lower() == ".txt":
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise BatchFileError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove the line") from e
            prompt = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else obj
            if not isinstance(prompt, str):
                raise BatchFileError(f'{path}:{n}: expected {{"prompt": "..."}} (a string), got {line[:60]}')
            prompts.append(prompt)
    if not prompts:
        raise BatchFileError(f"{flag} {path}: no prompts in the file")
    return prompts


def records(prompts: Sequence[str], completions: Sequence[Completion]) -> list[dict]:
    """One flat dict per prompt, the rows every output format holds."""
    return [
        {
            "prompt": p,
            "completion": c.text,
            "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": len(c.token_ids),
        }
        for p, c in zip(prompts, completions, strict=True)
    ]


def write_results(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as .json (a list), .jsonl, .csv (header row) or .txt (one completion per line, newlines
    escaped as \\n); written to a temporary file and renamed, so no half-written file is left."""
    path = check_output_path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    elif suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    else:
        text = "".join(r["completion"].replace("\\", "\\\\").replace("\n", "\\n") + "\n" for r in rows)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def generate_batches(
    model: GPT,
    tokenizer,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    control: ControlIds = NO_CONTROL,
) -> list[Completion]:
    """Completions of many prompts (text or token ids), batch_size at a time, in the order given.

    Prompts are grouped by length (less padding); each row has its own seeded generator, so the grouping
    does not change what a prompt gets. on_batch(n) is called after each batch of n prompts.
    """
    if batch_size < 1:
        raise BatchFileError(f"batch size {batch_size}: must be >= 1")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Completion | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [prompts[i] for i in idx]
        done = generate_texts(model, tokenizer, batch, max_new_tokens, params, seed, stop, control)
        for i, c in zip(idx, done, strict=True):
            out[i] = c
        if on_batch is not None:
            on_batch(len(idx))
    return out  # type: ignore[return-value]
