"""Inference speed straight on the model: prefill and decode through its KV cache, timed.

The model decodes as `generate` decodes: in the CPU decoding layout (`use_inference_layout`, given to
the model in place, as `LLM.load` does, with the packed weights where one sequence takes them,
`pack_for_decoding`), with one step per new token through the engine's one-token path
(`decode_step`, or on a GPU its step recorded as a CUDA graph). Prefill is one forward of the prompt into
an empty cache; time to first token adds choosing the first token.
Peak memory is the CUDA allocator's peak on a GPU and the process's peak resident set on a CPU (which
includes everything loaded so far).
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from ..generate.engine import graphs_by_default
from ..generate.layout import pack_for_decoding, use_inference_layout
from ..generate.sampling import SamplingParams, sample_rows
from ..generate.step import StaticDecoder, decode_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = 50,
    seed: int = 0,
    eos_id: int | None = None,
) -> tuple[list[int], dict[str, float]]:
    """New token ids for one prompt (stopping at eos_id) and the seconds spent in prefill and decode.

    Gives the model the decoding layout first (in place; a no-op once done, and for int8 layers).
    """
    use_inference_layout(model)
    pack_for_decoding(model, 1)  # as generate's one sequence (not timed)
    device = next(model.parameters()).device
    context = model.cfg.context_len
    max_new_tokens = max(0, min(max_new_tokens, context - 1))
    prompt = prompt[-(context - max_new_tokens) :] if max_new_tokens else prompt[-context:]
    params = SamplingParams(temperature=temperature, top_k=top_k)
    generators = [torch.Generator(device=device).manual_seed(seed)]
    graphs = graphs_by_default(device, max_new_tokens)  # as BatchDecoder decides
    cache = model.new_cache(1, max_len=len(prompt) + max_new_tokens, zeroed=graphs)
    if graphs:
        step_fn = StaticDecoder(model, cache, None)
    else:
        step_fn = lambda idx: decode_step(model, idx, cache)  # noqa: E731
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    _sync(device)
    start = time.perf_counter()
    logits = model(ids, cache=cache)[:, -1]  # (1, V)
    _sync(device)
    prefill_s = time.perf_counter() - start
    out: list[int] = []
    start = time.perf_counter()
    for step in range(max_new_tokens):
        nxt = sample_rows(logits, params, generators=generators)  # (1,)
        token = int(nxt.item())
        if step == 0:
            first_token_s = prefill_s + time.perf_counter() - start
        out.append(token)
        if token == eos_id or step == max_new_tokens - 1:
            break
        logits = step_fn(nxt.view(1, 1))  # (1, V)
    _sync(device)
    decode_s = time.perf_counter() - start
    timing = {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "first_token_s": first_token_s if out else prefill_s,
    }
    return out, timing


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated (GPU) or the process's peak resident set (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure_speed(
    model: torch.nn.Module, prompt_len: int = 128, new_tokens: int = 64, repeats: int = 3, seed: int = 0
) -> dict[str, float]:
    """Prefill tokens/s, decode tokens/s and time to first token (greedy, fixed random prompt).

    The best of `repeats` runs is kept: on a shared machine, other work only ever slows a run down.
    """
    device = next(model.parameters()).device
    context = model.cfg.context_len
    new_tokens = max(1, min(new_tokens, context // 2))
    prompt_len = max(1, min(prompt_len, context - new_tokens))
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=gen).tolist()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    decode(model, prompt, 2)  # warm-up: first-call allocation and kernel selection
    runs = []
    for _ in range(repeats):
        out, t = decode(model, prompt, new_tokens)
        steps = len(out) - 1  # forwards after the prefill
        runs.append(
            (prompt_len / t["prefill_s"], steps / t["decode_s"] if steps else 0.0, t["first_token_s"])
        )
    return {
        "prefill_tok_s": max(r[0] for r in runs),
        "decode_tok_s": max(r[1] for r in runs),
        "ttft_ms": 1000 * min(r[2] for r in runs),
        "peak_mem_mb": peak_memory_mb(device),
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
    }


def compare_speed(models: dict[str, torch.nn.Module], rounds: int = 3) -> dict[str, dict[str, float]]:
    """measure_speed of several models in alternating rounds (best of each), so that load on the
    machine that comes and goes weighs on all of them alike."""
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for name, model in models.items():
            r = measure_speed(model, repeats=1)
            if name not in best:
                best[name] = r
                continue
            b = best[name]
            b["prefill_tok_s"] = max(b["prefill_tok_s"], r["prefill_tok_s"])
            b["decode_tok_s"] = max(b["decode_tok_s"], r["decode_tok_s"])
            b["ttft_ms"] = min(b["ttft_ms"], r["ttft_ms"])
            b["peak_mem_mb"] = r["peak_mem_mb"]
    return best
