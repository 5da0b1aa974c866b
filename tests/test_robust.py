"""What a run directory guarantees: preemption, exact resume, corrupt checkpoints, guards, disk errors."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge import checkpoint as ckpt_io
from lmforge.checkpoint import latest_checkpoint, list_checkpoints, read_metrics, verify_checkpoint
from lmforge.cli import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USAGE, main
from lmforge.model import GPT

from .conftest import FAST, TINY_MODEL

# The 40-step run every preemption test is compared with; dropout makes the RNG state matter.
RUN40 = ["--train.max_steps=40", "--eval.every=10", "--checkpoint.every=20", "--model.dropout=0.1"]
SRC = str(Path(lmforge.__file__).resolve().parents[1])


def train_args(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), *TINY_MODEL, *FAST, *extra]


def losses(run):
    return [(r["step"], r["train_loss"]) for r in read_metrics(run) if r["type"] == "train"]


def evals(run):
    return [(r["step"], r["val_loss"]) for r in read_metrics(run) if r["type"] == "eval"]


def weights(ckpt):
    return load_file(str(Path(ckpt) / "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def spawn(data, out, *extra, env_extra=None):
    """`python -m lmforge train ...` in a real subprocess (single-threaded, like the in-process runs)."""
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_TEST_SIGNAL_AT"}
    env.update({"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env_extra or {})})
    cmd = [sys.executable, "-m", "lmforge", *train_args(data, out, *extra)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def main_one_thread(argv) -> int:
    # Module fixtures run before conftest's autouse (function) fixture sets one thread; results must
    # come from the same thread count as the runs they are compared with.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def straight40(tiny_data, tmp_path_factory):
    """An uninterrupted 40-step run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main_one_thread(train_args(tiny_data, run, *RUN40)) == 0
    return run


def assert_same_as_straight(run, straight):
    assert [s for s, _ in losses(run)] == list(range(1, 41))
    assert losses(run) == losses(straight)  # exact float equality, step for step
    assert evals(run) == evals(straight)
    assert same_weights(run / "checkpoints/step_0000040", straight / "checkpoints/step_0000040")


# --- 1. signals ---------------------------------------------------------------------------------


