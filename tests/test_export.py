"""Export (HF, safetensors, ONNX, GGUF) and HF import, checked against lmforge's own forward pass."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.cli import main
from lmforge.config import Config, config_to_dict
from lmforge.data import Tokenizer
from lmforge.export import ExportError, export_run
from lmforge.model import GPT
from lmforge.model.config import ModelConfig

SAMPLE = "the cat sat on the mat while birds sang in green trees"
TINY = dict(n_layer=2, n_embd=32, n_head=4, context_len=64)
VARIANTS = {
    "gpt2": dict(family="gpt2"),
    "gpt2-untied": dict(family="gpt2", tie_embeddings=False),
    "llama-gqa": dict(family="llama", n_kv_head=2, rope_theta=5000.0, norm_eps=1e-6),
    "llama-tied-bias": dict(family="llama", tie_embeddings=True, bias=True),
}


def make_run(root, tiny_data, name="gpt2", **overrides):
    """A run directory holding a tiny random model whose every parameter (norms, biases too) is non-trivial."""
    vocab = Tokenizer.load(tiny_data).vocab_size
    mcfg = ModelConfig(**{**TINY, **VARIANTS.get(name, {}), **overrides, "vocab_size": vocab})
    torch.manual_seed(0)
    model = GPT(mcfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:  # norms at 1 and biases at 0 would hide a swapped or dropped tensor
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "ln" in pname or "norm" in pname else 0.0))
    cfg = Config(model=mcfg, out=str(root / name))
    run = root / name
    run.mkdir(parents=True)
    shutil.copyfile(tiny_data / "tokenizer.json", run / "tokenizer.json")
    sd = {
        k: v
        for k, v in model.state_dict().items()
        if not (cfg.model.tie_embeddings and k == "lm_head.weight")
    }
    save_checkpoint(run, 1, sd, {}, {"config": config_to_dict(cfg), "tokens": 0})
    return run


def inputs(vocab, shape=(2, 12), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy(forward, idx, n):
    for _ in range(n):
        nxt = forward(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hf_export_matches_lmforge_logits_generation_and_tokens(tiny_data, tmp_path, name):
    transformers = pytest.importorskip("transformers")
    run = make_run(tmp_path, tiny_data, name)
    out = tmp_path / "hf"
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(out)]) == 0
    model, cfg, _ = load_model(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected_cls = "GPT2LMHeadModel" if cfg.model.family == "gpt2" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_cls

    idx = inputs(cfg.model.vocab_size)
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert theirs.shape == ours.shape  # padding rows trimmed: exactly vocab_size columns
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert not torch.allclose(theirs, ours.roll(1, dims=-1), atol=1e-4)  # negative control
    assert torch.equal(greedy(lambda x: hf(x).logits, idx, 8), greedy(model, idx, 8))

    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = Tokenizer.load(run / "tokenizer.json")
    assert tok(SAMPLE)["input_ids"] == ours_tok.encode(SAMPLE)
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.eos_token_id == ours_tok.eos_id
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours_tok.eos_id


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(family="gpt2", norm="rmsnorm"), "matches neither"),
        (dict(family="gpt2", pos_emb="rope"), "matches neither"),
        (dict(family="llama", mlp="gelu"), "matches neither"),
        (dict(family="llama", qk_norm=True), "qk_norm"),
        (dict(family="gpt2", n_kv_head=2), "grouped-query"),
    ],
)
def test_hf_export_refuses_what_transformers_cannot_represent(
    tiny_data, tmp_path, capsys, overrides, message
):
    pytest.importorskip("transformers")
    run = make_run(tmp_path, tiny_data, "custom", **overrides)
    out = tmp_path / "hf"
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("lmforge: error:")
    assert not out.exists()  # nothing half-written


def test_safetensors_export_trims_vocab_and_stores_a_tied_head_once(tiny_data, tmp_path):
    run = make_run(tmp_path, tiny_data, "gpt2")
    out = export_run(run, "safetensors", tmp_path / "st")
    model, cfg, _ = load_model(run)
    tensors = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    assert tensors["wte.weight"].shape == (cfg.model.vocab_size, 32)
    torch.testing.assert_close(
        tensors["wte.weight"], model.wte.weight[: cfg.model.vocab_size], atol=0, rtol=0
    )
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["vocab_size"] == cfg.model.vocab_size and saved["model"]["family"] == "gpt2"
    with pytest.raises(ExportError, match="already exists"):
        export_run(run, "safetensors", out)


@pytest.mark.parametrize(
    "name, overrides", [("gpt2", {}), ("llama-gqa", {}), ("llama-gqa", {"qk_norm": True})]
)
def test_onnx_export_matches_for_two_shapes(tiny_data, tmp_path, name, overrides):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    run = make_run(tmp_path, tiny_data, name, **overrides)
    out = export_run(run, "onnx", tmp_path / "onnx")
    model, cfg, _ = load_model(run)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 5), (3, 17)):
        idx = inputs(cfg.model.vocab_size, shape, seed=shape[1])
        (logits,) = session.run(None, {"idx": idx.numpy()})
        with torch.no_grad():
            expected = model(idx).numpy()
        assert logits.shape == expected.shape == (*shape, cfg.model.vocab_size)
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
