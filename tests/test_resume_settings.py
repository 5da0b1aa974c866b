"""A resume obeys changed optimizer settings (or refuses what it cannot apply); never a note that lies."""

from __future__ import annotations

import json

import pytest

from lmforge.checkpoint import latest_checkpoint, read_metrics
from lmforge.cli import EXIT_PREEMPTED, main

from .conftest import FAST, TINY_MODEL

FLAGS = [*TINY_MODEL, *FAST, "--train.device=cpu", "--train.precision=fp32", "--train.max_steps=6"]
FLAGS += ["--eval.every=0", "--eval.at_start=false", "--train.lr=3e-3", "--train.warmup_steps=1"]


def _losses(run):
    return [r["train_loss"] for r in read_metrics(run) if r["type"] == "train"]


def _stopped_at_3(data, out, monkeypatch):
    monkeypatch.setenv("LMFORGE_TEST_SIGNAL_AT", "SIGTERM@3")
    assert main(["train", "--data", str(data), "--out", str(out), *FLAGS]) == EXIT_PREEMPTED
    monkeypatch.delenv("LMFORGE_TEST_SIGNAL_AT")


@pytest.fixture
def stopped(tiny_data, tmp_path, monkeypatch):
    """Two copies of a run stopped after step 3, and the straight run's losses."""
    straight = tmp_path / "straight"
    assert main(["train", "--data", str(tiny_data), "--out", str(straight), *FLAGS]) == 0
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        _stopped_at_3(tiny_data, run, monkeypatch)
    return runs, _losses(straight)


def test_changed_weight_decay_and_betas_are_applied_on_resume_and_recorded(tiny_data, stopped, capsys):
    (same, changed), straight = stopped
    assert main(["train", "--data", str(tiny_data), "--out", str(same), *FLAGS]) == 0
    assert _losses(same) == straight  # negative control: an unchanged resume is the straight run, bitwise
    capsys.readouterr()
    new = ["--train.weight_decay=0.9", "--train.beta2=0.5", "--train.eps=1e-6"]
    assert main(["train", "--data", str(tiny_data), "--out", str(changed), *FLAGS, *new]) == 0
    out = capsys.readouterr().out
    assert "note: train.weight_decay 0.1 -> 0.9" in out and "note: train.beta2 0.95 -> 0.5" in out
    assert _losses(changed)[:3] == straight[:3]
    assert _losses(changed)[3:] != straight[3:]  # the new settings took effect from step 4
    meta = json.loads((latest_checkpoint(changed) / "meta.json").read_text())
    decay, no_decay = meta["optimizer_groups"]
    assert (decay["weight_decay"], decay["betas"], decay["eps"]) == (0.9, [0.9, 0.5], 1e-6)
    assert (no_decay["weight_decay"], no_decay["betas"]) == (0.0, [0.9, 0.5])  # norms and biases: no decay
    assert meta["config"]["train"]["weight_decay"] == 0.9


def test_a_changed_optimizer_kind_is_refused_in_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _stopped_at_3(tiny_data, run, monkeypatch)
    capsys.readouterr()
    args = ["train", "--data", str(tiny_data), "--out", str(run), *FLAGS, "--train.optimizer=adamw8bit"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "train.optimizer='adamw8bit' differs from the checkpoint's 'adamw'" in err
    assert len(err.splitlines()) == 1
