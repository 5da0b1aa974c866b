"""Int8 weight-only matmul kernels against fp32, per layer shape and for a whole model's decode.

    python benchmarks/int8_matmul.py [--threads N] [--run RUN_DIR]

Layer shapes are those of the bench model (6 layers x 384 wide, vocab 4096). Rows: 1 (a decode step),
8 (a small batch) and 128 (a prefill). Each time is the best of several repeats, so load from other
processes on a shared machine inflates it as little as possible. With --run, the whole model's prefill
and decode tokens/s are also measured in fp32 and with each int8 kernel (eval's speed measurement).
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
import torch.nn as nn

from lmforge.generate.quant import Int8Linear, quantize_int8, weight_bytes
from lmforge.model import GPT, ModelConfig
from lmforge.presets import BENCH_MODEL


def best_time(fn, repeats: int = 5, inner: int = 20) -> float:
    """Best seconds per call over `repeats` rounds of `inner` calls (after a warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


@torch.no_grad()
def layer_table(n_embd: int, vocab: int) -> None:
    shapes = {
        "attn.c_attn": (3 * n_embd, n_embd),
        "attn.c_proj": (n_embd, n_embd),
        "mlp.c_fc": (4 * n_embd, n_embd),
        "mlp.c_proj": (n_embd, 4 * n_embd),
        "lm_head": (vocab, n_embd),
    }
    kernels = ["dequant"] + (["int8pack"] if hasattr(torch, "_weight_int8pack_mm") else [])
    print(f"| layer (out x in) | rows | fp32 µs | {' | '.join(k + ' µs' for k in kernels)} |")
    print("|---|---:|---:|" + "---:|" * len(kernels))
    for name, (out, inp) in shapes.items():
        linear = nn.Linear(inp, out, bias=False)
        quant = {k: Int8Linear(linear, k) for k in kernels}
        for rows in (1, 8, 128):
            x = torch.randn(rows, inp)
            fp = best_time(lambda x=x, lin=linear: lin(x))
            q = [best_time(lambda x=x, m=m: m(x)) for m in quant.values()]
            cells = " | ".join(f"{t * 1e6:,.0f} ({fp / t:.2f}x)" for t in q)
            print(f"| {name} ({out}x{inp}) | {rows} | {fp * 1e6:,.0f} | {cells} |")


def model_table(model: GPT) -> None:
    from lmforge.eval.speed import compare_speed

    models = {"fp32": model}
    for kernel in ("dequant", "int8pack"):
        if kernel == "int8pack" and not hasattr(torch, "_weight_int8pack_mm"):
            continue
        models[f"int8 {kernel}"] = quantize_int8(copy.deepcopy(model), kernel=kernel)
    results = compare_speed(models, rounds=3)
    print("\n| weights | MiB | prefill tok/s | decode tok/s | time to first token ms |")
    print("|---|---:|---:|---:|---:|")
    for name, m in models.items():
        r = results[name]
        print(
            f"| {name} | {weight_bytes(m) / 2**20:.1f} | {r['prefill_tok_s']:,.0f} | "
            f"{r['decode_tok_s']:,.1f} | {r['ttft_ms']:.1f} |"
        )
    auto = quantize_int8(copy.deepcopy(model))
    print(
        f"\nquantize_int8(kernel='auto') picked: {auto.quant_info['kernel']} {auto.quant_info['kernel_timings_s']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--run", default=None, help="RUN_DIR to time whole (default: the bench model, random weights)"
    )
    ap.add_argument("--skip-layers", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}"
    )
    if args.run:
        from lmforge.checkpoint import load_model

        model = load_model(args.run)[0]
    else:
        torch.manual_seed(0)
        model = GPT(ModelConfig(**BENCH_MODEL)).eval()
    if not args.skip_layers:
        layer_table(model.cfg.n_embd, model.cfg.padded_vocab_size)
    model_table(model)


if __name__ == "__main__":
    main()
