"""The subcommands that use a run: generate, chat, serve, eval, export, import.
The rules that turn these functions into commands: __init__.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

from rich.console import Console

from ..config import ConfigError
from ..options import Harness, InferenceDevice, Run, SamplingParams, Without


def generate(
    run: Run,
    device: InferenceDevice,
    sampling: SamplingParams,
    *,
    prompt: str = "",
    stream: bool = False,
    chat: bool = False,
    input: str | None = None,
    output: str | None = None,
    batch_size: int = 8,
    console: Console,
) -> None:
    """Generate text from a run.

    Continues --prompt, or every prompt of --input into --output; with --chat, replies to them instead.

    Args:
        prompt: text to continue (empty: start from <|endoftext|>)
        stream: print tokens as they are generated
        chat: each prompt is a user message: print the assistant's reply (the run's chat template; a
            base run: a User:/Assistant: transcript)
        input: prompts.txt (one per line) or prompts.jsonl ({"prompt": ...}), with --output
        output: results .json | .jsonl | .csv | .txt (with --input)
        batch_size: prompts decoded together (with --input)
    """
    from ..api import LLM

    if input is not None or output is not None:
        _generate_file(run, device, sampling, input, output, batch_size, chat, console)
        return
    if chat and not prompt.strip():
        raise ConfigError("--chat replies to --prompt: give the message, e.g. --chat --prompt 'hello'")
    llm = LLM.load(run.run, device=device.device, quantize=device.quantize)
    source = [{"role": "user", "content": prompt}] if chat else prompt
    if not chat:  # a continuation is shown after its prompt; a reply stands alone
        console.print(prompt, end="", style="bold", highlight=False, markup=False, soft_wrap=True)
    pieces = []
    events = llm.stream_events(source, sampling.max_new_tokens, sampling, sampling.seed, sampling.stop)
    for piece in events:
        if not isinstance(piece, str):  # the Completion, last
            continue
        pieces.append(piece)
        if stream:
            console.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
            console.file.flush()
    if not stream:
        console.print("".join(pieces), end="", highlight=False, markup=False, soft_wrap=True)
    console.print()


def _generate_file(
    run: Run, device: InferenceDevice, sampling: SamplingParams, input, output, batch_size, chat, console
):
    """`lmforge generate --input FILE --output FILE`: batches of prompts, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..api import LLM
    from ..generate.batch import check_output_path, read_prompts

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
            chat=chat,
            **dataclasses.asdict(sampling),
        )
    console.print(f"wrote {len(rows)} completions to {output}", highlight=False, soft_wrap=True)


def chat(
    run: Run,
    device: InferenceDevice,
    sampling: SamplingParams,
    *,
    system: str | None = None,
    web: bool = False,
    port: int = 8000,
    console: Console,
) -> None:
    """Chat with a run in the terminal, or in a web page (--web).

    Commands: /reset, /temperature X, /quit; Ctrl-C stops a reply. --web serves the chat page on
    127.0.0.1 (the same server as `lmforge serve`) and prints its address to open in a browser.

    Args:
        system: a system line kept at the start of the conversation (terminal chat)
        web: serve the web chat page on 127.0.0.1 instead; the sampling flags become its defaults
        port: the web page's port (with --web)
    """
    from ..api import LLM
    from ..generate.chat import repl

    if web:
        _chat_web(run, device, sampling, system, port, console)
        return
    llm = LLM.load(run.run, device=device.device, quantize=device.quantize)
    how = (
        f"chat template {llm.template.name}" if llm.template else "a base run: a User:/Assistant: transcript"
    )
    console.print(f"{llm.name}: {how}", highlight=False, markup=False, soft_wrap=True)
    session = llm.session(sampling.max_new_tokens, sampling, sampling.seed)
    session.system = system
    repl(session)


def _chat_web(run: Run, device: InferenceDevice, sampling: SamplingParams, system, port, console) -> None:
    """`lmforge chat --web`: `lmforge serve` on 127.0.0.1, whose first printed line is the page's address."""
    from ..serve import serve as serve_run

    if system is not None:
        raise ConfigError(
            "--system is for the terminal chat: with --web, write it in the page's System prompt"
        )
    serve_run(
        run.run,
        host="127.0.0.1",
        port=port,
        device=device.device,
        quantize=device.quantize,
        sampling=sampling,
        console=console,
    )


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
    api_key: str | None = None,
    insecure: bool = False,
    max_rows: int = 8,
    max_queue: int = 64,
    timeout: float = 600.0,
    console: Console,
) -> None:
    """OpenAI-compatible HTTP server for a run.

    Serves /v1/completions and /v1/chat/completions; the sampling flags are what a request gets for the
    fields it leaves out. Concurrent requests decode together (continuous batching).

    Args:
        host: address to bind (0.0.0.0 exposes it to the network)
        port: port to listen on
        max_tokens: cap on the max_tokens a request may ask for
        max_body: largest request body in bytes (413 above)
        model_name: the model id clients see (default: the run's name)
        api_key: require 'Authorization: Bearer KEY' on /v1 (default: $LMFORGE_API_KEY; none: open)
        insecure: serve on a non-loopback --host without an API key
        max_rows: generations decoded together; more wait in the queue
        max_queue: generations that may wait for a row; past it a request gets 429 with Retry-After
        timeout: seconds a generation may run; then it ends with finish_reason "length"
    """
    from ..serve import serve as serve_run

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
        api_key=api_key,
        insecure=insecure,
        max_rows=max_rows,
        max_queue=max_queue,
        timeout=timeout,
        console=console,
    )


