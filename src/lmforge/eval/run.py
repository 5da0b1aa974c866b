"""`lmforge eval`: every measurement of a run in one report (a table and eval.json).

Sections: language modelling on validation data or a text file (loss, perplexity, bits per byte,
top-1/top-5 accuracy, and the same with sliding windows), multiple-choice tasks, generation quality on
a prompt set, speed, and, with int8 quantization, its speed-up and bits-per-byte change.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..checkpoint import load_model, tokenizer_path
from ..data import Tokenizer, TokenShards, load_meta
from ..data.batches import data_kind, eval_batches
from ..data.folder import data_tokenizer, val_windows
from ..device import pick_device
from ..errors import LmforgeError
from ..generate.batch import read_prompts as read_prompt_file
from ..generate.params import SamplingParams
from ..words import counted
from .metrics import evaluate_loss, score_tokens, summarize_scores
from .quality import DEFAULT_PROMPTS, generation_quality
from .speed import compare_speed, decode, measure_speed
from .tasks import evaluate_multiple_choice, read_multiple_choice


class EvalError(LmforgeError, ValueError):
    """Bad arguments or inputs to `lmforge eval`; the message says what and how to fix it."""


# Sampling settings the generation check does not apply (it decodes with temperature and top-k).
UNUSED_SAMPLING = ("top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "stop")


@dataclass
class EvalOptions:
    """What `lmforge eval` measures and on what (the CLI flags, one to one).

    sampling: how the generation check draws, with the defaults of every other command; an unset seed is
    0 there, so a report repeats. Of the sampling settings, UNUSED_SAMPLING must stay at their defaults.
    """

    data: str | None = None
    text: str | None = None
    stride: int | None = None  # sliding-window stride; default: see sliding_stride
    batches: int = 16  # validation batches of batch_size x seq_len tokens (--data)
    batch_size: int = 8
    tasks: dict[str, str] = field(default_factory=dict)
    prompts: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    speed: bool = True
    quantize: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        default = SamplingParams()
        unused = [k for k in UNUSED_SAMPLING if getattr(self.sampling, k) != getattr(default, k)]
        if unused:
            raise EvalError(
                f"{', '.join(unused)}: eval's generation check samples with temperature and top_k only; "
                f"leave {'it' if len(unused) == 1 else 'them'} unset"
            )


def read_prompts(path: str | Path) -> list[str]:
    """The --prompts set: .txt (one per line) or .jsonl, read like `generate --input`."""
    return read_prompt_file(path, flag="--prompts")


def _read_text(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise EvalError(f"text file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read text file '{path}' ({e}): it must be UTF-8 text") from None
    if not text.strip():
        raise EvalError(f"text file '{path}' is empty")
    return text


def lm_tokens(opts: EvalOptions, cfg, tokenizer: Tokenizer) -> tuple[torch.Tensor, float, str]:
    """The token sequence to score, the bytes its targets cover, and where it came from."""
    if opts.text:
        text = _read_text(opts.text)
        # Led by <|endoftext|>, as every document is in training, so the first token is scored too.
        ids = torch.tensor([tokenizer.eos_id, *tokenizer.encode(text)], dtype=torch.long)
        return ids, float(len(text.encode("utf-8"))), opts.text
    data = opts.data or cfg.data
    if not data or not Path(data).is_dir():
        whose = "data folder" if opts.data else "the run's data folder"
        raise EvalError(f"{whose} '{data}' does not exist: pass --data DATA_DIR or --text FILE")
    meta = load_meta(data)
    shards = TokenShards(data, "val", meta=meta)
    want = opts.batches * opts.batch_size * model_seq_len(cfg) + 1
    n = min(want, len(shards))
    if n < 2:
        raise EvalError(f"the val split of '{data}' has fewer than 2 tokens: prepare more data")
    ids = torch.from_numpy(shards.read(0, n))
    return ids, (n - 1) * float(meta["val_bytes_per_token"]), f"{data} (val)"


def model_seq_len(cfg) -> int:
    """The sequence length the model was trained on: the window it has learned to use."""
    return cfg.model.resolved().seq_len


def sliding_stride(opts: EvalOptions, cfg, window: int) -> tuple[int, str]:
    """The stride of the sliding windows, and where it comes from: --stride; else, for a data folder's
    val split, the stride of the val_windows `prepare --seq-len/--stride` recorded, when they are windows
    of this model's length; else half the window."""
    if opts.stride:
        return opts.stride, "--stride"
    data = None if opts.text else opts.data or cfg.data
    windows = val_windows(load_meta(data)) if data else None
    if windows is None:
        return max(1, window // 2), "half the window"
    if windows[0] != window:  # a stride chosen for other windows says nothing about these
        return max(1, window // 2), f"half the window: {data}'s val_windows are of {windows[0]} tokens"
    return windows[1], f"the val_windows of {data}"


def language_modelling(model, ids: torch.Tensor, n_bytes: float, window: int, stride: int, batch) -> dict:
    """Metrics over disjoint windows (as training's eval), and over windows sliding by `stride`.

    The window is the training sequence length: positions past it were never trained (a learned
    position table has untrained rows there), so a longer window would not help.
    """
    plain = summarize_scores(score_tokens(model, ids, window, window, batch), n_bytes)
    sliding = summarize_scores(score_tokens(model, ids, window, stride, batch), n_bytes)
    out = {k: plain[k] for k in ("loss", "ppl", "bpb", "top1_acc", "top5_acc", "tokens")}
    out.update({"sliding_" + k: sliding[k] for k in ("loss", "ppl", "bpb")})
    out.update({"window": window, "stride": stride})
    return out


def generation(model, tokenizer: Tokenizer, prompts: list[str], opts: EvalOptions) -> dict:
    """Sample one continuation per prompt and measure its quality."""
    texts, counts = [], []
    s = opts.sampling
    seed = 0 if s.seed is None else s.seed
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt) if prompt else []
        out, _ = decode(
            model,
            [tokenizer.eos_id, *ids],
            s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            seed=seed + i,
            eos_id=tokenizer.eos_id,
        )
        if out and out[-1] == tokenizer.eos_id:
            out = out[:-1]
        texts.append(tokenizer.decode(out))
        counts.append(len(out))
    report = generation_quality(texts, counts)
    report["examples"] = [{"prompt": p, "output": t} for p, t in zip(prompts[:3], texts[:3], strict=False)]
    return report


def evaluate_run(run: str | Path, opts: EvalOptions, console: Console | None = None) -> dict:
    """Load the run, measure everything `opts` asks for, and return the report (a JSON-able dict)."""
    say = (lambda m: console.print(m, highlight=False, soft_wrap=True)) if console else (lambda m: None)
    tasks, prompts, device = _check_inputs(opts)
    model, cfg, ckpt = load_model(run, device=device)
    tokenizer = Tokenizer.load(tokenizer_path(Path(run)))
    report: dict = {"run": str(run), "checkpoint": str(ckpt), "device": str(device)}
    data = None if opts.text else opts.data or cfg.data
    meta = load_meta(data) if data and Path(data).is_dir() else None
    if meta is not None:
        _check_in_runs_tokens(data, tokenizer)
    base_model, base_bpb = None, None
    if meta is not None and data_kind(data, meta) == "chat":
        report["source"], report["lm"] = _conversations_lm(model, cfg, data, meta, opts, say)
    else:
        ids, n_bytes, report["source"] = lm_tokens(opts, cfg, tokenizer)
        window = model_seq_len(cfg)
        stride, why = sliding_stride(opts, cfg, window)
        say(f"sliding windows of {window} tokens every {stride} ({why})")
        if not 1 <= stride <= window:
            raise EvalError(f"--stride {stride}: must be between 1 and the model's window ({window} tokens)")
        if opts.quantize == "int8":
            base_model, base_bpb = _quantize(model, ids, n_bytes, window, opts, report, say)
        say(f"scoring {ids.numel() - 1:,} tokens of {report['source']} ...")
        report["lm"] = language_modelling(model, ids, n_bytes, window, stride, opts.batch_size)
    for name, items in tasks.items():
        say(f"task {name}: {counted(len(items), 'item')} ...")
        report.setdefault("tasks", {})[name] = evaluate_multiple_choice(model, tokenizer, items)
    say(f"generating from {counted(len(prompts), 'prompt')} ...")
    report["generation"] = generation(model, tokenizer, prompts, opts)
    if opts.speed:
        say("timing prefill and decode ...")
        _speed(model, base_model, report)
    if base_bpb is not None:
        q = report["quantization"]
        q.update(bpb_fp=base_bpb, bpb_int8=report["lm"]["bpb"], bpb_change=report["lm"]["bpb"] - base_bpb)
    return report


def _conversations_lm(model, cfg, data: str, meta: dict, opts: EvalOptions, say) -> tuple[str, dict]:
    """A folder of conversations (`prepare --chat`): (its name, the loss on what a fine-tune learns there:
    the assistants' tokens of the val windows, as the fine-tune's val loss). No bits per byte or sliding
    windows: the tokens scored are not a text's bytes."""
    if opts.quantize == "int8":
        raise EvalError(
            f"--quantize int8 compares bits per byte, which '{data}' (conversations) has none of: pass "
            "--text FILE or a text --data folder"
        )
    seq_len = model_seq_len(cfg)
    batches = eval_batches(data, meta, seq_len, opts.batch_size, opts.batches)
    say(f"scoring the assistants' tokens of {data} (val) ...")
    loss, count = evaluate_loss(model, batches, next(model.parameters()).device)
    lm = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "window": seq_len}
    return f"{data} (val, assistants' tokens)", lm


