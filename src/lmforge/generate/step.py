"""The model's forward written for generation steps: one new token per row (`decode_step`), eagerly or
recorded as a CUDA graph (`StaticDecoder`), with the same values as `GPT.forward` through the KV cache
(tests compare the logits bitwise), which `BatchDecoder` and eval's speed check decode through; and
continuous batching's step (`step_rows`), where running rows decode and new prompts prefill in one
forward.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.gpt import GPT, apply_rope, attention_mask
from ..model.kv_cache import KVCache


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(x); RMSNorm on the CPU in fp32 as the 6 operations torch's own CPU kernel performs (same
    values), without its ~4 extra dispatches for dtype conversions, which cost more than the arithmetic."""
    if isinstance(norm, nn.RMSNorm) and x.is_cpu and x.dtype == torch.float32 and norm.weight is not None:
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps)) * norm.weight
    return norm.forward(x)


def _rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], fast: bool) -> torch.Tensor:
    """`apply_rope`, or with full-width tables (cos|cos, -sin|sin) in fp32 as x*cos + roll(x)*sin: the same
    products and sums in 4 operations instead of 12 (roll by half swaps the halves)."""
    if not fast:
        return apply_rope(x, *rope)
    cos, sin = rope
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


def _rope_rows(
    model: GPT, where: slice | torch.Tensor, dtype: torch.dtype
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, bool]:
    """RoPE tables for the new tokens, made once per step for all layers, and whether they are the
    full-width ones `_rope` takes (fp32). where: a slice of one position shared by all tokens, or (T, 1)
    positions, one per token."""
    if model.cfg.pos_emb != "rope":
        return None, False
    cos, sin = model.rope_cos[where], model.rope_sin[where]  # (1, hd/2) or (T, 1, hd/2)
    if dtype != torch.float32:
        return (cos, sin), False
    return (torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), True


# attend(layer, q, k, v): store the new tokens' keys and values, and return their attention output.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _blocks(
    model: GPT,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    fast_rope: bool,
    attend: Attend,
) -> torch.Tensor:
    """The hidden states (T, C) after every block, from the embedded new tokens x (T, C), which may
    belong to different sequences: attend(layer, q, k, v) gets every token's query (T, nh, hd), key and
    value (T, nkv, hd) after QK-norm and RoPE, and returns the attention output (T, nh * hd). The hidden
    state stays 2-d: each linear layer is then one matrix product, without matmul's reshapes around it."""
    cfg = model.cfg
    T, nh, nkv, hd = x.size(0), cfg.n_head, cfg.n_kv_head, cfg.head_dim
    for layer, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        qkv = attn.c_attn.forward(_norm(block.ln_1, x)).view(T, nh + 2 * nkv, hd)
        q, k, v = qkv.split([nh, nkv, nkv], dim=1)  # (T, nh, hd), (T, nkv, hd) x 2
        if attn.q_norm is not None:
            q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
            if rope is not None:
                q, k = _rope(q, rope, fast_rope), _rope(k, rope, fast_rope)
        elif rope is not None:  # q and k are adjacent heads of qkv: rotate them in one pass (same values)
            q, k = _rope(qkv[:, : nh + nkv], rope, fast_rope).split([nh, nkv], dim=1)
        x = x + attn.c_proj.forward(attend(layer, q, k, v))
        x = x + mlp.c_proj.forward(mlp.act(mlp.c_fc.forward(_norm(block.ln_2, x))))
    return x


def _logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """Logits (T, vocab) of hidden states x (T, C)."""
    logits = model.lm_head.forward(_norm(model.ln_f, x))  # (T, padded vocab)
    return logits if logits.size(1) == model.cfg.vocab_size else logits[:, : model.cfg.vocab_size]


def _one_token_each(
    model: GPT,
    mask: torch.Tensor | None,
    store: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> Attend:
    """Attention for one new token per row (T = B): store(layer, k, v) writes the new keys and values
    (B, nkv, 1, hd) to the cache and returns every key and value the row's query sees (B, nkv, L, hd);
    `mask` (B, 1, 1, L) hides padding. One query per row sees every stored key: no causal mask."""
    gqa = model.cfg.n_kv_head != model.cfg.n_head

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = store(layer, k.unsqueeze(2), v.unsqueeze(2))
        y = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, enable_gqa=gqa)
        return y.view(q.size(0), -1)  # (B, nh * hd)

    return attend


def _check_room(model: GPT, cache: KVCache) -> None:
    if cache.pos + 1 > model.cfg.context_len:
        raise ValueError(
            f"sequence of {cache.pos + 1} tokens is longer than the context ({model.cfg.context_len})"
        )


