"""Training checkpoints for every parallel mode: one writer for DDP, sharded files for FSDP2.

DDP (and a single process) keeps the single-file format of `checkpoint.py`: rank 0 holds the whole model
and writes it. FSDP2 writes through `torch.distributed.checkpoint` (DCP): every rank writes its own
shard of the weights and optimizer state into one temporary directory; after a barrier rank 0 checksums
the files, writes meta.json and renames the directory into place with the same `publish_checkpoint` as
single-file checkpoints (atomic, `latest`, rotation, SHA-256 of every file).

Resuming: a sharded checkpoint can be loaded at any world size and into either parallel mode; DCP
re-slices each tensor for the new layout. On the same world size the resume is exact. On another one
the weights, optimizer state and RNG are restored exactly and the data continues after the windows the
run had consumed (see `loader_state_for`), but the last partial pass over the data differs a little,
because each rank's share of an epoch is rounded down to whole windows.

Nothing is unpickled: a sharded checkpoint holds tensors only (any other value of the training state goes
to meta.json), its index (`.metadata`, a pickle) is read with an allow-list of the classes DCP writes and
must describe tensors only, and the shards are read here with `weights_only=True`. A checkpoint with
non-tensor items, which DCP itself would unpickle, is refused before anything is read.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint as ckpt_io
from ..checkpoint import CheckpointError
from ..lora import has_adapters, load_trainable, trainable_state
from ..run_dir import RunDir
from .distributed import DistEnv, all_ok
from .resume import load_optimizer, optimizer_tensors

SHARDED_TMP = ".tmp-{name}-sharded"  # one name every rank can compute (pids differ between ranks)


# --- reading a sharded checkpoint: tensors only, nothing unpickled -----------------------------------
#
# DCP stores tensors with torch.save (read back with weights_only=True) and any other value as raw bytes
# that its loader hands to torch.load(weights_only=False), i.e. a pickle that can run code. lmforge never
# writes such items (see _split_non_tensors), so its reader refuses them at three points: the index's
# unpickler does not know BytesStorageMetadata, the loaded index must describe tensors only, and
# read_data refuses byte items and loads every tensor itself with weights_only=True.

_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def _non_tensor_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: the sharded checkpoint holds non-tensor (pickled) items ({what}), which lmforge never "
        f"loads because unpickling them can run code: it was not written by lmforge or was modified; "
        f"nothing was loaded"
    )


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, f, path: Path) -> None:
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name == "BytesStorageMetadata":
            raise _non_tensor_error(self.path, "BytesStorageMetadata")
        raise CheckpointError(
            f"{self.path}: the sharded checkpoint index refers to {module}.{name}, which a checkpoint never "
            f"needs: the file is not an lmforge checkpoint (it was not loaded)"
        )


def _check_tensors_only(metadata, index: Path) -> None:
    """Refuse an index that describes anything but tensors stored in plain files of its own directory."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    if not (
        isinstance(metadata, Metadata)
        and isinstance(metadata.state_dict_metadata, dict)
        and isinstance(metadata.storage_data, dict)
    ):
        raise CheckpointError(f"{index}: not a sharded checkpoint index (nothing was loaded)")
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise _non_tensor_error(index, f"{fqn} is a {type(item).__name__}")
    for info in metadata.storage_data.values():
        rel = getattr(info, "relative_path", None)
        # Shards are files beside the index, covered by meta.json's checksums; lmforge writes no transforms.
        if not isinstance(info, _StorageInfo) or not isinstance(rel, str) or Path(rel).name != rel:
            raise CheckpointError(f"{index}: refers to data outside its checkpoint directory ({rel!r})")
        if rel in ("", ".", "..") or getattr(info, "transform_descriptors", None):  # older torch: absent
            raise CheckpointError(f"{index}: refers to transformed or missing shard data ({rel!r})")


