"""GGUF export (llama.cpp) with the `gguf` package: architectures `gpt2` and `llama`.

Tensor names and metadata keys follow llama.cpp's own HF converter (convert_hf_to_gguf.py):
  gpt2:  token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down},
         output_norm, output (each with .bias); the fused qkv keeps our [q | k | v] row order.
  llama: token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
         ffn_down}, output_norm, output (absent when tied: llama.cpp then reuses token_embd).
Weights keep nn.Linear's (out, in) layout: GGUF lists dimensions in reverse, which is what ggml expects.

RoPE: llama.cpp's `llama` architecture rotates adjacent pairs (x[2i], x[2i+1]) (the original Meta
layout), while lmforge, like HF, rotates halves (x[i], x[i + hd/2]). So, exactly as llama.cpp's converter
does for HF checkpoints, the rows of every Q and K head (weights and biases) are permuted from halves to
interleaved order; the attention scores are unchanged because q and k are permuted alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .common import ExportError, staged_dir, standard_architecture, trimmed_state

# Per-tensor storage: 1-D tensors (norms, biases) stay f32, as llama.cpp's converter keeps them.
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows (hd, ...) from [x0..x_{hd/2-1} | y0..] to [x0, y0, x1, y1, ...]."""
    rest = w.shape[1:]
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


def gguf_tensors(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """(architecture, float32 tensors under llama.cpp's names) for a model; vocab padding trimmed."""
    cfg = model.cfg
    arch = standard_architecture(cfg, "gguf")
    sd = trimmed_state(model)
    C = cfg.n_embd
    out = {"token_embd.weight": sd["wte.weight"], "output_norm.weight": sd["ln_f.weight"]}

    def get(name: str, rows: int) -> torch.Tensor:
        # GPT-2 in llama.cpp requires every bias; zeros are exact where the model has none.
        return sd.get(name, torch.zeros(rows))

    if arch == "gpt2":
        out["position_embd.weight"] = sd["wpe.weight"]
        out["output_norm.bias"] = get("ln_f.bias", C)
        # llama.cpp's converter always writes output.weight for gpt2, a copy of token_embd when tied.
        out["output.weight"] = sd["wte.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
        names = {
            "ln_1": "attn_norm",
            "attn.c_attn": "attn_qkv",
            "attn.c_proj": "attn_output",
            "ln_2": "ffn_norm",
            "mlp.c_fc": "ffn_up",
            "mlp.c_proj": "ffn_down",
        }
        for i in range(cfg.n_layer):
            for src, dst in names.items():
                w = sd[f"blocks.{i}.{src}.weight"]
                out[f"blk.{i}.{dst}.weight"] = w
                out[f"blk.{i}.{dst}.bias"] = get(f"blocks.{i}.{src}.bias", w.shape[0])
        return arch, out

    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    nq, nkv, H = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.ffn_hidden
    for i in range(cfg.n_layer):
        s, d = f"blocks.{i}", f"blk.{i}"
        out[f"{d}.attn_norm.weight"] = sd[f"{s}.ln_1.weight"]
        out[f"{d}.ffn_norm.weight"] = sd[f"{s}.ln_2.weight"]
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = sd[f"{s}.attn.c_attn.{kind}"].split([nq, nkv, nkv], dim=0)
            out[f"{d}.attn_q.{kind}"] = halves_to_interleaved(q, cfg.n_head)
            out[f"{d}.attn_k.{kind}"] = halves_to_interleaved(k, cfg.n_kv_head)
            out[f"{d}.attn_v.{kind}"] = v.contiguous()
            out[f"{d}.attn_output.{kind}"] = sd[f"{s}.attn.c_proj.{kind}"]
            gate, up = sd[f"{s}.mlp.c_fc.{kind}"].split([H, H], dim=0)
            out[f"{d}.ffn_gate.{kind}"] = gate.contiguous()
            out[f"{d}.ffn_up.{kind}"] = up.contiguous()
            out[f"{d}.ffn_down.{kind}"] = sd[f"{s}.mlp.c_proj.{kind}"]
    return arch, out


def _vocab(tokenizer_file: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order, their GGUF token types and the BPE merges as 'a b' strings."""
    import gguf

    data = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    special = set()
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL))
        else:  # a model vocab larger than the tokenizer's: unreachable ids
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return tokens, types, merges


def _encode(name: str, t: torch.Tensor, dtype: str):
    """(numpy array, raw GGML type or None) for one tensor in the requested dtype."""
    import gguf

    a = t.numpy().astype(np.float32)
    if a.ndim == 1 or dtype == "f32":
        return a, None
    if dtype == "f16":
        return a.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if a.shape[-1] % block:  # Q8_0 works on rows in blocks of 32; fall back as llama.cpp does
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, qtype), qtype


def export_gguf(
    model: torch.nn.Module, tokenizer_file: str | Path, out: str | Path, dtype: str = "f32"
) -> Path:
    """Write `out`/model.gguf: weights in `dtype` (f32, f16, bf16, q8_0), hyper-parameters and tokenizer
    (with a run's chat template as tokenizer.chat_template, and its end of turn as eos and eot)."""
    try:
        import gguf
    except ImportError as e:
        raise ExportError("--format gguf needs the gguf package: pip install 'lmforge[gguf]'") from e
    from ..data import Tokenizer
    from ..data.chat_template import JINJA, ChatTemplate

    cfg = model.cfg
    arch, tensors = gguf_tensors(model)
    tok = Tokenizer.load(tokenizer_file)
    eos_id, template = tok.eos_id, ChatTemplate.of(tok)
    tokens, types, merges = _vocab(Path(tokenizer_file), cfg.vocab_size)
    with staged_dir(out) as tmp:
        w = gguf.GGUFWriter(str(tmp / "model.gguf"), arch)
        w.add_name("lmforge")
        w.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[dtype])))
        w.add_context_length(cfg.context_len)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.ffn_hidden)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_vocab_size(cfg.vocab_size)
        if arch == "gpt2":
            w.add_layer_norm_eps(cfg.norm_eps)
        else:
            w.add_layer_norm_rms_eps(cfg.norm_eps)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_rope_dimension_count(cfg.head_dim)
        # Byte-level BPE with GPT-2's pre-tokenizer regex (ByteLevel(use_regex=True) in data/tokenizer.py).
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(eos_id)
        if template is None:
            w.add_eos_token_id(eos_id)
        else:  # llama.cpp ends a reply at eos and eot: the end of turn, where the template says it ends
            w.add_eos_token_id(template.end_id)
            w.add_eot_token_id(template.end_id)
            w.add_chat_template(JINJA)
        w.add_add_bos_token(False)
        for name, t in tensors.items():
            data, raw = _encode(name, t, dtype)
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)
