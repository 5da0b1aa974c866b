"""Low-rank adapters (LoRA, Hu et al., 2021) and vocabulary growth for fine-tuning a built GPT from outside.

`add_adapters` swaps the chosen linear layers of every block for `LoRALinear`, which keeps the very same
`weight` and `bias` parameters (frozen) and adds `lora_A` (r, in) and `lora_B` (out, r): state-dict keys of
the base stay what they were (`blocks.0.attn.c_attn.weight`) and the adapters sit beside them
(`blocks.0.attn.c_attn.lora_A`). When a fine-tune's tokenizer added tokens (the chat template's), their
rows of the embedding and head get a zero-initialised delta that trains with the adapters (`new_rows`):
frozen mean-initialised rows would leave every new token with the same embedding, so a LoRA model could
not tell `<|user|>` from `<|assistant|>`. `merge_adapters` folds all of it back into plain layers.

Why a module of our own rather than peft's `inject_adapter_in_model`: peft renames the base weights
(`c_attn.base_layer.weight`, `lora_A.default.weight`), and its key layout has changed between releases,
while a checkpoint format here must stay readable (STYLE 1); it would add transformers and accelerate to
every import of a run that loads adapters; its layers are one more thing FSDP2 has to wrap, where these are
plain parameters on the blocks `fully_shard` already wraps. What LoRA needs is the forward below.

Imports only torch and the model package, so `checkpoint.py` (loading a LoRA run for generate, eval,
serve and export) reaches it without `train/`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import GPT
from .model.config import ModelConfig

if TYPE_CHECKING:
    from .config import LoraConfig


class _LoRAMatmul(torch.autograd.Function):
    """x W^T + b + s (x A^T) B^T and its gradients for x, A and B (W and b are frozen), in one node.

    Autograd's own backward of the same expression multiplies in layouts that CPU BLAS runs slowly for a
    thin rank-r operand ((N, out)^T @ (N, r) took 6x longer than (N, r)^T @ (N, out) here) and adds the
    two branches in separate passes; this computes the transposes that run fast and accumulates with
    addmm: a LoRA step went from 18% slower than a pretraining step of the same shape to as fast (CPU,
    4 x 128-wide blocks, rank 8). Under autocast everything is cast to its dtype first, as autocast would.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):  # noqa: D102
        dtype = (
            torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        )
        x2, w, a, b = (t.to(dtype) for t in (x.reshape(-1, x.size(-1)), weight, lora_a, lora_b))
        h = (x2 @ a.t()) * scaling  # (N, r)
        base = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())  # (N, out)
        ctx.save_for_backward(x2, w, a, b, h)
        ctx.scaling, ctx.shape, ctx.dtypes = scaling, x.shape, (x.dtype, lora_a.dtype, lora_b.dtype)
        return torch.addmm(base, h, b.t()).view(*x.shape[:-1], w.size(0))

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x2, w, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.size(-1)).to(x2.dtype)  # (N, out)
        grad_b = (h.t() @ g).t()  # (out, r)
        grad_h = (b.t() @ g.t()).t() * ctx.scaling  # (N, r)
        grad_x = torch.addmm(grad_h @ a, g, w)  # (N, in): both branches, one pass
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        grad_x = grad_x.view(ctx.shape).to(x_dtype)
        return grad_x, None, None, (grad_h.t() @ x2).to(a_dtype), grad_b.to(b_dtype), None


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) (x A^T) B^T, with W and b frozen and B starting at zero, so the layer
    computes exactly what the base layer did until the first update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: the base's key and storage, no copy
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, self.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(base.weight.new_zeros(self.out_features, rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # A as nn.Linear initialises, B = 0 (the paper)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LoRAMatmul.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing W + (alpha / r) B A (in float32, then the weight's dtype)."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (out, in)
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach().clone())
        return plain


class NewRowsEmbedding(nn.Embedding):
    """The token embedding with a trainable delta on the rows of tokens [start, start + n)."""

    def __init__(self, base: nn.Embedding, start: int, n: int) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.sparse = None, None, False
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.start = start
        self.new_rows = nn.Parameter(base.weight.new_zeros(n, self.embedding_dim, dtype=torch.float32))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n = self.new_rows.size(0)
        local = idx - self.start
        inside = (local >= 0) & (local < n)  # (B, T)
        delta = F.embedding(local.clamp(0, n - 1), self.new_rows) * inside.unsqueeze(-1)  # (B, T, C)
        return F.embedding(idx, self.weight) + delta.to(self.weight.dtype)


class NewRowsHead(nn.Linear):
    """The output head with a delta on the logits' columns [start, start + n): the head's own trainable
    rows, or (tied embeddings) the embedding's, held outside the module tree so they are saved once."""

    def __init__(self, base: nn.Linear, start: int, n: int, tied: NewRowsEmbedding | None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", None)
        self.weight.requires_grad_(False)
        self.start, self.tied = start, (tied,) if tied is not None else ()
        if tied is None:
            self.new_rows = nn.Parameter(base.weight.new_zeros(n, self.in_features, dtype=torch.float32))

    def rows(self) -> nn.Parameter:
        """The delta of the new tokens' rows, (n, C)."""
        return self.tied[0].new_rows if self.tied else self.new_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)  # (..., V)
        rows = self.rows()
        out[..., self.start : self.start + rows.size(0)] += F.linear(x, rows.to(out.dtype))
        return out


def add_adapters(model: GPT, rank: int, alpha: float, targets: Sequence[str], base_vocab: int) -> int:
    """Freeze every weight, wrap the target layers of each block in LoRALinear, and give the tokens from
    base_vocab to the model's vocab_size (those a fine-tune's tokenizer added) trainable rows. Returns the
    number of trainable parameters."""
    model.requires_grad_(False)
    for block in model.blocks:
        for target in targets:
            parent_name, name = target.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    new = model.cfg.vocab_size - base_vocab
    if new > 0:
        model.wte = NewRowsEmbedding(model.wte, base_vocab, new)
        model.lm_head = NewRowsHead(
            model.lm_head, base_vocab, new, model.wte if model.cfg.tie_embeddings else None
        )
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapt(model: GPT, lora: LoraConfig, base_vocab: int) -> str:
    """add_adapters with a run's lora settings; returns the line that says what trains."""
    n = add_adapters(model, lora.rank, lora.alpha, lora.targets, base_vocab)
    total = sum(p.numel() for p in model.parameters())
    return f"LoRA rank {lora.rank}: training {n:,} of {total:,} parameters ({100 * n / total:.2f}%)"


def has_adapters(model: nn.Module) -> bool:
    """Whether add_adapters has been applied (some weights are frozen)."""
    return any(not p.requires_grad for p in model.parameters())


@torch.no_grad()
def merge_adapters(model: GPT) -> GPT:
    """Fold every adapter and new-rows delta into plain layers, in place; the model is then a plain GPT
    whose every parameter trains again. Returns it."""
    for block in model.blocks:
        for part in (block.attn, block.mlp):
            for name, child in list(part.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(part, name, child.merged())
    head, wte = model.lm_head, model.wte
    if isinstance(wte, NewRowsEmbedding):
        plain = nn.Embedding(wte.num_embeddings, wte.embedding_dim, device="meta")
        plain.weight = nn.Parameter(wte.weight.detach().clone())
        plain.weight[wte.start : wte.start + wte.new_rows.size(0)] += wte.new_rows.to(plain.weight.dtype)
        model.wte = plain
    if isinstance(head, NewRowsHead):
        lin = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        if head.tied:  # the merged embedding already holds the delta: share it again
            lin.weight = model.wte.weight
        else:
            lin.weight = nn.Parameter(head.weight.detach().clone())
            lin.weight[head.start : head.start + head.new_rows.size(0)] += head.new_rows.to(lin.weight.dtype)
        model.lm_head = lin
    return model.requires_grad_(True)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of this model holds: every weight of a plain model (a tied head once), the
    adapters and new rows alone of one with adapters (its base weights are the base run's)."""
    model = getattr(model, "_orig_mod", model)
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    sd = model.state_dict()
    if not has_adapters(model):
        if model.cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        keep = set(sd)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items() if k in keep}


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Copy adapter tensors into a model with adapters; returns the problems (missing or unexpected
    keys, wrong shapes) as text, empty when they match exactly."""
    params = dict(model.named_parameters())
    wanted = {name for name, p in params.items() if p.requires_grad}
    problems = [f"missing {k}" for k in sorted(wanted - set(tensors))]
    problems += [f"unexpected {k}" for k in sorted(set(tensors) - wanted)]
    for key in sorted(wanted & set(tensors)):
        if params[key].shape != tensors[key].shape:
            problems.append(f"{key} has shape {tuple(tensors[key].shape)}, not {tuple(params[key].shape)}")
    if not problems:
        with torch.no_grad():
            for key in wanted:
                params[key].copy_(tensors[key])
    return problems


def grow_vocab(
    tensors: dict[str, torch.Tensor], base_vocab: int, cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """A base model's tensors for cfg.vocab_size >= base_vocab tokens: the base's rows as they are, the new
    tokens' rows (embedding, and an untied head) the mean of the base's real rows, padding rows zero.

    The mean keeps a new token's logit near the average one, so the base model's predictions barely move
    until fine-tuning teaches the new tokens (Hewitt, 2021, "Initializing New Word Embeddings for
    Pretrained Language Models"). Nothing changes when the vocabulary did not grow.
    """
    if cfg.vocab_size == base_vocab:
        return tensors
    grown = dict(tensors)
    for key in ("wte.weight", "lm_head.weight"):
        if key not in tensors:  # a tied head is stored once, as wte.weight
            continue
        old = tensors[key]
        new = old.new_zeros(cfg.padded_vocab_size, old.size(1))
        new[:base_vocab] = old[:base_vocab]
        new[base_vocab : cfg.vocab_size] = old[:base_vocab].float().mean(0).to(old.dtype)
        grown[key] = new
    return grown
