"""The model card every export writes as README.md: YAML front matter the Hugging Face hub reads
(library_name, license, tags, datasets, model-index with the run's evaluation numbers) and a body drawn
from the run's report card (report.py), with how to use the files and, for a tokenizer with the chat
template's tokens, how to chat.

The numbers in model-index are those measured on the exported checkpoint: the run's validation at that
checkpoint's step (loss, perplexity, bits per byte, and any accuracies the eval line holds), and
`lmforge eval`'s eval.json when it measured that same step. Nothing is claimed for other checkpoints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ..report import ReportError, _json, _num, accuracies, run_facts
from ..run_dir import CHECKPOINT_META, RunDir
from .common import ExportError

CARD_FILE = "README.md"
LIBRARY = {"hf": "transformers", "gguf": "gguf", "onnx": "onnx", "safetensors": "lmforge"}
# A license is an identifier as the hub lists them (apache-2.0, mit, cc-by-4.0, llama3, other, ...).
LICENSE_RE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


def check_license(license: str | None) -> str | None:
    """The --license value in the hub's lowercase form; ExportError for one that is no identifier."""
    if license is None:
        return None
    value = license.strip().lower()
    if not LICENSE_RE.match(value):
        raise ExportError(
            f"--license {license!r}: give a license identifier such as apache-2.0, mit, cc-by-4.0 or other"
        )
    return value


def run_of(run: str | Path, ckpt: Path) -> Path | None:
    """The run directory behind `run` (a RUN_DIR, or a checkpoint directory inside one), or None."""
    for candidate in (Path(run), ckpt.parent.parent, ckpt.parent):
        if RunDir(candidate).looks_like_run():
            return candidate
    return None


def measured(facts: dict, run_dir: Path, step: int | None) -> dict:
    """The numbers measured on the checkpoint of `step`: {"val": eval line, "scores": accuracies,
    "eval_json": eval.json's part} (each None when that step has none)."""
    r = facts["results"]
    at_step = [e for e in r["evals"] if e.get("step") == step]
    report = r["eval_json"] or {}
    harness = report.get("harness")
    return {
        "val": at_step[-1] if at_step else None,
        "scores": accuracies(at_step[-1]) if at_step else None,
        "eval_json": report if report and _eval_step(report, run_dir) == step else None,
        "harness": harness if harness and _eval_step(harness, run_dir) == step else None,
    }


def _eval_step(report: dict, run_dir: Path) -> int | None:
    """The step of the checkpoint eval.json measured (None when that checkpoint is gone). Its path may be
    relative to where `lmforge eval` ran, so the run's own folder of that name is tried too."""
    path = report.get("checkpoint")
    if not isinstance(path, str):
        return None
    for ckpt in (Path(path), RunDir(run_dir).checkpoints / Path(path).name, run_dir / Path(path).name):
        if (ckpt / CHECKPOINT_META).is_file():
            return _json(ckpt / CHECKPOINT_META).get("step")
    return None


# lmforge eval's lm keys -> (model-index metric type, its name on the card)
EVAL_LM = {
    "loss": ("loss", "Loss (lmforge eval)"),
    "ppl": ("perplexity", "Perplexity (lmforge eval)"),
    "bpb": ("bpb", "Bits per byte (lmforge eval)"),
    "top1_acc": ("accuracy", "Next-token accuracy (lmforge eval)"),
    "top5_acc": ("top5_accuracy", "Next-token top-5 accuracy (lmforge eval)"),
}


def _result(task: str, task_name: str, dataset: dict, metrics: list[tuple[str, float, str]]) -> dict:
    """One model-index result (new dicts each time: YAML would write shared ones as &anchors)."""
    return {
        "task": {"type": task, "name": task_name},
        "dataset": dict(dataset),
        "metrics": [{"type": kind, "value": float(value), "name": name} for kind, value, name in metrics],
    }


def _task_of(key: str) -> tuple[str, str]:
    """(task, metric type) of an accuracy key of an eval line: "tasks.hellaswag.acc" and "acc/hellaswag"
    are hellaswag's accuracy; a flat key ("centered_acc") is its own task."""
    parts = [p for p in re.split(r"[./]", key) if p]
    metric = next((p for p in reversed(parts) if "acc" in p.lower()), parts[-1])
    others = [p for p in parts if p not in (metric, "tasks")]
    kind = "accuracy" if metric.lower() in ("acc", "accuracy") else metric
    return (others[-1] if others else key), kind


def model_index(name: str, facts: dict, numbers: dict) -> list[dict]:
    """The hub's model-index: one result per (task, dataset) with the exported checkpoint's numbers, as
    measured (unrounded); [] when that checkpoint was never measured."""
    data = facts["data"]
    data_id = (data["hub_datasets"] or [Path(str(data["path"])).name or "lmforge-data"])[0]
    val_data = {"type": data_id, "name": "validation split of the training data", "split": "validation"}
    results = []
    val = numbers["val"]
    if val:
        metrics = [("loss", val["val_loss"], "Validation loss (nats/token)")]
        metrics += [("perplexity", val["val_ppl"], "Perplexity")] if _num(val.get("val_ppl")) else []
        metrics += [("bpb", val["val_bpb"], "Bits per byte")] if _num(val.get("val_bpb")) else []
        results.append(_result("text-generation", "Language modeling", val_data, metrics))
    for key, value in (numbers["scores"] or {}).items():
        task, kind = _task_of(key)
        results.append(_result("multiple-choice", task, {"type": task, "name": task}, [(kind, value, key)]))
    report = numbers["eval_json"] or {"lm": {}, "tasks": {}}
    if report["lm"]:
        source = Path(str(report.get("source"))).name  # a local path names nothing on the hub
        metrics = [(EVAL_LM[k][0], v, EVAL_LM[k][1]) for k, v in report["lm"].items()]
        results.append(_result("text-generation", "Language modeling", {**val_data, "name": source}, metrics))
    for task, scores in report["tasks"].items():
        metrics = [("accuracy" if k == "acc" else k, v, f"{task} {k}") for k, v in scores.items()]
        if metrics:
            results.append(_result("multiple-choice", task, {"type": task, "name": task}, metrics))
    harness = numbers.get("harness") or {"tasks": {}, "n_shot": {}}
    for task, scores in harness["tasks"].items():
        shots = harness["n_shot"].get(task)
        how = "lm-eval" + (f", {shots}-shot" if shots is not None else "")
        metrics = [("accuracy" if k == "acc" else k, v, f"{task} {k} ({how})") for k, v in scores.items()]
        results.append(_result("text-generation", task, {"type": task, "name": task}, metrics))
    return [{"name": name, "results": results}] if results else []


