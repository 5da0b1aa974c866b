"""The run directory: one name for every file of a run, and the small readers and writers of those files.

    RUN_DIR/
      config.yaml        the resolved config of the run
      tokenizer.json     a copy of the data's tokenizer, so the run stands on its own
      metrics.jsonl      one JSON object per logged step, evaluation and skipped step, and per start and end
      train.log          one timestamped line per logged step, evaluation, checkpoint and the end
      status.json        the heartbeat `lmforge status` reads (pid, host, state, step, tokens, speed)
      samples.jsonl      text generated from log.sample_prompts during training
      eval.json          the report of `lmforge eval`
      report.md          the report card written when a run ends (and by `lmforge report`)
      report.html        the same report as one self-contained page, the curves embedded
      report_curves.png  the curves report.md shows
      curves.png         the chart `lmforge plot` draws when given no --out
      tb/                TensorBoard event files (log.tensorboard=true)
      checkpoints/
        step_0000500/    a checkpoint (its files and meta.json are checkpoint.py's format)
        best/            the checkpoint with the lowest validation loss
        latest           the name of the newest complete checkpoint
      consolidated/      the single-file copy `lmforge consolidate` makes of a sharded checkpoint
      .lock              held by the `lmforge train` writing the run (runlock.py)

A new file of a run is one line in `RunDir`; every reader and writer takes its path from there. This module
imports nothing heavy (no torch), so `lmforge status` and the run lock start at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# A checkpoint directory is complete once its meta.json exists: the checkpoint writer puts it in last.
CHECKPOINT_META = "meta.json"
LATEST = "latest"
BEST = "best"
STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"{STEP_PREFIX}{step:07d}"


class _Entry:
    """One file or folder of a run: read on the class it is the name, on a RunDir the path."""

    def __init__(self, name: str, what: str) -> None:
        self.name, self.__doc__ = name, what

    def __get__(self, run: RunDir | None, owner: type | None = None) -> Any:
        return self.name if run is None else run.path / self.name


class RunDir:
    """The files of one run directory (`RunDir.metrics` is the name, `RunDir(path).metrics` the path)."""

    config = _Entry("config.yaml", "the resolved config of the run")
    tokenizer = _Entry("tokenizer.json", "a copy of the data's tokenizer")
    metrics = _Entry(
        "metrics.jsonl", "one JSON object per logged step, evaluation, skipped step, start and end"
    )
    log = _Entry("train.log", "one timestamped line per event of the run")
    status = _Entry("status.json", "the run's heartbeat")
    samples = _Entry("samples.jsonl", "text generated during training")
    eval_report = _Entry("eval.json", "the report of `lmforge eval`")
    curves = _Entry("curves.png", "the chart `lmforge plot` draws when given no --out")
    report_md = _Entry("report.md", "the report card of the run (Markdown)")
    report_html = _Entry("report.html", "the report card of the run (one self-contained HTML page)")
    report_curves = _Entry("report_curves.png", "the curves report.md shows (report.html embeds them)")
    tensorboard = _Entry("tb", "TensorBoard event files")
    checkpoints = _Entry("checkpoints", "the checkpoints, `best` and the `latest` marker")
    consolidated = _Entry("consolidated", "a single-file copy of a sharded checkpoint")
    lock = _Entry(".lock", "the lock of the `lmforge train` writing the run")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def names(cls) -> dict[str, str]:
        """Every entry of a run: attribute -> file or folder name."""
        return {key: value.name for key, value in vars(cls).items() if isinstance(value, _Entry)}

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self, step: int, name: str | None = None) -> Path:
        """The directory of the checkpoint taken after `step` steps, or of the side checkpoint `name`."""
        return self.checkpoints / (name or step_dir_name(step))

    @property
    def best(self) -> Path:
        """The checkpoint with the lowest validation loss (never rotated)."""
        return self.checkpoints / BEST

    @property
    def latest_marker(self) -> Path:
        """The small file naming the newest complete checkpoint."""
        return self.checkpoints / LATEST

    def step_checkpoints(self) -> list[Path]:
        """Every step checkpoint directory, complete or not, oldest first."""
        return sorted(p for p in self.checkpoints.glob(STEP_PREFIX + "*") if p.is_dir())

    def complete_checkpoints(self) -> list[Path]:
        """The step checkpoint directories that have their meta.json, oldest first."""
        return [p for p in self.step_checkpoints() if (p / CHECKPOINT_META).is_file()]

    def marked_checkpoint(self) -> Path | None:
        """The directory `latest` names (complete or not), or None without a marker."""
        marker = self.latest_marker
        return self.checkpoints / marker.read_text().strip() if marker.is_file() else None

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (the `latest` marker, else the highest step), or None."""
        marked = self.marked_checkpoint()
        if marked is not None and (marked / CHECKPOINT_META).is_file():
            return marked
        found = self.complete_checkpoints()
        return found[-1] if found else None

    # --- the other files -------------------------------------------------------------------------
    def looks_like_run(self) -> bool:
        """Whether `lmforge train` has written here (a config or metrics)."""
        return self.config.is_file() or self.metrics.is_file()

    def read_metrics(self) -> list[dict]:
        """All records of metrics.jsonl (a torn last line, from a crash mid-write, is skipped)."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def read_status(self) -> dict:
        """The last heartbeat of status.json; {} when there is none or it cannot be read."""
        try:
            status = json.loads(self.status.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return status if isinstance(status, dict) else {}

    def write_status(self, status: dict) -> None:
        """Replace status.json whole. Rewritten at every logged step, so not flushed to disk: a crash may
        leave it one beat old."""
        from .safewrite import write_atomic

        write_atomic(self.status, json.dumps(status), "the run status", durable=False)

    def read_config(self) -> dict:
        """config.yaml as a plain dict; {} when it is missing or unreadable."""
        import yaml

        try:
            config = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            return {}
        return config if isinstance(config, dict) else {}

    def write_config(self, config: dict) -> None:
        """Write config.yaml (a config as `config_to_dict` gives it) whole or not at all."""
        import yaml

        from .safewrite import write_atomic

        write_atomic(self.config, yaml.safe_dump(config, sort_keys=False), "the config")
