"""`lmforge quickstart`: the built-in corpus -> a small BPE -> the tiny preset -> a generated sample."""

from __future__ import annotations

from rich.console import Console

from .api import LLM
from .checkpoint import read_metrics
from .config import CheckpointConfig, Config, EvalConfig, LogConfig, ModelConfig, TrainConfig
from .data import prepare
from .data.errors import DataError
from .data.folder import load_meta
from .presets import get_preset

# Sized to train in about 5 minutes on a 2-core CPU: the tiny preset runs at ~2.4k tokens/s there in fp32
# (measured, batch 8 x 256), so 700k tokens = 342 steps of 8 x 256. On a GPU the same budget takes seconds.
QUICKSTART_VOCAB = 4096
QUICKSTART_BATCH = 8
QUICKSTART_TOKENS = 700_000
QUICKSTART_VAL_FRACTION = 0.03  # ~20 stdlib modules, enough for a steady validation number
# (and no less than eval/stdlib_task.py HELD_OUT_FRACTION: its task is made of the modules held out here)
# Openings of Python the corpus is full of: the samples show what the model learned of the language.
# None ends in a space: byte-level BPE attaches a word's leading space to the word, so a prompt ending in
# " " leaves the model a token it rarely saw there ("def " gave "def  # If the ..." after 700k tokens).
QUICKSTART_PROMPTS = (
    "def __init__(self",
    "class Error(Exception):\n    def __init__(self",
    "    for i in range(",
)
SAMPLE_TOKENS = 64
QUICKSTART_TASK = "builtin:stdlib-next-line"
QUICKSTART_TASK_ITEMS = 200  # all of the task's items (146 on CPython 3.11): ~12% of the run's compute


def quickstart_config(data_dir: str, run_dir: str, max_tokens: int | None, device: str) -> Config:
    """The tiny preset with a short cosine schedule, evaluated at the start and the end."""
    tokens = max_tokens or QUICKSTART_TOKENS
    return Config(
        preset="tiny",
        data=data_dir,
        out=run_dir,
        model=ModelConfig(**get_preset("tiny")),
        train=TrainConfig(
            max_tokens=tokens,
            micro_batch_size=QUICKSTART_BATCH,
            lr=2e-3,  # a small model with few steps tolerates (and needs) a high peak rate
            warmup_steps=20,
            weight_decay=0.1,
            device=device,
            seed=1337,
        ),
        # The embedded downstream task, from stdlib modules this data holds out (eval/stdlib_task.py).
        eval=EvalConfig(every=100, batches=20, tasks=[QUICKSTART_TASK], task_items=QUICKSTART_TASK_ITEMS),
        checkpoint=CheckpointConfig(every=0),
        log=LogConfig(every=10),
    )


def quickstart(
    data_dir: str = "data/stdlib",
    run_dir: str = "runs/quickstart",
    max_tokens: int | None = None,
    device: str = "auto",
    console: Console | None = None,
) -> dict:
    """Run the whole pipeline; returns the first and last validation reports and the sample."""
    from .train.loop import train

    console = console or Console()
    console.rule("[bold]1/3 prepare: builtin:stdlib -> byte-level BPE -> shards")
    try:
        meta = load_meta(data_dir)
        console.print(
            f"reusing prepared data in {data_dir} ({meta['splits']['train']['tokens']:,} train tokens)",
            soft_wrap=True,
        )
    except DataError:
        meta = prepare(
            ["builtin:stdlib"],
            data_dir,
            vocab_size=QUICKSTART_VOCAB,
            val_fraction=QUICKSTART_VAL_FRACTION,
            progress=lambda msg: console.print(
                msg, highlight=False, soft_wrap=True
            ),  # ends with a "wrote ..." summary
        )

    console.rule("[bold]2/3 train: the tiny preset")
    cfg = quickstart_config(data_dir, run_dir, max_tokens, device)
    result = train(cfg, console=console)

    console.rule("[bold]3/3 generate")
    samples = generate_samples(run_dir)
    for i, (prompt, text) in enumerate(samples.items(), 1):
        console.rule(f"sample {i} of {len(samples)}", style="dim", align="left")
        console.print(prompt + text, highlight=False, markup=False, soft_wrap=True)

    # From metrics.jsonl, so a re-run of a finished quickstart still reports the whole run.
    evals = [r for r in read_metrics(run_dir) if r.get("type") == "eval"]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    console.rule("[bold]done")
    if "val_bpb" in first and "val_bpb" in last:
        console.print(
            f"val bits per byte: {first['val_bpb']:.3f} at step {first['step']} -> {last['val_bpb']:.3f} at step {last['step']} "
            f"({100 * last['val_bpb'] / first['val_bpb']:.0f}% of the start)",
            highlight=False,
            soft_wrap=True,
        )
    task = QUICKSTART_TASK.removeprefix("builtin:") + "/acc_norm"
    if task in first and task in last:  # 4 choices: chance is 0.25
        console.print(
            f"{task} (pick the real next line of a function among 4): {first[task]:.3f} at step {first['step']} "
            f"-> {last[task]:.3f} at step {last['step']} (chance 0.250)",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"data: {data_dir}   run: {run_dir} (config.yaml, metrics.jsonl, checkpoints/)\n"
        f'next: lmforge generate --run {run_dir} --prompt "def __init__(self" --stream',
        highlight=False,
        soft_wrap=True,
    )
    return {"first_eval": first, "last_eval": last, "samples": samples, "result": result}


def generate_samples(run_dir: str) -> dict[str, str]:
    """One continuation of each quickstart prompt (fixed seeds, so a re-run prints the same)."""
    llm = LLM.load(run_dir, device="cpu")  # as `lmforge generate` loads it, so the two print the same
    # A little below the usual 0.8: a 6M-parameter model's tail is mostly noise.
    return {
        prompt: llm.generate(prompt, SAMPLE_TOKENS, temperature=0.7, top_k=40, seed=i)
        for i, prompt in enumerate(QUICKSTART_PROMPTS)
    }