def _check_in_runs_tokens(data: str, tokenizer: Tokenizer) -> None:
    """A data folder is scored only in the run's own tokens: every token of the data's tokenizer has the
    same id in the run's (a fine-tune's added chat tokens aside); else the numbers would mean nothing, or an
    id past the run's vocabulary would fail inside the model."""
    theirs = data_tokenizer(data)
    if not theirs.is_file():
        return
    ours = tokenizer.hf.get_vocab()
    if any(ours.get(token) != i for token, i in Tokenizer.load(theirs).hf.get_vocab().items()):
        raise EvalError(
            f"data folder '{data}' is in another tokenizer's tokens than this run's: pass data prepared with "
            "the run's tokenizer (lmforge prepare --tokenizer RUN_DIR ...), or --text FILE"
        )


def _check_inputs(opts: EvalOptions) -> tuple[dict, list[str], torch.device]:
    """The tasks, the prompts and the device, read before the model loads so a bad input fails early."""
    if opts.data and opts.text:
        raise EvalError("give --data or --text, not both")
    if opts.quantize not in (None, "none", "int8"):
        raise EvalError(f"--quantize {opts.quantize}: the supported value is int8")
    tasks = {name: read_multiple_choice(path) for name, path in opts.tasks.items()}
    prompts = read_prompts(opts.prompts) if opts.prompts else list(DEFAULT_PROMPTS)
    try:
        device = pick_device(opts.device)
    except ValueError as e:
        raise EvalError(str(e).replace("train.device", "--device")) from None
    return tasks, prompts, device


