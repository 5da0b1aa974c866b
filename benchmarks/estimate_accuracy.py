"""How close `lmforge estimate` comes to measured memory: one forward/backward per model shape.

On CPU the peak comes from the torch profiler's allocator events; on CUDA from max_memory_allocated.
Compared quantity: what one training step adds to the weights already in memory (gradients, saved
activations, logits and, under 16-bit autocast, the 16-bit weight copies).

    PYTHONPATH=src python benchmarks/estimate_accuracy.py [--device cuda] [--precision bf16]
"""

from __future__ import annotations

import argparse

import torch

from lmforge.device import autocast
from lmforge.estimate import Setting, measure_step_peak, memory_breakdown
from lmforge.model import GPT, ModelConfig, count_params

SHAPES = [
    dict(family="gpt2", n_layer=4, n_head=4, n_embd=128, vocab_size=320),
    dict(family="gpt2", n_layer=4, n_head=4, n_embd=256, vocab_size=4096),
    dict(family="llama", n_layer=4, n_head=4, n_kv_head=2, n_embd=128, vocab_size=320),
    dict(family="llama", n_layer=4, n_head=8, n_embd=256, vocab_size=4096),
]


def measure(kw: dict, batch: int, seq: int, device: torch.device, precision: str) -> tuple[int, int]:
    """(measured, estimated) bytes of one step above the weights."""
    m = ModelConfig(context_len=seq, **kw).resolved()
    model = GPT(m).to(device)
    x = torch.randint(0, m.vocab_size, (batch, seq), device=device)
    y = torch.randint(0, m.vocab_size, (batch, seq), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with autocast(device, precision):
            loss = model(x, y)
        loss.backward()
        measured = torch.cuda.max_memory_allocated(device) - base
    else:
        with autocast(device, precision):
            measured = measure_step_peak(model, x, y)
    mem = memory_breakdown(m, Setting(batch, seq, precision=precision), device.type)
    est = mem["weights"] - 4 * count_params(model) + mem["gradients"] + mem["activations"] + mem["logits"]
    return measured, est


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", help="fp32 | bf16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {args.precision}, batch {args.batch} x {args.seq}")
    print("| model | measured MB | estimated MB | estimate / measured |")
    print("|---|---|---|---|")
    for kw in SHAPES:
        measured, est = measure(kw, args.batch, args.seq, device, args.precision)
        name = f"{kw['family']} {kw['n_layer']}x{kw['n_embd']} kv{kw.get('n_kv_head', kw['n_head'])} V{kw['vocab_size']}"
        print(f"| {name} | {measured / 1e6:.1f} | {est / 1e6:.1f} | {est / measured:.3f} |")


if __name__ == "__main__":
    main()
