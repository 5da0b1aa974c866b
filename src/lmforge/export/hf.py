"""Hugging Face transformers interop: export a run as GPT2LMHeadModel / LlamaForCausalLM, and import one back.

The target class is chosen from the architecture switches by `standard_architecture` (export/__init__.py);
mixes that no transformers class computes exactly (e.g. RoPE with LayerNorm, or qk_norm) are refused.

Weight layouts (ours -> HF):
  GPT-2: HF's Conv1D stores (in, out), the transpose of nn.Linear's (out, in); the fused c_attn rows
         [q | k | v] are the same order in both.
  Llama: c_attn rows [q (nh*hd) | k (nkv*hd) | v (nkv*hd)] -> q_proj, k_proj, v_proj; c_fc rows
         [gate | up] -> gate_proj, up_proj. RoPE already uses HF's rotate_half layout: no permutation.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data.chat_template import END_TOKEN, JINJA, SPECIAL_TOKENS, ChatTemplate
from ..data.folder import data_tokenizer
from ..data.tokenizer import EOS_TOKEN, tokenizer_id
from ..model.config import ModelConfig
from ..run_dir import RunDir
from .common import ExportError, staged_dir, standard_architecture, torch_dtype, trimmed_state

if TYPE_CHECKING:
    from ..config import Config

HF_DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


# --- lmforge -> HF -------------------------------------------------------------------------------


def to_hf(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(HF state dict, HF config kwargs incl. model_type) for a model; vocab padding trimmed."""
    cfg: ModelConfig = model.cfg
    arch = standard_architecture(cfg, "transformers")
    sd = trimmed_state(model)
    return (
        (_to_gpt2(sd, cfg), _gpt2_config(cfg)) if arch == "gpt2" else (_to_llama(sd, cfg), _llama_config(cfg))
    )