def evaluate(
    run: Run,
    device: InferenceDevice,
    sampling: Annotated[
        SamplingParams,
        Without("top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "stop"),
    ],
    harness: Harness,
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
    --harness TASKS runs lm-evaluation-harness tasks on the run instead, with the generation settings
    each task gives.

    Args:
        data: DATA_DIR whose val split is scored (default: the run's data)
        text: a UTF-8 text file to score instead of --data
        stride: sliding-window stride (default: the data folder's val_windows stride when its windows
            are this model's length, else half the window)
        batches: val batches to score (--data)
        batch_size: windows per forward pass
        tasks: NAME=FILE.jsonl in HellaSwag's, ARC's or MMLU's layout, or NAME=builtin:stdlib-next-line (repeatable)
        prompts: prompt set: .txt (one per line) or .jsonl (default: built in)
        no_speed: skip the speed measurement
        out: where to write the JSON report (default: RUN_DIR/eval.json)
    """
    from ..eval.run import EvalError, EvalOptions, evaluate_run, report_table, write_report
    from ..safewrite import check_writable

    path = Path(out or Path(run.run) / "eval.json")
    if out or path.parent.is_dir():  # a report that cannot be written is found before the work, not after
        check_writable(path)
    if harness.harness is not None:
        own = {"--data": data, "--text": text, "--stride": stride, "--tasks": tasks, "--prompts": prompts}
        if given := [flag for flag, value in own.items() if value]:
            raise EvalError(f"{', '.join(given)}: lmforge's own measurements; run them without --harness")
        _evaluate_harness(run, device, harness, batch_size, path, console)
        return
    if given := harness.settings_given():
        raise EvalError(f"{', '.join(given)}: only with --harness TASKS")
    opts = EvalOptions(
        data=data,
        text=text,
        stride=stride,
        batches=batches,
        batch_size=batch_size,
        tasks=_named_tasks(tasks or []),
        prompts=prompts,
        sampling=sampling,
        speed=not no_speed,
        quantize=device.quantize,
        device=device.device,
    )
    report = evaluate_run(run.run, opts, console)
    written = write_report(report, path)
    console.print(report_table(report))
    console.print(f"wrote {written}", highlight=False, soft_wrap=True)


def _named_tasks(specs: list[str]) -> dict[str, str]:
    """--tasks NAME=FILE.jsonl, each one, as {name: file}."""
    from ..eval.run import EvalError

    named = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise EvalError(
                f"--tasks {spec}: write it as NAME=FILE.jsonl, e.g. hellaswag=hellaswag_val.jsonl"
            )
        named[name] = file
    return named


def _evaluate_harness(
    run: Run, device: InferenceDevice, harness: Harness, batch_size: int, path: Path, console: Console
) -> None:
    """`lmforge eval --harness`: lm-eval's table of results, kept in the report file under "harness"."""
    from ..eval.harness_report import HarnessOptions, parse_tasks, run_harness
    from ..eval.run import read_report, write_report

    opts = HarnessOptions(
        tasks=parse_tasks(harness.harness),
        num_fewshot=harness.num_fewshot,
        limit=harness.limit,
        include_path=harness.include_path,
        apply_chat_template=harness.apply_chat_template,
        batch_size=batch_size,
        device=device.device,
        quantize=device.quantize,
    )
    section, table = run_harness(run.run, opts)
    console.print(table, highlight=False, markup=False, soft_wrap=True)
    written = write_report({**read_report(path), "harness": section}, path)
    console.print(f"wrote {written}", highlight=False, soft_wrap=True)


def export(
    run: Run, *, format: str, out: str, dtype: str = "f32", license: str | None = None, console: Console
) -> None:
    """Export a run (hf, safetensors, onnx, gguf).

    Every export holds a model card (README.md) with the run's numbers.

    Args:
        format: hf | safetensors | onnx | gguf
        out: folder to write (must not exist, or be empty)
        dtype: f32 | f16 | bf16 (hf, safetensors, gguf) | q8_0 (gguf)
        license: the model card's license, a hub identifier such as apache-2.0 or mit (default: none given)
    """
    from ..export import export_run

    written = export_run(run.run, format, out, dtype, license=license)
    console.print(f"exported {run.run} as {format} to {written}", highlight=False, soft_wrap=True)


def import_hf(source: str, *, out: str, console: Console) -> None:
    """Import a Hugging Face model as a run.

    Reads a local GPT-2 or Llama model folder.

    Args:
        source: hf:DIR, a folder with config.json, *.safetensors and tokenizer.json
        out: RUN_DIR to create
    """
    from ..export import ExportError
    from ..export.hf import import_hf as import_folder

    kind, sep, path = source.partition(":")
    if not sep or kind != "hf" or not path:
        raise ExportError(f"source {source!r}: write it as hf:DIR (a local Hugging Face model folder)")
    written = import_folder(path, out)
    console.print(
        f"imported {path} into {written}; try: lmforge generate --run {written}",
        highlight=False,
        soft_wrap=True,
    )
