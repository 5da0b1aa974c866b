"""The `lmforge` subcommands, one typed function each: the signature is the command line.

cli.py turns each function into its parser with jsonargparse. Plain parameters before `*` without a
default are positional arguments; the others are flags, underscores written as dashes (batch_size is
--batch-size); a `bool` defaulting to False is a switch (--stream); a `list[str]` flag is repeated
(--stop A --stop B). A parameter typed with a group of options.py (Run, Device, SamplingParams ...) adds
that group's fields as flags, the same on every command; `RunConfig` adds --config and every
--section.key of the Config; a `Console` parameter is given by cli.py. The docstring's first line is the
command's line in `lmforge --help`, the docstring its description, its Args: section the flags' help.

Adding a subcommand: write one such function here and add one line to COMMANDS at the bottom.
Heavy modules are imported inside the functions, so `lmforge --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Annotated

import yaml
from jsonargparse import ArgumentParser, Namespace
from rich.console import Console

from .config import DEFAULT_MAX_STEPS, Config, ConfigError
from .errors import LmforgeError
from .model import ModelConfig
from .options import Device, InferenceDevice, Run, RunConfig, SamplingParams, Without
from .presets import BENCH_MODEL

EXIT_USAGE = 2  # bad input: a config value, missing data, an unusable checkpoint, a failed checkpoint write
EXIT_DIVERGED = 3  # train.max_bad_steps consecutive non-finite steps; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # SIGINT/SIGTERM/SIGUSR1: checkpoint saved, run the same command to resume (EX_TEMPFAIL)


class RunDiverged(LmforgeError):
    """Training stopped on non-finite steps; the message names the last good checkpoint."""

    exit_code = EXIT_DIVERGED


BUDGET_KEYS = ("max_steps", "max_tokens")


def _budget_flags(argv: list[str]) -> set[str]:
    """Budget keys given as --train.KEY flags on the command line."""
    found = (re.match(r"--train\.(max_steps|max_tokens)(=|$)", arg) for arg in argv)
    return {m.group(1) for m in found if m}


def _budget_in_yaml(paths: list) -> set[str]:
    """Budget keys that the --config files set (to something other than null)."""
    keys: set[str] = set()
    for path in paths:
        data = yaml.safe_load(Path(os.fspath(path)).read_text(encoding="utf-8")) or {}
        train = data.get("train") if isinstance(data, dict) else None
        keys |= {k for k in BUDGET_KEYS if isinstance(train, dict) and train.get(k) is not None}
    return keys


def resolve_budget(ns: Namespace, argv: list[str]) -> str:
    """Keep the one budget key given at the highest level (YAML < command line); clear the other in ns.

    Returns where the budget came from, for the run's first lines. Both keys at one level is an error.
    """
    for where, keys in (
        ("the command line", _budget_flags(argv)),
        ("--config", _budget_in_yaml(ns.get("config") or [])),
    ):
        if len(keys) > 1:
            raise ConfigError(
                f"train.max_steps and train.max_tokens are both given by {where}: they are two ways to set "
                f"one budget; keep one"
            )
        if keys:
            (key,) = keys
            other = BUDGET_KEYS[1 - BUDGET_KEYS.index(key)]
            ns[f"train.{other}"] = None
            return f"train.{key}={ns[f'train.{key}']}, from {where}"
    return f"train.max_steps={DEFAULT_MAX_STEPS}, the default"


def parse_config_with_budget(ns: Namespace, parser: ArgumentParser, argv: list[str]) -> tuple[Config, str]:
    """The validated Config of a train/estimate namespace, and where its budget came from."""
    try:
        budget = resolve_budget(ns, argv)
        init = parser.instantiate(ns)
        return Config(**{f.name: init[f.name] for f in dataclasses.fields(Config)}), budget
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e


def parse_config(ns: Namespace, parser: ArgumentParser, argv: list[str] | None = None) -> Config:
    """Build the validated Config from the train subcommand's namespace (argv: to tell flags from YAML)."""
    return parse_config_with_budget(ns, parser, argv or [])[0]


