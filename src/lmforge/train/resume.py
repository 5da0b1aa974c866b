"""Resuming a run: which checkpoint, whether it fits the new config, and the state it restores.

Optimizer moments and RNG states are flattened into named tensors (safetensors) plus JSON, so nothing is
ever unpickled.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt_io
from ..checkpoint import CheckpointError
from ..config import Config, ConfigError, config_to_dict


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


def check_resume_compatible(saved: dict, cfg: Config, data_meta: dict, say=None) -> None:
    """Architecture, vocab, seq_len, tokenizer and dataset must match the checkpoint; the error names the setting.

    Changes to safe settings (lr, max_steps, intervals, ...) are allowed and reported through `say`.
    """
    old_model = saved["config"]["model"]
    for key, new in config_to_dict(cfg.model).items():
        if key in ("dropout",):
            continue
        if old_model.get(key) != new:
            raise ConfigError(
                f"model.{key}={new!r} differs from the checkpoint's {old_model.get(key)!r}: resume with the same "
                f"model settings, or start a new run with a different --out"
            )
    for what, key in (("tokenizer", "tokenizer_sha256"), ("dataset", "fingerprint")):
        old = saved.get(key if key == "tokenizer_sha256" else "data_fingerprint")
        new = data_meta.get(key)
        if old and old != new:
            raise ConfigError(
                f"the data's {what} ({key} {str(new)[:12]}) differs from the one this run was trained with "
                f"({str(old)[:12]}): use the same data, or start a new run with a different --out"
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