def test_sigterm_from_outside_saves_then_resume_is_bit_exact(tiny_data, tmp_path, straight40):
    run = tmp_path / "run"
    proc = spawn(tiny_data, run, *RUN40)
    deadline = time.time() + 120
    while not any(r["type"] == "train" and r["step"] >= 3 for r in read_metrics(run)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # the real signal, as a scheduler sends it
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    stopped = latest_checkpoint(run)
    step = verify_checkpoint(stopped)["step"]
    assert 3 <= step < 40 and "received SIGTERM" in out
    assert max(s for s, _ in losses(run)) == step  # stopped at a step boundary, and saved that step

    assert main(train_args(tiny_data, run, *RUN40)) == 0
    assert_same_as_straight(run, straight40)


@pytest.mark.parametrize("when", ["SIGINT@17", "SIGUSR1@eval:20"])
def test_sigint_or_signal_during_eval_saves_then_resume_is_bit_exact(tiny_data, tmp_path, straight40, when):
    run = tmp_path / "run"
    proc = spawn(tiny_data, run, *RUN40, env_extra={"LMFORGE_TEST_SIGNAL_AT": when})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    step = int(when.rpartition(":")[2].rpartition("@")[2])
    assert latest_checkpoint(run).name == f"step_{step:07d}"
    if "eval" in when:  # the evaluation that was running finished and was logged once
        assert evals(run)[-1][0] == 20

    assert main(train_args(tiny_data, run, *RUN40)) == 0
    assert_same_as_straight(run, straight40)


def test_output_that_nobody_reads_any_more_stops_the_run_with_a_checkpoint(tiny_data, tmp_path):
    """`lmforge train ... | head`: once head has its lines, the run saves and stops as on a hang-up (it
    exited 1 at its next line, with nothing saved since the last checkpoint)."""
    run = tmp_path / "run"
    proc = spawn(tiny_data, run, "--train.max_steps=400", "--log.every=1", "--checkpoint.every=1000")
    while not proc.stdout.readline().startswith("step 2/"):  # head has its lines once training has begun
        assert proc.poll() is None
    proc.stdout.close()  # the reader is gone
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, err[-3000:]
    step = verify_checkpoint(latest_checkpoint(run))["step"]
    assert 0 < step < 400 and max(s for s, _ in losses(run)) == step and "Traceback" not in err
    # a closed terminal (SIGHUP, as an ssh session that drops sends) saves and stops too
    hung = spawn(
        tiny_data, tmp_path / "hup", "--train.max_steps=400", "--log.every=1", "--checkpoint.every=1000"
    )
    while not hung.stdout.readline().startswith("step 2/"):
        assert hung.poll() is None
    hung.send_signal(signal.SIGHUP)
    out, err = hung.communicate(timeout=120)
    assert hung.returncode == EXIT_PREEMPTED and "received SIGHUP" in out, err[-3000:]
    assert verify_checkpoint(latest_checkpoint(tmp_path / "hup"))["step"] >= 2


def test_a_finished_run_started_again_does_nothing_and_says_so(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(tiny_data, run, "--train.max_steps=4", "--eval.every=2")
    assert main(args) == 0
    before = evals(run)
    capsys.readouterr()
    assert main(args) == 0
    assert evals(run) == before and [s for s, _ in before] == [0, 2, 4]  # every step's evaluation once
    assert "the run had already trained its 4 steps: nothing to do" in capsys.readouterr().out


def test_previous_signal_handlers_are_restored(tiny_data, tmp_path):
    def mine(signum, frame):
        pass

    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert main(train_args(tiny_data, tmp_path / "run", "--train.max_steps=2")) == 0
        assert all(signal.getsignal(s) is mine for s in before)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_stop_flag_records_the_signal_and_a_second_ctrl_c_stops_at_once():
    from lmforge.train.signals import StopFlag

    with StopFlag() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.name() == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- 2. negative control: the exactness check can fail -------------------------------------------


@pytest.mark.parametrize("skip", ["rng", "loader"])
def test_resume_without_restoring_rng_or_loader_is_not_exact(
    tiny_data, tmp_path, straight40, monkeypatch, skip
):
    run = tmp_path / "run"
    shutil.copytree(straight40, run)
    shutil.rmtree(run / "checkpoints/step_0000040")
    (run / "checkpoints/latest").write_text("step_0000020\n")  # metrics after step 20 are dropped on resume
    if skip == "rng":
        monkeypatch.setattr("lmforge.train.loop.restore_rng", lambda tensors, meta: None)
    else:
        monkeypatch.setattr("lmforge.data.TokenLoader.load_state_dict", lambda self, state: None)
    assert main(train_args(tiny_data, run, *RUN40)) == 0
    assert [s for s, _ in losses(run)] == list(range(1, 41))
    assert losses(run)[:20] == losses(straight40)[:20]
    assert losses(run)[20:] != losses(straight40)[20:]
    assert not same_weights(run / "checkpoints/step_0000040", straight40 / "checkpoints/step_0000040")


# --- 3. corrupt checkpoints ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ckpts(tiny_data, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("two") / "run"
    assert (
        main(train_args(tiny_data, run, "--train.max_steps=4", "--checkpoint.every=2", "--eval.every=0")) == 0
    )
    return run


def corrupt(ckpt: Path, how: str) -> Path:
    target = ckpt / ("meta.json" if how == "meta" else "model.safetensors")
    if how == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif how == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif how in ("empty", "meta"):
        target.write_bytes(b"" if how == "empty" else b'{"step": 4, "files": ')
    elif how == "missing":
        target.unlink()
    return target


@pytest.mark.parametrize("how", ["flip", "truncate", "empty", "missing", "meta"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    tiny_data, tmp_path, two_ckpts, how, capsys
):
    run = tmp_path / "run"
    shutil.copytree(two_ckpts, run)
    bad = corrupt(run / "checkpoints/step_0000004", how)
    capsys.readouterr()
    assert main(train_args(tiny_data, run, "--train.max_steps=5", "--eval.every=0")) == 0
    out = capsys.readouterr().out
    assert f"checkpoint step_0000004 is unusable: {bad}" in out
    assert "falling back to step_0000002" in out and "(step 2," in out
    assert verify_checkpoint(latest_checkpoint(run))["step"] == 5
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5]  # lines after step 2 were rewritten once


def test_no_valid_checkpoint_is_one_clear_line_not_a_fresh_start(tiny_data, tmp_path, two_ckpts, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_ckpts, run)
    corrupt(run / "checkpoints/step_0000004", "flip")
    corrupt(run / "checkpoints/step_0000002", "missing")
    capsys.readouterr()
    assert main(train_args(tiny_data, run, "--train.max_steps=6")) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no valid checkpoint" in err
    assert sorted(p.name for p in list_checkpoints(run)) == ["step_0000002", "step_0000004"]  # nothing new

    for ckpt in list_checkpoints(run):  # the marker says there were checkpoints: still no fresh start
        shutil.rmtree(ckpt)
    assert main(train_args(tiny_data, run, "--train.max_steps=6")) == EXIT_USAGE
    assert "no valid checkpoint" in capsys.readouterr().err


def test_save_killed_midway_resumes_from_previous_and_cleans_up(tiny_data, tmp_path, two_ckpts, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_ckpts, run)
    leftover = run / "checkpoints/.tmp-step_0000006-12345"  # what kill -9 during a save leaves
    shutil.copytree(run / "checkpoints/step_0000004", leftover)
    (leftover / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    assert main(train_args(tiny_data, run, "--train.max_steps=6", "--eval.every=0")) == 0
    assert "(step 4," in capsys.readouterr().out
    assert not leftover.exists()
    assert [p.name for p in list_checkpoints(run)][-1] == "step_0000006"


# --- 4. resume modes --------------------------------------------------------------------------------


def test_resume_never_refuses_a_run_with_checkpoints(tiny_data, tmp_path, two_ckpts, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_ckpts, run)
    capsys.readouterr()
    assert main(train_args(tiny_data, run, "--train.max_steps=6", "--resume=never")) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resume=never" in err
    assert main(train_args(tiny_data, tmp_path / "fresh", "--train.max_steps=1", "--resume=never")) == 0


def test_resume_from_an_explicit_checkpoint_path(tiny_data, tmp_path, two_ckpts, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_ckpts, run)
    capsys.readouterr()
    path = run / "checkpoints/step_0000002"
    assert main(train_args(tiny_data, run, "--train.max_steps=4", "--eval.every=0", f"--resume={path}")) == 0
    assert "(step 2," in capsys.readouterr().out
    assert losses(run) == losses(two_ckpts)  # steps 3 and 4 again, from step 2's state
    assert verify_checkpoint(latest_checkpoint(run))["step"] == 4
    assert main(train_args(tiny_data, run, f"--resume={tmp_path / 'nope'}")) == EXIT_USAGE


# --- 5. best + rotation ------------------------------------------------------------------------------


def test_keep_last_plus_best_and_a_failed_delete_never_stops_training(tiny_data, tmp_path, monkeypatch):
    real_rmtree = shutil.rmtree

    def flaky_rmtree(path, *a, **k):
        if Path(path).name == "step_0000001":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(ckpt_io.shutil, "rmtree", flaky_rmtree)
    run = tmp_path / "run"
    args = ["--train.max_steps=6", "--checkpoint.every=1", "--checkpoint.keep_last=2", "--eval.every=2"]
    with pytest.warns(UserWarning, match="could not delete old checkpoint"):
        assert main(train_args(tiny_data, run, "--train.lr=3e-3", *args)) == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best", "latest", "step_0000001", "step_0000005", "step_0000006"]  # 1: undeletable

    monkeypatch.setattr(ckpt_io.shutil, "rmtree", real_rmtree)
    run2 = tmp_path / "run2"
    assert main(train_args(tiny_data, run2, "--train.lr=3e-3", *args)) == 0
    assert sorted(p.name for p in (run2 / "checkpoints").iterdir()) == [
        "best",
        "latest",
        "step_0000005",
        "step_0000006",
    ]
    best = verify_checkpoint(run2 / "checkpoints/best")
    lowest = min(evals(run2), key=lambda e: e[1])
    assert (best["step"], best["val_loss"]) == lowest
    assert latest_checkpoint(run2).name == "step_0000006"  # best never becomes the resume point


# --- 6. NaN guard ---------------------------------------------------------------------------------------


def poison_forward(monkeypatch, bad_calls):
    """Make training forwards number `bad_calls` (1-based) return a NaN loss."""
    real = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        out = real(self, idx, targets)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", forward)


def test_non_finite_steps_are_skipped_counted_and_persisted(tiny_data, tmp_path, monkeypatch):
    poison_forward(monkeypatch, {3, 4})
    run = tmp_path / "run"
    args = ["--train.max_steps=6", "--checkpoint.every=0", "--eval.every=0"]
    assert main(train_args(tiny_data, run, *args)) == 0
    bad = [r for r in read_metrics(run) if r["type"] == "bad_step"]
    assert [(r["step"], r["bad_steps"], r["consecutive"]) for r in bad] == [(3, 1, 1), (4, 2, 2)]
    meta = verify_checkpoint(latest_checkpoint(run))
    assert meta["guards"]["bad_steps"] == {"total": 2, "consecutive": 0}
    state = load_file(str(latest_checkpoint(run) / "train_state.safetensors"))
    steps = {float(v) for k, v in state.items() if k.endswith("/step")}
    assert steps == {4.0}  # AdamW stepped 4 times in 6 steps: the two bad ones never touched it
    assert all(torch.isfinite(t).all() for t in weights(latest_checkpoint(run)).values())

    monkeypatch.undo()
    assert main(train_args(tiny_data, run, "--train.max_steps=7", "--eval.every=0")) == 0
    assert verify_checkpoint(latest_checkpoint(run))["guards"]["bad_steps"]["total"] == 2  # across resume


def test_too_many_consecutive_bad_steps_stop_with_the_last_good_checkpoint(
    tiny_data, tmp_path, monkeypatch, capsys
):
    poison_forward(monkeypatch, set(range(5, 100)))
    run = tmp_path / "run"
    args = ["--train.max_steps=20", "--checkpoint.every=2", "--eval.every=0", "--train.max_bad_steps=3"]
    assert main(train_args(tiny_data, run, *args)) == EXIT_DIVERGED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged" in err and "max_bad_steps=3" in err
    # bad steps 5, 6, 7: step 6's checkpoint holds weights untouched since step 4
    assert latest_checkpoint(run).name == "step_0000006"
    assert max(s for s, _ in losses(run)) == 7
    assert same_weights(run / "checkpoints/step_0000006", run / "checkpoints/step_0000004")
    verify_checkpoint(latest_checkpoint(run))


# --- 7. early stopping -------------------------------------------------------------------------------------


def test_early_stopping_saves_and_its_state_is_checkpointed(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "--train.max_steps=40",
        "--eval.every=2",
        "--checkpoint.every=0",
        "--train.early_stop_patience=2",
        "--train.early_stop_min_delta=100",  # no evaluation can count as an improvement
    ]
    assert main(train_args(tiny_data, run, *args)) == 0
    assert "early stop at step 4" in capsys.readouterr().out
    meta = verify_checkpoint(latest_checkpoint(run))
    assert meta["step"] == 4 and meta["guards"]["early_stop"]["bad_evals"] == 2
    assert [s for s, _ in evals(run)] == [0, 2, 4]
    # the same command again trains no further
    assert main(train_args(tiny_data, run, *args)) == 0
    assert "early stop at step 4" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(run)] == ["step_0000004"]
    assert max(s for s, _ in losses(run)) == 4


# --- 8. write failures -------------------------------------------------------------------------------------


def test_disk_full_during_save_is_a_clear_error_and_the_previous_checkpoint_survives(
    tiny_data, tmp_path, monkeypatch, capsys
):
    real = ckpt_io.save_file
    calls = {"n": 0}

    def save_file(tensors, path, *a, **k):
        if Path(path).parent.name.startswith(".tmp-step_0000004"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        calls["n"] += 1
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_io, "save_file", save_file)
    run = tmp_path / "run"
    args = ["--train.max_steps=6", "--checkpoint.every=2", "--eval.every=0"]
    capsys.readouterr()
    assert main(train_args(tiny_data, run, *args)) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not write checkpoint" in err and "No space left" in err
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002"]
    assert latest_checkpoint(run).name == "step_0000002"
    verify_checkpoint(latest_checkpoint(run))
    ckpt_io.load_model(run)
    assert not list((run / "checkpoints").glob(".tmp-*"))


# --- 9. security --------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_pickle_in_a_checkpoint_is_never_unpickled(tiny_data, tmp_path, two_ckpts):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    pickle.loads(payload)  # the payload really works...
    assert marker.exists()
    marker.unlink()

    run = tmp_path / "run"
    shutil.copytree(two_ckpts, run)
    ckpt = run / "checkpoints/step_0000004"
    for name in ("model.pt", "optimizer.pt", "pytorch_model.bin"):
        (ckpt / name).write_bytes(payload)
    ckpt_io.load_model(run)  # generation/export path
    assert main(train_args(tiny_data, run, "--train.max_steps=5", "--eval.every=0")) == 0  # resume path
    assert not marker.exists()

    # a checkpoint that only has a pickle is refused, not loaded
    only_pickle = tmp_path / "only" / "checkpoints" / "step_0000001"
    only_pickle.mkdir(parents=True)
    (only_pickle / "model.pt").write_bytes(payload)
    with pytest.raises(ckpt_io.CheckpointError):
        ckpt_io.load_model(only_pickle.parent.parent)
    assert main(train_args(tiny_data, only_pickle.parent.parent, "--train.max_steps=2")) == EXIT_USAGE
    assert not marker.exists()


# --- 10. compatibility ------------------------------------------------------------------------------------


def test_resume_refuses_another_seq_len_or_dataset_and_logs_safe_changes(
    tiny_data, tmp_path, two_ckpts, capsys
):
    run = tmp_path / "run"
    shutil.copytree(two_ckpts, run)
    capsys.readouterr()
    assert main(train_args(tiny_data, run, "--train.max_steps=6", "--model.seq_len=16")) == EXIT_USAGE
    assert "model.seq_len=16 differs from the checkpoint's 32" in capsys.readouterr().err

    other = tmp_path / "other_data"
    shutil.copytree(tiny_data, other)
    meta = json.loads((other / "meta.json").read_text())
    old_fp, meta["fingerprint"] = meta["fingerprint"], "f" * 64
    (other / "meta.json").write_text(json.dumps(meta))
    assert main(train_args(other, run, "--train.max_steps=6")) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "dataset" in err and "ffffffffffff" in err and old_fp[:12] in err

    assert main(train_args(tiny_data, run, "--train.max_steps=6", "--train.lr=1e-3", "--eval.every=0")) == 0
    out = capsys.readouterr().out
    assert "train.lr 0.0006 -> 0.001" in out and "train.max_steps 4 -> 6" in out
    assert not math.isnan(losses(run)[-1][1])
