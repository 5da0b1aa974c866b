"""`lmforge bench`: lmforge and the HF twin train the same model on the same batches."""

from __future__ import annotations

import pytest

from lmforge.bench import bench_training
from lmforge.cli import main
from lmforge.model import ModelConfig

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, context_len=16, seq_len=16, vocab_size=256)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_twin_trains_identically(family):
    cfg = ModelConfig(family=family, **SHAPE)
    ours, hf = bench_training(cfg, batch=2, steps=3, warmup=1, device="cpu", precision="fp32")
    assert (ours.name, hf.name) == ("lmforge", "hf")
    # Same weights, batches and optimizer: the two loss curves agree step by step.
    assert ours.losses == pytest.approx(hf.losses, abs=1e-4)
    assert len(ours.losses) == 4
    assert ours.tokens_per_s > 0 and hf.tokens_per_s > 0


def test_bench_command_prints_table(capsys):
    args = ["bench", "--steps", "1", "--warmup", "1", "--batch", "2", "--device", "cpu"]
    args += [f"--model.{k}={v}" for k, v in SHAPE.items()]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "lmforge" in out and "hf" in out and "tokens/s" in out
    assert "first-step loss difference vs hf: 0.00e+00" in out
    assert "mean loss of the last 2 steps" in out and "(0.00% apart)" in out


def test_bench_rejects_unknown_comparison(capsys):
    assert main(["bench", "--compare", "vllm", "--steps", "1"]) == 2
    assert "--compare 'vllm'" in capsys.readouterr().err
