"""The one `lmforge` command. Each subcommand maps to one function; jsonargparse does all the parsing.

lmforge prepare  --source SRC --out DATA_DIR [--tokenizer bpe] [--vocab-size N]
lmforge train    --config configs/X.yaml --data DATA_DIR --out RUN_DIR [--resume auto|never|PATH] [--section.key=value ...]
lmforge generate --run RUN_DIR --prompt "..." [--stream]
lmforge export   --run RUN_DIR --format hf|safetensors|onnx|gguf --out DIR [--dtype f32|f16|bf16|q8_0]
lmforge import   hf:HF_DIR --out RUN_DIR
lmforge consolidate --run RUN_DIR [--out DIR]
lmforge quickstart
"""

from __future__ import annotations

import dataclasses
import re
import sys
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from rich.console import Console

from .config import Config, ConfigError, all_keys, unknown_key_message
from .errors import LmforgeError
from .export import ExportError
from .model import ModelConfig
from .presets import BENCH_MODEL, get_preset

EXIT_USAGE = 2  # bad input: a config value, missing data, an unusable checkpoint, a failed checkpoint write
EXIT_DIVERGED = 3  # train.max_bad_steps consecutive non-finite steps; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # SIGINT/SIGTERM/SIGUSR1: checkpoint saved, run the same command to resume (EX_TEMPFAIL)


def _parser(description: str) -> ArgumentParser:
    return ArgumentParser(description=description, exit_on_error=False)


def build_parser() -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    """The top-level parser and each subcommand's parser (the train parser takes presets as defaults)."""
    root = ArgumentParser(
        prog="lmforge", description="Train GPT-style language models and use them.", exit_on_error=False
    )
    subs = root.add_subcommands(dest="command", required=True)
    parsers: dict[str, ArgumentParser] = {}

    p = _parser("Train a tokenizer on raw text and write token shards plus meta.json.")
    p.add_argument(
        "--source",
        action="append",
        required=True,
        help="a file, a folder of .txt/.md/.json/.jsonl, or builtin:stdlib (repeatable)",
    )
    p.add_argument("--out", required=True, help="DATA_DIR to write")
    p.add_argument("--tokenizer", default="bpe", help="bpe (byte-level BPE), or a path to a tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size of a trained tokenizer")
    p.add_argument(
        "--val-fraction", type=float, default=0.01, help="share of documents held out for validation"
    )
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
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
    parsers["generate"] = p

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
        "export": "export a run (hf, safetensors, onnx, gguf)",
        "import": "import a Hugging Face model as a run",
        "quickstart": "the whole pipeline in a few minutes on a CPU",
        "bench": "training throughput next to HF transformers",
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


def parse_config(ns: Namespace, parser: ArgumentParser) -> Config:
    """Build the validated Config from the train subcommand's namespace."""
    init = parser.instantiate(ns)
    fields = {f.name: init[f.name] for f in dataclasses.fields(Config)}
    return Config(**fields)


def parse(argv: list[str]) -> tuple[str, Namespace, dict[str, ArgumentParser]]:
    """Parse argv; a preset (from the command line or a config file) becomes the model defaults, then re-parse."""
    root, parsers = build_parser()
    ns = root.parse_args(argv)
    name = {"train": lambda: ns.train.preset, "bench": lambda: ns.bench.preset}.get(
        ns.command, lambda: None
    )()
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
            return cmd_train(ns, parsers["train"], console, err)
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


def cmd_train(ns: Namespace, parser: ArgumentParser, console: Console, err: Console) -> int:
    """`lmforge train`: build the config (preset < YAML < flags), train, and map the outcome to an exit code."""
    try:
        cfg = parse_config(ns, parser)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    from .train.loop import train

    init = None
    if ns.init_from:
        from .export.hf import init_from_hf

        cfg, init = init_from_hf(ns.init_from, cfg)
    result = train(cfg, dry_run=ns.dry_run, console=console, init_tensors=init)
    if result is not None and result.status == "preempted":
        return EXIT_PREEMPTED
    if result is not None and result.status == "diverged":
        err.print(f"lmforge: error: {result.message}", highlight=False, soft_wrap=True)
        return EXIT_DIVERGED
    return 0


def cmd_quickstart(ns: Namespace, console: Console) -> None:
    """`lmforge quickstart`: the whole pipeline on the built-in corpus."""
    from .quickstart import quickstart

    quickstart(data_dir=ns.data, run_dir=ns.out, max_tokens=ns.max_tokens, device=ns.device, console=console)


