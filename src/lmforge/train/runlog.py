"""The run log: every event of a training run is given here once and fans out to where it is shown or
kept — metrics.jsonl, train.log / status.json / TensorBoard / W&B / samples (RunHooks), the console, and
listeners (a callable taking the event's name and step; the tests' signal injection is one).

Only rank 0 writes; on other ranks every sink is off, and listeners still hear the events.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from ..config import Config
from ..run_dir import RunDir
from .hooks import RunHooks
from .logging import ConsoleReporter, MetricsWriter
from .signals import test_signal_listener

Listener = Callable[[str, int], None]  # (event, step): "step" after an optimizer step, "eval" before one


class RunLog:
    """One object the loop reports to; it knows every place an event goes."""

    def __init__(
        self, cfg: Config, run_dir: Path, console: Console, max_steps: int, step: int, is_main: bool
    ) -> None:
        self.metrics = MetricsWriter(RunDir(run_dir).metrics, enabled=is_main)
        self.hooks = RunHooks(cfg, run_dir, max_steps, step, enabled=is_main)
        self.console = ConsoleReporter(console, max_steps, step, is_main, cfg.log.progress)
        self.listeners: list[Listener] = [f for f in (test_signal_listener(),) if f is not None]

    def notify(self, event: str, step: int) -> None:
        """Tell the listeners that `event` happens at `step`."""
        for listener in self.listeners:
            listener(event, step)

    def say(self, message: str) -> None:
        """A line for the person watching (above the progress bar)."""
        self.console.print(message)

    def train(self, record: dict) -> None:
        """A logged optimizer step (a train line of metrics.jsonl)."""
        self.metrics.write(record)
        self.hooks.train_step(record)
        self.console.step(
            record["step"], record["train_loss"], record["tok_per_s"], record.get("mfu"), log_line=True
        )

    def bad_step(self, record: dict) -> None:
        """A step whose loss or gradient norm was not finite (its update was skipped)."""
        self.metrics.write(record)
        self.say(
            f"step {record['step']}: non-finite loss or gradient norm, optimizer step skipped "
            f"({record['consecutive']} in a row, {record['bad_steps']} in all)"
        )

    def evaluated(self, report: dict, tokens: int, precision: str, model) -> None:
        """A validation result (model: for the periodic samples)."""
        self.metrics.write({"type": "eval", "tokens": tokens, **report, "precision": precision})
        self.hooks.evaluated(report, tokens, model)
        bpb = f" | val bpb {report['val_bpb']:.3f}" if "val_bpb" in report else ""
        self.say(
            f"step {report['step']}: val loss {report['val_loss']:.4f} | ppl {report['val_ppl']:.1f}{bpb}"
        )

    def checkpoint(self, path: Path, step: int) -> None:
        """A checkpoint was written."""
        self.say(f"saved checkpoint {path}")
        self.hooks.checkpoint(path, step)

    def end(self, status: str, step: int, tokens: int, message: str) -> None:
        """The run stopped; close every sink."""
        if message:
            self.say(message)
        self.hooks.end(status, step, tokens, message)
        self.console.close()
        self.metrics.close()
