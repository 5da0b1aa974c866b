"""The Transformer (pure torch): config, model and KV cache.

``ModelConfig`` is plain Python; the torch parts are imported on first use, so commands that
only read configs (``lmforge prepare``, ``--help``) start without loading torch.
"""

from typing import TYPE_CHECKING

from .config import ModelConfig

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ below imports them
    from .gpt import GPT, count_params, flops_per_token, param_breakdown
    from .kv_cache import KVCache

__all__ = [
    "GPT",
    "KVCache",
    "ModelConfig",
    "count_params",
    "flops_per_token",
    "param_breakdown",
]

_LAZY = {
    "GPT": "gpt",
    "count_params": "gpt",
    "flops_per_token": "gpt",
    "param_breakdown": "gpt",
    "KVCache": "kv_cache",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
