"""Weight layouts for fast CPU decoding: the same linear layers, stored the way each product reads fastest.

Decoding multiplies a handful of rows (one per sequence) by every weight of the model, so on a CPU its
speed is set by how fast the weights stream from memory (benchmarks/RESULTS.md, decode):

- one row (one sequence): BLAS streams a column-major weight in memory order, 1.3-1.6x faster than
  PyTorch's default row-major layout on x86 CPUs;
- 2 to 64 rows (a batch of sequences): oneDNN's GEMM on a weight pre-packed into its blocked layout is
  up to 1.7x faster than BLAS on either plain layout, more for larger weights (fp32, AVX2);
- on CPUs with AVX-512, oneDNN's packed product is the faster one at every decoding shape, one row and
  small weights included (`packs_every_product`).

`use_inference_layout` gives every CPU linear layer the first; `pack_for_batches` adds the second as an
extra copy, which the generation engine asks for (`pack_for_decoding`) when it decodes several sequences
at once, or any sequence where `packs_every_product()`.

Whoever decodes a model it owns applies the layout (`LLM.load`, eval's generation and speed checks);
`checkpoint.load_model` returns the plain model, so training, scoring and export never see these layers.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# Rows per product up to which the packed weight is used: decoding a batch. Longer products (a prefill
# of hundreds of tokens) are compute bound, where BLAS is as fast or faster.
MAX_PACKED_ROWS = 64
# Smallest weight worth packing. oneDNN's call costs ~30 us more than BLAS's, which only a weight that
# comes from memory (not cache) in every step repays. Measured at 8 rows inside a decoding-sized model
# (AVX2, 1 thread): 384x384 (0.56 MiB) 130 vs 115 us, slower packed; 640x384 (0.94 MiB) 179 vs 196 us;
# 2048x384 (3 MiB) 446 vs 674 us; 4096x384 (6 MiB) 832 vs 1,402 us.
MIN_PACKED_BYTES = 768 << 10


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a (out, in) fp32 CPU weight, or None where oneDNN cannot provide one.

    Only on x86 CPUs with AVX2 or AVX-512, where it was measured to pay; elsewhere BLAS keeps the work.
    """
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or not torch.backends.mkldnn.is_available()
        or not torch.backends.cpu.get_cpu_capability().startswith("AVX")
    ):
        return None
    if weight.nbytes < MIN_PACKED_BYTES and not packs_every_product():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (AttributeError, RuntimeError):  # an op this torch build does not have, or no kernel for this CPU
        return None


@functools.cache
def packs_every_product() -> bool:
    """Whether decoding on this CPU runs every product of 1 to MAX_PACKED_ROWS rows through the packed
    weights, whatever their size, rather than only batches through weights from MIN_PACKED_BYTES.

    True on CPUs with AVX-512, where oneDNN's packed product took 0.5-0.7x BLAS's time at one row and
    0.3-0.5x at 8 rows for every weight of the bench and gpt2-124m shapes, from 384x384 up (AMD EPYC with
    AVX-512, benchmarks/RESULTS.md); on AVX2-only CPUs BLAS's column-major product was the faster at one
    row and for the smaller weights. Read once: torch's CPU capability does not change in a process."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias with the weight in oneDNN's packed layout (from `_pack`)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _stamp(weight: torch.Tensor) -> tuple[int, int]:
    """What changes when a weight is replaced or updated in place (inference tensors keep no version)."""
    return weight.data_ptr(), (-1 if weight.is_inference() else weight._version)


class InferenceLinear(nn.Linear):
    """nn.Linear for CPU inference: same parameters and state_dict, faster kernels for decoding shapes.

    With a packed copy (`pack`), products of 2..MAX_PACKED_ROWS rows (1.. where `packs_every_product()`)
    run through oneDNN on it; everything else (one row elsewhere, long prefills, anything that records
    gradients, a weight changed after packing) is the plain `F.linear`. The two kernels agree to float
    rounding (about 1e-6 relative).
    """

    _packed: torch.Tensor | None = None
    _packed_stamp: tuple[int, int] = (0, -1)

    def pack(self) -> int:
        """Make the packed copy if there is none (idempotent); return the bytes it holds (0 if none)."""
        if self._packed is None or self._packed_stamp != _stamp(self.weight):
            self._packed = _pack(self.weight)
            self._packed_stamp = _stamp(self.weight)
        return 0 if self._packed is None else self.weight.nbytes

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed copy behind (oneDNN's tensors have no storage to copy);
        the engine packs again when a copy decodes a batch."""
        state = self.__dict__.copy()
        state.pop("_packed", None)
        state.pop("_packed_stamp", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed
        if (
            packed is not None
            and (1 if packs_every_product() else 2) <= x.numel() // self.in_features <= MAX_PACKED_ROWS
            and self._packed_stamp == _stamp(self.weight)  # a weight replaced or updated since packing
            and not torch.is_grad_enabled()  # oneDNN's op has no backward
            and x.is_cpu
            and x.dtype == torch.float32
            and not torch.compiler.is_compiling()
        ):
            return packed_linear(x, packed, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_inference_layout(model: nn.Module) -> nn.Module:
    """Give each CPU linear layer of `model` the decoding layout, in place; return model.

    Each weight is stored column-major (the memory of its transpose): same shapes and values, so
    state_dict, export and every result stay the same up to float rounding; and each nn.Linear becomes an
    InferenceLinear (a subclass with the same parameters). For inference only: training keeps PyTorch's
    default layout, and GPU weights are left alone. So are weights other than fp32 (convert the model
    first): CPU bf16 products on column-major weights take a slow path, 20-30x slower than row-major
    (gpt2-124m shape, bf16, AVX2). Idempotent.
    """
    for module in model.modules():
        w = module.weight if type(module) is nn.Linear else None
        if w is not None and w.device.type == "cpu" and w.dtype == torch.float32:
            w.data = w.data.t().contiguous().t()
            module.__class__ = InferenceLinear  # same object, so tied weights and references stay intact
    return model


def pack_for_batches(model: nn.Module, max_bytes: int | None = None) -> int:
    """Give every InferenceLinear of `model` its packed copy (weights from MIN_PACKED_BYTES, or all where
    `packs_every_product()`); return the bytes they hold. `pack_for_decoding` says when decoding asks.

    Costs as much memory again as the linear weights: nothing is packed when that would exceed
    max_bytes. Layers that cannot be packed keep `F.linear`. Cheap when already done.
    """
    layers = [m for m in model.modules() if isinstance(m, InferenceLinear)]
    if max_bytes is not None and sum(m.weight.nbytes for m in layers) > max_bytes:
        return 0
    return sum(m.pack() for m in layers)


def pack_for_decoding(model: nn.Module, rows: int) -> int:
    """`pack_for_batches` where decoding `rows` sequences at once takes the packed products (2 or more, or
    any number where `packs_every_product()`), within `packing_budget()`; the bytes the packed copies
    hold (0: none made)."""
    return pack_for_batches(model, packing_budget()) if rows > 1 or packs_every_product() else 0


@functools.cache
def packing_budget() -> int | None:
    """The most memory a packed copy of the weights may add: a quarter of the machine's (None: unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):
        return None
