"""A run's plan: the batch arithmetic and budget in steps, what the config cannot do in that many steps,
the vocabulary from the data, and the dry run that prints it all without training."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import yaml
from rich.console import Console

from ..config import Config, ConfigError
from ..config_io import config_to_dict


@dataclass
class Plan:
    """Batch arithmetic derived from the config and the world size."""

    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    seq_len: int
    tokens_per_step: int
    max_steps: int


def make_plan(cfg: Config, world_size: int) -> Plan:
    """Global batch = micro-batch x accumulation x world size; the token budget decides max_steps if given."""
    t = cfg.train
    gb = t.global_batch_size or t.micro_batch_size * world_size
    if gb % (t.micro_batch_size * world_size):
        raise ConfigError(
            f"train.global_batch_size={gb} is not a multiple of micro_batch_size x world size "
            f"({t.micro_batch_size} x {world_size})"
        )
    seq_len = cfg.model.seq_len
    tokens_per_step = gb * seq_len
    max_steps = t.steps_for(tokens_per_step)
    return Plan(
        t.micro_batch_size, gb // (t.micro_batch_size * world_size), gb, seq_len, tokens_per_step, max_steps
    )


def plan_warnings(cfg: Config, plan: Plan) -> list[str]:
    """Settings that cannot do what they say in a run of plan.max_steps steps, one line each."""
    steps, out = plan.max_steps, []
    if cfg.train.warmup_steps >= steps:
        out.append(
            f"train.warmup_steps={cfg.train.warmup_steps} is not shorter than the run ({steps} steps): "
            f"the learning rate never reaches train.lr"
        )
    for key, every, what in (
        ("eval.every", cfg.eval.every, "evaluation happens only at the start and the end"),
        (
            "checkpoint.every",
            cfg.checkpoint.every,
            "checkpoints are saved only at each epoch's end and the end",
        ),
    ):
        if every >= steps:
            out.append(f"{key}={every} is not shorter than the run ({steps} steps): {what}")
    return out


def resolve_vocab(cfg: Config, meta: dict, console: Console | None) -> Config:
    """The data's tokenizer defines the vocabulary; a different model.vocab_size is replaced with a note."""
    data_vocab = int(meta["vocab_size"])
    if cfg.model.vocab_size not in (None, data_vocab) and console is not None:
        console.print(
            f"note: model.vocab_size {cfg.model.vocab_size} -> {data_vocab} (from the data's tokenizer)",
            soft_wrap=True,
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data_vocab))


def count_params_from_config(cfg: Config) -> int:
    """Exact parameter count without building the model."""
    from ..model import param_breakdown

    return param_breakdown(cfg.model)["total"]


def print_dry_run(
    cfg: Config, plan: Plan, precision: str, device: torch.device, n_params: int, fpt: int, console: Console
) -> None:
    """The resolved config and the estimator's plan for this device; nothing is trained."""
    from ..estimate import estimate, local_device
    from ..estimate_report import report_lines

    console.print(
        yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), highlight=False, soft_wrap=True
    )
    est = estimate(cfg, device=local_device(device), precision=precision)
    console.print(f"memory estimate and plan on {device} ({precision}):", highlight=False, soft_wrap=True)
    for line in report_lines(est):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