def _quantize(model, ids, n_bytes: float, window: int, opts: EvalOptions, report: dict, say):
    """Score the model as it is, then make it int8 in place; (a copy of the unquantized model when speed
    is compared, else None; its bits per byte). Adds the weight sizes to report["quantization"]."""
    from ..generate.layout import use_inference_layout
    from ..generate.quant import quantize_int8, weight_bytes

    say("scoring the unquantized model first ...")
    base_scores = score_tokens(model, ids, window, window, opts.batch_size)
    base_bpb = summarize_scores(base_scores, n_bytes)["bpb"]
    base_model = copy.deepcopy(model) if opts.speed else None
    fp_bytes = weight_bytes(model)
    use_inference_layout(model)  # int8 of the decoding layout, as `LLM.load(quantize="int8")` makes it
    quantize_int8(model)
    report["quantization"] = {
        **model.quant_info,
        "weight_mb_fp": fp_bytes / 2**20,
        "weight_mb_int8": weight_bytes(model) / 2**20,
    }
    return base_model, base_bpb


def _speed(model, base_model, report: dict) -> None:
    """report["speed"]; with an unquantized copy, also both speeds and the speed-ups in report["quantization"]."""
    if base_model is None:
        report["speed"] = measure_speed(model)
        return
    both = compare_speed({"int8": model, "fp": base_model})
    report["speed"] = both["int8"]
    for key in ("prefill_tok_s", "decode_tok_s"):
        speedup = both["int8"][key] / both["fp"][key]
        report["quantization"][f"{key}_fp"] = both["fp"][key]
        report["quantization"][f"{key.removesuffix('_tok_s')}_speedup"] = speedup


def read_report(path: str | Path) -> dict:
    """The report a file holds: {} when there is none (or it is not a JSON object)."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


# Sections a report keeps from the file it replaces: measured by another command, not this one.
KEPT_SECTIONS = ("harness",)


def write_report(report: dict, path: str | Path, keep: tuple[str, ...] = KEPT_SECTIONS) -> Path:
    """Write the report as JSON through a temporary file and a rename (never half-written); the sections
    named in `keep` that the file already has and the report lacks are carried over."""
    path = Path(path)
    previous = read_report(path) if keep else {}
    report = {**{k: previous[k] for k in keep if k in previous}, **report}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise EvalError(f"cannot write '{path}' ({e.strerror or e}): choose another --out") from None
    return path


def _fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isfinite(value) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


ROWS = {
    "lm": (
        "loss",
        "ppl",
        "bpb",
        "top1_acc",
        "top5_acc",
        "sliding_loss",
        "sliding_ppl",
        "sliding_bpb",
        "tokens",
    ),
    "generation": ("distinct_1", "distinct_2", "repetition_rate", "mean_tokens", "mean_words"),
    "speed": ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_mem_mb"),
    "quantization": (
        "kernel",
        "bpb_fp",
        "bpb_int8",
        "bpb_change",
        "prefill_speedup",
        "decode_speedup",
        "weight_mb_fp",
        "weight_mb_int8",
    ),
}


def report_table(report: dict) -> Table:
    """The report as a rich table: section, metric, value."""
    table = Table(title=f"lmforge eval: {report['run']}")
    table.add_column("section")
    table.add_column("metric")
    table.add_column("value", justify="right")
    sections = [(name, report.get(name, {}), keys) for name, keys in ROWS.items()]
    for name, result in report.get("tasks", {}).items():
        sections.insert(1, (f"task {name}", result, ("acc", "acc_norm", "items")))
    for title, result, keys in sections:
        first = True
        for key in keys:
            if key in result:
                table.add_row(title if first else "", key, _fmt(result[key]))
                first = False
        if not first:
            table.add_section()
    return table
