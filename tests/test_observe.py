"""Watching runs: train.log, samples, TensorBoard, W&B offline, plot, status (finished, running, dead), doctor."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import read_metrics
from lmforge.cli import main
from lmforge.plot import PlotError, plot_runs
from lmforge.watch import run_status

from .conftest import FAST, TINY_MODEL


def train_args(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), *TINY_MODEL, *FAST, *extra]


@pytest.fixture(scope="module")
def observed(tiny_data, tmp_path_factory):
    """A real 10-step run with TensorBoard, W&B (offline) and samples at every evaluation."""
    root = tmp_path_factory.mktemp("observed")
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT", "WANDB_DISABLE_GIT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = [
            "--train.max_steps=10",
            "--eval.every=5",
            "--checkpoint.every=5",
            "--log.tensorboard=true",
            "--log.wandb=true",
            "--log.wandb_mode=offline",
            "--log.wandb_run_name=observed",
            "--log.sample_every=1",
            "--log.sample_tokens=8",
        ]
        assert main(train_args(tiny_data, root / "run", *args)) == 0
        assert main(train_args(tiny_data, root / "plain", "--train.max_steps=6", "--train.lr=1e-3")) == 0
    finally:
        torch.set_num_threads(n)
        # Stop W&B's service threads: later tests fork worker processes (prepare's pool), and a
        # forked child of a process with live threads can inherit their locks mid-use.
        if "wandb" in sys.modules:
            sys.modules["wandb"].teardown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return root / "run", root / "plain"


def train_records(run):
    return [r for r in read_metrics(run) if r["type"] == "train"]


def test_train_log_and_samples_are_written(observed):
    run, plain = observed
    log = (run / "train.log").read_text()
    assert "step 10 | loss" in log and "val loss" in log and "saved checkpoint" in log
    assert "end: finished at step 10" in log
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 5, 5, 10, 10]  # two prompts at each of three evaluations
    assert {s["prompt"] for s in samples} == {"The", "def "} and all(
        isinstance(s["text"], str) for s in samples
    )
    assert (plain / "train.log").is_file() and not (plain / "samples.jsonl").exists()  # samples are opt-in


def test_tensorboard_event_files_hold_the_logged_scalars(observed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, plain = observed
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tok_per_s", "val/loss", "val/ppl"} <= set(
        tags["scalars"]
    )
    logged = train_records(run)
    tb_loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in tb_loss] == [r["step"] for r in logged]
    assert [v for _, v in tb_loss] == pytest.approx([r["train_loss"] for r in logged], rel=1e-6)
    evals = [r for r in read_metrics(run) if r["type"] == "eval"]
    assert [e.value for e in acc.Scalars("val/loss")] == pytest.approx(
        [r["val_loss"] for r in evals], rel=1e-6
    )
    assert "samples/text_summary" in tags["tensors"]  # the samples, as text
    assert not (plain / "tb").exists()  # off unless asked for


def wandb_records(path: Path):
    """Records of a W&B transaction log (.wandb: LevelDB log framing around protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, part, block = path.read_bytes(), 7, b"", 32768  # 7: the ':W&B' header
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 0:
            break
        part = data if kind in (1, 2) else part + data  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            yield rec


def test_wandb_offline_run_logs_the_metrics_and_the_config(observed):
    run, _ = observed
    dirs = list((run / "wandb").glob("offline-run-*"))
    assert len(dirs) == 1  # offline: written locally, nothing sent
    (log,) = dirs[0].glob("run-*.wandb")
    history, config = [], {}
    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            )
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
    logged = train_records(run)
    got = [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert got == [(r["step"], pytest.approx(r["train_loss"], rel=1e-6)) for r in logged]
    evals = [r for r in read_metrics(run) if r["type"] == "eval"]
    assert [h["val/loss"] for h in history if "val/loss" in h] == pytest.approx(
        [r["val_loss"] for r in evals]
    )
    assert config["model"]["n_embd"] == 32 and config["log"]["wandb"] is True
    assert len(list((dirs[0] / "files/media/table").glob("samples_*.table.json"))) == 3


def test_plot_draws_metrics_of_several_runs(observed, tmp_path, capsys):
    run, plain = observed
    fig = plot_runs([run, plain], tmp_path / "curves.png")
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    loss_ax = fig.axes[0]
    labels = [line.get_label() for line in loss_ax.lines]
    assert labels == ["run train", "run val", "plain train", "plain val"]
    for line, r in ((loss_ax.lines[0], run), (loss_ax.lines[2], plain)):
        recs = train_records(r)
        assert list(line.get_xdata()) == [x["tokens"] for x in recs]
        assert list(line.get_ydata()) == [x["train_loss"] for x in recs]
    lr_line = fig.axes[1].lines[0]
    assert list(lr_line.get_ydata()) == [x["lr"] for x in train_records(run)]
    assert main(["plot", str(run), "--out", str(tmp_path / "c.html")]) == 0
    assert "data:image/png;base64," in (tmp_path / "c.html").read_text()
    with pytest.raises(PlotError, match="no metrics"):
        plot_runs([tmp_path], tmp_path / "x.png")


def test_status_of_a_finished_run(observed, capsys):
    run, _ = observed
    s = run_status(run)
    assert s["state"] == "finished" and not s["alive"] and s["step"] == 10 and s["max_steps"] == 10
    assert s["tokens"] == 10 * 4 * 32 and "eta_s" not in s
    evals = [r["val_loss"] for r in read_metrics(run) if r["type"] == "eval"]
    assert s["best_val_loss"] == min(evals)
    assert s["last_checkpoint"].endswith("step_0000010")
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "step         10/10" in out and "best val" in out


def _train_in_child(argv: list[str]) -> None:
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process is killed)
    os._exit(main(argv))


def test_status_of_a_running_then_killed_run(tiny_data, tmp_path):
    run = tmp_path / "live"
    argv = train_args(tiny_data, run, "--train.max_steps=100000", "--eval.at_start=false")
    # a forked child: a real separate process (own pid) that skips re-importing torch
    proc = multiprocessing.get_context("fork").Process(target=_train_in_child, args=(argv,))
    proc.start()
    try:
        deadline = time.time() + 60
        s = None
        while time.time() < deadline:
            if (run / "status.json").is_file():
                s = run_status(run)
                if s["step"] >= 2:
                    break
            time.sleep(0.1)
        assert s is not None and s["state"] == "running" and s["alive"]
        assert s["eta_s"] > 0 and s["last_loss"] is not None
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no chance to write an end state
        proc.join(timeout=30)
    s = run_status(run)
    assert s["state"] == "dead" and not s["alive"] and "eta_s" not in s


def test_status_of_a_path_that_is_no_run_is_one_line(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_doctor_reports_torch_and_devices(capsys):
    assert main(["doctor", "--run-dir", "."]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and "free disk" in out and "tensorboard" in out and "bf16" in out
