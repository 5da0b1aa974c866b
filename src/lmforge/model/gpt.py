"""The decoder-only Transformer: GPT-2 and Llama families in one readable module.

Imports only torch. Shapes: B batch, T time (sequence), C n_embd, nh n_head, nkv n_kv_head, hd head_dim,
V padded vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kv_cache import KVCache


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm (Llama, Zhang & Sennrich 2019)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE angles (Su et al., 2021), each (length, head_dim/2), in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, h, T, hd) by position; halves layout (as HF Llama), so exported weights need no permutation."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, h, T, hd/2) each
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, optional RoPE and QK-norm, through SDPA."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # One fused projection for q, k, v: [nh*hd | nkv*hd | nkv*hd] output rows.
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim],
            dim=-1,
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if self.q_norm is not None:
            if q.dtype != self.q_norm.weight.dtype:  # bf16 activations under autocast: normed in fp32, as
                q, k = q.float(), k.float()  # torch's mixed-dtype fallback does (which warns on every CPU)
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        pos = 0
        if cache is not None:
            pos = cache.pos
            k, v = cache.update(layer, k, v)  # (B, nkv, pos+T, hd)
        if mask is not None:  # a batch with padding: the caller's (B, 1, T, L) mask already holds causality
            # SDPA's enable_gqa reads each kv head for its nh/nkv query heads without copying the cache.
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, nh, T, hd)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        # Grouped-query attention: each kv head serves nh/nkv query heads. Decoding lets SDPA read the shared
        # heads in place (enable_gqa) instead of copying the whole cache every step.
        gqa_in_place = self.n_kv_head != self.n_head and cache is not None
        if self.n_kv_head != self.n_head and cache is None:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, L, hd)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        mask, causal = None, True
        if pos > 0:  # queries sit at positions pos..pos+T-1 and may see every key up to their own position
            causal = False
            if T > 1:
                key_pos = torch.arange(k.size(2), device=x.device)
                mask = key_pos[None, :] <= (pos + torch.arange(T, device=x.device))[:, None]  # (T, L)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=gqa_in_place,
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.c_proj(y)


class MLP(nn.Module):
    """GELU MLP (GPT-2), SwiGLU (Shazeer, 2020; Llama) or ReLU² (So et al., 2021, Primer)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.relu2 = cfg.mlp == "relu2"
        # SwiGLU fuses gate and up projections: rows [gate | up].
        self.c_fc = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * cfg.ffn_hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.bias)

    def act(self, h: torch.Tensor) -> torch.Tensor:
        """The activation between the two projections: c_fc's output in, c_proj's input out."""
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        if self.relu2:
            return F.relu(h).square()
        return F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x, rope=None, cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), rope, cache, layer, mask))
        return x + self.drop(self.mlp(self.ln_2(x)))


def attention_mask(key_mask: torch.Tensor, pos: int, T: int) -> torch.Tensor:
    """(B, 1, T, L) boolean mask: query i (slot pos+i) sees real keys in slots <= its own, and itself.

    Letting every query see its own slot keeps padding rows finite (a row with no visible key would be
    NaN, and 0 * NaN in the next matmul would spread it to real rows); real rows never look at padding.
    """
    L = key_mask.size(1)
    q_slot = pos + torch.arange(T, device=key_mask.device)  # (T,)
    k_slot = torch.arange(L, device=key_mask.device)  # (L,)
    causal = k_slot[None, :] <= q_slot[:, None]  # (T, L)
    own = k_slot[None, :] == q_slot[:, None]  # (T, L)
    return ((causal[None] & key_mask[:, None, :]) | own[None]).unsqueeze(1)  # (B, 1, T, L)


class GPT(nn.Module):
    """Decoder-only Transformer. forward(idx) -> logits (B, T, vocab); forward(idx, targets) -> mean loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg = cfg.resolved()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set")
        self.cfg = cfg
        V = cfg.padded_vocab_size
        self.wte = nn.Embedding(V, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.context_len, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.pos_emb == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.context_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), biases 0, norms 1; residual output projections scaled by 1/sqrt(2*n_layer)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj") else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        if self.cfg.pos_emb == "rope":  # buffers are garbage after to_empty() from the meta device
            cos, sin = rope_tables(
                self.cfg.head_dim, self.cfg.context_len, self.cfg.rope_theta, self.rope_cos.device
            )
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or the mean loss when targets are given.

        For batches of prompts with padding (inference): `positions` (B, T) are each token's position in
        its own sequence, `key_mask` (B, L) marks the cache slots 0..L-1 (L = cache.pos + T) that hold real
        tokens, and `last_only` computes logits for the last position only, (B, 1, vocab).
        """
        B, T = idx.shape
        pos = cache.pos if cache is not None else 0
        if pos + T > self.cfg.context_len:
            raise ValueError(
                f"sequence of {pos + T} tokens is longer than the context ({self.cfg.context_len})"
            )
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(
                positions if positions is not None else torch.arange(pos, pos + T, device=idx.device)
            )
        x = self.drop(x)
        rope = None
        if self.cfg.pos_emb == "rope" and positions is None:
            rope = (self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T])  # (T, hd/2) each
        elif self.cfg.pos_emb == "rope":  # per-row positions: (B, 1, T, hd/2), broadcast over heads
            rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
        mask = None if key_mask is None else attention_mask(key_mask, pos, T)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i, mask)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): decoding needs only the next token's logits
        x = self.ln_f(x)
        logits = self.lm_head(x)[..., : self.cfg.vocab_size]  # (B, T, vocab): padding rows never scored
        if targets is None:
            return logits
        # -1 marks positions that carry no target (padding).
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        zeroed: bool = False,
    ) -> KVCache:
        """An empty KV cache for up to max_len positions (default: the whole context); zeroed for
        attention over all of it (the fixed-shape decode step that CUDA graphs record)."""
        p = self.wte.weight
        return KVCache(
            self.cfg.n_layer,
            batch_size,
            self.cfg.n_kv_head,
            max_len or self.cfg.context_len,
            self.cfg.head_dim,
            device=p.device,
            dtype=dtype or p.dtype,
            zeroed=zeroed,
        )


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token, 6N + 12*L*C*T (Kaplan et al. 2020; PaLM appendix B).

    N counts the parameters that take part in a matmul for every token: everything but the embedding
    lookups. With tied embeddings the output head is a matmul, so the shared matrix counts once.
    """
    cfg = cfg.resolved()
    n = matmul_params(cfg)
    T = seq_len or cfg.seq_len
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T


def param_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts computed from the config alone (no model is built)."""
    cfg = cfg.resolved()
    C, L, V, H = cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size, cfg.ffn_hidden
    b = 1 if cfg.bias else 0
    norm = C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    attn = C * qkv_out + b * qkv_out + cfg.n_head * cfg.head_dim * C + b * C
    attn += 2 * cfg.head_dim if cfg.qk_norm else 0
    n_fc = (2 if cfg.mlp == "swiglu" else 1) * H
    mlp = C * n_fc + b * n_fc + H * C + b * C
    blocks = L * (attn + mlp + 2 * norm)
    emb = V * C
    pos = cfg.context_len * C if cfg.pos_emb == "learned" else 0
    head = 0 if cfg.tie_embeddings else V * C
    return {
        "embedding": emb,
        "position": pos,
        "blocks": blocks,
        "final_norm": norm,
        "head": head,
        "total": emb + pos + blocks + norm + head,
    }


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in a matmul per token: blocks, final norm and the output head (tied or not)."""
    p = param_breakdown(cfg)
    return p["blocks"] + p["final_norm"] + cfg.padded_vocab_size * cfg.n_embd
