"""Model hyper-parameters: one dataclass that describes both model families.

Pure Python (no torch, no I/O) so that the config layer, the model and the planner can all share it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

# Family defaults: a field left as None takes its value from the family.
FAMILY_DEFAULTS: dict[str, dict] = {
    # GPT-2 (Radford et al., 2019): learned positions, LayerNorm, GELU MLP (4x), biases, tied embeddings.
    "gpt2": dict(
        pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, qk_norm=False
    ),
    # Llama (Touvron et al., 2023): RoPE, RMSNorm, SwiGLU, no biases, untied output head.
    "llama": dict(
        pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, qk_norm=False
    ),
}

PAD_VOCAB_MULTIPLE = (
    64  # matmul shapes that are multiples of 64 run faster on tensor cores (nanoGPT: 50257 -> 50304)
)


@dataclass
class ModelConfig:
    """Shape and architecture of a decoder-only Transformer (both the GPT-2 and the Llama family)."""

    family: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = 6
    n_head: int = 8
    n_kv_head: int | None = None  # None: n_head (multi-head attention); fewer: grouped-query attention
    n_embd: int = 256
    context_len: int = 1024  # longest sequence the model supports (size of the position table / RoPE cache)
    seq_len: int | None = None  # training sequence length; None: context_len
    vocab_size: int | None = None  # None: taken from the prepared data's tokenizer
    ffn_hidden: int | None = None  # None: 4*n_embd (gelu, relu2) or 8/3*n_embd rounded up to 256 (swiglu)
    pos_emb: Literal["learned", "rope"] | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    mlp: Literal["gelu", "swiglu", "relu2"] | None = None  # relu2: relu(x)^2 (So et al., 2021, Primer)
    bias: bool | None = None
    tie_embeddings: bool | None = None
    qk_norm: bool | None = None
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # Validation only: fields left as None stay None here, so a config file or command line that
        # changes the family still gets that family's defaults. resolved() fills them in.
        if self.family not in FAMILY_DEFAULTS:
            raise ValueError(f"model.family={self.family!r}: must be one of {sorted(FAMILY_DEFAULTS)}")
        for key in ("n_layer", "n_head", "n_embd", "context_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)}: must be a positive integer")
        n_kv_head = self.n_head if self.n_kv_head is None else self.n_kv_head
        if n_kv_head < 1:
            raise ValueError(f"model.n_kv_head={n_kv_head}: must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                f"choose n_head among {_divisors(self.n_embd)}"
            )
        if self.n_head % n_kv_head:
            raise ValueError(
                f"model.n_head={self.n_head} is not divisible by model.n_kv_head={n_kv_head}: "
                f"choose n_kv_head among {_divisors(self.n_head)}"
            )
        pos_emb = self.pos_emb or FAMILY_DEFAULTS[self.family]["pos_emb"]
        if pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"model.n_embd/n_head={self.head_dim}: RoPE needs an even head dimension")
        if self.seq_len is not None and not 1 <= self.seq_len <= self.context_len:
            raise ValueError(
                f"model.seq_len={self.seq_len}: must be between 1 and the model's context "
                f"(model.context_len={self.context_len}); raise context_len or lower seq_len"
            )
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"model.vocab_size={self.vocab_size}: must be at least 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout}: must be in [0, 1)")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ValueError(f"model.ffn_hidden={self.ffn_hidden}: must be a positive integer")
        # Zero or negative values here train NaN losses from the first step (a norm divides by
        # sqrt(var + eps); RoPE's frequencies are theta^(-2i/d)); refuse them before anything runs.
        for key, typical in (
            ("norm_eps", "1e-5 or 1e-6"),
            ("rope_theta", "10000 or 500000"),
            ("init_std", "0.02"),
        ):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"model.{key}={value}: must be a positive number (typical: {typical})")

    def resolved(self) -> ModelConfig:
        """A copy with every None that has a derived value filled in (family defaults, n_kv_head, ...)."""
        filled = {k: v for k, v in FAMILY_DEFAULTS[self.family].items() if getattr(self, k) is None}
        if self.n_kv_head is None:
            filled["n_kv_head"] = self.n_head
        if self.seq_len is None:
            filled["seq_len"] = self.context_len
        if self.ffn_hidden is None:
            if (self.mlp or FAMILY_DEFAULTS[self.family]["mlp"]) == "swiglu":
                # Llama: 2/3 of 4d rounded up to a multiple of 256 keeps the params of a 4d GELU MLP.
                filled["ffn_hidden"] = 256 * math.ceil(int(2 * 4 * self.n_embd / 3) / 256)
            else:
                filled["ffn_hidden"] = 4 * self.n_embd
        return dataclasses.replace(self, **filled) if filled else self

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Vocab rounded up to a multiple of 64; the extra rows never take part in loss or sampling."""
        if self.vocab_size is None:
            raise ValueError(
                "model.vocab_size is not set: give it, or train on prepared data that defines it"
            )
        return PAD_VOCAB_MULTIPLE * math.ceil(self.vocab_size / PAD_VOCAB_MULTIPLE)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
