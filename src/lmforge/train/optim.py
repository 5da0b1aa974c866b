"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

from ..config import ConfigError, TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on matmul weights; none on norms, biases or embeddings (nanoGPT, GPT-3)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm, nn.RMSNorm)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters yields a tied weight once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA: one kernel for all parameters), or 8-bit AdamW with train.optimizer=adamw8bit."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "adamw8bit":
        return adamw_8bit(param_groups(model, cfg.weight_decay), kwargs)
    if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
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
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
