"""`lmforge finetune`: the same training loop, started from a base run's weights on another data folder.

What is particular to a fine-tune happens here, before the loop: which base checkpoint (the base run's
latest, or on a resume the one the run started from), whether the data's tokenizer extends the base's, the
model settings (the base's architecture; the data's vocabulary, grown with mean rows, `lora.py`), the
default budget, and the record of the base that every checkpoint carries. From there `train()` runs as for
pretraining, so resume, signals, the NaN guard, early stopping and DDP/FSDP2 behave the same.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.console import Console

from .. import checkpoint as ckpt_io
from ..config import Config, ConfigError
from ..config_io import config_to_dict
from ..data import load_meta
from ..data.folder import data_tokenizer
from ..data.tokenizer import Tokenizer
from ..finetuned import base_record, check_base
from ..lora import grow_vocab
from ..model.config import ModelConfig
from .loop import TrainResult, train
from .resume import resume_meta

# With no budget given: this many passes over the SFT train split. Small instruction sets are usually
# trained for 2-3 epochs; more starts to memorise the answers.
DEFAULT_EPOCHS = 3
# Model settings a fine-tune may set itself; the rest are the base's (its weights have those shapes).
FREE_MODEL_KEYS = ("seq_len", "dropout")


def base_checkpoint(base_run: str, cfg: Config) -> Path:
    """The checkpoint a fine-tune starts from: the base run's latest (or the checkpoint directory given);
    on a resume the one the run started from, which --from must name (or name its run)."""
    saved = resume_meta(cfg)
    record = (saved or {}).get("base")
    if not record:  # a fresh run (a resume of something else is refused by the loop, in one line)
        return ckpt_io.resolve_checkpoint(base_run)
    started = Path(record["checkpoint"])
    if Path(base_run).resolve() not in (started, started.parent.parent):
        raise ConfigError(
            f"--from {base_run} is not the base this fine-tune started from ({started}): pass --from "
            f"{started.parent.parent}, or start a new fine-tune with a different --out"
        )
    return check_base(record, cfg.out)


def extension_problem(base: Tokenizer, data: Tokenizer) -> str | None:
    """Why the data's tokenizer is not the base's plus special tokens at new ids, or None when it is."""
    base_tree, data_tree = json.loads(base.hf.to_str()), json.loads(data.hf.to_str())
    for part in ("model", "normalizer", "pre_tokenizer", "decoder"):
        if base_tree.get(part) != data_tree.get(part):
            return f"its {part} differs from the base's, so the same text becomes other tokens"
    base_vocab, data_vocab = base.hf.get_vocab(), data.hf.get_vocab()
    for token, i in sorted(base_vocab.items(), key=lambda item: item[1]):
        if data_vocab.get(token) != i:
            there = f"id {data_vocab[token]}" if token in data_vocab else "absent"
            return f"the base's token {token!r} (id {i}) is {there} there"
    special = {t.content for t in data.hf.get_added_tokens_decoder().values() if t.special}
    added = sorted((i, t) for t, i in data_vocab.items() if t not in base_vocab)
    for i, token in added:
        if token not in special or i < base.vocab_size:
            return f"it adds {token!r} (id {i}), which is not a special token after the base's ids"
    return None


def check_extends(base_file: Path, data_dir: str) -> None:
    """One line when the data's tokenizer does not extend the base run's."""
    problem = extension_problem(Tokenizer.load(base_file), Tokenizer.load(data_tokenizer(data_dir)))
    if problem:
        raise ConfigError(
            f"the tokenizer of {data_dir} does not extend the base run's ({problem}): prepare the data "
            f"with the base run's tokenizer (`lmforge prepare --tokenizer {base_file} ...`; with --chat for "
            f"conversations)"
        )


def with_base_model(cfg: Config, base: ModelConfig, given: dict, data_meta: dict) -> Config:
    """cfg with the base's model settings, the data's vocabulary and, for conversations, the seq_len they
    were packed for; a given model.* other than seq_len or dropout that differs from the base is one line
    (the base weights have its shapes)."""
    defaults = config_to_dict(ModelConfig())
    chosen = {k: v for k, v in given.items() if k in defaults and v != defaults[k]}
    for key, value in chosen.items():
        if key not in FREE_MODEL_KEYS and key != "vocab_size" and value != getattr(base, key):
            raise ConfigError(
                f"model.{key}={value!r} differs from the base run's {getattr(base, key)!r}: a fine-tune "
                f"keeps the base's architecture (only model.seq_len and model.dropout may change)"
            )
    free = {k: chosen[k] for k in FREE_MODEL_KEYS if k in chosen}
    if data_meta.get("kind") == "chat" and "seq_len" not in free:  # its windows have this length
        free["seq_len"] = data_meta.get("seq_len")
    try:
        model = dataclasses.replace(base, **free, vocab_size=int(data_meta["vocab_size"])).resolved()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return dataclasses.replace(cfg, model=model, preset=None)


def epochs_budget(cfg: Config, data_meta: dict) -> tuple[Config, str]:
    """cfg with a budget of DEFAULT_EPOCHS passes over the data's train windows (as train.max_tokens, the
    budget that does not depend on the batch size), and the line that says so."""
    seq_len, tokens = cfg.model.seq_len, int(data_meta["splits"]["train"]["tokens"])
    # the windows the batch source cuts: packed conversations of seq_len + 1 tokens, or a stream's windows
    windows = tokens // (seq_len + 1) if data_meta.get("kind") == "chat" else (tokens - 1) // seq_len
    budget = max(1, DEFAULT_EPOCHS * windows * seq_len)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=None, max_tokens=budget))
    epochs = f"{DEFAULT_EPOCHS} epochs of {windows} train windows"
    return cfg, f"train.max_tokens={budget}: {epochs}, the fine-tuning default"


def finetune(
    cfg: Config, base_run: str, model_given: dict, console: Console, budget: str | None, dry_run: bool = False
) -> TrainResult | None:
    """Fine-tune (or resume fine-tuning) cfg.out from base_run on cfg.data; None for a dry run.

    model_given: the command's model.* values; budget: where the step budget came from (options.py), or
    None when none was given, which makes it DEFAULT_EPOCHS epochs of the data."""
    if cfg.data is None:
        raise ConfigError("data is not set: pass --data DATA_DIR (made by `lmforge prepare`)")
    data_meta = load_meta(cfg.data)
    ckpt = base_checkpoint(base_run, cfg)
    base_model, base_cfg, _ = ckpt_io.load_model(ckpt)  # verified; a LoRA base comes merged
    meta = ckpt_io.read_meta(ckpt)
    check_extends(ckpt_io.tokenizer_path(ckpt), cfg.data)
    base_vocab = int(base_cfg.model.vocab_size)
    cfg = with_base_model(cfg, base_cfg.model, model_given, data_meta)
    if budget is None:
        cfg, budget = epochs_budget(cfg, data_meta)
    console.print(f"budget: {budget}", highlight=False, soft_wrap=True)
    console.print(f"base: {ckpt} (step {meta.get('step')})", highlight=False, soft_wrap=True)
    if cfg.model.vocab_size > base_vocab:
        console.print(
            f"vocabulary {base_vocab} -> {cfg.model.vocab_size}: the data's tokenizer adds "
            f"{cfg.model.vocab_size - base_vocab} tokens, whose rows start as the mean of the base's",
            highlight=False,
            soft_wrap=True,
        )
    tensors = grow_vocab(ckpt_io.model_state(base_model), base_vocab, cfg.model)
    del base_model
    return train(cfg, dry_run=dry_run, console=console, init_tensors=tensors, base=base_record(ckpt, meta))
