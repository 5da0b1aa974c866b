"""The run log: every event of a training run is given here once and fans out to where it is shown or
kept — metrics.jsonl, train.log / status.json / TensorBoard / W&B / samples (RunHooks), the console, and
listeners (a callable taking the event's name and step; the tests' signal injection is one).

Each start of a run (fresh or resumed) writes a start line to metrics.jsonl and each stop an end line, so
the run's history — resumes, signals, rollbacks, crashes, wall time — can be read back from that one file;
after the end line the report card is written (report.py).

Only rank 0 writes; on other ranks every sink is off, and listeners still hear the events.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from ..config import Config
from ..eval.downstream import summary
from ..provenance import code_version
from ..run_dir import RunDir
from .hooks import RunHooks
from .logging import ConsoleReporter, MetricsWriter
from .signals import test_signal_listener

Listener = Callable[[str, int], None]  # (event, step): "step" after an optimizer step, "eval" before one


def start_facts(s, resumed_from: Path | None, rolled_back_from: int | None) -> dict:
    """What a start line records of where and how the run computes (from the loop's Setup `s`: device,
    precision, processes, the batch plan), and what it resumed from."""
    device, plan = s.device, s.plan
    facts = {"device": str(device), "precision": s.precision, "world_size": s.env.world_size}
    if device.type == "cuda":
        import torch

        facts["device_name"] = torch.cuda.get_device_name(device)
    facts.update(
        max_steps=plan.max_steps,
        global_batch_size=plan.global_batch_size,
        grad_accum=plan.grad_accum,
        tokens_per_step=plan.tokens_per_step,
        resumed_from=str(resumed_from) if resumed_from else None,
        rolled_back_from=rolled_back_from,
    )
    return facts


class RunLog:
    """One object the loop reports to; it knows every place an event goes."""

    def __init__(
        self, cfg: Config, run_dir: Path, console: Console, max_steps: int, step: int, is_main: bool
    ) -> None:
        self.run_dir, self.is_main, self.t_start = run_dir, is_main, time.time()
        self.report = cfg.log.report
        self.metrics = MetricsWriter(RunDir(run_dir).metrics, enabled=is_main)
        self.hooks = RunHooks(cfg, run_dir, max_steps, step, enabled=is_main)
        self.console = ConsoleReporter(console, max_steps, step, is_main, cfg.log.progress)
        self.listeners: list[Listener] = [f for f in (test_signal_listener(),) if f is not None]

    def started(self, step: int, tokens: int, how: dict) -> None:
        """This start of the run: its step and tokens, and `how` (device, precision, world size, the
        checkpoint resumed from, the step a resume rolled back from)."""
        if not self.is_main:
            return
        record = {"type": "start", "step": step, "tokens": tokens, "time": self.t_start, **how}
        if how.get("resumed_from"):  # a checkpoint of this run by its place in the run (its path elsewhere)
            with contextlib.suppress(ValueError):
                inside = Path(how["resumed_from"]).resolve().relative_to(Path(self.run_dir).resolve())
                record["resumed_from"] = str(inside)
        record.update(host=socket.gethostname(), code=code_version())
        previous = self.hooks.previous
        if previous.get("state") == "running" and "updated" in previous:
            # The previous start never wrote its end: killed or crashed. Its last heartbeat dates it.
            record["previous"] = {k: previous.get(k) for k in ("started", "updated", "step")}
        self.metrics.write(record)

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
            + summary(report)
        )

    def checkpoint(self, path: Path, step: int) -> None:
        """A checkpoint was written."""
        self.say(f"saved checkpoint {path}")
        self.hooks.checkpoint(path, step)

    def end(self, status: str, step: int, tokens: int, message: str, signal: str = "") -> None:
        """The run stopped (`signal`: the one that stopped it); close every sink, then write the report."""
        if message:
            self.say(message)
        now = time.time()
        end = {"type": "end", "step": step, "tokens": tokens, "status": status, "message": message}
        self.metrics.write({**end, "signal": signal or None, "time": now, "wall_s": now - self.t_start})
        self.hooks.end(status, step, tokens, message)
        self.console.close()
        self.metrics.close()
        if self.is_main and self.report:
            from ..report import write_report_quietly

            write_report_quietly(self.run_dir, self.say)
