"""Export (HF, safetensors, ONNX, GGUF) and HF import, checked against lmforge's own forward pass."""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.cli import main
from lmforge.config import Config
from lmforge.config_io import config_to_dict
from lmforge.data import Tokenizer
from lmforge.export import ExportError, export_run
from lmforge.generate.layout import use_inference_layout
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
ROUND_TRIP = list(VARIANTS)
# A GPT-2 without biases exports exactly (zero biases), but imports back as a GPT-2 with (zero) biases.
VARIANTS["gpt2-nobias"] = dict(family="gpt2", bias=False)


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


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_sees_plain_linear_layers_never_the_decoding_layout(tiny_data, tmp_path, monkeypatch, fmt):
    # The decoding layout (InferenceLinear, column-major weights) is generation's own: loading a run for
    # export must hand the exporter the model as trained.
    module = importlib.import_module(f"lmforge.export.{fmt}")
    name = f"export_{fmt}"
    real, seen = getattr(module, name), []

    def spy(model, *args, **kwargs):
        seen.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    run = make_run(tmp_path, tiny_data, "gpt2-untied")
    assert main(["export", "--run", str(run), "--format", fmt, "--out", str(tmp_path / "out")]) == 0
    (model,) = seen

    def plain(m: torch.nn.Module) -> bool:
        linears = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
        return bool(linears) and all(type(x) is torch.nn.Linear and x.weight.is_contiguous() for x in linears)

    assert plain(model)
    assert not plain(use_inference_layout(model))  # negative control: the check sees the layout


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
    assert (
        json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours_tok.eos_id


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(family="gpt2", norm="rmsnorm"), "matches neither"),
        (dict(family="gpt2", pos_emb="rope"), "matches neither"),
        (dict(family="llama", mlp="gelu"), "matches neither"),
        (dict(family="llama", mlp="relu2"), "matches neither"),
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
    assert err.endswith("export with --format safetensors or onnx")  # not gguf: it refuses the same
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


GGUF_KEYS = [
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
]


