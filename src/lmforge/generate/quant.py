"""Int8 weight-only quantization of nn.Linear layers: per-output-channel symmetric scales, pure torch.

Each weight row w_i is stored as int8 q_i = round(w_i / s_i) with s_i = max|w_i| / 127, so the layer
computes y = (x @ q^T) * s + b. Activations stay in floating point. Weights take a quarter of their
fp32 memory; whether it is also faster depends on the kernel the machine has, so `quantize_int8`
times the candidates on the model's own largest layer and keeps the fastest one that is correct.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNELS = ("int8pack", "dequant")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 per-row scale) of a (out, in) weight; all-zero rows get scale 1."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0  # (out,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def _int8pack_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one float scale per output channel (weight-only)."""

    def __init__(self, linear: nn.Linear, kernel: str = "dequant") -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: choose one of {', '.join(KERNELS)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("weight_int8", q.to(linear.weight.device))
        self.register_buffer("scale", scale.to(linear.weight.device))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if self.kernel == "int8pack":
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scale.to(x2.dtype))  # (M, out)
        else:
            # Scaling the output instead of the weight: x @ (q*s)^T == (x @ q^T) * s, one multiply per output.
            y = F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scale.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def _time(layer: Int8Linear, x: torch.Tensor, repeats: int = 20) -> float:
    layer(x)  # warm-up (first-call packing and allocation)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            layer(x)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def pick_kernel(linear: nn.Linear, batch_rows: int = 1) -> tuple[str, dict[str, float]]:
    """The fastest correct kernel for this layer on its device, and each candidate's seconds per 20 calls.

    The decode shape (one row per step) is timed, since that is where weight-only int8 can win.
    A kernel that is missing or disagrees with the plain dequantized product is skipped.
    """
    device = linear.weight.device
    x = torch.randn(batch_rows, linear.in_features, device=device, dtype=linear.weight.dtype)
    ref = Int8Linear(linear, "dequant")
    expected = ref(x)
    times = {"dequant": _time(ref, x)}
    if _int8pack_available():
        cand = Int8Linear(linear, "int8pack")
        try:
            got = cand(x)
            if torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-3):
                times["int8pack"] = _time(cand, x)
        except (RuntimeError, NotImplementedError):  # no kernel for this device or dtype
            pass
    return min(times, key=times.get), times


@torch.no_grad()
def quantize_int8(model: nn.Module, kernel: str = "auto", skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by an Int8Linear and return the model.

    kernel: "auto" (time the candidates on the largest layer and keep the fastest), "int8pack"
    (torch._weight_int8pack_mm) or "dequant" (convert the int8 weight in each call). Modules whose
    qualified name is in `skip` stay in floating point. Embeddings are not touched; a tied output
    head gets its own int8 copy. The chosen kernel and timings are left in model.quant_info.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]
    if not linears:
        raise ValueError("the model has no nn.Linear layers to quantize")
    timings: dict[str, float] = {}
    if kernel == "auto":
        largest = max(linears, key=lambda nm: nm[1].weight.numel())[1]
        kernel, timings = pick_kernel(largest)
    elif kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: choose auto or one of {', '.join(KERNELS)}")
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear, kernel))
    model.quant_info = {"method": "int8-weight-only", "kernel": kernel, "kernel_timings_s": timings}
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
