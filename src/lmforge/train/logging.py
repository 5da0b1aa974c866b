"""What a run shows and records: metrics.jsonl, console lines and a progress bar. Rank 0 only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..safewrite import LineFile, failing_cleanly, write_atomic

HISTORY = ("start", "end")  # metrics.jsonl lines that tell the run's story rather than a step's numbers


class MetricsWriter:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl (kept across resumes).

    Each line is written straight to the file (no buffer), so a crash loses nothing already logged, and a
    failed write (a full disk) leaves no torn line and stops the run with one line (DiskWriteError).
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self._f = LineFile(path, "metrics") if enabled else None

    def write(self, record: dict) -> None:
        """Write one record."""
        if self._f is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.append(json.dumps(clean) + "\n")

    def close(self) -> None:
        """Close the file."""
        if self._f is not None:
            self._f.close()
            self._f = None


def discard_metrics(path: Path) -> int:
    """Delete the metrics of an earlier start that never checkpointed (a fresh start writes them again);
    return how many records it held."""
    if not path.is_file():
        return 0
    n = len(path.read_text(encoding="utf-8", errors="replace").splitlines())
    with failing_cleanly("metrics", path):  # a read-only directory, say
        path.unlink()
    return n


def truncate_metrics(path: Path, step: int) -> int | None:
    """Drop records after `step` (written after the checkpoint a run resumes from); return the highest
    step dropped (the step the run rolls back from), or None when nothing was after `step`. Start and end
    lines stay: they are the run's history (a stop by divergence, a start later killed), not steps that
    training will write again.

    The file is rewritten through a temporary one: if that fails (a full disk), the original stays and
    the error is one line.
    """
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept, dropped = [], None
    for line in lines:
        try:
            record = json.loads(line)
            record_step = record.get("step", 0)
        except (ValueError, AttributeError):
            continue  # a torn line from a crash mid-write
        if record_step > step and record.get("type") not in HISTORY:
            dropped = max(dropped or record_step, record_step)
            continue
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        write_atomic(path, "".join(kept), "metrics")
    return dropped


class ConsoleReporter:
    """A progress bar on terminals (step, loss, tokens/s, MFU, ETA); plain lines elsewhere."""

    def __init__(
        self, console: Console, total_steps: int, start_step: int, enabled: bool, show_bar: bool
    ) -> None:
        self.console = console
        self.enabled = enabled
        self.bar = None
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        if enabled and show_bar and console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    def print(self, message: str) -> None:
        """A line above the bar (or a plain line); soft_wrap keeps a long path whole on one line in logs."""
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)

    def step(self, step: int, loss: float, tok_per_s: float, mfu: float | None, log_line: bool) -> None:
        """Advance to `step`; plain output prints on log steps only."""
        if not self.enabled:
            return
        mfu_txt = f" mfu {100 * mfu:.1f}%" if mfu is not None else ""
        info = f"loss {loss:.4f} | {tok_per_s:,.0f} tok/s{mfu_txt}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif log_line:
            elapsed = time.time() - self.t0
            eta = elapsed / max(1, step - self.start_step) * (self.total - step)
            self.console.print(
                f"step {step}/{self.total} | {info} | {elapsed:.0f}s elapsed, ETA {eta:.0f}s",
                highlight=False,
                soft_wrap=True,
            )

    def close(self) -> None:
        """Stop the bar."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