@torch.no_grad()
def decode_step(
    model: GPT,
    idx: torch.Tensor,
    cache: KVCache,
    positions: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, vocab) of the next token after one new token per row, idx (B, 1), through the KV cache.

    The same values as `model(idx, cache=cache, positions=positions, key_mask=key_mask,
    last_only=True)[:, -1]` (tests check the logits are bitwise identical), computed for the one-token
    shape: submodules are run through their `forward` (no module-call machinery or hooks) and q, k, v
    come out of the fused projection as views, RMSNorm and RoPE take fewer dispatches (`_norm`, `_rope`).
    In eval mode only (no dropout). On a CPU, where a step is a few hundred small operations, whole
    generations on the bench model are 2-10% faster than through `model(...)` (benchmarks/RESULTS.md).
    """
    _check_room(model, cache)
    pos = cache.pos
    B = idx.size(0)
    x = model.wte.forward(idx.view(B))  # (B, C)
    if model.wpe is not None:
        x = x + (model.wpe.forward(positions.view(B)) if positions is not None else model.wpe.weight[pos])
    where = positions.view(B, 1) if positions is not None else slice(pos, pos + 1)
    rope, fast_rope = _rope_rows(model, where, x.dtype)
    mask = None if key_mask is None else attention_mask(key_mask, pos, 1)  # (B, 1, 1, L)
    logits = _logits(model, _blocks(model, x, rope, fast_rope, _one_token_each(model, mask, cache.update)))
    cache.advance(1)
    return logits


def static_decode_step(
    model: GPT,
    idx: torch.Tensor,
    positions: torch.Tensor,
    slot: torch.Tensor,
    key_mask: torch.Tensor,
    cache: KVCache,
) -> torch.Tensor:
    """decode_step with every shape fixed and no value read on the host, so it can be recorded as a CUDA
    graph: the new token of each row goes to cache slot `slot` (a (1,) tensor) and attention runs over the
    whole cache, masked to the slots up to `slot` that key_mask (B, cache.max_len) marks as real tokens.
    positions (B, 1): each row's position. Does not advance the cache (the caller owns `pos`). Needs a
    cache made with zeroed=True: masked slots get zero weight, and 0 * NaN from never-written memory would
    still be NaN."""
    B = idx.size(0)
    x = model.wte.forward(idx.view(B))  # (B, C)
    if model.wpe is not None:
        x = x + model.wpe.forward(positions.view(B))
    rope, fast_rope = _rope_rows(model, positions.view(B, 1), x.dtype)
    k_slot = torch.arange(cache.max_len, device=idx.device)  # (L,)
    mask = (key_mask & (k_slot <= slot)) | (k_slot == slot)  # (B, L): real keys so far, and its own
    attend = _one_token_each(
        model, mask[:, None, None, :], lambda layer, k, v: cache.store_at(layer, slot, k, v)
    )
    return _logits(model, _blocks(model, x, rope, fast_rope, attend))


class StaticDecoder:
    """Decode steps for one batch and one KV cache through `static_decode_step`. On a GPU the first step
    is recorded as a CUDA graph and every step replays it: one launch instead of one per kernel (hundreds
    per step), which is what bounds decoding speed at small batches. Elsewhere the step runs eagerly (the
    same arithmetic; what the CPU tests check).

    key_mask (B, cache.max_len) marks real tokens (left padding False) and must be updated in place by the
    caller before each step that adds a token to a padded row; None: every row is all real tokens. The
    logits returned are overwritten by the next step.
    """

    def __init__(self, model: GPT, cache: KVCache, key_mask: torch.Tensor | None) -> None:
        B, L, device = cache.k.size(1), cache.max_len, cache.k.device
        self.model, self.cache = model, cache
        # Inputs live in fixed tensors: a graph reads the memory it was recorded with.
        self.idx = torch.zeros((B, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((B, 1), dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.key_mask = (
            key_mask if key_mask is not None else torch.ones((B, L), dtype=torch.bool, device=device)
        )
        self.graph_wanted = device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _step(self) -> torch.Tensor:
        return static_decode_step(self.model, self.idx, self.positions, self.slot, self.key_mask, self.cache)

    def _record(self) -> None:
        """Record the step as a CUDA graph (after one warm-up run on a side stream, as CUDA graphs need);
        the warm-up writes the same keys and values the replay is about to write."""
        side = torch.cuda.Stream(device=self.idx.device)
        side.wait_stream(torch.cuda.current_stream(self.idx.device))
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream(self.idx.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """decode_step(model, idx, cache, positions, key_mask) for this batch: logits (B, vocab)."""
        _check_room(self.model, self.cache)
        pos = self.cache.pos
        self.idx.copy_(idx)
        if positions is None:
            self.positions.fill_(pos)
        else:
            self.positions.copy_(positions)
        self.slot.fill_(pos)
        if self.graph_wanted and self.graph is None:
            try:
                self._record()
            except RuntimeError as e:  # an operation that cannot be recorded: decode without the graph
                warnings.warn(f"decoding without a CUDA graph: recording failed ({e})", stacklevel=2)
                self.graph_wanted = False
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step()
        self.cache.advance(1)
        return logits


@torch.no_grad()
def step_rows(
    model: GPT,
    idx: torch.Tensor,
    positions: torch.Tensor,
    prompts: Sequence[torch.Tensor],
    k_layers: tuple[torch.Tensor, ...],
    v_layers: tuple[torch.Tensor, ...],
    starts: Sequence[int] = (),
) -> torch.Tensor:
    """One step of continuous batching in one forward: rows 0..D-1 decode a token each, rows D..D+m-1
    take a prompt each (prefill). Logits (D + m, vocab): each decoding row's next token, then each
    prompt's first new token.

    Row i < D feeds token idx[i] (D,) at position positions[i] (D,), stored in cache slot positions[i],
    and attends to slots 0..positions[i] of its row; prompt j, (n_j,) token ids, goes to slots
    s_j..s_j+n_j-1 of row D+j and attends causally to them and to the s_j slots before them, which hold
    the keys and values of the prompt's start already (starts: s_j for each prompt; none given: all 0).
    k_layers/v_layers: one (rows, n_kv_head, L, head_dim) view of the cache per
    layer, rows >= D + m and L past every slot written. Every token goes through each linear layer in
    one product: on a CPU, where a small batch's step costs about what streaming the weights costs, a
    prompt joining the running rows' step costs a fraction of a forward of its own. Continuous batching
    steps through this: its rows join and leave at any step and share no slot timeline."""
    D, device = idx.numel(), idx.device
    lengths = [p.numel() for p in prompts]
    starts = list(starts) or [0] * len(prompts)
    tokens = torch.cat([idx, *prompts])  # (T,)
    spans = (torch.arange(s, s + n, device=device) for s, n in zip(starts, lengths, strict=True))
    where = torch.cat([positions, *spans])  # (T,): each token's position, and its slot in its row
    rows = torch.cat(
        [torch.arange(D, device=device)]
        + [torch.full((n,), D + j, device=device) for j, n in enumerate(lengths)]
    )
    T = tokens.numel()
    x = model.wte.forward(tokens)  # (T, C)
    if model.wpe is not None:
        x = x + model.wpe.forward(where)
    rope, fast_rope = _rope_rows(model, where.view(T, 1), x.dtype)
    attend = _rows_attention(model, k_layers, v_layers, positions, where, rows, lengths, starts)
    x = _blocks(model, x, rope, fast_rope, attend)
    last = torch.tensor([*range(D), *(D + c - 1 for c in itertools.accumulate(lengths))], device=device)
    return _logits(model, x if last.numel() == T else x[last])


def _rows_attention(
    model: GPT,
    k_layers: tuple[torch.Tensor, ...],
    v_layers: tuple[torch.Tensor, ...],
    positions: torch.Tensor,
    where: torch.Tensor,
    rows: torch.Tensor,
    lengths: list[int],
    starts: list[int],
) -> Attend:
    """step_rows' attention: every token's key and value into slot where[t] of row rows[t], then the D
    decoding rows (positions (D,)) over their rows in one call, and the m prompts (lengths, starts) over
    theirs in another: each prompt's queries padded to the longest prompt's count (padding repeats its
    last token, whose output is dropped), each seeing its row's slots up to its own position."""
    D, device, m, new = positions.numel(), positions.device, len(lengths), sum(lengths)
    gqa = model.cfg.n_kv_head != model.cfg.n_head
    seen = torch.arange(k_layers[0].size(2), device=device)[None, :] <= positions[:, None]  # (D, L)
    if m:
        n_max, span = max(lengths), max(s + n for s, n in zip(starts, lengths, strict=True))
        count = torch.tensor(lengths, device=device)[:, None]  # (m, 1)
        t = torch.minimum(torch.arange(n_max, device=device)[None, :], count - 1)  # (m, n_max)
        pick = None  # where each padded query comes from among the prompts' tokens; None: in order
        keep = None  # which padded outputs are real tokens; None: all
        if new != m * n_max:
            pick = torch.tensor([0, *itertools.accumulate(lengths)][:-1], device=device)[:, None] + t
            keep = (torch.arange(n_max, device=device)[None, :] < count).view(-1).nonzero().view(-1)
        query_pos = torch.tensor(starts, device=device)[:, None] + t  # (m, n_max)
        causal = torch.arange(span, device=device)[None, None, :] <= query_pos[:, :, None]  # (m, n_max, span)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_all, v_all = k_layers[layer], v_layers[layer]
        k_all[rows, :, where] = k  # every new token's key and value into its row's slot
        v_all[rows, :, where] = v
        out = []
        if D:
            y = F.scaled_dot_product_attention(
                q[:D].unsqueeze(2), k_all[:D], v_all[:D], attn_mask=seen[:, None, None, :], enable_gqa=gqa
            )  # (D, nh, 1, hd)
            out.append(y.view(D, -1))
        if m:
            qp = q[D:][pick] if pick is not None else q[D:].view(m, n_max, *q.shape[1:])  # (m, n_max, nh, hd)
            y = F.scaled_dot_product_attention(
                qp.transpose(1, 2),
                k_all[D : D + m, :, :span],
                v_all[D : D + m, :, :span],
                attn_mask=causal[:, None],
                enable_gqa=gqa,
            )  # (m, nh, n_max, hd)
            y = y.transpose(1, 2).reshape(m * n_max, -1)
            out.append(y if keep is None else y[keep])
        return out[0] if len(out) == 1 else torch.cat(out)

    return attend
