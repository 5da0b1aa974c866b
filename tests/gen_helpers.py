"""A tiny run directory for the generation, chat, API and server tests (random weights, real tokenizer)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from lmforge.checkpoint import load_model, model_state, save_checkpoint
from lmforge.config import Config
from lmforge.config_io import config_to_dict
from lmforge.data import Tokenizer
from lmforge.data.chat_template import with_chat_tokens
from lmforge.model import GPT, ModelConfig


def make_run(
    data_dir: Path,
    out: Path,
    family: str = "gpt2",
    context_len: int = 128,
    seed: int = 0,
    chat: bool = False,
    edit: Callable[[GPT], None] | None = None,
    **model_fields: object,
) -> Path:
    """RUN_DIR with config.yaml, tokenizer.json and one checkpoint of a seeded 2-layer model.

    chat: the tokenizer gets the chat template's special tokens (what a fine-tuned run has); edit(model)
    changes the weights before they are saved; model_fields: other ModelConfig fields.
    """
    tok = Tokenizer.load(data_dir / "tokenizer.json")
    if chat:
        tok = with_chat_tokens(tok)
    extra = {"n_kv_head": 2} if family == "llama" else {}
    shape = {"n_layer": 2, "n_head": 4, "n_embd": 32, **extra, **model_fields}
    mcfg = ModelConfig(family=family, context_len=context_len, vocab_size=tok.vocab_size, **shape)
    cfg = Config(model=mcfg, data=str(data_dir), out=str(out))
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if chat:
        tok.save(out / "tokenizer.json")
    else:
        shutil.copyfile(data_dir / "tokenizer.json", out / "tokenizer.json")
    meta = {"config": config_to_dict(cfg), "tokens": 0, "tokenizer_sha256": tok.sha256()}
    save_checkpoint(out, 0, model_state(model), {}, meta)
    return out


def follow_chain(chain: dict[int, int]) -> Callable[[GPT], None]:
    """An edit that makes greedy decoding follow `chain` (token -> next token), whatever came before.

    For a GPT-2 with an untied head: the blocks' output projections and the positions are zeroed, so the
    residual stream is the current token's embedding alone. Each token of the chain gets its own axis as
    its embedding, and the head row of its successor points along that axis: after LayerNorm the axis
    holds +5.6 and the others -0.18, so the successor's logit is ~56 and every other logit <= ~0. A token
    outside the chain has a zero embedding and all-zero logits (greedy: token 0).
    """

    def edit(model: GPT) -> None:
        assert model.cfg.family == "gpt2" and not model.cfg.tie_embeddings and len(chain) <= model.cfg.n_embd
        for block in model.blocks:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()
        for param in (model.wpe.weight, model.wte.weight, model.lm_head.weight):
            param.zero_()
        model.ln_f.weight.fill_(1.0)
        model.ln_f.bias.zero_()
        for axis, (token, successor) in enumerate(chain.items()):
            model.wte.weight[token, axis] = 1.0
            model.lm_head.weight[successor, axis] = 10.0

    return edit


ENDLESS_WORD = " the"


def make_endless_run(data_dir: Path, out: Path, context_len: int = 8192, tokens: int = 0) -> Path:
    """A GPT-2 run that writes ENDLESS_WORD after any text, at any temperature, for ever (never
    <|endoftext|> nor a next turn), so a generation lasts exactly max_tokens: the final LayerNorm's weight
    is 0, so its output is its bias, set along that word's (tied) embedding. `tokens`: the training tokens
    its checkpoint claims."""
    tok = Tokenizer.load(data_dir / "tokenizer.json")
    (word,) = tok.encode(ENDLESS_WORD)

    def edit(model: GPT) -> None:
        emb = model.lm_head.weight[word]
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(emb * (100.0 / emb.dot(emb)))  # the word's logit is 100, every other far below

    run = make_run(data_dir, out, family="gpt2", context_len=context_len, edit=edit)
    if tokens:  # make_run's checkpoint claims none: the same weights again, as trained on `tokens`
        model, cfg, _ = load_model(run)
        meta = {"config": config_to_dict(cfg), "tokens": tokens, "tokenizer_sha256": tok.sha256()}
        save_checkpoint(run, 1, model_state(model), {}, meta)
    return run
