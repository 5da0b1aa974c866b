"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

from ..config import ConfigError, TrainConfig
from .muon import MuonAdamW


def param_groups(model: nn.Module, weight_decay: float, exclude: frozenset[int] = frozenset()) -> list[dict]:
    """Two AdamW groups: decay on matmul weights; none on norms, biases or embeddings (nanoGPT, GPT-3).

    Parameters whose id is in `exclude` (Muon's matrices) are in neither group.
    """
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm, nn.RMSNorm)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters yields a tied weight once
        if not p.requires_grad or id(p) in exclude:
            continue
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weight matrices inside the transformer blocks: what train.optimizer=muon steps with Muon.

    The token embedding, the output head (a classifier, not a hidden layer: Jordan's Muon write-up), the
    norms and the biases stay with AdamW.
    """
    return [p for p in model.blocks.parameters() if p.ndim == 2 and p.requires_grad]


def muon_settings(cfg: TrainConfig) -> dict:
    """The keys a Muon group carries (its lr is the peak; the schedule scales it each step)."""
    return {
        "muon": True,
        "lr": cfg.muon_lr,
        "weight_decay": cfg.muon_weight_decay,
        "momentum": cfg.muon_momentum,
        "nesterov": cfg.muon_nesterov,
        "ns_steps": cfg.muon_ns_steps,
        "lr_adjust": cfg.muon_lr_adjust,
    }


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA: one kernel for all parameters), 8-bit AdamW with train.optimizer=adamw8bit, or
    Muon on the blocks' matrices and AdamW on the rest with train.optimizer=muon."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "adamw8bit":
        return adamw_8bit(param_groups(model, cfg.weight_decay), kwargs)
    if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    if cfg.optimizer == "muon":
        matrices = muon_matrices(model)
        groups = param_groups(model, cfg.weight_decay, exclude=frozenset(id(p) for p in matrices))
        for group in groups:
            group["muon"] = False
        return MuonAdamW([*groups, {"params": matrices, **muon_settings(cfg)}], **kwargs)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Put the config's betas, eps and weight decay on every group of a restored optimizer.

    Loading a checkpoint restores its groups as they were saved; without this, a resume that changes
    these settings would report the change but train with the old values. Group 0 is param_groups()'s
    decayed group and group 1 the one without decay, in checkpoints of every version.
    """
    for i, group in enumerate(optimizer.param_groups):
        group["betas"] = (cfg.beta1, cfg.beta2)
        group["eps"] = cfg.eps
        group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0
        if group.get("muon"):  # Muon's group comes after AdamW's two
            group.update({k: v for k, v in muon_settings(cfg).items() if k != "lr"})


def adamw_8bit(groups: list[dict], kwargs: dict) -> torch.optim.Optimizer:
    """AdamW with moments stored in 8 bits (Dettmers et al., 2022): 2 instead of 8 bytes per parameter.

    torchao's AdamW8bit when installed, else bitsandbytes'; both need a GPU for their kernels.
    """
    try:
        from torchao.optim import AdamW8bit

        return AdamW8bit(groups, **kwargs)
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    except ImportError:
        raise ConfigError(
            "train.optimizer=adamw8bit needs torchao or bitsandbytes, and neither is installed: "
            "pip install torchao (or bitsandbytes), or use train.optimizer=adamw"
        ) from None


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps, or (schedule
    wsd) the peak until the last decay_fraction of the steps, which decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        return wsd_lr(step, cfg, max_steps)
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def wsd_lr(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Warmup-stable-decay after warmup: the peak lr, then the last round(decay_fraction * max_steps) steps
    fall to the floor, linearly or as 1 - sqrt(progress) (Hägele et al., 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations", found 1-sqrt the better cooldown).

    The last step trains at the floor itself. A run can be continued from before its decay at the peak lr.
    """
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    start = max_steps - decay_steps
    if step < start:
        return cfg.lr
    progress = min(1.0, (step + 1 - start) / decay_steps)
    left = 1 - math.sqrt(progress) if cfg.decay_shape == "1-sqrt" else 1 - progress
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * left


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Put this step's scheduled lr on every group; returns AdamW's (the one logged).

    Muon's groups follow the same schedule from their own peak, train.muon_lr.
    """
    lr = lr_at(step, cfg, max_steps)
    for group in optimizer.param_groups:
        group["lr"] = cfg.muon_lr * (lr / cfg.lr) if group.get("muon") else lr
    return lr
