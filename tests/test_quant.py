"""Int8 weight-only quantization: storage really int8, logits close to fp32, bits per byte barely move."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn as nn

from lmforge.checkpoint import load_model
from lmforge.cli import main
from lmforge.eval.metrics import score_tokens, summarize_scores
from lmforge.generate.quant import Int8Linear, pick_kernel, quantize_int8, quantize_weight, weight_bytes
from lmforge.model import GPT, ModelConfig


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of the shared trained run, so that eval.json written by one test is not seen by another."""
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def test_weights_round_to_int8_per_output_channel():
    torch.manual_seed(0)
    w = torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitude
    w[5] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (48,)
    assert q.abs().max() <= 127 and (q.abs().amax(1)[torch.arange(48) != 5] == 127).all()
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()  # round to nearest: at most half a step per row
    assert (q[5] == 0).all()


def test_storage_is_int8_and_a_quarter_of_the_linear_bytes():
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, context_len=32, tie_embeddings=False)
    )
    linears = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = weight_bytes(model)
    assert quantize_int8(model, kernel="dequant") is model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    for name, numel in linears.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Int8Linear) and layer.weight_int8.dtype == torch.int8
        assert layer.weight_int8.numel() == numel and layer.weight_int8.element_size() == 1
    state = model.state_dict()
    assert not any(
        k.endswith(".weight") and v.dim() == 2 and v.dtype == torch.float32
        for k, v in state.items()
        if not k.startswith(("wte", "wpe"))
    )
    n_linear = sum(linears.values())
    scales = sum(model.get_submodule(n).scale.numel() for n in linears)
    # every linear weight went from 4 bytes to 1, plus one fp32 scale per output row
    assert before - weight_bytes(model) == 3 * n_linear - 4 * scales


@pytest.mark.parametrize("kernel", ["dequant", "int8pack"])
def test_kernels_agree_with_the_dequantized_product(kernel):
    if kernel == "int8pack" and not hasattr(torch, "_weight_int8pack_mm"):
        pytest.skip("this torch has no _weight_int8pack_mm")
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    x = torch.randn(3, 5, 64)
    q, scale = quantize_weight(linear.weight)
    want = x @ (q.float() * scale[:, None]).T + linear.bias
    got = Int8Linear(linear, kernel)(x)
    assert got.shape == (3, 5, 96) and torch.allclose(got, want, atol=1e-4)
    assert (want - linear(x)).abs().max() > 1e-5  # negative control: quantization did change the weights


def test_auto_kernel_is_a_timed_candidate():
    kernel, times = pick_kernel(nn.Linear(64, 128))
    assert kernel in times and times[kernel] == min(times.values()) and "dequant" in times
    model = quantize_int8(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, context_len=16)))
    assert model.quant_info["kernel"] in ("dequant", "int8pack")
    with pytest.raises(ValueError, match="kernel='int3'"):
        quantize_int8(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, context_len=16)), "int3")


def test_quantized_logits_and_bpb_stay_close(run, tiny_data):
    model, cfg, _ = load_model(run)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
    meta = json.loads((tiny_data / "meta.json").read_text())
    from lmforge.data import TokenShards

    val = torch.from_numpy(TokenShards(tiny_data, "val").read(0, 257))
    n_bytes = 256 * meta["val_bytes_per_token"]
    bpb_fp = summarize_scores(score_tokens(model, val, 32), n_bytes)["bpb"]

    quantize_int8(model)
    with torch.no_grad():
        got = model(ids)
    tol = 0.02 * ref.std().item()
    assert (got - ref).abs().max().item() < 5 * tol and (got - ref).abs().mean().item() < tol
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    bpb_int8 = summarize_scores(score_tokens(model, val, 32), n_bytes)["bpb"]
    assert abs(bpb_int8 - bpb_fp) < 0.005 * bpb_fp

    # Negative control: the same tolerance rejects a coarser grid (int4-like: 15 levels per sign).
    coarse, _, _ = load_model(run)
    with torch.no_grad():
        for m in coarse.modules():
            if isinstance(m, nn.Linear):
                step = m.weight.abs().amax(1, keepdim=True) / 7
                m.weight.copy_(torch.round(m.weight / step) * step)
        bad = coarse(ids)
    assert (bad - ref).abs().mean().item() > tol


def test_cli_eval_quantize_reports_speedup_and_bpb_change(run, tmp_path):
    out = tmp_path / "q.json"
    args = ["eval", "--run", str(run), "--quantize", "int8", "--batches", "2", "--batch-size", "4"]
    assert main([*args, "--max-new-tokens", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    q = report["quantization"]
    assert q["method"] == "int8-weight-only" and q["kernel"] in ("dequant", "int8pack")
    assert q["bpb_int8"] == report["lm"]["bpb"] and q["bpb_change"] == pytest.approx(
        q["bpb_int8"] - q["bpb_fp"]
    )
    assert abs(q["bpb_change"]) < 0.01 and q["weight_mb_int8"] < q["weight_mb_fp"]
    for key in ("prefill_speedup", "decode_speedup"):
        assert q[key] > 0
    assert q["decode_speedup"] == pytest.approx(report["speed"]["decode_tok_s"] / q["decode_tok_s_fp"])
