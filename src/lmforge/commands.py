"""One function per `lmforge` subcommand: each takes the parsed namespace and does the work.

cli.py builds the parsers and dispatches here; heavy modules are imported inside each function, so
`lmforge --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, Namespace
from rich.console import Console

from .config import DEFAULT_MAX_STEPS, Config, ConfigError
from .export import ExportError
from .model import ModelConfig

EXIT_USAGE = 2  # bad input: a config value, missing data, an unusable checkpoint, a failed checkpoint write
EXIT_DIVERGED = 3  # train.max_bad_steps consecutive non-finite steps; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # SIGINT/SIGTERM/SIGUSR1: checkpoint saved, run the same command to resume (EX_TEMPFAIL)


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


def cmd_train(ns: Namespace, parser: ArgumentParser, console: Console, err: Console, argv: list[str]) -> int:
    """`lmforge train`: build the config (preset < YAML < flags), train, and map the outcome to an exit code."""
    cfg, budget = parse_config_with_budget(ns, parser, argv)
    console.print(f"budget: {budget}", highlight=False, soft_wrap=True)
    from .train.loop import train

    init = None
    if ns.init_from:
        from .export.hf import init_from_hf

        cfg, init = init_from_hf(ns.init_from, cfg)
    else:  # resuming: the model settings this command leaves at their defaults are the checkpoint's
        from .train.resume import model_from_checkpoint

        cfg = model_from_checkpoint(cfg, ns.model.as_dict())
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
        text_field=ns.text_field,
        special_tokens=[t.strip() for t in ns.special_tokens.split(",") if t.strip()],
        workers=ns.workers,
        max_tokens=ns.max_tokens,
        seq_len=ns.seq_len,
        stride=ns.stride,
        console=console,
    )
    return meta  # prepare's progress callback has printed the summary


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


def cmd_generate(ns: Namespace, console: Console) -> str | list:
    """`lmforge generate`: continue a prompt with a trained run, or every prompt of a file."""
    from .generate.sampling import SamplingParams

    try:
        params = SamplingParams(ns.temperature, ns.top_k, ns.top_p, ns.repetition_penalty, ns.min_p)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if ns.input is not None or ns.output is not None:
        return _generate_file(ns, console)
    from .api import LLM

    llm = LLM.load(ns.run, device=ns.device, quantize=ns.quantize)
    console.print(ns.prompt, end="", style="bold", highlight=False, markup=False)
    pieces = []
    for piece in llm.stream_params(ns.prompt, ns.max_new_tokens, params, ns.seed, ns.stop):
        pieces.append(piece)
        if ns.stream:
            console.print(piece, end="", highlight=False, markup=False)
            console.file.flush()
    text = "".join(pieces)
    if not ns.stream:
        console.print(text, end="", highlight=False, markup=False)
    console.print()
    return text


def _generate_file(ns: Namespace, console: Console) -> list:
    """`lmforge generate --input FILE --output FILE`: batches of prompts, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .api import LLM
    from .generate.batch import check_output_path, read_prompts

    if ns.input is None or ns.output is None:
        raise ConfigError("--input and --output go together: give both (e.g. --input p.txt --output r.jsonl)")
    check_output_path(ns.output)
    prompts = read_prompts(ns.input)
    llm = LLM.load(ns.run, device=ns.device, quantize=ns.quantize)
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("generate", total=len(prompts))
        rows = llm.batch_generate(
            prompts,
            output_file=ns.output,
            max_new_tokens=ns.max_new_tokens,
            temperature=ns.temperature,
            top_k=ns.top_k,
            top_p=ns.top_p,
            min_p=ns.min_p,
            repetition_penalty=ns.repetition_penalty,
            stop=ns.stop,
            seed=ns.seed,
            batch_size=ns.batch_size,
            on_batch=lambda n: bar.advance(task, n),
        )
    console.print(f"wrote {len(rows)} completions to {ns.output}", highlight=False, soft_wrap=True)
    return rows


