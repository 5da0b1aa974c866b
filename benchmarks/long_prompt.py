"""What a long prompt joining the batch costs the requests already generating (continuous batching).

A few requests stream (the running rows); then one prompt of many tokens arrives. Without chunking, its
whole prefill is one step, and every running request waits for it before its next token; with a budget
of prompt tokens per step (`continuous.PREFILL_TOKENS`), the prompt is prefilled over several steps and
the running rows decode a token in each. Reported: the running requests' longest gap between two tokens
while the prompt prefills, the long prompt's time to its first token, and the running requests' median
gap before it arrived. With --score the long prompt is scored instead, as a completions request with echo
and logprobs is (`logprobs.PromptScorer`, a chunk of the budget's size per call between decode steps;
a budget past the prompt's length scores it in one forward): reported is the time to score it.

    python benchmarks/long_prompt.py --model gpt2-124m --prompt-tokens 1000 --budget 512 --budget 128
    python benchmarks/long_prompt.py --score --budget 100000 --budget 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from lmforge.generate import continuous
from lmforge.generate.continuous import Completion, Request, Scheduler
from lmforge.generate.layout import use_inference_layout
from lmforge.generate.logprobs import PromptScorer
from lmforge.generate.sampling import SamplingParams
from lmforge.model import GPT, ModelConfig
from lmforge.presets import get_preset

GREEDY = SamplingParams(temperature=0.0)


class Tokens:
    """Stands in for a tokenizer: the scheduler only decodes pieces of text (and logprobs their bytes)."""

    def decode(self, ids):
        return "".join(chr(97 + t % 26) for t in ids)

    def token_bytes(self, token):
        return self.decode([token]).encode()


def one(model, budget: int, running: int, prompt_tokens: int, new_tokens: int, score: bool = False) -> dict:
    """One measurement: `running` streams already decoding, then the long prompt joins (or, with score,
    is scored)."""
    continuous.PREFILL_TOKENS = budget
    sched = Scheduler(model, Tokens(), max_rows=running + 1)
    stamps: list[list[float]] = [[] for _ in range(running)]
    done = threading.Event()
    left, errors = [running + (0 if score else 1)], []  # requests still to finish

    def on_event(i: int):
        def deliver(event):
            if i < running and isinstance(event, str):
                stamps[i].append(time.perf_counter())
            if isinstance(event, BaseException):
                errors.append(event)
            if isinstance(event, (Completion, BaseException)):
                left[0] -= 1
                if not left[0]:
                    done.set()

        return deliver

    g = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size
    for i in range(running):
        ids = torch.randint(0, vocab, (16,), generator=g).tolist()
        sched.submit(Request(ids, new_tokens, GREEDY, deliver=on_event(i)))
    while min(len(s) for s in stamps) < 8:  # the running rows are decoding
        time.sleep(0.001)
    first: list[float] = []
    long = torch.randint(0, vocab, (prompt_tokens,), generator=g).tolist()

    def long_deliver(event):
        if isinstance(event, str) and not first:
            first.append(time.perf_counter())
        on_event(running)(event)

    arrived = time.perf_counter()
    if score:
        scorer = PromptScorer(model, long, 1, Tokens(), budget)
        while not scorer.finished:
            sched.call(scorer.step).result()
        first.append(time.perf_counter())
    else:
        sched.submit(Request(long, 4, GREEDY, deliver=long_deliver))
    done.wait()
    sched.close()
    if errors:
        raise errors[0]
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if b > arrived and a < first[0]]
    if not gaps:
        raise SystemExit(
            "the running requests ended before the long prompt's first token: raise --new-tokens"
        )
    steady = [b - a for s in stamps for a, b in zip(s[1:8], s[2:8], strict=False)]
    return {
        "ttft": first[0] - arrived,
        "max_gap": max(gaps),
        "steady_gap": statistics.median(steady),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-124m", help="a preset's shape, random weights")
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--running", type=int, default=4, help="requests generating when the prompt arrives")
    ap.add_argument("--new-tokens", type=int, default=200, help="tokens each running request asks for")
    ap.add_argument("--budget", type=int, action="append", help="prompt tokens per step (repeatable)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--score", action="store_true", help="score the long prompt (echo with logprobs)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT(ModelConfig(**get_preset(args.model))).eval()
    use_inference_layout(model)
    budgets = args.budget or [continuous.PREFILL_TOKENS]
    print(
        f"# {args.model}, {os.cpu_count()} cores, torch {torch.__version__}; {args.running} running, "
        f"a {args.prompt_tokens}-token prompt joins"
    )
    for _ in range(args.repeats):  # the budgets interleaved: the machine's drift hits each alike
        for b in budgets:
            m = one(model, b, args.running, args.prompt_tokens, args.new_tokens, args.score)
            what = "scored in" if args.score else "first token"
            print(
                f"budget {b:5d}  long prompt's {what} {m['ttft'] * 1e3:7.0f} ms   running rows' "
                f"longest gap {m['max_gap'] * 1e3:6.0f} ms (steady {m['steady_gap'] * 1e3:4.0f} ms)"
            )


if __name__ == "__main__":
    main()
