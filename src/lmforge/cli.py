"""The one `lmforge` command. Each subcommand maps to one function; jsonargparse does all the parsing.

lmforge prepare  --source SRC[:WEIGHT] ... --out DATA_DIR [--tokenizer bpe|wordpiece|unigram|word|char|gpt2|tiktoken:NAME|FILE]
lmforge train    --config configs/X.yaml --data DATA_DIR --out RUN_DIR [--resume auto|never|PATH] [--section.key=value ...]
lmforge generate --run RUN_DIR --prompt "..." [--stream] | --input prompts.txt --output results.jsonl
lmforge chat     --run RUN_DIR
lmforge serve    --run RUN_DIR [--host 127.0.0.1] [--port 8000]
lmforge export   --run RUN_DIR --format hf|safetensors|onnx|gguf --out DIR [--dtype f32|f16|bf16|q8_0]
lmforge import   hf:HF_DIR --out RUN_DIR
lmforge eval     --run RUN_DIR [--data DATA_DIR | --text FILE] [--tasks NAME=FILE.jsonl] [--quantize int8]
lmforge consolidate --run RUN_DIR [--out DIR]
lmforge quickstart
lmforge bench    [--preset P] [--batch N] [--compare hf|none]
lmforge estimate --config configs/X.yaml [--preset P] [--gpu NAME] [--gpus N] [--section.key=value ...]
lmforge plot     RUN_DIR [RUN_DIR ...] [--out FILE.png|.html]
lmforge status   RUN_DIR
lmforge doctor   [--run-dir DIR]

The parsers live here; what each subcommand does lives in commands.py.
"""

from __future__ import annotations

import re
import sys
from argparse import ArgumentError

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from rich.console import Console

from .commands import (
    COMMANDS,
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    cmd_estimate,
    cmd_train,
    parse_config,
)
from .config import Config, ConfigError, all_keys, unknown_key_message
from .errors import LmforgeError
from .model import ModelConfig
from .presets import BENCH_MODEL, get_preset

__all__ = ["EXIT_DIVERGED", "EXIT_PREEMPTED", "EXIT_USAGE", "build_parser", "main", "parse", "parse_config"]


def _parser(description: str) -> ArgumentParser:
    return ArgumentParser(description=description, exit_on_error=False)


