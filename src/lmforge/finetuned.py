"""Fine-tuned runs: the base checkpoint they name, loading a LoRA run (its base plus its adapters, merged),
and `lmforge merge`, which writes such a run out as a plain one.

Every checkpoint of `lmforge finetune` records its base under "base" in meta.json:

    {"checkpoint": "/abs/runs/base/checkpoints/step_0000400",   the base checkpoint directory
     "step": 400, "meta_sha256": "...",                          its step and the digest of its meta.json
     "vocab_size": 320}                                          the base's vocabulary (new tokens follow)

A LoRA checkpoint holds the adapters only, so loading it reads that base checkpoint again, and refuses it
in one line when it is gone or its metadata digest differs (it was retrained or replaced): the adapters
were trained on those weights and no others. `lmforge merge` makes a run that no longer needs the base.
Reached from `checkpoint.load_model`, so eval, generation, serving and export never import `train/`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .checkpoint import CheckpointError
from .config import Config, LoraConfig
from .config_io import config_from_dict, config_to_dict
from .lora import adapt, grow_vocab, load_trainable, merge_adapters
from .model import GPT
from .run_dir import RunDir
from .safewrite import failing_cleanly

BASE_KEY = "base"  # meta.json key of a fine-tune's base checkpoint


def base_record(ckpt: Path, meta: dict) -> dict:
    """What a fine-tune records of its base checkpoint (meta: that checkpoint's verified meta.json)."""
    return {
        "checkpoint": str(Path(ckpt).resolve()),
        "step": meta.get("step"),
        "meta_sha256": meta.get(ckpt_io.META_DIGEST),
        "vocab_size": int(meta["config"]["model"]["vocab_size"]),
    }


def check_base(record: dict, what: str) -> Path:
    """The base checkpoint a record names, when it is still there with the same metadata digest."""
    ckpt = Path(record["checkpoint"])
    hint = (
        "restore it, or fine-tune again from the base you have (`lmforge merge` makes runs that stand alone)"
    )
    if not (ckpt / ckpt_io.META_FILE).is_file():
        raise CheckpointError(f"{what}'s base checkpoint {ckpt} is missing: {hint}")
    now = ckpt_io.read_meta(ckpt).get(ckpt_io.META_DIGEST)
    if now != record.get("meta_sha256"):
        raise CheckpointError(
            f"{what}'s base checkpoint {ckpt} has changed since the fine-tune started (meta digest "
            f"{str(record.get('meta_sha256'))[:12]}, now {str(now)[:12]}): {hint}"
        )
    return ckpt


def load_lora_model(ckpt: Path, cfg: Config, adapters: dict[str, torch.Tensor], meta: dict) -> GPT:
    """The plain model of a LoRA checkpoint: its base's weights, grown to the run's vocabulary, with the
    adapters loaded and folded in (float32 on the CPU)."""
    record = meta.get(BASE_KEY)
    if not isinstance(record, dict):
        raise CheckpointError(
            f"{ckpt} holds LoRA adapters but does not name its base checkpoint: it is damaged"
        )
    base_model, _, _ = ckpt_io.load_model(check_base(record, str(ckpt)))  # a LoRA base is merged in turn
    tensors = grow_vocab(ckpt_io.model_state(base_model), record["vocab_size"], cfg.model)
    model = GPT(cfg.model)
    ckpt_io.load_model_weights(model, tensors)
    adapt(model, cfg.lora, record["vocab_size"])
    problems = load_trainable(model, adapters)
    if problems:
        raise CheckpointError(
            f"{ckpt}: the adapters do not match the run's lora settings ({'; '.join(problems[:3])})"
        )
    return merge_adapters(model)


def merge_run(run: str | Path, out: str | Path) -> Path:
    """Write a LoRA run's latest checkpoint (or the checkpoint given) as a plain run directory at `out`:
    config.yaml, tokenizer.json and one weights-only checkpoint, which every command reads as a run and
    `lmforge train`/`finetune` can start from. Nothing is left at `out` when it fails."""
    ckpt = ckpt_io.resolve_checkpoint(run)
    meta = ckpt_io.verify_checkpoint(ckpt)
    if not config_from_dict(meta["config"]).lora.rank:
        raise CheckpointError(
            f"{ckpt} is not a LoRA checkpoint (it holds every weight already): use it as it is"
        )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"--out '{out}' already exists and is not empty: choose a new folder or remove it"
        )
    model, cfg, _ = ckpt_io.load_model(ckpt)
    cfg = dataclasses.replace(cfg, lora=LoraConfig(), out=str(out))
    tensors = ckpt_io.model_state(model)
    keep = ("tokens", "tokenizer_sha256", "tokenizer_id", "data_fingerprint", "precision")
    info = {k: meta[k] for k in keep if k in meta} | {"config": config_to_dict(cfg)}
    # where the weights came from; not a "base": the merged run needs no other checkpoint to load
    info["merged_from"] = {
        "checkpoint": str(ckpt.resolve()),
        "meta_sha256": meta.get(ckpt_io.META_DIGEST),
        BASE_KEY: meta.get(BASE_KEY),
    }
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with failing_cleanly("the merged run", out, needed, then="", remove=[tmp]):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        RunDir(tmp).write_config(config_to_dict(cfg))
        shutil.copyfile(ckpt_io.tokenizer_path(ckpt), RunDir(tmp).tokenizer)
        ckpt_io.save_checkpoint(tmp, meta["step"], tensors, {}, info)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    return out
