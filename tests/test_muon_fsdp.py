"""Muon under FSDP2: two gloo processes (torchrun) shard every matrix by rows, and the orthogonalisation
must still see whole matrices. A negative control skips it on one rank's rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmforge.checkpoint import read_metrics
from lmforge.cli import EXIT_PREEMPTED, main
from lmforge.train.dist_checkpoint import _safe_reader

from .conftest import TINY_MODEL

FLAGS = [
    *TINY_MODEL,
    "--model.seq_len=32",
    "--train.max_steps=5",
    "--eval.every=0",
    "--eval.batches=2",
    "--eval.at_start=false",
    "--log.every=1",
    "--log.progress=false",
    "--checkpoint.every=0",
    "--train.global_batch_size=4",
    "--train.micro_batch_size=1",
    "--train.device=cpu",
    # fp32: FSDP2's bf16 policy and autocast round at different points; compared in fp32 they agree to
    # the order in which the gradient reduction sums (~1e-7), well inside the 1e-5 the check allows.
    "--train.precision=fp32",
    "--train.optimizer=muon",
    "--train.muon_lr=0.05",
    "--train.lr=3e-3",
    "--train.warmup_steps=1",
]

# Runs `lmforge` in each torchrun process; on the rank named by SKIP_ORTHO_RANK the orthogonalisation
# returns the update as it is, so that rank's rows of every matrix get a plain momentum step.
LAUNCHER = """
import os, sys
from lmforge.train import muon
if os.environ.get("RANK") == os.environ.get("SKIP_ORTHO_RANK"):
    muon.orthogonalize = lambda update, steps, dtype: update.to(dtype)
from lmforge.cli import EXIT_PREEMPTED, main
from lmforge.train.dist_checkpoint import _safe_reader
sys.exit(main(sys.argv[1:]))
"""


def curve(run):
    """Train losses of every step, then the val loss after the last update."""
    records = read_metrics(run)
    return [r["train_loss"] for r in records if r["type"] == "train"] + [
        r["val_loss"] for r in records if r["type"] == "eval"
    ]


def fsdp_two_processes(tiny_data, run, launcher, skip_rank=""):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_TEST_SIGNAL")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SKIP_ORTHO_RANK": skip_rank})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(launcher)]
    cmd += ["train", "--data", str(tiny_data), "--out", str(run), *FLAGS, "--train.parallel=fsdp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accum 2, world 2" in proc.stdout
    return curve(run)


@pytest.mark.timeout(600)
def test_fsdp2_muon_on_two_processes_matches_one_process(tiny_data, tmp_path):
    ref = tmp_path / "one"
    assert main(["train", "--data", str(tiny_data), "--out", str(ref), *FLAGS]) == 0  # 1 x 4 accumulation
    expected = curve(ref)
    assert len(expected) == 6

    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    sharded = fsdp_two_processes(tiny_data, tmp_path / "fsdp", launcher)
    assert sharded == pytest.approx(expected, abs=1e-5)

    # Negative control: rank 1's rows skip the orthogonalisation. The first loss comes before any update;
    # every later one must leave the tolerance, or the comparison above could not tell.
    skipped = fsdp_two_processes(tiny_data, tmp_path / "skip", launcher, skip_rank="1")
    assert skipped[0] == pytest.approx(expected[0], abs=1e-5)
    assert all(abs(a - b) > 1e-4 for a, b in zip(skipped[2:], expected[2:], strict=True))


def test_fsdp2_muon_sharded_checkpoint_resumes_bit_exact(tiny_data, tmp_path, monkeypatch):
    # One process: the sharded (DCP) checkpoint holds Muon's momentum buffers as DTensors next to AdamW's
    # moments, and a resume continues with the same losses, bit for bit.
    flags = ["--train.parallel=fsdp", "--train.micro_batch_size=2"]
    straight = tmp_path / "straight"
    assert main(["train", "--data", str(tiny_data), "--out", str(straight), *FLAGS, *flags]) == 0
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--out", str(run), *FLAGS, *flags]
    monkeypatch.setenv("LMFORGE_TEST_SIGNAL_AT", "SIGTERM@3")
    assert main(args) == EXIT_PREEMPTED
    monkeypatch.delenv("LMFORGE_TEST_SIGNAL_AT")
    saved = json.loads((run / "checkpoints" / "step_0000003" / "meta.json").read_text())
    assert [g["muon"] for g in saved["optimizer_groups"]] == [False, False, True]
    stored = _safe_reader(run / "checkpoints" / "step_0000003").read_metadata().state_dict_metadata
    assert sum(k.endswith("momentum_buffer") for k in stored) == 8  # 4 matrices in each of 2 blocks
    assert main(args) == 0
    assert curve(run) == curve(straight)
