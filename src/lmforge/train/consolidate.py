"""`lmforge consolidate`: a sharded (FSDP2) checkpoint gathered into one model.safetensors that generate,
eval and export read. A LoRA run's sharded checkpoint holds its adapters only, and so does its
consolidated copy (with the record of its base, which loading merges them onto)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from .. import checkpoint as ckpt_io
from ..checkpoint import CheckpointError
from ..run_dir import RunDir
from ..safewrite import failing_cleanly
from .dist_checkpoint import _load_tensors_only


def consolidate(run: str | Path, out: str | Path | None = None) -> Path:
    """Gather a sharded checkpoint's weights into a single-file checkpoint directory; returns it.

    `run` is a RUN_DIR (its latest checkpoint) or a sharded checkpoint directory. The output (default
    RUN_DIR/consolidated) holds model.safetensors, meta.json and tokenizer.json, so `lmforge generate` and
    `lmforge export` take it as --run. Runs in one process; no GPU or process group is needed.
    """
    from ..config_io import config_from_dict
    from ..lora import adapt, load_trainable, trainable_state
    from ..model import GPT

    ckpt = ckpt_io.resolve_checkpoint(run)
    meta = ckpt_io.verify_checkpoint(ckpt)
    if not meta.get("sharded"):
        raise CheckpointError(f"{ckpt} is already a single-file checkpoint: use it directly")
    run_dir = ckpt.parent.parent
    out = Path(out) if out is not None else RunDir(run_dir).consolidated
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty: pass another --out or remove it")
    cfg = config_from_dict(meta["config"])
    model = GPT(cfg.model)
    if cfg.lora.rank:  # the shards hold the adapters alone: gather those
        adapt(model, cfg.lora, meta["base"]["vocab_size"])
    template = trainable_state(model)
    state = {"model": {k: v for k, v in model.state_dict().items() if k in template}}
    _load_tensors_only(state, ckpt, no_dist=True)  # only the model's entries are read
    if not cfg.lora.rank:
        ckpt_io.load_model_weights(model, state["model"])
    elif problems := load_trainable(model, state["model"]):
        raise CheckpointError(
            f"{ckpt}: the adapters do not match the run's lora settings ({'; '.join(problems[:3])})"
        )

    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = trainable_state(model)
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    # a full disk is one line, and what was half-written goes (the sharded checkpoint is only read)
    with failing_cleanly("the consolidated checkpoint", out, needed, then="", remove=[tmp]):
        return _write_consolidated(tmp, out, tensors, ckpt, meta, run_dir)


def _write_consolidated(tmp: Path, out: Path, tensors: dict, ckpt: Path, meta: dict, run_dir: Path) -> Path:
    tmp.mkdir(parents=True)
    try:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / ckpt_io.MODEL_FILE))
        with contextlib.suppress(CheckpointError):  # a checkpoint copied without its run: weights still load
            shutil.copyfile(ckpt_io.tokenizer_path(run_dir), RunDir(tmp).tokenizer)  # tokenizer_path finds it
        keep = (
            "config",
            "tokens",
            "tokenizer_sha256",
            "tokenizer_id",
            "data_fingerprint",
            "precision",
            "base",
        )
        info = {k: meta[k] for k in keep if k in meta} | {"consolidated_from": str(ckpt)}
        if out.exists():
            out.rmdir()
        return ckpt_io.publish_checkpoint(tmp, out, meta["step"], info, is_step=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
