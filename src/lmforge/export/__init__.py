"""Export a trained run to other formats (HF transformers, plain safetensors, ONNX, GGUF) and import HF models.

Every exporter reads the run through `checkpoint.py`, works on the CPU in float32, trims the vocabulary
padding rows to `vocab_size`, and writes into a temporary folder that is renamed into place at the end,
so a failed export never leaves a half-written `--out`; every format then gets a model card (README.md,
model_card.py). A new format is one module with a function `(model, tokenizer_path, out, dtype) -> Path`
and one line in EXPORTERS.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .common import ExportError
from .model_card import check_license, model_card, write_card

__all__ = ["DTYPES", "EXPORTERS", "FORMATS", "ExportError", "export_run"]

# format -> (module in this package, function, the --dtype values it stores)
EXPORTERS = {
    "hf": ("hf", "export_hf", ("f32", "f16", "bf16")),
    "safetensors": ("safetensors_format", "export_safetensors", ("f32", "f16", "bf16")),
    "onnx": ("onnx", "export_onnx", ("f32",)),
    "gguf": ("gguf", "export_gguf", ("f32", "f16", "bf16", "q8_0")),
}
FORMATS = tuple(EXPORTERS)
DTYPES = ("f32", "f16", "bf16", "q8_0")


def export_run(
    run: str | Path, fmt: str, out: str | Path, dtype: str = "f32", license: str | None = None
) -> Path:
    """Export the latest checkpoint of `run` (or a checkpoint directory) as `fmt` into the folder `out`,
    with a model card (README.md, export/model_card.py) declaring `license` when one is given."""
    import torch

    from ..checkpoint import load_model, tokenizer_path

    if fmt not in EXPORTERS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    module, function, dtypes = EXPORTERS[fmt]
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype not in dtypes:
        raise ExportError(f"--dtype {dtype} is not available for --format {fmt}: use {' or '.join(dtypes)}")
    check_license(license)  # a bad value stops before the model loads
    model, _, ckpt = load_model(run, device="cpu", dtype=torch.float32)
    card = model_card(run, ckpt, fmt, out, tokenizer_path(run), license)  # read before anything is written
    exporter = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    written = Path(exporter(model, tokenizer_path(run), out, dtype))
    write_card(written, card)
    return written
