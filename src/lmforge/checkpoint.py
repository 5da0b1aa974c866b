"""Checkpoints: save (atomically), find, verify, load. Where they live in a run is `run_dir.py`'s.

    RUN_DIR/checkpoints/step_0000500/
      model.safetensors        weights (a tied output head is stored once, as wte.weight)
      train_state.safetensors  optimizer moments and RNG states (tensors only)
      meta.json                what `checkpoint_meta` gathers (config, tokens, tokenizer, data, loader
                               state, RNG, precision, guards), the optimizer's hyper-parameters, the step,
                               the SHA-256 of each file, and the SHA-256 of meta.json's own content

Tensors live in safetensors and everything else in JSON, so loading a checkpoint never unpickles anything.
Eval, generation, export and serving read runs through this module and never import `train/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import Config
from .config_io import config_from_dict, config_to_dict
from .data.folder import shard_glob
from .errors import LmforgeError
from .model import GPT
from .run_dir import BEST as BEST  # re-exported: callers know checkpoints by this module
from .run_dir import CHECKPOINT_META, LATEST, RunDir
from .run_dir import step_dir_name as step_dir_name
from .safewrite import io_errno, remove_quietly, write_failure

# 2: meta.json carries META_DIGEST, the SHA-256 of its other content. Checkpoints of format 1 (written
# before it existed) still load, unverified metadata and all; from format 2 on a missing digest is damage.
FORMAT_VERSION = 2
META_DIGEST = "meta_sha256"
CKPT_DIR = RunDir.checkpoints
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
META_FILE = CHECKPOINT_META
SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint (FSDP runs)


class CheckpointError(LmforgeError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match; the message says which file and what to do."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory entry itself is flushed (POSIX).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors for saving: contiguous CPU copies, a tied output head stored once."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    sd = model.state_dict()
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_tensors: dict[str, torch.Tensor],
    state_tensors: dict[str, torch.Tensor],
    meta: dict,
    keep_last: int | None = None,
    name: str | None = None,
) -> Path:
    """Write a checkpoint into a temporary directory, flush it, rename it into place, then move `latest`.

    `name` (e.g. "best") writes a side checkpoint: same format, but `latest` and rotation are left alone.
    A failed write (a full disk) raises CheckpointError in one line, with the room it needed and the room
    free; the previous checkpoints stay as they were and the temporary directory is removed.
    """
    final = RunDir(run_dir).checkpoint(step, name)
    ckpt_root = final.parent
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    needed = sum(t.numel() * t.element_size() for t in (*model_tensors.values(), *state_tensors.values()))
    with _discard_on_failure(tmp, final, needed):
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_file(model_tensors, str(tmp / MODEL_FILE))
        save_file(state_tensors, str(tmp / STATE_FILE))
    return publish_checkpoint(tmp, final, step, meta, keep_last, is_step=name is None)


@contextlib.contextmanager
def _discard_on_failure(tmp: Path, final: Path, needed: int | None = None) -> Iterator[None]:
    """Remove what a failed save half-wrote; a failed write (a full disk, also inside safetensors) becomes
    one line naming the checkpoint that stays the resume point."""
    try:
        yield
    except BaseException as e:
        remove_quietly(tmp)
        remove_quietly(_latest_tmp(final.parent))
        if io_errno(e) is None or isinstance(e, CheckpointError):
            raise
        raise CheckpointError(write_failure("checkpoint", final, e, needed, _resume_hint(final))) from e


def _resume_hint(final: Path) -> str:
    if final.parent.name != CKPT_DIR:  # a consolidated copy, not part of a run's checkpoints
        return ", then run the same command again"
    try:
        previous = latest_checkpoint(final.parent.parent)
    except OSError:  # the hint must not hide the error it is part of
        return ", then run the same command again"
    if previous is None:
        return ", then run the same command again (the run has no checkpoint yet: it starts over)"
    return f", then run the same command again to resume from {previous.name} (it is intact)"


def publish_checkpoint(
    tmp: Path, final: Path, step: int, meta: dict, keep_last: int | None = None, is_step: bool = True
) -> Path:
    """Checksum every file of a filled temporary directory, write meta.json, rename it into place, move
    `latest` (step checkpoints only) and rotate. The one commit point for every checkpoint format.

    On failure the temporary directory is removed and the previous checkpoints stay as they were.
    """
    ckpt_root = final.parent
    with _discard_on_failure(tmp, final):
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[path.relative_to(tmp).as_posix()] = sha256_file(path)
        _write_json(tmp / META_FILE, sealed_meta(meta, step, files))
        _fsync_dir(tmp)
        old = None
        if final.exists():  # a re-save of the same step: keep the old copy until the new one is in place
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if old is not None:
                os.replace(old, final)  # the old copy goes back rather than away with the leftovers
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(ckpt_root)
        if is_step:
            latest_tmp = _latest_tmp(ckpt_root)
            latest_tmp.write_text(final.name + "\n")
            os.replace(latest_tmp, RunDir(ckpt_root.parent).latest_marker)
            _fsync_dir(ckpt_root)
    if keep_last and is_step:
        _rotate(ckpt_root, keep_last)
    return final


def _latest_tmp(ckpt_root: Path) -> Path:
    # the `latest` marker is written here first, then renamed over the old one
    return ckpt_root / f".{LATEST}.tmp"


def checkpoint_meta(
    cfg: Config,
    tokens: int,
    data_meta: dict,
    loader: dict,
    rng: dict,
    precision: str,
    guards: dict,
    **extra: Any,
) -> dict:
    """What every training checkpoint records of the run besides its tensors: the config, tokens seen,
    which tokenizer and data (a resume refuses others), the loader's position, the RNG states kept in JSON,
    the precision and the guards' state; `extra` adds keys (val_loss for `best`).

    The checkpointer (train/dist_checkpoint.py) adds how it wrote the tensors (world size, sharded, the
    optimizer's groups), and `sealed_meta` the format version, step, checksums and digest."""
    return {
        "config": config_to_dict(cfg),
        "tokens": tokens,
        "tokenizer_sha256": data_meta.get("tokenizer_sha256"),
        "tokenizer_id": data_meta.get("tokenizer_id"),
        "data_fingerprint": data_meta.get("fingerprint"),
        "loader": loader,
        "rng": rng,
        "precision": precision,
        "guards": guards,
        **extra,
    }


def sealed_meta(meta: dict, step: int, files: dict[str, str]) -> dict:
    """meta.json's content: `meta` with the format version, the step, each file's SHA-256 and, over all of
    that, the metadata's own digest. Every checkpoint is written through this (by publish_checkpoint)."""
    body = {**meta, "format_version": FORMAT_VERSION, "step": step, "files": files}
    body = json.loads(json.dumps(body))  # the digest is over what a reader will parse back
    return {**body, META_DIGEST: meta_digest(body)}


def _rotate(ckpt_root: Path, keep_last: int) -> None:
    # Keep the newest `keep_last` complete checkpoints, and never let a failed delete stop training.
    # meta.json goes first: a kill halfway leaves a directory without it, which is never a resume point
    # and which clean_leftovers removes on the next start.
    for old in RunDir(ckpt_root.parent).complete_checkpoints()[:-keep_last]:
        try:
            (old / META_FILE).unlink()
            shutil.rmtree(old)
        except OSError as e:
            warnings.warn(f"could not delete old checkpoint {old}: {e}", stacklevel=2)


def clean_leftovers(run_dir: str | Path) -> list[Path]:
    """Remove what an interrupted save or rotation left behind; return the removed paths.

    That is temporary directories (`.tmp-*`, `.old-*`) and `step_*` directories without meta.json that
    are older than the newest complete checkpoint (a rotation killed halfway). A newer incomplete one is
    kept: find_valid_checkpoint reports it, and the run writes that step again when it gets there.
    """
    run = RunDir(run_dir)
    found = [p for pattern in (".tmp-*", ".old-*") for p in run.checkpoints.glob(pattern)]
    found += [p for p in (_latest_tmp(run.checkpoints),) if p.exists()]
    complete = run.complete_checkpoints()
    if complete:
        found += [p for p in run.step_checkpoints() if p.name < complete[-1].name and p not in complete]
    for p in found:
        remove_quietly(p)
    return found


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    return RunDir(run_dir).complete_checkpoints()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (the `latest` marker, else the highest step), or None."""
    return RunDir(run_dir).latest_checkpoint()


def meta_digest(meta: dict) -> str:
    """SHA-256 of a checkpoint's metadata (without the digest itself) as canonical JSON."""
    body = {k: v for k, v in meta.items() if k != META_DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_meta(ckpt: str | Path) -> dict:
    """meta.json of a checkpoint."""
    path = Path(ckpt) / META_FILE
    if not path.is_file() and Path(ckpt).is_dir():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: unreadable checkpoint metadata (not a JSON object)")
    return meta


def verify_checkpoint(ckpt: str | Path) -> dict:
    """Check the metadata and every file against the SHA-256s recorded at save time; return the metadata."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    _verify_meta_digest(ckpt / META_FILE, meta)
    files = meta.get("files")
    has_weights = MODEL_FILE in files if isinstance(files, dict) else False
    if meta.get("sharded") and isinstance(files, dict):  # torch.distributed.checkpoint shards (FSDP)
        has_weights = SHARDED_INDEX in files
    if not isinstance(files, dict) or not has_weights or not isinstance(meta.get("step"), int):
        raise CheckpointError(
            f"{ckpt / META_FILE}: incomplete checkpoint metadata (no step or file checksums)"
        )
    for name, digest in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupt or was modified)")
    return meta


def _verify_meta_digest(path: Path, meta: dict) -> None:
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version {version!r} is not a checkpoint format")
    if version < 2:  # written before the metadata had a digest: accepted as it is (see FORMAT_VERSION)
        return
    if meta.get(META_DIGEST) != meta_digest(meta):
        what = "has no checksum" if META_DIGEST not in meta else "does not match its checksum"
        raise CheckpointError(f"{path}: the metadata {what} (the file is corrupt or was edited)")


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every step checkpoint directory of a run, complete or not, oldest first."""
    return RunDir(run_dir).step_checkpoints()


def find_valid_checkpoint(run_dir: str | Path, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The newest checkpoint whose files match their checksums, with its metadata.

    A corrupt one (flipped byte, truncated, empty or missing file, a meta.json that is unreadable, edited
    or missing) is reported through `warn`, naming the file, and the next older one is tried. None when
    the run has no checkpoint directories at all; CheckpointError when it has some but none is valid.
    """
    run = RunDir(run_dir)
    candidates = run.step_checkpoints()[::-1]
    marked = run.marked_checkpoint()
    if marked in candidates:  # the marker wins over the highest name; if incomplete, it is reported
        candidates.remove(marked)
        candidates.insert(0, marked)
    for i, ckpt in enumerate(candidates):
        try:
            return ckpt, verify_checkpoint(ckpt)
        except CheckpointError as e:
            nxt = f"falling back to {candidates[i + 1].name}" if i + 1 < len(candidates) else "no older one"
            warn(f"warning: checkpoint {ckpt.name} is unusable: {e}; {nxt}")
    if candidates or run.latest_marker.is_file():  # `latest` alone: they were deleted
        raise CheckpointError(
            f"no valid checkpoint in {run.checkpoints} ({len(candidates)} found, none usable): "
            f"start a new run with another --out, or pass --resume=PATH_TO_A_GOOD_CHECKPOINT"
        )
    return None


def load_checkpoint(ckpt: str | Path, verify: bool = True) -> tuple[dict, dict, dict]:
    """(model tensors, train-state tensors, meta) of a checkpoint, on the CPU."""
    ckpt = Path(ckpt)
    meta = verify_checkpoint(ckpt) if verify else read_meta(ckpt)
    if meta.get("sharded"):
        raise CheckpointError(
            f"{ckpt} is a sharded checkpoint (train.parallel=fsdp): run `lmforge consolidate --run "
            f"{ckpt}` and use the directory it writes"
        )
    model_sd = _load_tensors(ckpt / MODEL_FILE)
    state_path = ckpt / STATE_FILE
    state = _load_tensors(state_path) if state_path.is_file() else {}
    return model_sd, state, meta


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; anything else (e.g. a pickle under that name) is one line, never loaded."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(
            f"{path}: not a safetensors file ({e}); lmforge loads weights only from safetensors and never "
            f"unpickles: the checkpoint was not written by lmforge or was modified"
        ) from None


def load_model_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into a model; a tied head may be absent, anything else must match exactly."""
    model = getattr(model, "_orig_mod", model)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if model.cfg.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}"
        )


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (its latest) or a checkpoint directory itself."""
    path = Path(path)
    if (path / META_FILE).is_file() and ((path / MODEL_FILE).is_file() or (path / SHARDED_INDEX).is_file()):
        return path
    if not path.exists():
        raise CheckpointError(f"run '{path}' does not exist: pass a RUN_DIR written by `lmforge train`")
    ckpt = latest_checkpoint(path)
    if ckpt is None and any(path.glob(shard_glob("train"))):  # token shards: what `lmforge prepare` writes
        raise CheckpointError(
            f"'{path}' is a data folder, not a run: pass a RUN_DIR (`lmforge train --data {path} --out RUN_DIR` "
            "makes one)"
        )
    if ckpt is None:
        raise CheckpointError(
            f"run '{path}' has no checkpoint yet: train it first (`lmforge train --out {path}`)"
        )
    return ckpt


def load_model(
    run: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, Config, Path]:
    """Build the model of a run (or checkpoint directory) with its saved weights, in eval mode, as trained:
    plain nn.Linear layers (whoever decodes applies its own layout, `generate/layout.py`); a LoRA run's
    adapters are folded into its base's weights (`finetuned.py`)."""
    ckpt = resolve_checkpoint(run)
    model_sd, _, meta = load_checkpoint(ckpt)
    cfg = config_from_dict(meta["config"])
    if cfg.lora.rank:  # adapters only: merged onto their base here, so every reader gets a plain model
        from .finetuned import load_lora_model

        model = load_lora_model(ckpt, cfg, model_sd, meta)
    else:
        model = GPT(cfg.model)
        load_model_weights(model, model_sd)
    model.to(device=device, dtype=dtype).eval()
    return model, cfg, ckpt


def tokenizer_path(run: str | Path) -> Path:
    """The tokenizer of a run, of the run holding a checkpoint directory, or the one a consolidated
    checkpoint carries under the run's file name."""
    path = Path(run)
    for candidate in (RunDir(path).tokenizer, RunDir(path.parent.parent).tokenizer):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"no {RunDir.tokenizer} in run '{path}': the run directory is incomplete")


def read_metrics(run: str | Path) -> list[dict]:
    """All records of a run's metrics (a torn last line, from a crash mid-write, is skipped)."""
    return RunDir(run).read_metrics()
