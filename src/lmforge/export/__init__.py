"""Export a trained run to other formats (HF transformers, plain safetensors, ONNX, GGUF) and import HF models.

Every exporter reads the run through `checkpoint.py`, works on the CPU in float32, trims the vocabulary
padding rows to `vocab_size`, and writes into a temporary folder that is renamed into place at the end,
so a failed export never leaves a half-written `--out`.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

FORMATS = ("hf", "safetensors", "onnx", "gguf")
DTYPES = ("f32", "f16", "bf16", "q8_0")


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
    other = "safetensors or onnx" if target == "gguf" else "safetensors, onnx or gguf"
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


def export_run(run: str | Path, fmt: str, out: str | Path, dtype: str = "f32") -> Path:
    """Export the latest checkpoint of `run` (or a checkpoint directory) as `fmt` into the folder `out`."""
    import torch

    from ..checkpoint import load_model, tokenizer_path

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype != "f32" and fmt not in ("gguf", "hf", "safetensors"):
        raise ExportError(f"--dtype {dtype} is not supported for --format {fmt}: use f32")
    if dtype == "q8_0" and fmt != "gguf":
        raise ExportError("--dtype q8_0 is only available for --format gguf")
    model, cfg, _ = load_model(run, device="cpu", dtype=torch.float32)
    tok = tokenizer_path(run)
    if fmt == "hf":
        from .hf import export_hf

        export_hf(model, tok, out, dtype)
    elif fmt == "safetensors":
        export_safetensors(model, out, dtype)
    elif fmt == "onnx":
        from .onnx import export_onnx

        export_onnx(model, tok, out)
    else:
        from .gguf import export_gguf

        export_gguf(model, tok, out, dtype)
    return Path(out)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an export ``--dtype`` that stores plain floats (f32, f16, bf16)."""
    import torch

    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]


def export_safetensors(model: torch.nn.Module, out: str | Path, dtype: str = "f32") -> Path:
    """Plain weights (lmforge names, vocab trimmed, a tied head once) plus config.json with the model config."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.cfg
    tensors = {k: v.to(torch_dtype(dtype)).contiguous() for k, v in trimmed_state(model).items()}
    with staged_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(
            tmp / "config.json",
            {
                "format": "lmforge",
                "dtype": dtype,
                "model": dataclasses.asdict(cfg),
                "note": "wte.weight (and lm_head.weight when untied) hold vocab_size rows, without padding",
            },
        )
    return Path(out)
