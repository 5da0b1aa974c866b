"""The Transformer (pure torch): config, model and KV cache."""

from .config import ModelConfig
from .gpt import GPT, count_params, flops_per_token, param_breakdown
from .kv_cache import KVCache

__all__ = ["GPT", "KVCache", "ModelConfig", "count_params", "flops_per_token", "param_breakdown"]
