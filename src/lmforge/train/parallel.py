"""Parallelism applied to a built model from outside: activation checkpointing -> compile -> FSDP2 or DDP.

The model's forward code knows nothing of this (STYLE: parallelism from outside). The order follows
torchtitan: recomputation wraps each block's forward, compilation then sees the recomputing forward, and
sharding goes last so its hooks surround everything. World size 1 takes the same path: FSDP2 over a
one-process group (mixed precision, identical code), and DDP, which would only copy gradients to
themselves, is skipped.

DeepSpeed vocabulary: `train.parallel=fsdp` with `fsdp.reshard_after_forward=false` keeps each block's
gathered weights from forward to backward and shards gradients and optimizer state (ZeRO-2);
`true` also frees the weights after forward and gathers them again in backward (ZeRO-3).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import Config, ConfigError
from .distributed import DistEnv, ensure_process_group


def checkpointed_blocks(n_layer: int, mode: str, k: int) -> list[int]:
    """Indices of the blocks whose activations are recomputed in backward (every_k: blocks 0, k, 2k, ...)."""
    if mode == "full":
        return list(range(n_layer))
    if mode == "every_k":
        return list(range(0, n_layer, k))
    return []


def _recompute_forward(forward):
    # Non-reentrant checkpointing (the form torch.compile and FSDP2 support): only the block's input is
    # kept; its activations are recomputed when backward reaches it. The module stays the same object,
    # so state-dict keys do not change.
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return wrapped


def apply_activation_checkpointing(model: nn.Module, mode: str, k: int) -> list[int]:
    """Recompute the chosen blocks' activations in backward; returns their indices."""
    chosen = checkpointed_blocks(len(model.blocks), mode, k)
    for i in chosen:
        block = model.blocks[i]
        block.forward = _recompute_forward(block.forward)
    return chosen


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block's forward (same graph for every block, so it compiles once and is reused)."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


def apply_fsdp(model: nn.Module, cfg: Config, env: DistEnv, device: torch.device, precision: str) -> None:
    """FSDP2 `fully_shard` on every block, then on the root (embeddings, final norm and head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    check_supported(cfg, device, precision)
    ensure_process_group(device, cfg.train.dist_timeout_s)
    mesh = init_device_mesh(device.type, (env.world_size,))
    if precision == "bf16":  # compute in bf16, but average gradients in fp32 so small updates survive
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cfg.fsdp.cpu_offload else OffloadPolicy()
    kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=cfg.fsdp.reshard_after_forward, **kwargs)
    # The root's parameters are needed again at once by backward (the head comes last in forward).
    fully_shard(model, reshard_after_forward=False, **kwargs)


def check_supported(cfg: Config, device: torch.device, precision: str) -> None:
    """Refuse, in one line, parallel settings this device or precision cannot run (before anything is written)."""
    if cfg.train.parallel != "fsdp":
        if cfg.fsdp.cpu_offload:
            raise ConfigError(
                "fsdp.cpu_offload=true needs train.parallel=fsdp (DDP keeps a full copy per GPU)"
            )
        return
    if precision == "fp16":
        raise ConfigError(
            "train.precision=fp16 with train.parallel=fsdp is not supported: use train.precision=bf16 "
            "(or fp32), or train.parallel=ddp"
        )
    if cfg.fsdp.cpu_offload and device.type != "cuda":
        raise ConfigError(
            f"fsdp.cpu_offload=true needs a CUDA GPU (it keeps GPU state in CPU memory), this run is on "
            f"{device.type}: remove fsdp.cpu_offload"
        )


def parallelize(
    model: nn.Module, cfg: Config, env: DistEnv, device: torch.device, precision: str
) -> nn.Module:
    """Apply activation checkpointing, compile and FSDP2/DDP; returns the module to call in training.

    With FSDP2 the model is sharded in place and is itself returned; with DDP a wrapper around it is
    (world size > 1). Either way `model` stays the module to save, evaluate and clip.
    """
    t = cfg.train
    apply_activation_checkpointing(model, t.activation_checkpointing, t.activation_checkpointing_k)
    if t.compile:
        apply_compile(model)
    if t.parallel == "fsdp":
        apply_fsdp(model, cfg, env, device, precision)
        return model
    check_supported(cfg, device, precision)
    if env.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce gradients across ranks only on the last micro-step of an accumulation (DDP and FSDP2)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: skip the reduce-scatter, keep local grads
        model.set_requires_gradient_sync(sync)
        yield
    elif sync or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (across all ranks' shards under FSDP2); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # FSDP2: a norm over shards, reduced here to the global value
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
