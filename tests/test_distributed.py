"""Two CPU processes (torchrun, gloo) train exactly like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmforge.checkpoint import read_metrics
from lmforge.cli import main

from .conftest import TINY_MODEL

COMMON = [
    *TINY_MODEL,
    "--model.seq_len=32",
    "--train.max_steps=4",
    "--eval.every=0",
    "--eval.batches=2",
    "--log.every=1",
    "--log.progress=false",
    "--train.global_batch_size=4",
    "--train.device=cpu",
]


def losses(run):
    return [r["train_loss"] for r in read_metrics(run) if r["type"] == "train"]


@pytest.mark.timeout(180)
def test_ddp_two_processes_match_one_process(tiny_data, tmp_path):
    one = tmp_path / "one"
    assert (
        main(["train", "--data", str(tiny_data), "--out", str(one), "--train.micro_batch_size=4", *COMMON])
        == 0
    )

    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "lmforge",
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(two),
        "--train.micro_batch_size=2",
        *COMMON,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # micro-batch 2 x 2 ranks sees the same 4 windows per step as micro-batch 4 on one process
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    assert len(losses(two)) == 4
    # rank 0 alone wrote the run directory
    assert (two / "checkpoints" / "step_0000004" / "model.safetensors").is_file()
