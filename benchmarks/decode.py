"""Decode throughput: lmforge's KV-cache engine next to HF transformers `generate` on the same weights.

Both sides decode greedily from the same random prompts for the same number of new tokens (no early
stop), so the work is identical; the script checks that both produce the same tokens. Time covers the
whole generation call (prefill + decode); tokens/s counts new tokens over all rows.

    PYTHONPATH=src python benchmarks/decode.py                       # gpt2 and llama, batch 1 and 8
    PYTHONPATH=src python benchmarks/decode.py --family llama --batch 8 --new-tokens 64
    PYTHONPATH=src python benchmarks/decode.py --device cuda --dtype bfloat16 --model gpt2-124m

On a GPU lmforge decodes through CUDA graphs (its default there); the table adds lmforge without them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from lmforge.bench import hf_twin
from lmforge.generate.engine import BatchDecoder
from lmforge.generate.layout import use_inference_layout
from lmforge.generate.sampling import SamplingParams
from lmforge.model import GPT, ModelConfig
from lmforge.presets import BENCH_MODEL, get_preset

GREEDY = SamplingParams(temperature=0.0)


def lmforge_generate(
    model: GPT, prompts: torch.Tensor, new: int, cuda_graph: bool | None = None
) -> list[list[int]]:
    dec = BatchDecoder(model, prompts.tolist(), new, GREEDY, eos_id=None, cuda_graph=cuda_graph)
    while not dec.finished:
        dec.step()
    return dec.generated


def hf_generate(hf, prompts: torch.Tensor, new: int) -> list[list[int]]:
    out = hf.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[:, prompts.size(1) :].tolist()


def timed(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, list]]:
    """Median seconds of each function, calls interleaved (a, b, a, b, ...) after one warm-up each, so a
    change in the machine's load hits all alike; and the last result of each."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()  # token lists: the device has finished when they exist
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, results


@torch.inference_mode()
def bench(args, family: str, batch: int) -> dict:
    kw = dict(get_preset(args.model) if args.model else BENCH_MODEL, family=family)
    if family == "llama":
        kw["n_kv_head"] = max(1, kw["n_head"] // 3)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**kw)).eval()
    hf = hf_twin(model).eval().to(device=device, dtype=dtype)
    model.to(device=device, dtype=dtype)
    use_inference_layout(model)  # what LLM.load does for generate, chat, serve and the Python API
    prompts = torch.randint(
        0, kw["vocab_size"], (batch, args.prompt_len), generator=torch.Generator().manual_seed(1)
    ).to(device)
    new = args.new_tokens
    fns = {
        "lmforge": lambda: lmforge_generate(model, prompts, new),
        "hf": lambda: hf_generate(hf, prompts, new),
    }
    if device.type == "cuda":
        fns["eager"] = lambda: lmforge_generate(model, prompts, new, cuda_graph=False)
    t, out = timed(fns, args.repeats)
    same = sum(a == b for a, b in zip(out["lmforge"], out["hf"], strict=True))
    r = {
        "family": family,
        "batch": batch,
        "lmforge_tok_s": batch * new / t["lmforge"],
        "hf_tok_s": batch * new / t["hf"],
        "speedup": t["hf"] / t["lmforge"],
        "same_rows": f"{same}/{batch}",
    }
    if "eager" in t:
        r["eager_tok_s"] = batch * new / t["eager"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="gpt2,llama")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--model", default=None, help="a model preset (default: the 6x384 bench model)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    kw = get_preset(args.model) if args.model else BENCH_MODEL
    where = (
        torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    )
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {where}, "
        f"{torch.get_num_threads()} threads, {args.dtype}; model {args.model or 'bench'} "
        f"{kw['n_layer']}x{kw['n_embd']}, vocab {kw['vocab_size']}; prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, greedy"
    )
    cuda = args.device == "cuda"
    extra = (" lmforge without CUDA graphs tok/s |", "---|") if cuda else ("", "")
    print(f"| family | batch | lmforge tok/s | HF generate tok/s | speed-up | same tokens |{extra[0]}")
    print(f"|---|---|---|---|---|---|{extra[1]}")
    for family in args.family.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            r = bench(args, family, batch)
            eager = f" {r['eager_tok_s']:.0f} |" if cuda else ""
            print(
                f"| {r['family']} | {r['batch']} | {r['lmforge_tok_s']:.0f} | {r['hf_tok_s']:.0f} | "
                f"{r['speedup']:.2f}x | {r['same_rows']} |{eager}",
                flush=True,
            )


if __name__ == "__main__":
    main()