def _read_tensors(reader, plan, planner) -> None:
    """Fill the planner's tensors from the shard files; byte items and pickled objects are refused."""
    from torch.distributed.checkpoint.planner import LoadItemType

    index = Path(reader.path) / ckpt_io.SHARDED_INDEX
    for req in plan.items:
        if req.type == LoadItemType.BYTE_IO:
            raise _non_tensor_error(index, f"{req.storage_index.fqn} is stored as bytes")
    for req in plan.items:
        info = reader.storage_data[req.storage_index]
        path = Path(reader.path) / info.relative_path
        with open(path, "rb") as f:
            f.seek(info.offset)
            blob = io.BytesIO(f.read(info.length))
        try:
            tensor = torch.load(blob, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only raises UnpicklingError, a bad zip RuntimeError, ...
            raise CheckpointError(
                f"{path}: item {req.storage_index.fqn} is not plain tensor data ({type(e).__name__}); "
                f"lmforge never unpickles it: the checkpoint was not written by lmforge or was modified"
            ) from None
        if not isinstance(tensor, torch.Tensor):
            raise _non_tensor_error(index, f"{req.storage_index.fqn} holds a {type(tensor).__name__}")
        for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths, strict=True)):
            tensor = tensor.narrow(dim, start, length)  # this rank's chunk of the saved chunk
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise CheckpointError(
                f"{path}: item {req.storage_index.fqn} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(target.shape)}: the checkpoint index and its shards do not match"
            )
        target.copy_(tensor)
        planner.commit_tensor(req, target)


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """FileSystemReader for tensors only: an allow-listed, checked index and weights-only tensor loads."""

        def read_metadata(self, *args, **kwargs):
            index = Path(self.path) / ckpt_io.SHARDED_INDEX
            try:
                with open(index, "rb") as f:
                    metadata = _AllowListUnpickler(f, index).load()
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
                raise CheckpointError(f"{index}: unreadable sharded checkpoint index ({e})") from e
            _check_tensors_only(metadata, index)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            _read_tensors(self, plan, planner)
            done = torch.futures.Future()
            done.set_result(None)
            return done

    return SafeReader(str(path))


def _load_tensors_only(state: dict, ckpt: Path, **kwargs) -> None:
    """`dcp.load` into `state` through the safe reader; its refusals come out as one-line CheckpointErrors."""
    import torch.distributed.checkpoint as dcp

    reader = _safe_reader(ckpt)
    reader.read_metadata()  # refuse before DCP plans anything (DCP would wrap the error in its own)
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=reader, **kwargs)
    except dcp.api.CheckpointException as e:
        for failure in e.failures.values():
            err = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(err, CheckpointError):
                raise err from None
        raise


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns that it "assumes" one process when no process group exists; here that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _split_non_tensors(tree: dict) -> tuple[dict, dict]:
    """(the nested dict with its tensors only, its other leaves in the same nesting).

    DCP would store a non-tensor leaf (e.g. an optimizer's int step count) as a pickle, which no reader
    here loads; those leaves go to meta.json instead and `_merge` puts them back after loading.
    """
    tensors, others = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            tensors[key], sub = _split_non_tensors(value)
            if sub:
                others[key] = sub
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            others[key] = value
    return tensors, others


def _merge(tree: dict, others: dict) -> None:
    """Put the leaves `_split_non_tensors` took out (as read back from meta.json) into `tree`."""
    for key, value in others.items():
        if isinstance(value, dict):
            _merge(tree.setdefault(key, {}), value)
        else:
            tree[key] = value


# --- the checkpointer the training loop uses ---------------------------------------------------------


