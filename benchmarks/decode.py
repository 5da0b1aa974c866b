"""Decode throughput: lmforge's KV-cache engine next to HF transformers `generate` on the same weights.

Both sides decode greedily from the same random prompts for the same number of new tokens (no early
stop), so the work is identical; the script checks that both produce the same tokens. Time covers the
whole generation call (prefill + decode); tokens/s counts new tokens over all rows.

    PYTHONPATH=src python benchmarks/decode.py                       # gpt2 and llama, batch 1 and 8
    PYTHONPATH=src python benchmarks/decode.py --family llama --batch 8 --new-tokens 64
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from lmforge.bench import hf_twin
from lmforge.generate.engine import BatchDecoder
from lmforge.generate.sampling import SamplingParams
from lmforge.model import GPT, ModelConfig, use_inference_layout
from lmforge.presets import BENCH_MODEL

GREEDY = SamplingParams(temperature=0.0)


def lmforge_generate(model: GPT, prompts: torch.Tensor, new: int) -> list[list[int]]:
    dec = BatchDecoder(model, prompts.tolist(), new, GREEDY, eos_id=None)
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


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[float, float, list, list]:
    """Median seconds of each function, calls interleaved (a, b, a, b, ...) after one warm-up each, so a
    change in the machine's load hits both alike; and the last result of each."""
    ra, rb = fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ra = fn_a()
        t1 = time.perf_counter()
        rb = fn_b()
        ta.append(t1 - t0)
        tb.append(time.perf_counter() - t1)
    return statistics.median(ta), statistics.median(tb), ra, rb


@torch.inference_mode()
def bench(family: str, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    kw = dict(BENCH_MODEL, family=family)
    if family == "llama":
        kw["n_kv_head"] = 2
    torch.manual_seed(0)
    model = GPT(ModelConfig(**kw)).eval()
    hf = hf_twin(model).eval()
    use_inference_layout(model)  # what load_model does for generate, chat, serve and the Python API
    prompts = torch.randint(
        0, kw["vocab_size"], (batch, prompt_len), generator=torch.Generator().manual_seed(1)
    )
    t_lm, t_hf, out_lm, out_hf = timed_pair(
        lambda: lmforge_generate(model, prompts, new), lambda: hf_generate(hf, prompts, new), repeats
    )
    same = sum(a == b for a, b in zip(out_lm, out_hf, strict=True))
    return {
        "family": family,
        "batch": batch,
        "lmforge_tok_s": batch * new / t_lm,
        "hf_tok_s": batch * new / t_hf,
        "speedup": t_hf / t_lm,
        "same_rows": f"{same}/{batch}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="gpt2,llama")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; model {BENCH_MODEL['n_layer']}x{BENCH_MODEL['n_embd']}, "
        f"vocab {BENCH_MODEL['vocab_size']}; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy"
    )
    print("| family | batch | lmforge tok/s | HF generate tok/s | speed-up | same tokens |")
    print("|---|---|---|---|---|---|")
    for family in args.family.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            r = bench(family, batch, args.prompt_len, args.new_tokens, args.repeats)
            print(
                f"| {r['family']} | {r['batch']} | {r['lmforge_tok_s']:.0f} | {r['hf_tok_s']:.0f} | "
                f"{r['speedup']:.2f}x | {r['same_rows']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