def build_parser() -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    """The top-level parser and each subcommand's parser (the train parser takes presets as defaults)."""
    root = ArgumentParser(
        prog="lmforge", description="Train GPT-style language models and use them.", exit_on_error=False
    )
    subs = root.add_subcommands(dest="command", required=True)
    parsers: dict[str, ArgumentParser] = {}

    p = _parser("Train a tokenizer on raw text and write token shards plus meta.json and manifest.json.")
    p.add_argument(
        "--source",
        action="append",
        required=True,
        help="a file or folder (.txt .md .json .jsonl .jsonl.gz .parquet .csv), builtin:stdlib, "
        "hf:NAME[:CONFIG][@SPLIT], fineweb, fineweb-edu, dolma, pile, c4, or kaggle:OWNER/DATASET; "
        "repeatable, SRC:WEIGHT mixes sources in proportion",
    )
    p.add_argument("--out", required=True, help="DATA_DIR to write")
    p.add_argument(
        "--tokenizer",
        default="bpe",
        help="bpe | wordpiece | unigram | word | char (trained here), gpt2, tiktoken:NAME, or a tokenizer.json",
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size of a trained tokenizer")
    p.add_argument("--special-tokens", default="", help="extra special tokens, comma-separated")
    p.add_argument(
        "--text-field", default="text", help="record field holding the text (text falls back to content)"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.01, help="share of documents held out for validation"
    )
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--max-tokens", type=int, default=None, help="stop once this many tokens are written")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--seq-len", type=int, default=None, help="validation window length recorded for eval")
    p.add_argument(
        "--stride", type=int, default=None, help="step between validation windows (< seq-len overlaps)"
    )
    parsers["prepare"] = p

    p = _parser("Train (or resume) a model on prepared data.")
    p.add_argument("--config", action=ActionConfigFile, help="a YAML config (see configs/)")
    p.add_class_arguments(Config, nested_key=None, fail_untyped=False)
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and costs; train nothing"
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="hf:DIR: start from a local HF GPT-2/Llama model (its architecture replaces model.*)",
    )
    parsers["train"] = p

    p = _parser("Generate text from a trained run.")
    p.add_argument("--run", required=True, help="RUN_DIR (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int | None, default=50)
    p.add_argument("--top-p", type=float | None, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int | None, default=None, help="same seed, same output")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--device", default="auto")
    p.add_argument("--min-p", type=float | None, default=None, help="drop tokens below min_p x the top one")
    p.add_argument("--stop", action="append", default=None, help="stop at this text (repeatable)")
    p.add_argument("--input", default=None, help="prompts.txt (one per line) or prompts.jsonl ({'prompt'})")
    p.add_argument("--output", default=None, help="results .json | .jsonl | .csv | .txt (with --input)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (with --input)")
    p.add_argument("--quantize", default=None, help="int8: int8 weight-only linear layers (CPU inference)")
    parsers["generate"] = p

    p = _parser(
        "Chat with a trained run in the terminal (/reset, /temperature X, /quit; Ctrl-C stops a reply)."
    )
    p.add_argument("--run", required=True, help="RUN_DIR (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top-k", type=int | None, default=50)
    p.add_argument("--top-p", type=float | None, default=None)
    p.add_argument("--system", default=None, help="a system line kept at the start of the conversation")
    p.add_argument("--seed", type=int | None, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--quantize", default=None, help="int8: int8 weight-only linear layers (CPU inference)")
    parsers["chat"] = p

    p = _parser(
        "Serve a run over HTTP with an OpenAI-compatible API (/v1/completions, /v1/chat/completions)."
    )
    p.add_argument("--run", required=True, help="RUN_DIR (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens", type=int, default=512, help="cap on max_tokens a request may ask for")
    p.add_argument(
        "--max-body", type=int, default=1_000_000, help="largest request body in bytes (413 above)"
    )
    p.add_argument("--model-name", default=None, help="the model id clients see (default: the run's name)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quantize", default=None, help="int8: int8 weight-only linear layers (CPU inference)")
    parsers["serve"] = p

    p = _parser("Export a run to Hugging Face transformers, safetensors, ONNX or GGUF.")
    p.add_argument("--run", required=True, help="RUN_DIR (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--format", required=True, help="hf | safetensors | onnx | gguf")
    p.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", default="f32", help="f32 | f16 | bf16 (hf, safetensors, gguf) | q8_0 (gguf)")
    parsers["export"] = p

    p = _parser("Import a local Hugging Face GPT-2 or Llama model folder as an lmforge run.")
    p.add_argument("source", help="hf:DIR, a folder with config.json, *.safetensors and tokenizer.json")
    p.add_argument("--out", required=True, help="RUN_DIR to create")
    parsers["import"] = p

    p = _parser("Prepare the built-in corpus, train the tiny preset for a few minutes, and print a sample.")
    p.add_argument("--data", default="data/stdlib", help="where the prepared corpus goes (reused if present)")
    p.add_argument("--out", default="runs/quickstart", help="RUN_DIR")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="training token budget (default: sized for CPU)"
    )
    p.add_argument("--device", default="auto")
    parsers["quickstart"] = p

    p = _parser("Time training steps of an lmforge model next to the same model in HF transformers.")
    p.add_argument("--preset", default=None, help="a model preset (default: 6 layers x 384 wide, vocab 4096)")
    p.add_class_arguments(ModelConfig, nested_key="model", fail_untyped=False)
    p.set_defaults({f"model.{k}": v for k, v in BENCH_MODEL.items()})
    p.add_argument("--batch", type=int, default=12, help="sequences per step")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--compare", default="hf", help="hf, or none to time lmforge alone")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32 (same on both sides)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--data", default=None, help="DATA_DIR: train on its tokens instead of random ones")
    p.add_argument("--seed", type=int, default=0)
    parsers["bench"] = p

    p = _parser("Measure a run: loss, perplexity, bits per byte, accuracy, tasks, generation quality, speed.")
    p.add_argument("--run", required=True, help="RUN_DIR (its latest checkpoint) or a checkpoint directory")
    p.add_argument(
        "--data", default=None, help="DATA_DIR whose val split is scored (default: the run's data)"
    )
    p.add_argument("--text", default=None, help="a UTF-8 text file to score instead of --data")
    p.add_argument("--stride", type=int | None, default=None, help="sliding-window stride (default: half)")
    p.add_argument("--batches", type=int, default=16, help="val batches to score (--data)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument(
        "--tasks", action="append", default=[], help="NAME=FILE.jsonl in HellaSwag's format (repeatable)"
    )
    p.add_argument(
        "--prompts", default=None, help="prompt set: .txt (one per line) or .jsonl (default: built in)"
    )
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature for generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    p.add_argument(
        "--quantize", default=None, help="int8: evaluate int8 weights and compare with the original"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="where to write the JSON report (default RUN_DIR/eval.json)")
    parsers["eval"] = p

    p = _parser("Plan a run: parameters, FLOPs, memory per GPU, time, and which devices it fits.")
    p.add_argument("--config", action=ActionConfigFile, help="a YAML config (see configs/)")
    p.add_class_arguments(Config, nested_key=None, fail_untyped=False)
    p.add_argument(
        "--gpu", default=None, help="device of the summary, e.g. 4090, a100-80, h100 (default: RTX 4090)"
    )
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (data parallel or FSDP)")
    p.add_argument(
        "--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for the time estimate"
    )
    parsers["estimate"] = p

    p = _parser("Plot loss, learning rate, gradient norm and tokens/s of one or more runs.")
    p.add_argument("runs", nargs="+", help="RUN_DIRs (several: one chart, one line per run)")
    p.add_argument("--out", default=None, help="FILE.png or FILE.html (default: RUN_DIR/curves.png)")
    parsers["plot"] = p

    p = _parser("Where a run stands: step, tokens, loss, best val, ETA, last checkpoint, alive or not.")
    p.add_argument("run", help="RUN_DIR")
    parsers["status"] = p

    p = _parser(
        "Check this machine for training: torch, GPU, bf16, flash attention, compile, disk, packages."
    )
    p.add_argument("--run-dir", default=".", help="where runs will be written (for the free-disk check)")
    parsers["doctor"] = p

    p = _parser("Gather a sharded (FSDP) checkpoint into one model.safetensors for generate and export.")
    p.add_argument(
        "--run", required=True, help="RUN_DIR (its latest checkpoint) or a sharded checkpoint directory"
    )
    p.add_argument(
        "--out", default=None, help="checkpoint directory to write (default: RUN_DIR/consolidated)"
    )
    parsers["consolidate"] = p

    helps = {
        "prepare": "tokenize raw text into shards",
        "train": "train or resume a model",
        "generate": "generate text from a run",
        "chat": "chat with a run in the terminal",
        "serve": "OpenAI-compatible HTTP server for a run",
        "export": "export a run (hf, safetensors, onnx, gguf)",
        "import": "import a Hugging Face model as a run",
        "quickstart": "the whole pipeline in a few minutes on a CPU",
        "bench": "training throughput next to HF transformers",
        "eval": "measure a run: loss, ppl, bpb, accuracy, tasks, generation, speed",
        "estimate": "memory, time and device fit of a config, before training",
        "plot": "plot the curves of one or more runs",
        "status": "step, loss, ETA and liveness of a run",
        "doctor": "check torch, GPU, precision and optional packages",
        "consolidate": "gather a sharded (FSDP) checkpoint into one file",
    }
    for name, parser in parsers.items():
        subs.add_subcommand(name, parser, help=helps[name])
    return root, parsers