def cmd_chat(ns: Namespace, console: Console) -> None:
    """`lmforge chat`: an interactive conversation with a run."""
    from .api import LLM, sampling_params
    from .generate.chat import repl

    params = sampling_params(ns.temperature, ns.top_k, ns.top_p)
    llm = LLM.load(ns.run, device=ns.device, quantize=ns.quantize)
    session = llm.session(ns.max_new_tokens, params, ns.seed)
    session.system = ns.system
    repl(session)


def cmd_serve(ns: Namespace, console: Console) -> None:
    """`lmforge serve`: the OpenAI-compatible HTTP server."""
    from .serve import serve

    serve(
        ns.run,
        host=ns.host,
        port=ns.port,
        max_tokens=ns.max_tokens,
        max_body=ns.max_body,
        model_name=ns.model_name,
        device=ns.device,
        quantize=ns.quantize,
        console=console,
    )


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


def cmd_eval(ns: Namespace, console: Console) -> dict:
    """`lmforge eval`: measure a run, print a table and write eval.json."""
    from .eval.run import EvalError, EvalOptions, evaluate_run, report_table, write_report

    tasks = {}
    for spec in ns.tasks:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise EvalError(
                f"--tasks {spec}: write it as NAME=FILE.jsonl, e.g. hellaswag=hellaswag_val.jsonl"
            )
        tasks[name] = path
    opts = EvalOptions(
        data=ns.data,
        text=ns.text,
        stride=ns.stride,
        batches=ns.batches,
        batch_size=ns.batch_size,
        tasks=tasks,
        prompts=ns.prompts,
        max_new_tokens=ns.max_new_tokens,
        temperature=ns.temperature,
        seed=ns.seed,
        speed=not ns.no_speed,
        quantize=ns.quantize,
        device=ns.device,
    )
    report = evaluate_run(ns.run, opts, console)
    out = write_report(report, ns.out or Path(ns.run) / "eval.json")
    console.print(report_table(report))
    console.print(f"wrote {out}", highlight=False)
    return report


def cmd_estimate(ns: Namespace, parser: ArgumentParser, console: Console, argv: list[str]):
    """`lmforge estimate`: the plan for a config (no model is built, nothing is run)."""
    from .estimate import estimate, report_lines

    cfg = parse_config(ns, parser, argv)
    est = estimate(cfg, gpu=ns.gpu, gpus=ns.gpus, mfu=ns.mfu)
    for line in report_lines(est):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return est


def cmd_plot(ns: Namespace, console: Console) -> Path:
    """`lmforge plot`: curves of one or more runs into a PNG or HTML file."""
    from .plot import plot_runs

    out = Path(ns.out) if ns.out else Path(ns.runs[0]) / "curves.png"
    plot_runs(ns.runs, out)
    console.print(f"wrote {out}", highlight=False)
    return out


def cmd_status(ns: Namespace, console: Console) -> dict:
    """`lmforge status`: one screen on where a run stands."""
    from .watch import format_status, run_status

    status = run_status(ns.run)
    for line in format_status(status):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return status


def cmd_doctor(ns: Namespace, console: Console) -> list:
    """`lmforge doctor`: what this machine can do for training, and what to fix."""
    from .doctor import doctor_report

    checks = doctor_report(ns.run_dir)
    for line in format_checks(checks):
        console.print(line, highlight=False, soft_wrap=True)
    return checks


def format_checks(checks: list) -> list[str]:
    """Doctor checks as aligned lines, then the fixes."""
    from .doctor import format_report

    return format_report(checks)


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
    "chat": cmd_chat,
    "serve": cmd_serve,
    "export": cmd_export,
    "import": cmd_import,
    "quickstart": cmd_quickstart,
    "bench": cmd_bench,
    "eval": cmd_eval,
    "plot": cmd_plot,
    "status": cmd_status,
    "doctor": cmd_doctor,
    "consolidate": cmd_consolidate,
}
