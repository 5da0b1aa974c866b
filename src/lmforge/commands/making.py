"""The subcommands that make data and runs, and look at them: prepare, train, finetune, merge, estimate,
bench, quickstart, consolidate, plot, report, status, doctor. The rules that turn these functions into
commands: __init__.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from rich.console import Console

from ..config import FINETUNE_DEFAULTS, ConfigError
from ..errors import LmforgeError
from ..model import ModelConfig
from ..options import DEFAULT_BUDGET, Defaults, Device, Run, RunConfig
from ..presets import BENCH_MODEL

EXIT_DIVERGED = 3  # train.max_bad_steps consecutive non-finite steps; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # SIGINT/SIGTERM/SIGUSR1: checkpoint saved, run the same command to resume (EX_TEMPFAIL)


class RunDiverged(LmforgeError):
    """Training stopped on non-finite steps; the message names the last good checkpoint."""

    exit_code = EXIT_DIVERGED


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
    chat: bool = False,
    console: Console,
) -> None:
    """Tokenize raw text into shards.

    Trains a tokenizer (or loads one) and writes the token shards, meta.json and manifest.json.

    Args:
        source: a file or folder (.txt .md .json .jsonl .jsonl.gz .parquet .csv), builtin:stdlib,
            hf:NAME[:CONFIG][@SPLIT], fineweb, fineweb-edu, dolma, pile, c4, or kaggle:OWNER/DATASET;
            repeatable, SRC:WEIGHT mixes sources in proportion; --chat: conversations or builtin:stdlib-chat
        out: DATA_DIR to write
        tokenizer: bpe | wordpiece | unigram | word | char (trained here), gpt2, tiktoken:NAME, or a
            tokenizer.json; with --chat, the base RUN_DIR (its tokenizer and seq_len) or a ready tokenizer
        vocab_size: vocabulary size of a trained tokenizer
        special_tokens: extra special tokens, comma-separated
        text_field: record field holding the text (text falls back to content)
        val_fraction: share of documents held out for validation
        max_docs: stop after this many documents
        max_tokens: stop once this many tokens are written
        workers: tokenizer processes (default: all cores)
        seq_len: validation window length recorded for eval; with --chat, the training window
        stride: step between validation windows (< seq-len overlaps)
        chat: conversations for instruction tuning, packed into windows with a loss mask on the answers
    """
    if chat:  # these options mean nothing for conversations: refused rather than ignored
        unused = {"--special-tokens": special_tokens, "--max-tokens": max_tokens, "--stride": stride}
        return _prep_chat(source, out, tokenizer, seq_len, val_fraction, max_docs, workers, unused, console)
    from ..data import prepare as prepare_data

    prepare_data(  # its progress callback prints the summary
        source,
        out,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        max_docs=max_docs,
        progress=lambda msg: console.print(msg, highlight=False, soft_wrap=True),
        text_field=text_field,
        special_tokens=[t.strip() for t in special_tokens.split(",") if t.strip()],
        workers=workers,
        max_tokens=max_tokens,
        seq_len=seq_len,
        stride=stride,
        console=console,
    )


def _prep_chat(
    source: list[str],
    out: str,
    tokenizer: str,
    seq_len: int | None,
    val_fraction: float,
    max_docs: int | None,
    workers: int | None,
    unused: dict,
    console: Console,
) -> None:
    """`prepare --chat`; one line when an option in ``unused`` (flag -> value) was given."""
    from ..data.chat_prepare import prepare_chat
    from ..data.errors import DataError

    given = [flag for flag, value in unused.items() if value not in (None, "")]
    if given:
        raise DataError(
            f"{', '.join(given)} cannot be used with --chat (the chat template brings its own special tokens "
            "and packs whole conversations): leave it out"
        )
    prepare_chat(
        source,
        out,
        tokenizer,
        seq_len=seq_len,
        val_fraction=val_fraction,
        max_docs=max_docs,
        workers=workers,
        progress=lambda msg: console.print(msg, highlight=False, soft_wrap=True),
        console=console,
    )


def train(config: RunConfig, *, dry_run: bool = False, init_from: str | None = None, console: Console) -> int:
    """Train or resume a model.

    Settings come from a preset < --config YAML files < --section.key=value flags.

    Args:
        dry_run: print the resolved config and costs; train nothing
        init_from: hf:DIR: start from a local HF GPT-2/Llama model (its architecture replaces model.*)
    """
    cfg, init = config.config, None
    if cfg.lora.rank:
        raise ConfigError(
            f"lora.rank={cfg.lora.rank}: adapters need base weights to adapt: use `lmforge finetune --from "
            f"BASE_RUN ...`"
        )
    console.print(f"budget: {config.budget}", highlight=False, soft_wrap=True)
    from ..train.loop import train as train_loop

    if init_from:
        from ..export.hf import init_from_hf

        cfg, init = init_from_hf(init_from, cfg)
    else:  # resuming: the model settings this command leaves at their defaults are the checkpoint's
        from ..train.resume import model_from_checkpoint

        cfg = model_from_checkpoint(cfg, config.model_given)
    return _exit_code(train_loop(cfg, dry_run=dry_run, console=console, init_tensors=init))


def finetune(
    config: Annotated[RunConfig, Defaults(FINETUNE_DEFAULTS)],
    *,
    from_: str,
    dry_run: bool = False,
    console: Console,
) -> int:
    """Fine-tune a trained run on new data (full, or LoRA with --lora.rank).

    Starts from the base run's weights and architecture (not its optimizer), on the train loop with
    fine-tuning defaults; the same command again resumes. Settings: --config YAML < --section.key=value.

    Args:
        from_: BASE_RUN_DIR (its latest checkpoint) or a checkpoint directory to start from
        dry_run: print the resolved config and costs; train nothing
    """
    from ..train.finetune import finetune as run_finetune

    budget = None if config.budget == DEFAULT_BUDGET else config.budget  # None: a few epochs of the data
    result = run_finetune(config.config, from_, config.model_given, console, budget, dry_run)
    return _exit_code(result)


def merge(run: Run, *, out: str, console: Console) -> None:
    """Fold a LoRA run's adapters into a plain run.

    Writes a run directory with every weight, which every command reads like a trained run and which no
    longer needs the base run.

    Args:
        out: RUN_DIR to create
    """
    from ..finetuned import merge_run

    written = merge_run(run.run, out)
    console.print(f"wrote {written}; try: lmforge generate --run {written}", highlight=False, soft_wrap=True)


def _exit_code(result) -> int:
    """A training result's exit code: 0, EXIT_PREEMPTED, or RunDiverged raised with its message."""
    if result is not None and result.status == "preempted":
        return EXIT_PREEMPTED
    if result is not None and result.status == "diverged":
        raise RunDiverged(result.message)
    return 0


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
    from ..quickstart import quickstart as run_quickstart

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
    from ..bench import bench_training, report

    del preset  # cli.py has made it the model.* defaults before parsing
    try:
        model_cfg = model.resolved()
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    others = () if compare == "none" else tuple(compare.split(","))
    console.print(f"timing {steps} steps after {warmup} warmup steps ...", highlight=False, soft_wrap=True)
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
    from ..estimate import estimate as plan
    from ..estimate_report import report_lines

    for line in report_lines(plan(config.config, gpu=gpu, gpus=gpus, mfu=mfu)):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def consolidate(run: Run, *, out: str | None = None, console: Console) -> None:
    """Gather a sharded (FSDP) checkpoint into one file.

    Writes one model.safetensors that generate and export read.

    Args:
        out: checkpoint directory to write (default: RUN_DIR/consolidated)
    """
    from ..train.consolidate import consolidate as gather

    written = gather(run.run, out)
    console.print(
        f"wrote {written} (use it as --run for generate and export)", highlight=False, soft_wrap=True
    )


