"""What every exporter shares: the error type, trimmed float32 tensors, the standard-architecture check,
the staged output folder and small writers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LmforgeError
from ..model.config import ModelConfig

if TYPE_CHECKING:  # torch is imported where it is used, so `lmforge --help` starts fast
    import torch


class ExportError(LmforgeError, RuntimeError):
    """A model or request that an export format cannot represent exactly; the message is one line."""


def trimmed_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's float32 CPU tensors with the vocab padding rows cut; a tied head is stored once as wte."""
    import torch

    cfg: ModelConfig = model.cfg
    V = cfg.vocab_size
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        t = t.detach().to("cpu", torch.float32)
        if name in ("wte.weight", "lm_head.weight"):
            t = t[:V]  # (vocab, C): rows past vocab_size are padding that is never scored
        out[name] = t.contiguous()
    return out


def standard_architecture(cfg: ModelConfig, target: str) -> str:
    """'gpt2' or 'llama': the standard architecture that represents cfg exactly in `target`; else ExportError.

    Chosen from the switches, not the family name: learned positions + LayerNorm + GELU(tanh) + multi-head
    attention is exactly GPT-2; RoPE (halves layout) + RMSNorm + SwiGLU is exactly Llama. Biases need no
    check: a missing bias exports exactly as zeros (GPT-2) or as Llama's attention_bias/mlp_bias switch.
    """
    cfg = cfg.resolved()
    other = "safetensors or onnx"  # gguf and transformers take the same two architectures
    if cfg.qk_norm:
        raise ExportError(
            f"model.qk_norm=true has no exact GPT-2/Llama equivalent in {target}: export with --format {other}"
        )
    feats = (cfg.pos_emb, cfg.norm, cfg.mlp)
    if feats == ("learned", "layernorm", "gelu"):
        if cfg.n_kv_head != cfg.n_head:
            raise ExportError(
                f"model.n_kv_head={cfg.n_kv_head} != n_head={cfg.n_head}: GPT-2 in {target} has no "
                f"grouped-query attention; export with --format {other}"
            )
        return "gpt2"
    if feats == ("rope", "rmsnorm", "swiglu"):
        return "llama"
    raise ExportError(
        f"pos_emb={cfg.pos_emb}, norm={cfg.norm}, mlp={cfg.mlp} (family {cfg.family}) matches neither "
        f"GPT-2 (learned, layernorm, gelu) nor Llama (rope, rmsnorm, swiglu) in {target}: "
        f"export with --format {other}"
    )


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; rename it to `out` only when the block finishes without error."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out '{out}' already exists and is not empty: choose a new folder or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: dict) -> None:
    """Pretty JSON with a trailing newline."""
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an export ``--dtype`` that stores plain floats (f32, f16, bf16)."""
    import torch

    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]
