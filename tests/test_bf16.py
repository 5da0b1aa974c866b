"""The bf16-on-CPU path, whatever this CPU has: LMFORGE_CPU_BF16 picks it, training runs in it, evaluation
stays fp32 (so a run's val_loss equals `lmforge eval`'s loss), and resume is bit-exact in it."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge import device as dev
from lmforge.checkpoint import read_metrics
from lmforge.cli import EXIT_PREEMPTED, main

from .conftest import FAST, TINY_MODEL


@pytest.mark.parametrize("value, expected", [("1", "bf16"), ("0", "fp32")])
def test_the_switch_overrides_the_cpu_detection(monkeypatch, value, expected):
    monkeypatch.setenv("LMFORGE_CPU_BF16", value)
    assert dev.pick_precision("auto", torch.device("cpu")) == expected
    assert dev.pick_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit precision always wins


def test_a_bad_switch_value_is_one_line(monkeypatch, tiny_data, tmp_path, capsys):
    monkeypatch.setenv("LMFORGE_CPU_BF16", "yes")
    with pytest.raises(dev.DeviceError, match="LMFORGE_CPU_BF16='yes': must be 1"):
        dev.cpu_has_native_bf16()
    assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--train.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "LMFORGE_CPU_BF16" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "machine, line, expected",
    [
        ("x86_64", "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile", True),
        ("x86_64", "flags\t\t: fpu sse2 avx2 avx512f", False),
        ("aarch64", "Features\t: fp asimd evtstrm aes sha1 sve bf16 i8mm", True),
        ("aarch64", "Features\t: fp asimd evtstrm aes sha1", False),
        ("aarch64", "Features\t: fp asimd svebf16", False),  # a longer word that contains bf16 is not it
    ],
)
def test_cpuinfo_flags_on_x86_and_arm(monkeypatch, tmp_path, machine, line, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\n{line}\n\nprocessor\t: 1\n{line}\n")
    monkeypatch.setattr(dev.platform, "machine", lambda: machine)
    monkeypatch.setattr(dev.platform, "system", lambda: "Linux")
    real = dev._cpuinfo_words
    monkeypatch.setattr(dev, "_cpuinfo_words", lambda path=str(info): real(path))
    dev._detected_native_bf16.cache_clear()
    try:
        assert dev._detected_native_bf16() is expected
    finally:
        dev._detected_native_bf16.cache_clear()
    assert dev._cpuinfo_words(str(tmp_path / "missing")) == set()  # unreadable: no native bf16 claimed


def _train(data, out, *extra):
    args = ["train", "--data", str(data), "--out", str(out), *TINY_MODEL, *FAST, "--train.device=cpu"]
    return main([*args, "--train.lr=3e-3", "--train.warmup_steps=2", *extra])


def test_a_bf16_run_evaluates_in_fp32_and_eval_agrees(tiny_data, tmp_path):
    run = tmp_path / "bf16"
    assert _train(tiny_data, run, "--train.precision=bf16", "--train.max_steps=8", "--eval.every=0") == 0
    evals = [r for r in read_metrics(run) if r["type"] == "eval"]
    assert [r["precision"] for r in evals] == ["fp32", "fp32"]  # at the start and the end
    trains = [r["train_loss"] for r in read_metrics(run) if r["type"] == "train"]
    assert trains[-1] < trains[0]  # bf16 training learns
    meta = json.loads(next((run / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["precision"] == "bf16"
    # `lmforge eval` scores the same windows (batches x batch size) in fp32 on the same weights
    out = tmp_path / "eval.json"
    args = ["eval", "--run", str(run), "--batches", "2", "--batch-size", "4", "--no-speed", "--out", str(out)]
    assert main([*args, "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["lm"]["loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-6)


def test_bf16_resume_is_bit_exact(tiny_data, tmp_path, monkeypatch):
    """Both sides run the same bf16 arithmetic, so a stopped-and-resumed run equals a straight one."""
    flags = ["--train.precision=bf16", "--eval.every=0", "--eval.at_start=false", "--train.max_steps=6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(tiny_data, straight, *flags) == 0
    monkeypatch.setenv("LMFORGE_TEST_SIGNAL_AT", "SIGTERM@3")  # stops after step 3 with a checkpoint
    assert _train(tiny_data, resumed, *flags) == EXIT_PREEMPTED
    monkeypatch.delenv("LMFORGE_TEST_SIGNAL_AT")
    assert _train(tiny_data, resumed, *flags) == 0

    def losses(run):
        return [r["train_loss"] for r in read_metrics(run) if r["type"] == "train"]

    assert losses(resumed) == losses(straight)  # bitwise: no tolerance
    assert len(losses(straight)) == 6