class Checkpointer:
    """Saves and restores the model and optimizer of a run in the format of its parallel mode."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, sharded: bool
    ) -> None:
        self.model, self.optimizer, self.env, self.sharded = model, optimizer, env, sharded

    def _model_state(self) -> tuple[dict, object]:
        """(the model's state dict for DCP, the options that load it back): with adapters, the trainable
        tensors alone (DCP's own filter keeps a tied head, which is no parameter of its own)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        frozen = has_adapters(self.model)
        options = StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)
        sd = get_model_state_dict(self.model, options=options)
        if frozen:
            trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
            sd = {k: v for k, v in sd.items() if k in trainable}
        return sd, options

    def save(
        self,
        run_dir: Path,
        step: int,
        meta: dict,
        rng_tensors: dict[str, torch.Tensor],
        keep_last: int | None,
        name: str | None = None,
    ) -> Path:
        """Write a checkpoint (collective under FSDP: every rank must call it); returns its directory.

        `meta` is `checkpoint_meta`'s; this adds how the tensors were written (the readers dispatch on it)."""
        meta = {**meta, "world_size": self.env.world_size, "sharded": self.sharded}
        if not self.sharded:
            final = RunDir(run_dir).checkpoint(step, name)
            if self.env.is_main:
                opt_tensors, groups = optimizer_tensors(self.optimizer)
                model_tensors = trainable_state(self.model)  # LoRA: the adapters; the base is the base run's
                meta["optimizer_groups"] = groups
                ckpt_io.save_checkpoint(
                    run_dir, step, model_tensors, {**opt_tensors, **rng_tensors}, meta, keep_last, name
                )
            return final
        return self._save_sharded(Path(run_dir), step, meta, rng_tensors, keep_last, name)

    def _save_sharded(self, run_dir, step, meta, rng_tensors, keep_last, name) -> Path:
        import torch.distributed.checkpoint as dcp

        final = RunDir(run_dir).checkpoint(step, name)
        tmp = final.parent / SHARDED_TMP.format(name=final.name)
        error: BaseException | None = None
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                error = e
        if all_ok(error is None):  # also the barrier: no rank writes before the directory exists
            model_sd, optim_sd, groups = self._state_dicts()
            meta["optimizer_state"] = optim_sd is not None
            state = {"model": model_sd, "rng": rng_tensors} | ({"optim": optim_sd} if optim_sd else {})
            state, others = _split_non_tensors(state)
            try:
                meta["non_tensor_state"] = json.loads(json.dumps(others))  # TypeError: not JSON-able
                dcp.save(state, checkpoint_id=str(tmp))
            except (OSError, TypeError, dcp.api.CheckpointException) as e:  # DCP's is raised on every rank
                error = e
        if not all_ok(error is None):
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"could not write sharded checkpoint {final} on rank {self.env.rank} or another rank "
                f"({error or 'see the failing rank'}): free space or fix permissions, then run again to resume"
            )
        if self.env.is_main:
            meta["optimizer_groups"] = [
                {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups
            ]
            try:
                ckpt_io.publish_checkpoint(tmp, final, step, meta, keep_last, is_step=name is None)
            except CheckpointError as e:
                error = e
        if not all_ok(error is None):
            raise (
                error
                if isinstance(error, CheckpointError)
                else CheckpointError(f"rank 0 could not publish checkpoint {final}: see rank 0's error")
            )
        return final

    def _state_dicts(self) -> tuple[dict, dict | None, list[dict]]:
        """(model, optimizer state or None before the first step, param groups), keyed by parameter name."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        model_sd, _ = self._model_state()
        if not self.optimizer.state:
            # Asking DCP for an empty optimizer's state would run a zero step to create it, and AdamW's
            # step count (its bias correction) would then be off by one from an uninterrupted run.
            groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            return model_sd, None, groups
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer)
        return model_sd, optim_sd, optim_sd.pop("param_groups")

    def load(self, ckpt: Path, saved: dict) -> dict[str, torch.Tensor]:
        """Restore weights and optimizer state from `ckpt`; returns the saved RNG tensors."""
        if saved.get("sharded"):
            return self._load_sharded(ckpt, saved)
        if self.sharded:
            raise CheckpointError(
                f"{ckpt} is a single-file (DDP) checkpoint and this run uses train.parallel=fsdp: resume it "
                f"with train.parallel=ddp, or start the FSDP run from its weights with a new --out"
            )
        model_sd, state_tensors, _ = ckpt_io.load_checkpoint(ckpt, verify=False)
        if has_adapters(self.model):
            if problems := load_trainable(self.model, model_sd):
                raise CheckpointError(
                    f"{ckpt}: the adapters do not match this run's ({'; '.join(problems[:3])})"
                )
        else:
            ckpt_io.load_model_weights(self.model, model_sd)
        load_optimizer(self.optimizer, state_tensors, saved["optimizer_groups"])
        return {k: v for k, v in state_tensors.items() if k.startswith("rng/")}

    def _load_sharded(self, ckpt: Path, saved: dict) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from .resume import rng_state

        # Templates in this run's layout (sharded or whole); DCP fills them, re-slicing where needed.
        saved_keys = _safe_reader(ckpt).read_metadata().state_dict_metadata
        # RNG states this machine has and the checkpoint holds (CUDA ones only when both have them)
        rng = {k: v for k, v in rng_state()[0].items() if f"rng.{k}" in saved_keys}
        model_sd, options = self._model_state()
        state = {"model": model_sd, "rng": rng}
        with_optimizer = saved.get("optimizer_state", True)  # False: saved before the first step
        if with_optimizer:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
            state["optim"].pop("param_groups")
        state, _ = _split_non_tensors(state)  # the shards hold tensors only; the rest is in meta.json
        _load_tensors_only(state, ckpt)
        _merge(state, saved.get("non_tensor_state", {}))
        set_model_state_dict(self.model, state["model"], options=options)
        if not with_optimizer:
            return state["rng"]
        groups = [dict(g) for g in saved["optimizer_groups"]]
        for g in groups:
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        set_optimizer_state_dict(self.model, self.optimizer, {**state["optim"], "param_groups": groups})
        return state["rng"]


def loader_state_for(saved_loader: dict, world_size: int) -> dict:
    """The loader state for this world size: the same windows consumed, re-split across the new ranks.

    The loader hands rank r the windows r, r + W, r + 2W, ... of each epoch's permutation, so `position`
    windows per rank at world size W means the first position*W windows of the permutation are used.
    With a constant global batch that count is a multiple of both world sizes, so the new ranks continue
    exactly where the old ones stopped (until the epoch ends: each rank's share is rounded down).
    """
    old_world = int(saved_loader["world_size"])
    if old_world == world_size:
        return saved_loader
    consumed = int(saved_loader["position"]) * old_world
    return {**saved_loader, "world_size": world_size, "position": consumed // world_size}