def prepare(
    *,
    source: list[str],
    out: str,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    special_tokens: str = "",
    text_field: str = "text",
    val_fraction: float = 0.01,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    workers: int | None = None,
    seq_len: int | None = None,
    stride: int | None = None,
    console: Console,
) -> None:
    """Tokenize raw text into shards.

    Trains a tokenizer (or loads one) and writes the token shards, meta.json and manifest.json.

    Args:
        source: a file or folder (.txt .md .json .jsonl .jsonl.gz .parquet .csv), builtin:stdlib,
            hf:NAME[:CONFIG][@SPLIT], fineweb, fineweb-edu, dolma, pile, c4, or kaggle:OWNER/DATASET;
            repeatable, SRC:WEIGHT mixes sources in proportion
        out: DATA_DIR to write
        tokenizer: bpe | wordpiece | unigram | word | char (trained here), gpt2, tiktoken:NAME, or a
            tokenizer.json
        vocab_size: vocabulary size of a trained tokenizer
        special_tokens: extra special tokens, comma-separated
        text_field: record field holding the text (text falls back to content)
        val_fraction: share of documents held out for validation
        max_docs: stop after this many documents
        max_tokens: stop once this many tokens are written
        workers: tokenizer processes (default: all cores)
        seq_len: validation window length recorded for eval
        stride: step between validation windows (< seq-len overlaps)
    """
    from .data import prepare as prepare_data

    prepare_data(  # its progress callback prints the summary
        source,
        out,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        max_docs=max_docs,
        progress=lambda msg: console.print(msg, highlight=False),
        text_field=text_field,
        special_tokens=[t.strip() for t in special_tokens.split(",") if t.strip()],
        workers=workers,
        max_tokens=max_tokens,
        seq_len=seq_len,
        stride=stride,
        console=console,
    )


def train(config: RunConfig, *, dry_run: bool = False, init_from: str | None = None, console: Console) -> int:
    """Train or resume a model.

    Settings come from a preset < --config YAML files < --section.key=value flags.

    Args:
        dry_run: print the resolved config and costs; train nothing
        init_from: hf:DIR: start from a local HF GPT-2/Llama model (its architecture replaces model.*)
    """
    console.print(f"budget: {config.budget}", highlight=False, soft_wrap=True)
    from .train.loop import train as train_loop

    cfg, init = config.config, None
    if init_from:
        from .export.hf import init_from_hf

        cfg, init = init_from_hf(init_from, cfg)
    else:  # resuming: the model settings this command leaves at their defaults are the checkpoint's
        from .train.resume import model_from_checkpoint

        cfg = model_from_checkpoint(cfg, config.model_given)
    result = train_loop(cfg, dry_run=dry_run, console=console, init_tensors=init)
    if result is not None and result.status == "preempted":
        return EXIT_PREEMPTED
    if result is not None and result.status == "diverged":
        raise RunDiverged(result.message)
    return 0


def generate(
    run: Run,
    device: InferenceDevice,
    sampling: SamplingParams,
    *,
    prompt: str = "",
    stream: bool = False,
    input: str | None = None,
    output: str | None = None,
    batch_size: int = 8,
    console: Console,
) -> None:
    """Generate text from a run.

    Continues --prompt, or every prompt of --input into --output.

    Args:
        prompt: text to continue (empty: start from <|endoftext|>)
        stream: print tokens as they are generated
        input: prompts.txt (one per line) or prompts.jsonl ({"prompt": ...}), with --output
        output: results .json | .jsonl | .csv | .txt (with --input)
        batch_size: prompts decoded together (with --input)
    """
    from .api import LLM

    if input is not None or output is not None:
        _generate_file(run, device, sampling, input, output, batch_size, console)
        return
    llm = LLM.load(run.run, device=device.device, quantize=device.quantize)
    console.print(prompt, end="", style="bold", highlight=False, markup=False)
    pieces = []
    for piece in llm.stream_params(prompt, sampling.max_new_tokens, sampling, sampling.seed, sampling.stop):
        pieces.append(piece)
        if stream:
            console.print(piece, end="", highlight=False, markup=False)
            console.file.flush()
    if not stream:
        console.print("".join(pieces), end="", highlight=False, markup=False)
    console.print()


