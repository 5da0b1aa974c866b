"""A tiny run directory for the generation, chat, API and server tests (random weights, real tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from lmforge.checkpoint import model_state, save_checkpoint
from lmforge.config import Config, config_to_dict
from lmforge.data import Tokenizer
from lmforge.model import GPT, ModelConfig


def make_run(data_dir: Path, out: Path, family: str = "gpt2", context_len: int = 128, seed: int = 0) -> Path:
    """RUN_DIR with config.yaml, tokenizer.json and one checkpoint of a seeded 2-layer model."""
    tok = Tokenizer.load(data_dir / "tokenizer.json")
    extra = {"n_kv_head": 2} if family == "llama" else {}
    mcfg = ModelConfig(
        family=family,
        n_layer=2,
        n_head=4,
        n_embd=32,
        context_len=context_len,
        vocab_size=tok.vocab_size,
        **extra,
    )
    cfg = Config(model=mcfg, data=str(data_dir), out=str(out))
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    shutil.copyfile(data_dir / "tokenizer.json", out / "tokenizer.json")
    meta = {"config": config_to_dict(cfg), "tokens": 0, "tokenizer_sha256": tok.sha256()}
    save_checkpoint(out, 0, model_state(model), {}, meta)
    return out