def plot(runs: list[str], *, out: str | None = None, console: Console) -> None:
    """Plot the curves of one or more runs.

    Loss, learning rate, gradient norm and tokens/s; several runs share one chart.

    Args:
        runs: RUN_DIRs (several: one chart, one line per run)
        out: FILE.png or FILE.html (default: RUN_DIR/curves.png)
    """
    from ..plot import plot_runs

    path = Path(out) if out else Path(runs[0]) / "curves.png"
    plot_runs(runs, path)
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def report(run: str, *, console: Console) -> None:
    """Write a run's report card (report.md, report.html).

    What was trained, on what, where and how long, how it ended, resumes and incidents, the code version,
    the curves and a few samples. `lmforge train` writes it when a run ends; this writes it again.

    Args:
        run: RUN_DIR
    """
    from ..report import write_report

    for path in write_report(run):
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def status(run: str, *, console: Console) -> None:
    """Step, loss, ETA and liveness of a run.

    Where a run stands: step, tokens, loss, best val, ETA, last checkpoint, alive or not.

    Args:
        run: RUN_DIR
    """
    from ..watch import format_status, run_status

    for line in format_status(run_status(run)):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def doctor(*, run_dir: str = ".", console: Console) -> None:
    """Check torch, GPU, precision and optional packages.

    What this machine can do for training (bf16, flash attention, compile, disk) and what to fix.

    Args:
        run_dir: where runs will be written (for the free-disk check)
    """
    from ..doctor import doctor_report, format_report

    for line in format_report(doctor_report(run_dir)):
        console.print(line, highlight=False, soft_wrap=True)