def _generate_file(
    run: Run, device: InferenceDevice, sampling: SamplingParams, input, output, batch_size, console
):
    """`lmforge generate --input FILE --output FILE`: batches of prompts, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .api import LLM
    from .generate.batch import check_output_path, read_prompts

    if input is None or output is None:
        raise ConfigError("--input and --output go together: give both (e.g. --input p.txt --output r.jsonl)")
    check_output_path(output)
    prompts = read_prompts(input)
    llm = LLM.load(run.run, device=device.device, quantize=device.quantize)
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("generate", total=len(prompts))
        rows = llm.batch_generate(
            prompts,
            output_file=output,
            batch_size=batch_size,
            on_batch=lambda n: bar.advance(task, n),
            **dataclasses.asdict(sampling),
        )
    console.print(f"wrote {len(rows)} completions to {output}", highlight=False, soft_wrap=True)


def chat(
    run: Run,
    device: InferenceDevice,
    sampling: SamplingParams,
    *,
    system: str | None = None,
    console: Console,
) -> None:
    """Chat with a run in the terminal.

    Commands: /reset, /temperature X, /quit; Ctrl-C stops a reply.

    Args:
        system: a system line kept at the start of the conversation
    """
    from .api import LLM
    from .generate.chat import repl

    llm = LLM.load(run.run, device=device.device, quantize=device.quantize)
    session = llm.session(sampling.max_new_tokens, sampling, sampling.seed)
    session.system = system
    repl(session)


def serve(
    run: Run,
    device: InferenceDevice,
    sampling: SamplingParams,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_tokens: int = 512,
    max_body: int = 1_000_000,
    model_name: str | None = None,
    console: Console,
) -> None:
    """OpenAI-compatible HTTP server for a run.

    Serves /v1/completions and /v1/chat/completions; the sampling flags are what a request gets for the
    fields it leaves out.

    Args:
        host: address to bind (0.0.0.0 exposes it to the network)
        port: port to listen on
        max_tokens: cap on the max_tokens a request may ask for
        max_body: largest request body in bytes (413 above)
        model_name: the model id clients see (default: the run's name)
    """
    from .serve import serve as serve_run

    serve_run(
        run.run,
        host=host,
        port=port,
        max_tokens=max_tokens,
        max_body=max_body,
        model_name=model_name,
        device=device.device,
        quantize=device.quantize,
        sampling=sampling,
        console=console,
    )


def export(run: Run, *, format: str, out: str, dtype: str = "f32", console: Console) -> None:
    """Export a run (hf, safetensors, onnx, gguf).

    Args:
        format: hf | safetensors | onnx | gguf
        out: folder to write (must not exist, or be empty)
        dtype: f32 | f16 | bf16 (hf, safetensors, gguf) | q8_0 (gguf)
    """
    from .export import export_run

    written = export_run(run.run, format, out, dtype)
    console.print(f"exported {run.run} as {format} to {written}", highlight=False)


def import_hf(source: str, *, out: str, console: Console) -> None:
    """Import a Hugging Face model as a run.

    Reads a local GPT-2 or Llama model folder.

    Args:
        source: hf:DIR, a folder with config.json, *.safetensors and tokenizer.json
        out: RUN_DIR to create
    """
    from .export import ExportError
    from .export.hf import import_hf as import_folder

    kind, sep, path = source.partition(":")
    if not sep or kind != "hf" or not path:
        raise ExportError(f"source {source!r}: write it as hf:DIR (a local Hugging Face model folder)")
    written = import_folder(path, out)
    console.print(f"imported {path} into {written}; try: lmforge generate --run {written}", highlight=False)


def quickstart(
    device: Device,
    *,
    data: str = "data/stdlib",
    out: str = "runs/quickstart",
    max_tokens: int | None = None,
    console: Console,
) -> None:
    """The whole pipeline in a few minutes on a CPU.

    Prepares the built-in corpus, trains the tiny preset briefly and prints a sample.

    Args:
        data: where the prepared corpus goes (reused if present)
        out: RUN_DIR
        max_tokens: training token budget (default: sized for CPU)
    """
    from .quickstart import quickstart as run_quickstart

    run_quickstart(data_dir=data, run_dir=out, max_tokens=max_tokens, device=device.device, console=console)


BENCH_CONFIG = ModelConfig(**BENCH_MODEL)


def bench(
    device: Device,
    *,
    preset: str | None = None,
    model: ModelConfig = BENCH_CONFIG,
    batch: int = 12,
    steps: int = 20,
    warmup: int = 3,
    compare: str = "hf",
    precision: str = "auto",
    compile: bool = False,
    data: str | None = None,
    seed: int = 0,
    console: Console,
) -> None:
    """Training throughput next to HF transformers.

    Tokens/s, MFU and peak memory of lmforge and HF on the same model and batches.

    Args:
        preset: a model preset: its model.* become the defaults (default: 6 layers x 384 wide, vocab 4096)
        batch: sequences per step
        steps: timed optimizer steps
        warmup: untimed steps first
        compare: hf, or none to time lmforge alone
        precision: auto | bf16 | fp16 | fp32 (same on both sides)
        compile: torch.compile both models
        data: DATA_DIR: train on its tokens instead of random ones
        seed: seed of the weights and the random batches
    """
    from .bench import bench_training, report

    del preset  # cli.py has made it the model.* defaults before parsing
    try:
        model_cfg = model.resolved()
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    others = () if compare == "none" else tuple(compare.split(","))
    console.print(f"timing {steps} steps after {warmup} warmup steps ...", highlight=False)
    results = bench_training(
        model_cfg,
        batch=batch,
        steps=steps,
        warmup=warmup,
        device=device.device,
        precision=precision,
        compile=compile,
        compare=others,
        data=data,
        seed=seed,
    )
    report(results, model_cfg, batch, console)


def evaluate(
    run: Run,
    device: InferenceDevice,
    sampling: Annotated[SamplingParams, Without("top_p", "min_p", "repetition_penalty", "stop")],
    *,
    data: str | None = None,
    text: str | None = None,
    stride: int | None = None,
    batches: int = 16,
    batch_size: int = 8,
    tasks: list[str] | None = None,
    prompts: str | None = None,
    no_speed: bool = False,
    out: str | None = None,
    console: Console,
) -> None:
    """Measure a run: loss, ppl, bpb, accuracy, tasks, generation, speed.

    The generation check samples with the sampling flags below (an unset seed is 0, so reports repeat).

    Args:
        data: DATA_DIR whose val split is scored (default: the run's data)
        text: a UTF-8 text file to score instead of --data
        stride: sliding-window stride (default: half the window)
        batches: val batches to score (--data)
        batch_size: windows per forward pass
        tasks: NAME=FILE.jsonl in HellaSwag's format (repeatable)
        prompts: prompt set: .txt (one per line) or .jsonl (default: built in)
        no_speed: skip the speed measurement
        out: where to write the JSON report (default: RUN_DIR/eval.json)
    """
    from .eval.run import EvalError, EvalOptions, evaluate_run, report_table, write_report

    named = {}
    for spec in tasks or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise EvalError(
                f"--tasks {spec}: write it as NAME=FILE.jsonl, e.g. hellaswag=hellaswag_val.jsonl"
            )
        named[name] = path
    opts = EvalOptions(
        data=data,
        text=text,
        stride=stride,
        batches=batches,
        batch_size=batch_size,
        tasks=named,
        prompts=prompts,
        sampling=sampling,
        speed=not no_speed,
        quantize=device.quantize,
        device=device.device,
    )
    report = evaluate_run(run.run, opts, console)
    written = write_report(report, out or Path(run.run) / "eval.json")
    console.print(report_table(report))
    console.print(f"wrote {written}", highlight=False)


def estimate(
    config: RunConfig, *, gpu: str | None = None, gpus: int = 1, mfu: float = 0.4, console: Console
) -> None:
    """Memory, time and device fit of a config, before training.

    Parameters, FLOPs, memory per GPU, time, and which devices it fits; nothing is run.

    Args:
        gpu: device of the summary, e.g. 4090, a100-80, h100 (default: RTX 4090)
        gpus: number of GPUs (data parallel or FSDP)
        mfu: assumed model FLOPs utilisation for the time estimate
    """
    from .estimate import estimate as plan
    from .estimate import report_lines

    for line in report_lines(plan(config.config, gpu=gpu, gpus=gpus, mfu=mfu)):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def plot(runs: list[str], *, out: str | None = None, console: Console) -> None:
    """Plot the curves of one or more runs.

    Loss, learning rate, gradient norm and tokens/s; several runs share one chart.

    Args:
        runs: RUN_DIRs (several: one chart, one line per run)
        out: FILE.png or FILE.html (default: RUN_DIR/curves.png)
    """
    from .plot import plot_runs

    path = Path(out) if out else Path(runs[0]) / "curves.png"
    plot_runs(runs, path)
    console.print(f"wrote {path}", highlight=False)


def status(run: str, *, console: Console) -> None:
    """Step, loss, ETA and liveness of a run.

    Where a run stands: step, tokens, loss, best val, ETA, last checkpoint, alive or not.

    Args:
        run: RUN_DIR
    """
    from .watch import format_status, run_status

    for line in format_status(run_status(run)):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def doctor(*, run_dir: str = ".", console: Console) -> None:
    """Check torch, GPU, precision and optional packages.

    What this machine can do for training (bf16, flash attention, compile, disk) and what to fix.

    Args:
        run_dir: where runs will be written (for the free-disk check)
    """
    from .doctor import doctor_report, format_report

    for line in format_report(doctor_report(run_dir)):
        console.print(line, highlight=False, soft_wrap=True)


def consolidate(run: Run, *, out: str | None = None, console: Console) -> None:
    """Gather a sharded (FSDP) checkpoint into one file.

    Writes one model.safetensors that generate and export read.

    Args:
        out: checkpoint directory to write (default: RUN_DIR/consolidated)
    """
    from .train.dist_checkpoint import consolidate as gather

    written = gather(run.run, out)
    console.print(
        f"wrote {written} (use it as --run for generate and export)", highlight=False, soft_wrap=True
    )


# name -> function: the order of `lmforge --help`.
COMMANDS = {
    "prepare": prepare,
    "train": train,
    "generate": generate,
    "chat": chat,
    "serve": serve,
    "export": export,
    "import": import_hf,
    "quickstart": quickstart,
    "bench": bench,
    "eval": evaluate,
    "estimate": estimate,
    "plot": plot,
    "status": status,
    "doctor": doctor,
    "consolidate": consolidate,
}
