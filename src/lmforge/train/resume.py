"""Resuming a run: which checkpoint, whether it fits the new config, and the state it restores.

Optimizer moments and RNG states are flattened into named tensors (safetensors) plus JSON, so nothing is
ever unpickled.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt_io
from ..checkpoint import CheckpointError
from ..config import Config, ConfigError, LoraConfig
from ..config_io import config_to_dict
from ..data.folder import data_tokenizer
from ..data.tokenizer import Tokenizer, file_sha256, tokenizer_id
from ..model.config import ModelConfig
from ..run_dir import RunDir


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Torch/CUDA RNG states as tensors; Python and NumPy states as JSON."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Put back the RNG states rng_state() saved."""
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state as named tensors plus JSON-able param groups."""
    # Flatten AdamW's state into named tensors (safetensors) and JSON-able hyper-parameters.
    sd = opt.state_dict()
    tensors = {
        f"optim/{idx}/{name}": value.detach().cpu().contiguous()
        for idx, state in sd["state"].items()
        for name, value in state.items()
    }
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Inverse of optimizer_tensors."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


# Settings a resumed run may change: they alter the schedule or the bookkeeping, not what the weights mean.
SAFE_TO_CHANGE = ("train", "eval", "checkpoint", "log", "resume", "out", "fsdp")


def has_training_state(saved: dict) -> bool:
    """Whether a checkpoint can be resumed exactly; `lmforge import` writes weights only (no optimizer,
    data position or RNG), which a run then starts from, as from --init-from."""
    return "loader" in saved


def _recorded_tokenizer_id(meta: dict, tokenizer_file: Path) -> str | None:
    """meta's tokenizer_id; for a meta written before that key existed, the id of `tokenizer_file` when it
    is the very tokenizer meta's tokenizer_sha256 names (prepare records file_sha256, import .sha256())."""
    if meta.get("tokenizer_id"):
        return meta["tokenizer_id"]
    sha = meta.get("tokenizer_sha256")
    if not sha or not tokenizer_file.is_file():
        return None
    try:
        if sha == file_sha256(tokenizer_file) or sha == Tokenizer.load(tokenizer_file).sha256():
            return tokenizer_id(tokenizer_file)
    except (OSError, ValueError):  # unreadable, or not a tokenizer (DataError): the file digests decide
        pass
    return None


def _same_tokenizer(saved: dict, cfg: Config, data_meta: dict) -> tuple[bool, str, str]:
    """(same?, the data's and the checkpoint's digest as shown): by what the tokenizers do when both sides
    know it (a copy that transformers re-saved is the same tokenizer), else by the recorded file digests."""
    old_sha, new_sha = saved.get("tokenizer_sha256"), data_meta.get("tokenizer_sha256")
    if (not old_sha and not saved.get("tokenizer_id")) or (old_sha and old_sha == new_sha):
        return True, "", ""  # the checkpoint does not say which tokenizer it had, or the very same file
    new_id = _recorded_tokenizer_id(data_meta, data_tokenizer(cfg.data or ""))
    old_id = _recorded_tokenizer_id(saved, RunDir(cfg.out).tokenizer) if new_id else None
    if new_id and old_id:
        return new_id == old_id, f"tokenizer_id {new_id[:12]}", old_id[:12]
    return old_sha == new_sha, f"tokenizer_sha256 {str(new_sha)[:12]}", str(old_sha)[:12]


def check_resume_compatible(
    saved: dict, cfg: Config, data_meta: dict, say=None, base: dict | None = None
) -> None:
    """Architecture, vocab, seq_len, adapters, tokenizer, dataset and a fine-tune's base checkpoint (`base`)
    must match the checkpoint; the error names the setting.

    Changes to safe settings (lr, max_steps, intervals, ...) are allowed and reported through `say`. A
    checkpoint without training state (an import) may also change seq_len, as --init-from may.
    """
    old_model = saved["config"]["model"]
    free = ("dropout",) if has_training_state(saved) else ("dropout", "seq_len")
    for key, new in config_to_dict(cfg.model).items():
        if key in free:
            continue
        if old_model.get(key) != new:
            raise ConfigError(
                f"model.{key}={new!r} differs from the checkpoint's {old_model.get(key)!r}: resume with the same "
                f"model settings, or start a new run with a different --out"
            )
    old_optimizer = saved["config"].get("train", {}).get("optimizer", "adamw")
    if has_training_state(saved) and old_optimizer != cfg.train.optimizer:
        raise ConfigError(
            f"train.optimizer={cfg.train.optimizer!r} differs from the checkpoint's {old_optimizer!r}: its saved "
            f"state is {old_optimizer}'s; resume with --train.optimizer={old_optimizer}, or start a new run "
            f"with a different --out"
        )
    if has_training_state(saved):
        _check_same_adapters(saved, cfg)
        _check_same_base(saved, base, cfg.out)
    same, new_shown, old_shown = _same_tokenizer(saved, cfg, data_meta)
    old_fp, new_fp = saved.get("data_fingerprint"), data_meta.get("fingerprint")
    for what, ok, new, old in (
        ("tokenizer", same, new_shown, old_shown),
        ("dataset", not old_fp or old_fp == new_fp, f"fingerprint {str(new_fp)[:12]}", str(old_fp)[:12]),
    ):
        if not ok:
            raise ConfigError(
                f"the data's {what} ({new}) differs from the one this run was trained with ({old}): use the "
                f"same data, or start a new run with a different --out"
            )
    if say is None:
        return
    now = config_to_dict(cfg)
    for section in SAFE_TO_CHANGE:
        before, after = saved["config"].get(section), now.get(section)
        if isinstance(after, dict) and isinstance(before, dict):
            for key, value in after.items():
                if key in before and before[key] != value:
                    say(f"note: {section}.{key} {before[key]!r} -> {value!r} (changed since the checkpoint)")


