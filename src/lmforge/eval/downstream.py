"""Downstream scores while a model trains: the multiple-choice tasks of `eval.tasks`, scored at every
evaluation next to the validation loss.

Each task adds `<task>/acc` and `<task>/acc_norm` to the eval line of metrics.jsonl; all of them together
add `centered_acc`: each task's acc_norm rescaled so that chance is 0 and a perfect score 1, averaged over
the tasks (the centring of nanochat's CORE metric, after DCLM's). Chance is 1/number of choices, averaged
over the task's items, so tasks with 2 and with 4 choices are put on one scale.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import EvalConfig, task_spec
from ..data import Tokenizer
from ..data.folder import data_tokenizer
from .tasks import Choice, predictions, read_multiple_choice

CENTERED = "centered_acc"
SAMPLE_SEED = 0  # which items a task capped by eval.task_items keeps: the same ones at every evaluation


@dataclass(frozen=True)
class Task:
    """A named multiple-choice task and the items scored at each evaluation."""

    name: str
    items: tuple[Choice, ...]

    @property
    def chance(self) -> float:
        """The accuracy of a uniform guess: 1/number of choices, averaged over the items."""
        return sum(1 / len(item.endings) for item in self.items) / len(self.items)


def load_tasks(specs: Sequence[str], max_items: int) -> list[Task]:
    """Read every task of eval.tasks (TaskError for the first bad file), each cut to max_items items drawn
    with a fixed seed, so that every evaluation scores the same items."""
    tasks = []
    for spec in specs:
        name, source = task_spec(spec)
        items = read_multiple_choice(source)
        if len(items) > max_items:
            keep = sorted(random.Random(SAMPLE_SEED).sample(range(len(items)), max_items))
            items = [items[i] for i in keep]
        tasks.append(Task(name, tuple(items)))
    return tasks


@dataclass(frozen=True)
class Downstream:
    """The tasks of eval.tasks and the tokenizer they are scored with (the training data's)."""

    tasks: tuple[Task, ...]
    tokenizer: Any

    @classmethod
    def load(cls, cfg: EvalConfig, data_dir: str | Path) -> Downstream | None:
        """The tasks of cfg.tasks read and checked (TaskError for a bad file) with the tokenizer of the data
        folder, or None when no task is given."""
        if not cfg.tasks:
            return None
        tokenizer = Tokenizer.load(data_tokenizer(data_dir))
        return cls(tuple(load_tasks(cfg.tasks, cfg.task_items)), tokenizer)

    def score(
        self, model: torch.nn.Module, rank: int, world_size: int, sum_over_ranks: Callable = lambda v: v
    ) -> dict[str, float]:
        """`score_tasks` of these tasks."""
        return score_tasks(model, self.tokenizer, self.tasks, rank, world_size, sum_over_ranks)


def centered(acc: float, chance: float) -> float:
    """acc rescaled so that `chance` is 0 and a perfect score is 1 (below chance is negative)."""
    return (acc - chance) / (1 - chance)


@torch.no_grad()
def score_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[Task],
    rank: int = 0,
    world_size: int = 1,
    sum_over_ranks: Callable[[list[float]], list[float]] = lambda values: values,
) -> dict[str, float]:
    """`<task>/acc`, `<task>/acc_norm` of each task and their `centered_acc`, with the items split
    between ranks (rank r scores items r, r + world_size, ...; `sum_over_ranks` adds up the counts)."""
    was_training = model.training
    model.eval()  # no dropout while scoring
    out: dict[str, float] = {}
    try:
        for task in tasks:
            n = len(task.items)
            mine = task.items[rank::world_size]
            correct = [0.0, 0.0]
            # Every rank runs the same number of forwards, a repeat of an item where it has none left:
            # a sharded (FSDP) model gathers its weights in each forward, with every rank taking part.
            for i in range(-(-n // world_size)):
                best, best_norm = predictions(model, tokenizer, mine[i] if i < len(mine) else task.items[0])
                if i < len(mine):
                    correct[0] += best == mine[i].label
                    correct[1] += best_norm == mine[i].label
            correct = sum_over_ranks(correct)
            out[f"{task.name}/acc"], out[f"{task.name}/acc_norm"] = correct[0] / n, correct[1] / n
    finally:
        model.train(was_training)
    if tasks:
        out[CENTERED] = sum(centered(out[f"{t.name}/acc_norm"], t.chance) for t in tasks) / len(tasks)
    return out


def scalar_name(key: str) -> str | None:
    """The TensorBoard / W&B name of a downstream key of an eval line (tasks/...), None for another key."""
    if key == CENTERED or key.endswith(("/acc", "/acc_norm")):
        return f"tasks/{key}"
    return None


def summary(report: dict) -> str:
    """' | centered acc C (task acc_norm, ...)' for a console or log line; "" without tasks."""
    if CENTERED not in report:
        return ""
    tasks = ", ".join(
        f"{k[: -len('/acc_norm')]} {v:.3f}" for k, v in report.items() if k.endswith("/acc_norm")
    )
    return f" | centered acc {report[CENTERED]:.3f} ({tasks})"