def _one_line(err: Exception) -> str:
    """A jsonargparse/argparse error as one line, with a 'did you mean' for unknown keys."""
    msg = str(err)
    unknown = re.search(r"unrecognized arguments: (\S+)", msg)
    if unknown:
        key = unknown.group(1).lstrip("-").split("=")[0]
        return unknown_key_message(key, all_keys())
    group = re.search(r"(Group|Subcommand) '(\w+)' does not accept (?:option|nested key) '([\w.]+)'", msg)
    if group:
        key = group.group(3) if group.group(1) == "Subcommand" else f"{group.group(2)}.{group.group(3)}"
        return unknown_key_message(key, all_keys())
    key = re.search(r'Parser key "([\w.]+)":\s*(.*)', msg, re.S)
    if key:
        detail = " ".join(key.group(2).split())
        return f"{key.group(1)}: {detail}"
    return " ".join(msg.split())


def parse(argv: list[str]) -> tuple[str, Namespace, dict[str, ArgumentParser]]:
    """Parse argv; a preset (from the command line or a config file) becomes the model defaults, then re-parse."""
    root, parsers = build_parser()
    ns = root.parse_args(argv)
    name = {
        "train": lambda: ns.train.preset,
        "bench": lambda: ns.bench.preset,
        "estimate": lambda: ns.estimate.preset,
    }.get(ns.command, lambda: None)()
    if name:
        try:
            preset = get_preset(name)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        parsers[ns.command].set_defaults({f"model.{k}": v for k, v in preset.items()})
        ns = root.parse_args(argv)
    return ns.command, ns[ns.command], parsers


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmforge` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    console = Console()
    err = Console(stderr=True)
    try:
        command, ns, parsers = parse(argv)
        if command == "train":
            return cmd_train(ns, parsers["train"], console, err, argv)
        if command == "estimate":
            cmd_estimate(ns, parsers["estimate"], console, argv)
            return 0
        COMMANDS[command](ns, console)
        return 0
    except ArgumentError as e:
        err.print(f"lmforge: error: {_one_line(e)}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except LmforgeError as e:
        err.print(f"lmforge: error: {e}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("lmforge: interrupted", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