def _check_same_adapters(saved: dict, cfg: Config) -> None:
    """A resume keeps the run's LoRA settings: its adapters were saved with those shapes and layers."""
    old = {**config_to_dict(LoraConfig()), **(saved["config"].get("lora") or {})}
    for key, new in config_to_dict(cfg.lora).items():
        if old.get(key) != new:
            raise ConfigError(
                f"lora.{key}={new!r} differs from the checkpoint's {old.get(key)!r}: resume with the same "
                f"lora settings, or start a new fine-tune with a different --out"
            )


def _check_same_base(saved: dict, base: dict | None, out: str) -> None:
    """A fine-tune resumes on the very base checkpoint it started from; a run that is not one takes none."""
    old = saved.get("base")
    if old is None and base is None:
        return
    if old is None:
        raise ConfigError(
            f"{out} is not a fine-tune (its checkpoints have no base): fine-tune into a new --out, or resume "
            f"it with `lmforge train`"
        )
    if base is None:
        raise ConfigError(
            f"{out} is a fine-tune of {old['checkpoint']}: resume it with `lmforge finetune --from "
            f"{old['checkpoint']} ...` (the same command that started it)"
        )
    for key in ("checkpoint", "meta_sha256"):
        if old.get(key) != base.get(key):
            raise ConfigError(
                f"the base checkpoint ({base['checkpoint']}, meta digest "
                f"{str(base.get('meta_sha256'))[:12]}) differs from the one this fine-tune started from "
                f"({old['checkpoint']}, {str(old.get('meta_sha256'))[:12]}): use the same base, or start a "
                f"new fine-tune with a different --out"
            )


def resume_meta(cfg: Config) -> dict | None:
    """meta.json of the checkpoint cfg.resume points at, unverified (train verifies it), or None."""
    if cfg.resume == "never":
        return None
    ckpt = ckpt_io.latest_checkpoint(cfg.out) if cfg.resume == "auto" else Path(cfg.resume)
    try:
        return ckpt_io.read_meta(ckpt) if ckpt is not None else None
    except CheckpointError:
        return None  # train reports a damaged checkpoint properly


def model_from_checkpoint(cfg: Config, given: dict) -> Config:
    """For a resume: model settings left at train's defaults come from the checkpoint (e.g. an imported
    run's architecture); `given` (the command's raw model.* values: flags, --config, a preset) must match
    it, which check_resume_compatible enforces. A fresh run's cfg is returned as it is."""
    saved_cfg = (resume_meta(cfg) or {}).get("config")
    old = saved_cfg.get("model") if isinstance(saved_cfg, dict) else None
    if not isinstance(old, dict):
        return cfg
    defaults = config_to_dict(ModelConfig())
    chosen = {k: v for k, v in given.items() if k in defaults and v != defaults[k]}
    try:
        model = ModelConfig(**{**old, **chosen}).resolved()
    except (TypeError, ValueError):
        return cfg  # a checkpoint config this version cannot build: the compatibility check names it
    return dataclasses.replace(cfg, model=model)


def find_resume_point(cfg: Config, run_dir: Path, warn) -> tuple[Path | None, dict | None]:
    """(checkpoint, verified meta) to resume from according to cfg.resume, or (None, None) for a fresh run."""
    if cfg.resume == "never":
        if ckpt_io.step_checkpoints(run_dir):
            raise ConfigError(
                f"resume=never but {run_dir} already has checkpoints: choose another --out, "
                f"or pass --resume=auto to continue that run"
            )
        return None, None
    if cfg.resume == "auto":
        found = ckpt_io.find_valid_checkpoint(run_dir, warn)
        return found if found else (None, None)
    path = Path(cfg.resume)
    if not path.is_dir():
        raise CheckpointError(
            f"resume={cfg.resume}: no such checkpoint directory: pass auto, never or RUN_DIR/checkpoints/step_N"
        )
    return path, ckpt_io.verify_checkpoint(path)