def _to_gpt2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    C = cfg.n_embd
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"]}

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        # A LayerNorm without bias equals one with a zero bias: exact, so bias=false exports too.
        out[f"{dst}.bias"] = sd.get(f"{src}.bias", torch.zeros(C))

    def conv1d(src: str, dst: str) -> None:
        w = sd[f"{src}.weight"]  # (out, in) as nn.Linear
        out[f"{dst}.weight"] = w.t().contiguous()  # (in, out) as HF Conv1D
        out[f"{dst}.bias"] = sd.get(f"{src}.bias", torch.zeros(w.shape[0]))

    for i in range(cfg.n_layer):
        s, d = f"blocks.{i}", f"transformer.h.{i}"
        norm(f"{s}.ln_1", f"{d}.ln_1")
        conv1d(f"{s}.attn.c_attn", f"{d}.attn.c_attn")
        conv1d(f"{s}.attn.c_proj", f"{d}.attn.c_proj")
        norm(f"{s}.ln_2", f"{d}.ln_2")
        conv1d(f"{s}.mlp.c_fc", f"{d}.mlp.c_fc")
        conv1d(f"{s}.mlp.c_proj", f"{d}.mlp.c_proj")
    norm("ln_f", "transformer.ln_f")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _to_llama(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    nq, nkv, H = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.ffn_hidden
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    for i in range(cfg.n_layer):
        s, d = f"blocks.{i}", f"model.layers.{i}"
        out[f"{d}.input_layernorm.weight"] = sd[f"{s}.ln_1.weight"]
        out[f"{d}.post_attention_layernorm.weight"] = sd[f"{s}.ln_2.weight"]
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = sd[f"{s}.attn.c_attn.{kind}"].split([nq, nkv, nkv], dim=0)
            out[f"{d}.self_attn.q_proj.{kind}"] = q.contiguous()
            out[f"{d}.self_attn.k_proj.{kind}"] = k.contiguous()
            out[f"{d}.self_attn.v_proj.{kind}"] = v.contiguous()
            out[f"{d}.self_attn.o_proj.{kind}"] = sd[f"{s}.attn.c_proj.{kind}"]
            gate, up = sd[f"{s}.mlp.c_fc.{kind}"].split([H, H], dim=0)
            out[f"{d}.mlp.gate_proj.{kind}"] = gate.contiguous()
            out[f"{d}.mlp.up_proj.{kind}"] = up.contiguous()
            out[f"{d}.mlp.down_proj.{kind}"] = sd[f"{s}.mlp.c_proj.{kind}"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _gpt2_config(cfg: ModelConfig) -> dict:
    return dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_len,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.ffn_hidden,
        activation_function="gelu_new",  # tanh approximation, as F.gelu(approximate="tanh")
        layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def _llama_config(cfg: ModelConfig) -> dict:
    return dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.context_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        hidden_act="silu",
        attention_dropout=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def export_hf(
    model: torch.nn.Module, tokenizer_file: str | Path, out: str | Path, dtype: str = "f32"
) -> Path:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files into `out`; a
    run with a chat template also gets it as the tokenizer's chat_template, and stops at end of turn."""
    try:
        from transformers import AutoConfig, GenerationConfig
    except ImportError as e:
        raise ExportError("--format hf needs transformers: pip install 'lmforge[hf]'") from e
    from safetensors.torch import save_file

    from ..data import Tokenizer

    if dtype not in HF_DTYPE_NAMES:
        raise ExportError(f"--dtype {dtype} is not available for --format hf: use f32, f16 or bf16")
    tensors, kwargs = to_hf(model)
    tensors = {k: v.to(torch_dtype(dtype)).contiguous() for k, v in tensors.items()}
    tok = Tokenizer.load(tokenizer_file)
    eos_id, template = tok.eos_id, ChatTemplate.of(tok)
    # A chat run's reply ends at the end-of-turn token: `generate` stops there (or at end-of-text).
    eos = [template.end_id, eos_id] if template else eos_id
    model_type = kwargs.pop("model_type")
    hf_cfg = AutoConfig.for_model(model_type, bos_token_id=eos_id, eos_token_id=eos, **kwargs)
    # transformers 5 renamed torch_dtype to dtype; 4.x reads only torch_dtype.
    setattr(hf_cfg, "dtype" if "dtype" in hf_cfg.to_dict() else "torch_dtype", HF_DTYPE_NAMES[dtype])
    with staged_dir(out) as tmp:
        hf_cfg.save_pretrained(tmp)
        if model_type == "llama":
            _write_rope_theta(tmp / "config.json", model.cfg.rope_theta)
        GenerationConfig(bos_token_id=eos_id, eos_token_id=eos).save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_tokenizer(tmp, tokenizer_file, template, model.cfg.context_len)
    return Path(out)


def _write_tokenizer(tmp: Path, tokenizer_file: str | Path, template: ChatTemplate | None, context: int):
    """tokenizer.json and tokenizer_config.json; with a chat template, its Jinja twin, the special tokens
    declared and end of turn as eos (what instruction-tuned models on the Hub do)."""
    from transformers import PreTrainedTokenizerFast

    chat = {}
    if template is not None:
        chat = dict(eos_token=END_TOKEN, additional_special_tokens=list(SPECIAL_TOKENS), chat_template=JINJA)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=context,
        **{"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, **chat},
    )
    hf_tok.save_pretrained(tmp)  # transformers 5 puts the template in chat_template.jinja
    # transformers 5 names its class "TokenizersBackend", which 4.x cannot load; the old name loads in both.
    tok_cfg_path = tmp / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
    tok_cfg.pop("backend", None)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if template is not None:
        # 4.x reads the template and the special tokens from here only, under these names (5.x reads the
        # .jinja file first, and takes additional_special_tokens as its extra_special_tokens).
        tok_cfg["chat_template"] = JINJA
        tok_cfg["additional_special_tokens"] = tok_cfg.pop("extra_special_tokens", list(SPECIAL_TOKENS))
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")


def _write_rope_theta(path: Path, theta: float) -> None:
    """Put rope_theta where every supported transformers reads it: 4.x only at the top level, 5.x in
    rope_parameters (the top level is its fallback); the installed version's save writes only one."""
    hf = json.loads(path.read_text(encoding="utf-8"))
    hf["rope_theta"] = theta
    hf["rope_parameters"] = {**(hf.get("rope_parameters") or {}), "rope_type": "default", "rope_theta": theta}
    path.write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --- HF -> lmforge -------------------------------------------------------------------------------


def _load_hf_tensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ExportError(
            f"no *.safetensors in '{src}': only safetensors checkpoints are imported (never pickles)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except SafetensorError as e:
            raise ExportError(
                f"{f}: not a safetensors file ({e}); only safetensors weights are imported (never pickles)"
            ) from None
    return {k: v.to(torch.float32) for k, v in tensors.items()}


def from_hf(tensors: dict[str, torch.Tensor], hf: dict) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, lmforge state dict with padded vocab) from an HF GPT-2 or Llama config and state dict."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        cfg, sd = _from_gpt2(tensors, hf)
    elif model_type == "llama":
        cfg, sd = _from_llama(tensors, hf)
    else:
        raise ExportError(f"model_type {model_type!r} cannot be imported: lmforge imports gpt2 and llama")
    cfg = cfg.resolved()
    V, P = cfg.vocab_size, cfg.padded_vocab_size
    for name in ("wte.weight", "lm_head.weight"):
        if name in sd:  # zero padding rows: never scored, so their value does not matter
            sd[name] = torch.cat([sd[name][:V], sd[name].new_zeros(P - V, cfg.n_embd)])
    return cfg, {k: v.contiguous() for k, v in sd.items()}


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ExportError(f"tensor {name} is missing from the HF checkpoint")
    return tensors.pop(name)


def _from_gpt2(t: dict[str, torch.Tensor], hf: dict) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ExportError(f"activation_function={hf['activation_function']!r}: lmforge uses gelu_new")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ExportError("a GPT-2 with non-standard attention scaling cannot be imported exactly")
    # The original OpenAI GPT-2 files name tensors without the "transformer." prefix.
    t = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in t.items()}
    n_embd = hf.get("n_embd", 768)
    cfg = ModelConfig(
        family="gpt2",
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        context_len=hf.get("n_positions", 1024),
        vocab_size=hf.get("vocab_size", 50257),
        ffn_hidden=hf.get("n_inner") or 4 * n_embd,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )
    sd = {"wte.weight": _take(t, "transformer.wte.weight"), "wpe.weight": _take(t, "transformer.wpe.weight")}
    for i in range(cfg.n_layer):
        s, d = f"transformer.h.{i}", f"blocks.{i}"
        for src, dst, conv in (
            ("ln_1", "ln_1", False),
            ("attn.c_attn", "attn.c_attn", True),
            ("attn.c_proj", "attn.c_proj", True),
            ("ln_2", "ln_2", False),
            ("mlp.c_fc", "mlp.c_fc", True),
            ("mlp.c_proj", "mlp.c_proj", True),
        ):
            w = _take(t, f"{s}.{src}.weight")
            sd[f"{d}.{dst}.weight"] = w.t().contiguous() if conv else w
            sd[f"{d}.{dst}.bias"] = _take(t, f"{s}.{src}.bias")
    sd["ln_f.weight"], sd["ln_f.bias"] = (
        _take(t, "transformer.ln_f.weight"),
        _take(t, "transformer.ln_f.bias"),
    )
    head = t.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = head if head is not None else sd["wte.weight"].clone()
    return cfg, sd


def _rope_theta(hf: dict) -> float:
    """RoPE's base from a Llama config.json of any transformers version: 5.x writes rope_parameters, 4.x a
    top-level rope_theta (and rope_scaling for scaled variants, which lmforge does not compute)."""
    params = [p for p in (hf.get("rope_parameters"), hf.get("rope_scaling")) if isinstance(p, dict)]
    for p in params:
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise ExportError(f"rope scaling {kind!r} cannot be imported: lmforge computes plain RoPE")
    given = [hf.get("rope_theta"), *(p.get("rope_theta") for p in params)]
    thetas = sorted({float(t) for t in given if t is not None})
    if len(thetas) > 1:
        raise ExportError(
            f"config.json gives rope_theta {thetas[0]:g} and {thetas[1]:g} (at the top level, in "
            f"rope_parameters or rope_scaling): transformers 4 and 5 would read different models; keep one"
        )
    return thetas[0] if thetas else 10000.0  # transformers' default when a config names none


def _from_llama(t: dict[str, torch.Tensor], hf: dict) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    rope_theta = _rope_theta(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act={hf['hidden_act']!r}: lmforge's SwiGLU uses silu")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ExportError(
            f"attention_bias={attn_bias} with mlp_bias={mlp_bias}: lmforge has one bias switch for both"
        )
    C, nh = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, C // nh):
        raise ExportError(f"head_dim={hf['head_dim']} != hidden_size/num_attention_heads={C // nh}")
    cfg = ModelConfig(
        family="llama",
        n_layer=hf["num_hidden_layers"],
        n_head=nh,
        n_kv_head=hf.get("num_key_value_heads") or nh,
        n_embd=C,
        context_len=hf.get("max_position_embeddings", 2048),
        vocab_size=hf["vocab_size"],
        ffn_hidden=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        bias=attn_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    sd = {"wte.weight": _take(t, "model.embed_tokens.weight"), "ln_f.weight": _take(t, "model.norm.weight")}
    for i in range(cfg.n_layer):
        s, d = f"model.layers.{i}", f"blocks.{i}"
        sd[f"{d}.ln_1.weight"] = _take(t, f"{s}.input_layernorm.weight")
        sd[f"{d}.ln_2.weight"] = _take(t, f"{s}.post_attention_layernorm.weight")
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            a = f"{s}.self_attn"
            sd[f"{d}.attn.c_attn.{kind}"] = torch.cat(
                [_take(t, f"{a}.{p}_proj.{kind}") for p in ("q", "k", "v")], dim=0
            )
            sd[f"{d}.attn.c_proj.{kind}"] = _take(t, f"{a}.o_proj.{kind}")
            m = f"{s}.mlp"
            sd[f"{d}.mlp.c_fc.{kind}"] = torch.cat(
                [_take(t, f"{m}.gate_proj.{kind}"), _take(t, f"{m}.up_proj.{kind}")], dim=0
            )
            sd[f"{d}.mlp.c_proj.{kind}"] = _take(t, f"{m}.down_proj.{kind}")
    head = t.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = head if head is not None else sd["wte.weight"].clone()
    return cfg, sd


def _read_hf(src: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path]:
    """(ModelConfig, lmforge tensors, tokenizer.json path) of a local HF folder."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise ExportError(f"'{src}' has no config.json: pass a local Hugging Face model folder (hf:DIR)")
    if not (src / "tokenizer.json").is_file():
        raise ExportError(f"'{src}' has no tokenizer.json: lmforge needs a fast (tokenizers) tokenizer")
    hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    mcfg, sd = from_hf(_load_hf_tensors(src), hf)
    return mcfg, sd, src / "tokenizer.json"


def _same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two tokenizer.json files encode and decode alike (save_pretrained rewrites parts of them)."""
    try:
        return tokenizer_id(a) == tokenizer_id(b)
    except (OSError, ValueError):  # missing, unreadable or not a tokenizer (DataError is a ValueError)
        return False


def init_from_hf(source: str, cfg: Config) -> tuple[Config, dict[str, torch.Tensor]]:
    """(cfg with the HF model's architecture, its tensors) for `lmforge train --init-from hf:DIR`.

    The data must be tokenized with the model's own tokenizer; seq_len and dropout stay the run's own.
    """
    kind, sep, path = source.partition(":")
    if not sep or kind != "hf" or not path:
        raise ExportError(f"--init-from {source!r}: write it as hf:DIR (a local Hugging Face model folder)")
    mcfg, sd, tok_file = _read_hf(path)
    if cfg.data is not None and not _same_tokenizer(data_tokenizer(cfg.data), tok_file):
        raise ExportError(
            f"--data {cfg.data} was not tokenized with {tok_file}: "
            f"run lmforge prepare --tokenizer {tok_file} first"
        )
    seq_len = min(cfg.model.seq_len or mcfg.context_len, mcfg.context_len)
    mcfg = dataclasses.replace(mcfg, seq_len=seq_len, dropout=cfg.model.dropout)
    return dataclasses.replace(cfg, model=mcfg), sd


def import_hf(src: str | Path, run_dir: str | Path) -> Path:
    """Turn a local HF GPT-2/Llama folder into an lmforge RUN_DIR (config.yaml, tokenizer.json, a checkpoint)."""
    from ..checkpoint import save_checkpoint
    from ..config import Config
    from ..config_io import config_to_dict
    from ..data import Tokenizer
    from ..data.errors import DataError
    from ..model import GPT

    src = Path(src)
    mcfg, sd, tok_file = _read_hf(src)
    try:
        tok = Tokenizer.load(tok_file)
    except DataError as e:
        raise ExportError(f"{e} (lmforge needs a tokenizer.json with '{EOS_TOKEN}')") from e
    model = GPT(mcfg)  # checks that every tensor has the shape the config implies
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if mcfg.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ExportError(
            f"HF checkpoint does not match its config: missing {missing}, unexpected {unexpected}"
        )
    cfg = Config(model=mcfg, out=str(run_dir))
    with staged_dir(run_dir) as tmp:
        run = RunDir(tmp)
        run.write_config(config_to_dict(cfg))
        shutil.copyfile(tok_file, run.tokenizer)
        meta = {
            "config": config_to_dict(cfg),
            "tokens": 0,
            "tokenizer_sha256": tok.sha256(),
            "tokenizer_id": tokenizer_id(tok),
            "imported_from": str(src.resolve()),
        }
        if mcfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        save_checkpoint(tmp, 0, sd, {}, meta)
    return Path(run_dir)
