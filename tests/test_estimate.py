"""The planner against reality: parameter counts of built models, measured CPU peaks, and auto micro-batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from lmforge.checkpoint import read_metrics
from lmforge.cli import main
from lmforge.config import Config, TrainConfig
from lmforge.device import autocast
from lmforge.estimate import (
    EstimateError,
    Setting,
    estimate,
    find_device,
    measure_step_peak,
    memory_breakdown,
)
from lmforge.model import GPT, ModelConfig, count_params
from lmforge.train.autobatch import OutOfMemory, oom_guard
from lmforge.train.parallel import apply_activation_checkpointing

from .conftest import FAST, TINY_MODEL

MODELS = [
    dict(family="gpt2", n_layer=2, n_head=4, n_embd=64, context_len=128, vocab_size=320),
    dict(family="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context_len=128, vocab_size=300),
    dict(family="llama", n_layer=3, n_head=4, n_embd=48, context_len=64, vocab_size=1000, qk_norm=True),
    dict(family="gpt2", n_layer=2, n_head=2, n_embd=32, context_len=64, vocab_size=257, tie_embeddings=False),
]


@pytest.mark.parametrize("kw", MODELS)
def test_parameter_count_equals_the_built_model(kw):
    cfg = Config(model=ModelConfig(**kw))
    assert estimate(cfg).params["total"] == count_params(GPT(cfg.model))


def _measure(
    model_kw: dict, batch: int, seq: int, full_checkpointing: bool = False, precision: str = "fp32"
) -> tuple[int, int]:
    """(measured peak of one forward/backward on CPU, the estimate of the same) in bytes.

    What a step adds to the weights already in memory: gradients, activations, logits and, under 16-bit
    autocast, the 16-bit weight copies.
    """
    torch.manual_seed(0)
    m = ModelConfig(**model_kw).resolved()
    model = GPT(m)
    if full_checkpointing:  # the training loop's own checkpointing: keep block inputs, recompute the rest
        apply_activation_checkpointing(model, "full", 1)
    x = torch.randint(0, m.vocab_size, (batch, seq))
    y = torch.randint(0, m.vocab_size, (batch, seq))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        measured = measure_step_peak(model, x, y)
    s = Setting(batch, seq, precision=precision, checkpointing="full" if full_checkpointing else "none")
    mem = memory_breakdown(m, s, "cpu")
    fp32_weights = 4 * count_params(model)
    return measured, mem["weights"] - fp32_weights + mem["gradients"] + mem["activations"] + mem["logits"]


@pytest.mark.parametrize(
    "kw,precision",
    [(MODELS[0], "fp32"), (MODELS[1], "fp32"), (MODELS[0], "bf16")],
    ids=["gpt2", "llama-gqa", "gpt2-bf16"],
)
def test_step_memory_is_within_25_percent_of_the_measured_cpu_peak(kw, precision):
    measured, estimated = _measure(kw, batch=8, seq=128, precision=precision)
    assert abs(estimated - measured) / measured < 0.25, (estimated, measured)
    # negative control: the check tells batch sizes apart (an estimate for twice the batch is far off)
    _, doubled = _measure(kw, batch=16, seq=128, precision=precision)
    assert abs(doubled - measured) / measured > 0.5


def test_checkpointed_activations_are_within_25_percent_of_the_measured_cpu_peak():
    # (the estimate counts all gradients; at this peak, early in backward, most do not exist yet: the
    # estimate errs high by about the gradients' size, so activations must dominate for a fair check)
    kw = dict(family="gpt2", n_layer=6, n_head=4, n_embd=64, context_len=256, vocab_size=64)
    measured, estimated = _measure(kw, batch=8, seq=256, full_checkpointing=True)
    assert abs(estimated - measured) / measured < 0.25, (estimated, measured)
    plain, _ = _measure(kw, batch=8, seq=256)
    assert plain > 2 * measured  # checkpointing really saves memory here, so the comparison means something


def test_bigger_presets_show_a_setting_that_fits_a_24gb_gpu(capsys):
    for preset in ("pile-1.4b", "xl-1.5b"):
        cfg = Config(preset=preset, model=ModelConfig(**_preset(preset)))
        est = estimate(cfg)
        row = next(r for r in est.table if r["device"] == "RTX 4090 24GB")
        assert row["setting"] is not None, row["change"]
        fixed = row["setting"]
        assert sum(memory_breakdown(est.model, fixed).values()) <= 24 * 1024**3
        assert fixed.gpus == 1  # fits one card, not only a cluster of them
    assert main(["estimate", "--config", "configs/xl-1.5b.yaml"]) == 0
    out = capsys.readouterr().out
    assert "| RTX 4090 24GB |" in out and "8-bit AdamW" in out and "Chinchilla" in out
    assert "assumed MFU of 40%" in out


def _preset(name):
    from lmforge.presets import get_preset

    return get_preset(name)


def test_settings_another_feature_adds_are_read_when_present():
    cfg = Config(model=ModelConfig(**MODELS[0]))
    base = estimate(cfg)
    train = TrainConfig()
    object.__setattr__(train, "activation_checkpointing", "full")
    object.__setattr__(train, "optimizer", "adamw8bit")
    ck = estimate(dataclasses.replace(cfg, train=train))
    assert ck.memory["activations"] < base.memory["activations"]
    assert ck.memory["optimizer"] == base.memory["optimizer"] // 4
    assert "adamw8bit" in ck.setting.describe() and "checkpointing full" in ck.setting.describe()


def test_unknown_gpu_and_missing_vocab_are_one_line_errors(capsys):
    assert find_device("a100-80").name == "A100 80GB"
    with pytest.raises(EstimateError, match="not in the device table"):
        find_device("tpu")
    assert main(["estimate", "--model.n_layer=2"]) == 2
    assert "model.vocab_size is not set" in capsys.readouterr().err


def _auto_args(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), *TINY_MODEL, *FAST, *extra]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_auto_micro_batch_fits_a_simulated_limit_and_keeps_the_global_batch(
    precision, tiny_data, tmp_path, monkeypatch, capsys
):
    m = ModelConfig(
        **dict(n_layer=2, n_head=4, n_embd=32, context_len=64, seq_len=64, vocab_size=320)
    ).resolved()

    # A limit halfway between what micro-batch 4 and 8 need, measured the way the trial measures
    # (weights + the step's peak in this precision + AdamW's state), so the answer is 4 on any CPU:
    # the peaks themselves depend on the machine's kernels (bf16 autocast keeps extra casted copies).
    torch.manual_seed(0)
    model = GPT(m)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def need(b: int) -> int:
        x = torch.randint(0, 320, (b, 64))
        with autocast(torch.device("cpu"), precision):
            peak = measure_step_peak(model, x, x)
        model.zero_grad(set_to_none=True)
        return weights + peak + 8 * count_params(model)

    limit = (need(4) + need(8)) // 2
    monkeypatch.setenv("LMFORGE_MEMORY_LIMIT", str(limit))
    run = tmp_path / "run"
    args = _auto_args(
        tiny_data,
        run,
        "--model.seq_len=64",
        "--train.micro_batch_size=auto",
        "--train.global_batch_size=16",
        f"--train.precision={precision}",
    )
    assert main([*args, "--train.max_steps=2", "--eval.every=0"]) == 0
    out = capsys.readouterr().out
    assert "train.micro_batch_size=auto -> 4 by trial" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["micro_batch_size"] == 4 and saved["train"]["global_batch_size"] == 16
    steps = [r for r in read_metrics(run) if r["type"] == "train"]
    assert steps[-1]["tokens"] == 2 * 16 * 64  # the global batch is kept: 4 micro-batches of 4

    # a limit below what one sequence needs: one line, exit 2, nothing trained
    monkeypatch.setenv("LMFORGE_MEMORY_LIMIT", "100K")
    assert main([*args[:4], str(tmp_path / "none"), *args[5:], "--train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "even a micro-batch of 1 does not fit" in err and "Traceback" not in err


def test_out_of_memory_mid_run_is_one_line_quoting_the_estimate():
    cfg = Config(model=ModelConfig(**MODELS[0]))
    with pytest.raises(OutOfMemory) as info, oom_guard(cfg, 8, "fp32", torch.device("cpu"), 1):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    msg = str(info.value)
    assert "\n" not in msg and "micro-batch 8" in msg and "the estimate is" in msg and "auto" in msg
    with pytest.raises(ValueError), oom_guard(cfg, 8, "fp32", torch.device("cpu"), 1):
        raise ValueError("other errors pass through")


def test_dry_run_prints_the_estimate_with_auto_resolved(tiny_data, tmp_path, capsys):
    run = tmp_path / "dry"
    args = _auto_args(
        tiny_data, run, "--train.micro_batch_size=auto", "--train.global_batch_size=8", "--dry-run"
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train.micro_batch_size=auto -> 8 by the estimate" in out  # a dry run tries nothing
    assert "| RTX 4090 24GB |" in out and "activations without / with full checkpointing" in out
    assert not run.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_step_memory_is_within_25_percent_of_the_measured_cuda_peak(family):
    # big enough that activations, not cuBLAS workspaces (tens of MB on recent GPUs), dominate the peak
    device = torch.device("cuda")
    m = ModelConfig(
        family=family, n_layer=4, n_head=8, n_embd=512, context_len=512, vocab_size=8000
    ).resolved()
    model = GPT(m).to(device)
    x = torch.randint(0, m.vocab_size, (16, 512), device=device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, x)
    loss.backward()
    measured = torch.cuda.max_memory_allocated(device) - base
    mem = memory_breakdown(m, Setting(16, 512, precision="bf16"), "cuda")
    estimated = (
        mem["weights"] - 4 * count_params(model) + mem["gradients"] + mem["activations"] + mem["logits"]
    )
    assert abs(estimated - measured) / measured < 0.25, (estimated, measured)