def cmd_prepare(ns: Namespace, console: Console) -> dict:
    """`lmforge prepare`: tokenizer + shards + meta.json."""
    from .data import prepare

    meta = prepare(
        ns.source,
        ns.out,
        tokenizer=ns.tokenizer,
        vocab_size=ns.vocab_size,
        val_fraction=ns.val_fraction,
        max_docs=ns.max_docs,
        progress=lambda msg: console.print(msg, highlight=False),
    )
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    console.print(
        f"wrote {ns.out}: train {tr['tokens']:,} tokens ({tr['documents']:,} docs), "
        f"val {va['tokens']:,} tokens ({va['documents']:,} docs), vocab {meta['vocab_size']:,}, "
        f"{meta['val_bytes_per_token']:.2f} bytes/token",
        highlight=False,
    )
    return meta


def cmd_export(ns: Namespace, console: Console) -> Path:
    """`lmforge export`: write a run in another format."""
    from .export import export_run

    out = export_run(ns.run, ns.format, ns.out, ns.dtype)
    console.print(f"exported {ns.run} as {ns.format} to {out}", highlight=False)
    return out


def cmd_import(ns: Namespace, console: Console) -> Path:
    """`lmforge import hf:DIR`: make a run directory from a local Hugging Face model."""
    from .export.hf import import_hf

    kind, sep, path = ns.source.partition(":")
    if not sep or kind != "hf" or not path:
        raise ExportError(f"source {ns.source!r}: write it as hf:DIR (a local Hugging Face model folder)")
    out = import_hf(path, ns.out)
    console.print(f"imported {path} into {out}; try: lmforge generate --run {out}", highlight=False)
    return out


def cmd_generate(ns: Namespace, console: Console) -> str:
    """`lmforge generate`: continue a prompt with a trained run."""
    from .checkpoint import load_model, tokenizer_path
    from .data import Tokenizer
    from .device import pick_device
    from .generate.engine import stream_text
    from .generate.sampling import SamplingParams

    try:
        params = SamplingParams(ns.temperature, ns.top_k, ns.top_p, ns.repetition_penalty)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    model, _, _ = load_model(ns.run, device=pick_device(ns.device))
    tok = Tokenizer.load(tokenizer_path(Path(ns.run)))
    console.print(ns.prompt, end="", style="bold", highlight=False, markup=False)
    pieces = []
    for piece in stream_text(model, tok, ns.prompt, ns.max_new_tokens, params, ns.seed):
        pieces.append(piece)
        if ns.stream:
            console.print(piece, end="", highlight=False, markup=False)
            console.file.flush()
    text = "".join(pieces)
    if not ns.stream:
        console.print(text, end="", highlight=False, markup=False)
    console.print()
    return text


def cmd_bench(ns: Namespace, console: Console) -> list:
    """`lmforge bench`: tokens/s, MFU and peak memory of lmforge and HF on the same model and batches."""
    from .bench import bench_training, report

    try:
        model_cfg = ModelConfig(**ns.model.as_dict()).resolved()
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    compare = () if ns.compare == "none" else tuple(ns.compare.split(","))
    console.print(f"timing {ns.steps} steps after {ns.warmup} warmup steps ...", highlight=False)
    results = bench_training(
        model_cfg,
        batch=ns.batch,
        steps=ns.steps,
        warmup=ns.warmup,
        device=ns.device,
        precision=ns.precision,
        compile=ns.compile,
        compare=compare,
        data=ns.data,
        seed=ns.seed,
    )
    report(results, model_cfg, ns.batch, console)
    return results


def cmd_consolidate(ns: Namespace, console: Console) -> Path:
    """`lmforge consolidate`: a sharded checkpoint -> a single-file checkpoint directory."""
    from .train.dist_checkpoint import consolidate

    out = consolidate(ns.run, ns.out)
    console.print(f"wrote {out} (use it as --run for generate and export)", highlight=False, soft_wrap=True)
    return out


# Every subcommand but `train` (which needs its parser to build the config): name -> function(ns, console).
COMMANDS = {
    "prepare": cmd_prepare,
    "generate": cmd_generate,
    "export": cmd_export,
    "import": cmd_import,
    "quickstart": cmd_quickstart,
    "bench": cmd_bench,
    "consolidate": cmd_consolidate,
}


if __name__ == "__main__":
    sys.exit(main())
