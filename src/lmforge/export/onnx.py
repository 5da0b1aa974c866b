"""ONNX export of the forward pass, idx (batch, seq) int64 -> logits (batch, seq, vocab) float32.

Uses torch's TorchScript-based exporter (`dynamo=False`): it needs only the `onnx` package, while the
dynamo exporter also needs `onnxscript`. Batch and sequence axes are dynamic; the sequence must stay within
the model's context. There is no KV cache in the graph: every call recomputes the whole prefix.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import torch

from .common import ExportError, staged_dir, write_json

OPSET = 17  # LayerNormalization is a native op from opset 17


class _Logits(torch.nn.Module):
    """forward(idx) -> logits only, so the graph has one input and one output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)


class _RMSNorm(torch.nn.Module):
    """nn.RMSNorm written out: the TorchScript exporter has no symbolic for aten::rms_norm."""

    def __init__(self, norm: torch.nn.RMSNorm) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _exportable(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU copy of the model with every nn.RMSNorm replaced by the same formula in plain ops."""
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.RMSNorm):
                setattr(module, name, _RMSNorm(child))
    return model


def export_onnx(
    model: torch.nn.Module, tokenizer_file: str | Path, out: str | Path, dtype: str = "f32"
) -> Path:
    """Write model.onnx (dynamic batch and sequence), tokenizer.json and a small config.json into `out`.

    The graph computes in float32 (`dtype` is always f32: export_run refuses others for onnx)."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as e:
        raise ExportError("--format onnx needs onnx: pip install 'lmforge[onnx]'") from e
    cfg = model.cfg
    model = _exportable(model)
    example = torch.zeros((1, min(8, cfg.context_len)), dtype=torch.long)
    with staged_dir(out) as tmp, warnings.catch_warnings():
        # The tracer warns about python ints taken from shapes; the dynamic axes below cover them.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Logits(model),
            (example,),
            str(tmp / "model.onnx"),
            input_names=["idx"],
            output_names=["logits"],
            dynamic_axes={"idx": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
            opset_version=OPSET,
            dynamo=False,
        )
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        write_json(
            tmp / "config.json",
            {
                "inputs": {"idx": "int64 (batch, seq), seq <= context_len"},
                "outputs": {"logits": "float32 (batch, seq, vocab_size)"},
                "context_len": cfg.context_len,
                "vocab_size": cfg.vocab_size,
                "opset": OPSET,
            },
        )
    return Path(out)
