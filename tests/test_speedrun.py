"""The speedrun configs: the tiny one is tiny.yaml's size class, the 124M one trains on a CPU at a reduced
width and its estimate fits a 24 GB GPU."""

from __future__ import annotations

import json
import math
import re

import yaml

from lmforge.checkpoint import read_metrics
from lmforge.cli import main
from lmforge.model import ModelConfig, param_breakdown
from lmforge.presets import get_preset

SMALL = [
    "--model.n_layer=2",
    "--model.n_head=4",
    "--model.n_kv_head=2",
    "--model.n_embd=32",
    "--model.context_len=64",
    "--model.seq_len=32",
    "--train.micro_batch_size=2",
    "--train.global_batch_size=4",
    "--train.compile=false",
    "--train.device=cpu",
    "--train.precision=fp32",
    "--eval.batches=1",
    "--log.every=1",
    "--log.progress=false",
]


def config(name):
    return yaml.safe_load(open(f"configs/{name}.yaml", encoding="utf-8"))


def params(d):
    return param_breakdown(ModelConfig(**{**get_preset(d["preset"]), **(d.get("model") or {})}))["total"]


def test_the_tiny_speedrun_is_tiny_yaml_s_size_class_with_muon_and_wsd():
    speedrun, tiny = config("speedrun-tiny"), config("tiny")
    assert abs(params(speedrun) / params(tiny) - 1) < 0.1
    assert speedrun["train"]["optimizer"] == "muon" and speedrun["train"]["schedule"] == "wsd"
    # the same validation windows as tiny.yaml's evaluations (batches x micro-batch)
    assert (
        speedrun["eval"]["batches"] * speedrun["train"]["micro_batch_size"]
        == tiny["eval"]["batches"] * tiny["train"]["micro_batch_size"]
    )


def test_the_124m_speedrun_trains_its_first_20_steps_on_a_cpu_at_a_reduced_width(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", "configs/speedrun-124m.yaml", "--data", str(tiny_data), "--out", str(run)]
    assert main([*args, *SMALL, "--train.max_steps=20", "--eval.every=0"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["optimizer"] == "muon" and saved["train"]["schedule"] == "wsd"
    assert saved["model"]["n_embd"] == 32 and saved["model"]["family"] == "llama"
    losses = [r["train_loss"] for r in read_metrics(run) if r["type"] == "train"]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
    meta = json.loads((run / "checkpoints" / "step_0000020" / "meta.json").read_text())
    assert [g["muon"] for g in meta["optimizer_groups"]] == [False, False, True]


def test_the_124m_speedrun_fits_a_24gb_gpu_by_the_estimate(tiny_data, tmp_path, capsys):
    assert main(["estimate", "--config", "configs/speedrun-124m.yaml", "--gpu", "4090"]) == 0
    out = capsys.readouterr().out
    assert "bf16, muon, ddp x1" in out  # the estimate counted Muon's state, not AdamW's
    row = re.search(r"\| RTX 4090 24GB \| 24 GiB \| fits \(([\d.]+) GiB\) \| fits as configured \|", out)
    assert row and float(row.group(1)) <= 24
    total = float(re.search(r"\*\*total\*\* \| \*\*([\d.]+) GiB\*\*", out).group(1))
    assert total == float(row.group(1))
    # --dry-run prints the same plan (here for the test data's small vocabulary) and trains nothing
    run = tmp_path / "run"
    dry = ["train", "--config", "configs/speedrun-124m.yaml", "--data", str(tiny_data), "--out", str(run)]
    assert main([*dry, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "optimizer: muon" in out and ", muon, ddp x1" in out and "| RTX 4090 24GB | 24 GiB | fits" in out
    assert not run.exists()
