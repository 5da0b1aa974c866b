"""`--format safetensors`: lmforge's own tensor names in one file, plus the lmforge model config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..model.config import ModelConfig
from .common import staged_dir, torch_dtype, trimmed_state, write_json


def export_safetensors(model: torch.nn.Module, tokenizer: Path, out: str | Path, dtype: str = "f32") -> Path:
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