def gguf_value(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize(
    "name, dtype",
    [("gpt2", "f32"), ("llama-gqa", "f32"), ("gpt2", "f16"), ("llama-gqa", "bf16"), ("llama-gqa", "q8_0")],
)
def test_gguf_export_has_llama_cpp_tensors_shapes_and_metadata(tiny_data, tmp_path, name, dtype):
    gguf = pytest.importorskip("gguf")
    from lmforge.export.gguf import halves_to_interleaved

    run = make_run(tmp_path, tiny_data, name)
    out = export_run(run, "gguf", tmp_path / "gguf", dtype=dtype)
    model, cfg, _ = load_model(run)
    m = cfg.model
    V, C, H, hd = m.vocab_size, m.n_embd, m.ffn_hidden, m.head_dim
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    arch = "gpt2" if m.family == "gpt2" else "llama"

    # metadata llama.cpp reads
    assert gguf_value(reader, "general.architecture") == arch
    expected = [m.context_len, C, m.n_layer, H, m.n_head, m.n_kv_head]
    assert [gguf_value(reader, f"{arch}.{k}") for k in GGUF_KEYS] == expected
    if arch == "gpt2":
        assert gguf_value(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(m.norm_eps)
    else:
        assert gguf_value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(m.norm_eps)
        assert gguf_value(reader, "llama.rope.freq_base") == pytest.approx(m.rope_theta)
        assert gguf_value(reader, "llama.rope.dimension_count") == hd
    tok = Tokenizer.load(run / "tokenizer.json")
    assert gguf_value(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == V and tokens[tok.eos_id] == "<|endoftext|>"
    assert len(gguf_value(reader, "tokenizer.ggml.token_type")) == V
    assert len(gguf_value(reader, "tokenizer.ggml.merges")) > 0
    assert gguf_value(reader, "tokenizer.ggml.eos_token_id") == tok.eos_id
    assert gguf_value(reader, "tokenizer.ggml.bos_token_id") == tok.eos_id

    # every tensor, with the shape (in torch order) llama.cpp expects
    shapes = {"token_embd.weight": (V, C), "output_norm.weight": (C,)}
    for i in range(m.n_layer):
        b = f"blk.{i}"
        shapes |= {f"{b}.attn_norm.weight": (C,), f"{b}.ffn_norm.weight": (C,)}
        shapes |= {f"{b}.attn_output.weight": (C, C), f"{b}.ffn_down.weight": (C, H)}
        if arch == "gpt2":
            shapes |= {f"{b}.attn_qkv.weight": (3 * C, C), f"{b}.ffn_up.weight": (H, C)}
            for t in ("attn_norm", "ffn_norm", "attn_output", "ffn_down"):
                shapes[f"{b}.{t}.bias"] = (C,)
            shapes |= {f"{b}.attn_qkv.bias": (3 * C,), f"{b}.ffn_up.bias": (H,)}
        else:
            kv = m.n_kv_head * hd
            shapes |= {
                f"{b}.attn_q.weight": (C, C),
                f"{b}.attn_k.weight": (kv, C),
                f"{b}.attn_v.weight": (kv, C),
            }
            shapes |= {f"{b}.ffn_gate.weight": (H, C), f"{b}.ffn_up.weight": (H, C)}
    if arch == "gpt2":
        shapes |= {
            "position_embd.weight": (m.context_len, C),
            "output_norm.bias": (C,),
            "output.weight": (V, C),
        }
    elif not m.tie_embeddings:
        shapes["output.weight"] = (V, C)
    got = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    assert got == shapes

    # values: f32 is exact; the llama Q rows are the halves -> interleaved permutation of ours
    tensors = {t.name: t for t in reader.tensors}
    if dtype == "f32":
        emb = np.asarray(tensors["token_embd.weight"].data).reshape(V, C)
        np.testing.assert_array_equal(emb, model.wte.weight[:V].detach().numpy())
        if arch == "llama":
            q = model.blocks[0].attn.c_attn.weight[:C].detach()
            np.testing.assert_array_equal(
                np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(C, C),
                halves_to_interleaved(q, m.n_head).numpy(),
            )
    else:
        kind = getattr(gguf.GGMLQuantizationType, dtype.upper())
        assert tensors["token_embd.weight"].tensor_type == kind
        assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_gguf_q_k_permutation_matches_llama_cpp_pairwise_rope():
    """Interleaved-pair RoPE (llama.cpp's llama arch) on permuted rows == our halves RoPE, reordered."""
    from lmforge.export.gguf import halves_to_interleaved
    from lmforge.model.gpt import apply_rope, rope_tables

    torch.manual_seed(0)
    n_head, hd, C, T = 2, 8, 16, 5
    W, x = torch.randn(n_head * hd, C), torch.randn(T, C)
    cos, sin = rope_tables(hd, T, 10000.0)  # (T, hd/2)
    ours = apply_rope((x @ W.t()).view(1, T, n_head, hd).transpose(1, 2), cos, sin)  # (1, nh, T, hd)

    y = (x @ halves_to_interleaved(W, n_head).t()).view(T, n_head, hd // 2, 2)
    a, b = y[..., 0], y[..., 1]  # adjacent pairs (x[2i], x[2i+1])
    c, s = cos[:, None, :], sin[:, None, :]
    pairwise = torch.stack([a * c - b * s, a * s + b * c], dim=-1).view(T, n_head, hd)
    expected = halves_to_interleaved(ours[0].transpose(0, 1).reshape(T, n_head * hd).t(), n_head).t()
    torch.testing.assert_close(pairwise.reshape(T, n_head * hd), expected)
    # negative control: without the permutation the pairwise rotation gives something else
    y0 = (x @ W.t()).view(T, n_head, hd // 2, 2)
    unpermuted = torch.stack([y0[..., 0] * c - y0[..., 1] * s, y0[..., 0] * s + y0[..., 1] * c], dim=-1)
    assert not torch.allclose(unpermuted.reshape(T, n_head * hd), expected, atol=1e-3)


def test_gguf_generates_with_llama_cpp_when_installed(tiny_data, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    run = make_run(tmp_path, tiny_data, "llama-gqa")
    out = export_run(run, "gguf", tmp_path / "gguf")
    model, cfg, _ = load_model(run)
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=64, verbose=False)
    prompt = inputs(cfg.model.vocab_size, (1, 6))[0].tolist()
    theirs = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(tok)
        if len(theirs) == 8:
            break
    assert greedy(model, torch.tensor([prompt]), 8)[0, 6:].tolist() == theirs


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_hf_import_then_export_round_trip_leaves_weights_unchanged(tiny_data, tmp_path, capsys, name):
    pytest.importorskip("transformers")
    run = make_run(tmp_path, tiny_data, name)
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", f"hf:{tmp_path / 'hf'}", "--out", str(tmp_path / "imported")]) == 0
    original, cfg, _ = load_model(run)
    imported, cfg2, _ = load_model(tmp_path / "imported")
    assert cfg2.model == cfg.model
    V = cfg.model.vocab_size
    a, b = original.state_dict(), imported.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        rows = slice(0, V) if key in ("wte.weight", "lm_head.weight") else slice(None)  # padding is not kept
        assert torch.equal(a[key][rows], b[key][rows]), key

    # the imported run is a normal run: export it again and generate from it
    assert (
        main(
            ["export", "--run", str(tmp_path / "imported"), "--format", "hf", "--out", str(tmp_path / "hf2")]
        )
        == 0
    )
    first, second = (
        load_file(str(tmp_path / "hf/model.safetensors")),
        load_file(str(tmp_path / "hf2/model.safetensors")),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    capsys.readouterr()
    gen = [
        "generate",
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]
    assert main([*gen, "--run", str(run)]) == 0
    expected = capsys.readouterr().out
    assert main([*gen, "--run", str(tmp_path / "imported")]) == 0
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("source, message", [("nowhere", "hf:DIR"), ("hf:/no/such/dir", "no config.json")])
def test_import_refuses_bad_sources_in_one_line(tmp_path, capsys, source, message):
    assert main(["import", source, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_train_init_from_hf_starts_from_the_hf_weights(tiny_data, tmp_path):
    pytest.importorskip("transformers")
    run = make_run(tmp_path, tiny_data, "llama-gqa")
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    args = [
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "ft"),
        "--init-from",
        f"hf:{tmp_path / 'hf'}",
    ]
    fast = ["--train.max_steps=1", "--train.lr=1e-12", "--train.micro_batch_size=2", "--model.seq_len=16"]
    assert main([*args, *fast, "--eval.batches=1", "--log.progress=false", "--model.n_layer=5"]) == 0
    original, cfg, _ = load_model(run)
    tuned, cfg2, _ = load_model(tmp_path / "ft")
    assert cfg2.model.family == "llama" and cfg2.model.n_layer == 2 and cfg2.model.n_kv_head == 2  # from HF
    assert cfg2.model.seq_len == 16  # the run's own
    V = cfg.model.vocab_size
    for key, value in original.state_dict().items():
        rows = slice(0, V) if key in ("wte.weight", "lm_head.weight") else slice(None)
        torch.testing.assert_close(tuned.state_dict()[key][rows], value[rows], atol=1e-8, rtol=0)


def test_train_init_from_hf_refuses_data_with_another_tokenizer(tiny_data, tmp_path, capsys):
    pytest.importorskip("transformers")
    from lmforge.data import prepare

    from .conftest import make_corpus

    run = make_run(tmp_path, tiny_data, "gpt2")
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    make_corpus(tmp_path / "text", n_docs=5, words=50, seed=1)
    prepare([str(tmp_path / "text")], tmp_path / "other", vocab_size=300, val_fraction=0.2)
    capsys.readouterr()
    args = ["train", "--data", str(tmp_path / "other"), "--out", str(tmp_path / "ft")]
    assert main([*args, "--init-from", f"hf:{tmp_path / 'hf'}", "--train.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was not tokenized with" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ft").exists()