def front_matter(
    name: str, fmt: str, facts: dict | None, numbers: dict, license: str | None, chat: bool
) -> dict:
    """The card's YAML metadata."""
    meta: dict = {"library_name": LIBRARY[fmt]}
    if license:
        meta["license"] = license
    family = (facts or {}).get("model", {}).get("family")
    formats = [] if fmt == "hf" else [fmt]  # an hf export is the hub's default kind of repository
    meta["tags"] = ["lmforge", *formats, *([family] if family else []), *(["chat"] if chat else [])]
    meta["pipeline_tag"] = "text-generation"
    if facts and facts["data"]["hub_datasets"]:
        meta["datasets"] = list(facts["data"]["hub_datasets"])
    index = model_index(name, facts, numbers) if facts else []
    if index:
        meta["model-index"] = index
    return meta


# How to use each format; MODEL_DIR and END_OF_TURN are filled in. transformers 4.x and 5.x both take this
# apply_chat_template call (5.x returns a dict by default, so the dict is asked for explicitly).
HF_LOAD = """from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir = MODEL_DIR  # this folder, or its hub repository id
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
"""
HF_GENERATE = """ids = tok("Once upon a time", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=True)[0]))
"""
HF_CHAT = """messages = [{"role": "user", "content": "Hello!"}]
inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64)  # the export's generation config stops at END_OF_TURN
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""
GGUF_GENERATE = 'llama-cli -m model.gguf -p "Once upon a time" -n 40\n'
GGUF_CHAT = "llama-cli -m model.gguf -cnv\n"
FILES = {
    "onnx": "`model.onnx` (`idx` int64 (batch, seq) → `logits`) and `tokenizer.json`",
    "safetensors": "`model.safetensors` (lmforge's tensor names) and `config.json` (its model config)",
}


def usage(fmt: str, folder: str, chat: bool) -> str:
    """How to use the exported files (and chat, when the tokenizer has the chat tokens)."""
    from ..data.chat_template import END_TOKEN, ROLE_TOKENS, TEMPLATE_NAME

    if fmt == "hf":
        then = HF_CHAT.replace("END_OF_TURN", END_TOKEN) if chat else HF_GENERATE
        text = f"```python\n{HF_LOAD.replace('MODEL_DIR', json.dumps(folder))}{then}```\n"
    elif fmt == "gguf":
        text = f"```bash\n{GGUF_CHAT if chat else GGUF_GENERATE}```\n"
    else:
        text = f"Files: {FILES[fmt]}.\n"
    if chat:
        turns = f"<|endoftext|>{ROLE_TOKENS['user']}Hello!{END_TOKEN}{ROLE_TOKENS['assistant']}"
        text += f"\nChat format ({TEMPLATE_NAME}): `{turns}`; a reply ends with `{END_TOKEN}`.\n"
    return text


def model_card(
    run: str | Path, ckpt: Path, fmt: str, out: str | Path, tokenizer: Path, license: str | None
) -> str:
    """README.md for an export of checkpoint `ckpt` of `run` into `out`."""
    from ..data import Tokenizer
    from ..data.chat_template import has_chat_tokens
    from ..report_render import markdown_sections, sections

    license = check_license(license)
    run_dir = run_of(run, ckpt)
    try:
        facts = run_facts(run_dir) if run_dir else None
    except ReportError:
        facts = None
    step = _json(ckpt / CHECKPOINT_META).get("step")
    nothing = {"val": None, "scores": None, "eval_json": None, "harness": None}
    numbers = measured(facts, run_dir, step) if facts else nothing
    chat = has_chat_tokens(Tokenizer.load(tokenizer))
    name = facts["run"] if facts else Path(out).name
    meta = front_matter(name, fmt, facts, numbers, license, chat)
    body = [f"# {name}\n", f"A language model trained with lmforge, exported as `{fmt}` from step {step}.\n"]
    if not license:
        body.append("No license was given when this model was exported (`lmforge export --license ID`).\n")
    body += ["## Usage\n", usage(fmt, Path(out).name, chat)]
    if facts:
        if not numbers["val"]:
            note = f"The exported checkpoint (step {step}) has no validation result of its own"
            body.append(note + "; the report below is the whole run's.\n")
        body.append(markdown_sections(sections(facts, public=True)))
    else:
        body.append("The run directory of this checkpoint was not found, so there is no training report.\n")
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{head}---\n\n" + "\n".join(body)


def write_card(folder: Path, text: str) -> None:
    """Put README.md into a finished export; if that fails, remove the export (nothing half-written)."""
    import shutil

    try:
        (Path(folder) / CARD_FILE).write_text(text, encoding="utf-8")
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        where = Path(folder) / CARD_FILE
        raise ExportError(
            f"cannot write {where} ({e.strerror or e}): the export was removed; free space and export again"
        ) from None
