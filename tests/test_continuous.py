"""Continuous batching: requests join and leave a running batch; each gets what it would get alone."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from lmforge.data import Tokenizer
from lmforge.generate import continuous
from lmforge.generate.continuous import QueueFull, Request, Scheduler
from lmforge.generate.engine import BatchDecoder, Completion
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.step import step_rows
from lmforge.model import GPT, ModelConfig
from tests.gen_helpers import make_run

FAMILIES = {"gpt2": dict(family="gpt2"), "llama-gqa": dict(family="llama", n_kv_head=2)}
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from lmforge.data.tokenizer import train_tokenizer

    return train_tokenizer(["the cat sat on the mat and the dog ran to the park"] * 30, "bpe", 300)


def tiny(vocab: int, **kw) -> GPT:
    torch.manual_seed(0)
    base = dict(n_layer=2, n_head=4, n_embd=32, context_len=64, vocab_size=vocab)
    return GPT(ModelConfig(**{**base, **kw})).eval()


def alone(model, prompt, n, params=GREEDY, seed=None):
    dec = BatchDecoder(model, [prompt], n, params, seed)
    while not dec.finished:
        dec.step()
    return dec.generated[0]


def collect(sched: Scheduler, prompt, n, params=GREEDY, seed=None, **kw) -> Completion:
    *_, done = sched.run_sync(dict(prompt_ids=prompt, max_new_tokens=n, params=params, seed=seed, **kw))
    return done


def together(sched: Scheduler, jobs, n: int) -> dict:
    """name -> the tokens of each (name, prompt, params, seed) job, all submitted at once from threads."""
    out = {}

    def run(name, prompt, params, seed):
        out[name] = collect(sched, prompt, n, params, seed).token_ids

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def prompts_of(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 11, 7, 1, 20, 5)]


def spy_steps(monkeypatch) -> list[tuple[int, list[int]]]:
    """Record each step's (rows decoding, tokens prefilled for each prompt) as the scheduler runs it."""
    steps = []

    def spy(model, idx, positions, prompts, k_layers, v_layers, starts=()):
        steps.append((idx.numel(), [p.numel() for p in prompts]))
        return step_rows(model, idx, positions, prompts, k_layers, v_layers, starts)

    monkeypatch.setattr(continuous, "step_rows", spy)
    return steps


@pytest.mark.parametrize("family", FAMILIES)
def test_requests_joining_a_running_batch_get_what_they_get_alone(tok, family, monkeypatch):
    model = tiny(tok.vocab_size, **FAMILIES[family])
    prompts = prompts_of(tok.vocab_size)
    lengths = [20, 5, 30, 12, 9, 25]  # rows leave at different steps, others join while they run
    expected = [alone(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    steps = spy_steps(monkeypatch)
    sched = Scheduler(model, tok, max_rows=4, max_queue=8)
    results: list[Completion | None] = [None] * len(prompts)

    def client(i):
        time.sleep(0.002 * i)  # staggered arrivals
        results[i] = collect(sched, prompts[i], lengths[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    sched.close()
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == "length" for r in results)
    # the batch really was shared: fewer steps than the requests' tokens one after another, and some
    # prompts were prefilled in the same forward as running rows' next tokens
    assert sched.steps == len(steps) < sum(lengths) - len(lengths)
    assert any(decoding and prefilled for decoding, prefilled in steps)


def test_each_request_keeps_its_own_sampling_and_seed(tok):
    model = tiny(tok.vocab_size, family="llama", n_kv_head=2)
    p = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, repetition_penalty=1.2)
    prompt = [1, 2, 3]
    want = alone(model, prompt, 15, p, seed=5)
    sched = Scheduler(model, tok, max_rows=3)
    jobs = [("sampled", prompt, p, 5), ("greedy", [9, 8, 7], GREEDY, None), ("other", prompt, p, 6)]
    out = together(sched, jobs, 15)
    sched.close()
    assert out["sampled"] == want and out["other"] != want
    assert out["greedy"] == alone(model, [9, 8, 7], 15)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_frequency_and_presence_penalties_draw_as_the_model_alone(tok, family):
    model = tiny(tok.vocab_size, family=family)
    penalized = SamplingParams(temperature=0, frequency_penalty=0.7, presence_penalty=1.5)
    prompt, other = [1, 2, 3], [9, 8, 7]
    want = alone(model, prompt, 20, penalized)
    assert want != alone(model, prompt, 20)  # negative control: the penalties change the greedy tokens
    sched = Scheduler(model, tok, max_rows=3)
    jobs = [
        ("penalized", prompt, penalized, None),
        ("plain", other, GREEDY, None),
        ("again", prompt, penalized, None),
    ]
    out = together(sched, jobs, 20)
    sched.close()
    assert out["penalized"] == out["again"] == want
    assert out["plain"] == alone(model, other, 20)  # a row without them is drawn without them


def test_stops_text_banned_tokens_and_logprobs(tok):
    model = tiny(tok.vocab_size)
    prompt = tok.encode("the cat")
    free = alone(model, prompt, 12)
    sched = Scheduler(model, tok, max_rows=2)
    # a stop token ends the generation and is not part of it
    done = collect(sched, prompt, 12, stop_ids=[free[3]])
    assert done.finish_reason == "stop" and done.token_ids == free[: free.index(free[3])]
    # ...though it was drawn: with logprobs, it has the last entry
    ended = collect(sched, prompt, 12, stop_ids=[free[3]], logprobs=0)
    assert len(ended.logprobs) == len(ended.token_ids) + 1 and ended.logprobs[-1]["token"] == tok.decode(
        [free[3]]
    )
    # a banned token is never drawn: greedy takes the runner-up instead
    banned = collect(sched, prompt, 12, banned_ids=[free[0]])
    assert banned.token_ids[0] != free[0] and free[0] not in banned.token_ids
    # logprobs are the model's own log-softmax at each step
    done = collect(sched, prompt, 4, logprobs=3)
    ids = torch.tensor([prompt + done.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].float(), -1)
    for k, entry in enumerate(done.logprobs):
        row = logp[len(prompt) - 1 + k]
        assert entry["logprob"] == pytest.approx(float(row[done.token_ids[k]]), abs=1e-5)
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(float(row.max()), abs=1e-5)
    assert done.text == tok.decode(done.token_ids)
    # handed out piece by piece, each piece with the entries of the tokens drawn since the one before
    events = list(sched.run_sync(dict(prompt_ids=prompt, max_new_tokens=12, params=GREEDY, logprobs=0)))
    pieces, last = events[:-1], events[-1]
    handed = [e for p in pieces for e in p.logprobs]
    assert len(pieces) > 1 and all(p.logprobs for p in pieces)
    assert handed == last.logprobs[: len(handed)] and "".join(pieces) == last.text
    sched.close()


def test_cancel_frees_the_row_and_a_full_queue_refuses(tok):
    model = tiny(tok.vocab_size)
    sched = Scheduler(model, tok, max_rows=1, max_queue=1)
    got = []
    long = Request([1, 2, 3], 60, GREEDY, deliver=lambda e: (got.append(e), time.sleep(0.005)))
    sched.submit(long)
    while not got:  # generating
        time.sleep(0.001)
    sched.submit(Request([4, 5], 3, GREEDY, deliver=lambda e: None))  # waits: the one row is busy
    with pytest.raises(QueueFull):
        sched.submit(Request([6], 3, GREEDY, deliver=lambda e: None))
    long.cancel()
    steps = sched.steps
    deadline = time.monotonic() + 10
    while sched.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.001)
    sched.close()
    assert sched.load == (0, 0)
    # the cancelled row left within a step or two (the waiting request's 3 tokens took 2 more)
    assert sched.steps - steps <= 4
    assert not any(isinstance(e, Completion) for e in got)  # nobody was waiting for its completion


@pytest.mark.parametrize("family", FAMILIES)
def test_requests_arriving_together_are_prefilled_together_and_get_what_they_get_alone(
    tok, family, monkeypatch
):
    model = tiny(tok.vocab_size, **FAMILIES[family])
    prompts = prompts_of(tok.vocab_size)[:4] + [[5, 6, 7, 8, 9, 10, 11, 12]]  # lengths 3, 11, 7, 1, 8
    expected = [alone(model, p, 6) for p in prompts]
    steps = spy_steps(monkeypatch)
    sched = Scheduler(model, tok, max_rows=8, max_queue=8)
    done: list[list] = [[] for _ in prompts]
    with sched.lock:  # the loop takes them all from the queue at once, then waits for the lock
        with sched.wake:  # (re-entrant) the loop cannot look at the queue until all are in
            for i, p in enumerate(prompts):
                sched.submit(Request(p, 6, GREEDY, deliver=done[i].append))
        wait_for(lambda: sched.load == (len(prompts), 0))
    deadline = time.monotonic() + 30
    while not all(d and isinstance(d[-1], Completion) for d in done) and time.monotonic() < deadline:
        time.sleep(0.001)
    sched.close()
    assert [d[-1].token_ids for d in done] == expected
    # one forward prefilled all five (each prompt attends within its own row), then 5 steps decoded
    # them together
    assert steps == [(0, [3, 11, 7, 1, 8])] + [(5, [])] * 5


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_gives_decoding_rows_and_prompts_the_logits_of_the_model_alone(tok, family):
    """step_rows against the model run on each sequence by itself: prompts of different lengths from
    slot 0, then in one forward rows decoding, prompts from slot 0 and a prompt whose start its row
    holds already. Logits, not greedy tokens: a tiny random model's argmax hardly depends on attention."""
    model = tiny(tok.vocab_size, **FAMILIES[family])
    cfg = model.cfg
    k = torch.zeros(cfg.n_layer, 8, cfg.n_kv_head, cfg.context_len, cfg.head_dim)
    v = torch.zeros_like(k)
    ps = prompts_of(tok.vocab_size)  # lengths 3, 11, 7, 1, 20, 5

    def step(idx, positions, prompts, rows, starts=()):
        ids = [torch.tensor(p) for p in prompts]
        kv = tuple(k[:, :rows].unbind(0)), tuple(v[:, :rows].unbind(0))
        return step_rows(model, torch.tensor(idx).long(), torch.tensor(positions).long(), ids, *kv, starts)

    def expected(*seqs):
        return torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])

    with torch.no_grad():
        first = step([], [], ps[:3], 3)  # rows 0-2: lengths 3, 11, 7
        torch.testing.assert_close(first, expected(*ps[:3]), rtol=0, atol=1e-5)
        nxt = first.argmax(-1).tolist()
        branch = ps[1][:6] + ps[5]  # row 4 holds ps[1]'s first 6 tokens: it prefills the 5 after them
        k[:, 4, :, :6], v[:, 4, :, :6] = k[:, 1, :, :6], v[:, 1, :, :6]
        got = step(nxt, [3, 11, 7], [ps[4], branch[6:], ps[3]], 6, starts=[0, 6, 0])
    want = expected(*(p + [t] for p, t in zip(ps[:3], nxt, strict=True)), ps[4], branch, ps[3])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_step_prefills_at_most_its_budget_of_prompt_tokens(tok, monkeypatch):
    monkeypatch.setattr(continuous, "PREFILL_TOKENS", 10)
    steps = spy_steps(monkeypatch)
    sched = Scheduler(tiny(tok.vocab_size), tok, max_rows=8, max_queue=8)
    done: list[list] = [[] for _ in range(4)]
    with sched.lock, sched.wake:
        for i, n in enumerate((4, 5, 12, 3)):  # 4 + 5 + 1 of the 12; 10 more of it; its last + 3
            prompt = [10 * (i + 1) + t for t in range(n)]  # no two start alike (nothing to reuse)
            sched.submit(Request(prompt, 2, GREEDY, deliver=done[i].append))
    wait_for(lambda: all(d and isinstance(d[-1], Completion) for d in done))
    sched.close()
    assert [prefilled for _, prefilled in steps if prefilled] == [[4, 5, 1], [10], [1, 3]]
    # the budget counts what is left to prefill: a prompt whose start a free row holds costs the rest
    sched = Scheduler(tiny(tok.vocab_size), tok, max_rows=8, max_queue=8)
    first = [60 + t for t in range(10)]
    reply = collect(sched, first, 2).token_ids
    turn = first + [t for t in (90, 91, 92) if t != reply[0]][:2]  # 12 tokens, the first 10 held
    done = [[], []]
    with sched.lock, sched.wake:
        sched.submit(Request(turn, 2, GREEDY, deliver=done[0].append))
        sched.submit(Request([100 + t for t in range(8)], 2, GREEDY, deliver=done[1].append))
    wait_for(lambda: all(d and isinstance(d[-1], Completion) for d in done))
    sched.close()
    assert [prefilled for _, prefilled in steps if prefilled][-1] == [2, 8]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_long_prompt_is_prefilled_a_part_per_step_while_the_running_rows_decode(tok, family, monkeypatch):
    monkeypatch.setattr(continuous, "PREFILL_TOKENS", 8)
    model = tiny(tok.vocab_size, **FAMILIES[family])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, tok.vocab_size, (n,), generator=g).tolist() for n in (3, 4, 30, 2)]
    lengths = [3, 12, 6, 4]
    steps = spy_steps(monkeypatch)
    sched = Scheduler(model, tok, max_rows=4, max_queue=4)
    done: list[list] = [[] for _ in prompts]
    with sched.lock, sched.wake:  # all four wait before the first step
        for prompt, n, out in zip(prompts, lengths, done, strict=True):
            sched.submit(Request(prompt, n, GREEDY, deliver=out.append))
    wait_for(lambda: all(d and isinstance(d[-1], Completion) for d in done))
    sched.close()
    # the 30-token prompt: 1 token beside the two short ones, then 8, 8, 8 while both rows decode (the
    # first finishes meanwhile; the prompt part-way stays the last row), then its last 5 with the fourth
    assert steps[:5] == [(0, [3, 4, 1]), (2, [8]), (2, [8]), (1, [8]), (1, [5, 2])]
    assert [d[-1].token_ids for d in done] == [
        alone(model, p, n) for p, n in zip(prompts, lengths, strict=True)
    ]


def test_a_prompt_like_one_still_prefilling_copies_what_that_one_has_prefilled(tok, monkeypatch):
    # n > 1, or users with one long system prompt: the second copies the first's keys and values so far
    monkeypatch.setattr(continuous, "PREFILL_TOKENS", 8)
    model = tiny(tok.vocab_size)
    steps = spy_steps(monkeypatch)
    sched = Scheduler(model, tok, max_rows=2, max_queue=2)
    prompt = [40 + t % 50 for t in range(30)]
    done: list[list] = [[], []]
    with sched.lock, sched.wake:
        for out in done:
            sched.submit(Request(prompt, 3, GREEDY, deliver=out.append))
    wait_for(lambda: all(d and isinstance(d[-1], Completion) for d in done))
    sched.close()
    # the second joins when the first has 24 tokens in: it copies them and prefills 6, not 30
    assert [n for _, n in steps if n] == [[8], [8], [8], [6, 2], [4]]
    assert done[0][-1].token_ids == done[1][-1].token_ids == alone(model, prompt, 3)


def test_a_prompt_cancelled_part_way_frees_its_row_and_leaves_what_it_prefilled(tok, monkeypatch):
    monkeypatch.setattr(continuous, "PREFILL_TOKENS", 8)
    model = tiny(tok.vocab_size)
    steps: list[list[int]] = []
    long: list = []

    def spy(model, idx, positions, prompts, k_layers, v_layers, starts=()):
        steps.append([p.numel() for p in prompts])
        if len(steps) == 3:  # the long prompt's third part: its client leaves
            long[0].cancel()
        return step_rows(model, idx, positions, prompts, k_layers, v_layers, starts)

    monkeypatch.setattr(continuous, "step_rows", spy)
    sched = Scheduler(model, tok, max_rows=2, max_queue=2)
    prompt = [40 + t % 50 for t in range(30)]
    running: list = []
    with sched.lock, sched.wake:
        sched.submit(Request([5, 6], 10, GREEDY, deliver=running.append))
        long.append(sched.submit(Request(prompt, 4, GREEDY, deliver=lambda e: None)))
    wait_for(lambda: running and isinstance(running[-1], Completion))
    assert steps[:4] == [[2, 6], [8], [8], []]  # dropped at the step after it was cancelled
    assert running[-1].token_ids == alone(model, [5, 6], 10)
    # the same prompt again prefills only what the cancelled one did not: 6 + 8 + 8 tokens are held
    before = len(steps)
    assert collect(sched, prompt, 4).token_ids == alone(model, prompt, 4)
    sched.close()
    assert [n for n in steps[before:] if n] == [[8]]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prompt_reuses_the_keys_and_values_a_row_holds_for_its_start(tok, family, monkeypatch):
    model = tiny(tok.vocab_size, **FAMILIES[family])
    steps = spy_steps(monkeypatch)
    sched = Scheduler(model, tok, max_rows=2, max_queue=4)
    first = [7, 3, 9, 12, 40, 5, 8, 2, 11, 30]
    reply = collect(sched, first, 6).token_ids
    # the next turn of a conversation: the last prompt, part of its reply, something new; its row's
    # cache still holds the first 10 + 5 tokens (the last token drawn was never fed in)
    turn = first + reply[:3] + [21, 22]
    assert collect(sched, turn, 8).token_ids == alone(model, turn, 8)
    assert steps[-8][1] == [2]  # only the 2 new tokens were prefilled
    # the same prompt again: everything but its last token comes from the cache
    assert collect(sched, first, 6).token_ids == reply
    assert steps[-6][1] == [1]
    # a prompt sharing its start with a row still generating is copied from that row
    long = [50 + t for t in range(20)]
    done: list = []
    sched.submit(Request(long, 30, GREEDY, deliver=done.append))
    wait_for(lambda: len(done) >= 3)
    branch = long[:12] + [60, 61, 62]
    before = len(steps)
    assert collect(sched, branch, 5).token_ids == alone(model, branch, 5)
    assert [prefilled for _, prefilled in steps[before:] if prefilled] == [[3]]
    wait_for(lambda: isinstance(done[-1], Completion))
    sched.close()
    assert done[-1].token_ids == alone(model, long, 30)


def test_a_waiting_request_its_client_gave_up_frees_its_place_at_once(tok):
    sched = Scheduler(tiny(tok.vocab_size), tok, max_rows=1, max_queue=1)
    long = sched.submit(Request([1, 2, 3], 60, GREEDY, deliver=lambda e: time.sleep(0.005)))
    wait_for(lambda: sched.load == (1, 0))
    gave_up = sched.submit(Request([4, 5], 3, GREEDY, deliver=lambda e: None))
    with pytest.raises(QueueFull, match="1 requests are generating and 1 wait"):
        sched.submit(Request([6], 3, GREEDY, deliver=lambda e: None))
    gave_up.cancel()
    assert sched.load == (1, 0)  # not counted as waiting...
    sched.submit(Request([6], 3, GREEDY, deliver=lambda e: None))  # ...and its place is free
    long.cancel()
    sched.close()


def test_the_queue_bound_counts_requests_not_yet_prefilled(tok):
    # Held lock: the loop has taken the first two into rows but cannot prefill them; with one more
    # waiting, max_rows + max_queue are in the server.
    sched = Scheduler(tiny(tok.vocab_size), tok, max_rows=2, max_queue=1)
    with sched.lock:
        with sched.wake:  # (re-entrant) the loop takes both at once
            for prompt in ([1], [2]):
                sched.submit(Request(prompt, 5, GREEDY, deliver=lambda e: None))
        wait_for(lambda: sched.load == (2, 0))
        assert sched.steps == 0
        sched.submit(Request([3], 5, GREEDY, deliver=lambda e: None))
        with pytest.raises(QueueFull):
            sched.submit(Request([4], 5, GREEDY, deliver=lambda e: None))
    sched.close()


def test_prompt_that_fills_the_context_is_refused_and_the_context_ends_a_row(tok):
    model = tiny(tok.vocab_size)
    sched = Scheduler(model, tok, max_rows=2)
    with pytest.raises(ValueError, match="context"):
        sched.submit(Request(list(range(1, 65)), 5, GREEDY, deliver=lambda e: None))
    with pytest.raises(ValueError, match="token ids"):  # refused at once, not in the loop's thread
        sched.submit(Request([1, tok.vocab_size], 5, GREEDY, deliver=lambda e: None))
    done = collect(sched, list(range(1, 60)), 50)
    sched.close()
    assert done.finish_reason == "length" and 59 + len(done.token_ids) == 64
    assert done.token_ids == alone(model, list(range(1, 60)), 5)


def test_a_tokenizer_from_a_run_decodes(tiny_data):
    tok = Tokenizer.load(tiny_data / "tokenizer.json")
    model = tiny(tok.vocab_size)
    sched = Scheduler(model, tok, max_rows=2)
    pieces = list(sched.run_sync(dict(prompt_ids=tok.encode("the cat"), max_new_tokens=8, params=GREEDY)))
    sched.close()
    *text, done = pieces
    assert "".join(text) == done.text and len(done.token_ids) == 8


THREADS_PROBE = """
import os, sys, time
import torch
torch.set_num_threads(2)  # as on a machine with two cores or more
from lmforge.api import LLM
from lmforge.generate.sampling import SamplingParams

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
llm = LLM.load(sys.argv[1])
loaded = threads()
sched = llm.scheduler(4, 4)
time.sleep(0.2)
started = threads()
fields, _ = llm.request_fields("def main", 4, SamplingParams(temperature=0.0))
reply = list(sched.run_sync(fields))[-1]
print(before, loaded, started, len(reply.token_ids), flush=True)
sched.close()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_loading_and_starting_the_scheduler_start_no_openmp_team_on_the_callers_thread(tiny_data, tmp_path):
    # A thread that runs a parallel op keeps a team of OpenMP workers; one on the caller's thread beside
    # the scheduler's makes every decode step about twice as long. Tensors big enough to run in parallel.
    run = make_run(tiny_data, tmp_path / "run", n_embd=128, context_len=256)
    out = subprocess.run(
        [sys.executable, "-c", THREADS_PROBE, str(run)], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip(), out.stderr
    before, loaded, started, tokens = map(int, out.stdout.split())
    assert loaded == before, "LLM.load started threads on the caller's thread"
    assert started == before + 1, "the scheduler started more than its own thread before its first step"
    assert tokens == 4
    assert out.returncode == 0, out.stderr


EXIT_WHILE_GENERATING = """
import sys, time
import torch
torch.set_num_threads(2)
from lmforge.api import LLM
from lmforge.generate.continuous import Request
from lmforge.generate.sampling import SamplingParams

llm = LLM.load(sys.argv[1])
sched = llm.scheduler(4, 4)
started = []
for k in range(4):  # no end token: each row generates its 200 tokens
    ids = llm.tokenizer.encode(f"def main {k}")
    sched.submit(Request(ids, 200, SamplingParams(temperature=1.0), deliver=started.append))
while not started:
    time.sleep(0.01)
print("leaving with", sched.load[0], "rows generating", flush=True)
"""


def test_a_program_that_exits_while_requests_generate_exits_cleanly(tiny_data, tmp_path):
    # The decode thread is inside a torch op when the interpreter exits; unless it is stopped first the
    # process aborts ("terminate called without an active exception", exit status 134).
    run = make_run(tiny_data, tmp_path / "run", n_embd=128, context_len=256)
    out = subprocess.run(
        [sys.executable, "-c", EXIT_WHILE_GENERATING, str(run)], capture_output=True, text=True, timeout=120
    )
    assert "leaving with 4 rows generating" in out.stdout, out.stderr
    assert out.returncode == 0, out.stderr
    assert "terminate" not in out.stderr


@pytest.mark.parametrize("hold", [5.0, 0.0])
def test_a_request_sent_just_after_a_reply_ends_joins_the_next_step(tok, monkeypatch, hold):
    """A step that frees a row waits (up to `hold` seconds) for a request to take it, so a client that
    comes straight back joins the next step instead of waiting for it to end; hold=0 is the control."""
    steps = spy_steps(monkeypatch)
    sched = Scheduler(tiny(tok.vocab_size), tok, max_rows=2, max_queue=2, hold=hold)
    ended = threading.Event()
    at_end: list[int] = []  # steps taken when the short reply ended (its last step is steps[k - 1])

    def short_deliver(event):
        if isinstance(event, Completion):
            at_end.append(len(steps))
            ended.set()

    long = sched.submit(Request([1, 2, 3], 60, GREEDY, deliver=lambda e: time.sleep(0.005)))
    wait_for(lambda: len(steps) >= 2)  # decoding
    sched.submit(Request([4, 5], 2, GREEDY, deliver=short_deliver))
    assert ended.wait(30)
    time.sleep(0.05)  # the client's way back: the long row's steps take more than 5 ms each
    began = time.monotonic()
    done = collect(sched, [6, 7, 8, 9, 10], 3)
    took = time.monotonic() - began
    long.cancel()
    sched.close()
    assert done.finish_reason == "length"
    k = at_end[0]
    if hold:  # the step after the short reply's last took the new prompt beside the long row...
        assert steps[k] == (1, [5])
        assert took < hold / 2  # ...and the wait ended when it came, not at its limit
    else:  # no wait: the long row's next step began before the prompt came
        assert steps[k] == (1, [])
        assert (1, [5]) in steps[k + 1 :]


def test_the_wait_for_returning_requests_stops_when_they_do_not_come(tok):
    sched = Scheduler(tiny(tok.vocab_size), tok, max_rows=2, max_queue=2, hold=0.03)
    for _ in range(6):  # each reply frees the row; the next request comes well after the wait ends
        collect(sched, [1, 2, 3], 1)
        time.sleep(0.2)
    sched.close()
    # waits at the first four freeings, each met by no one; then below HOLD_MET the loop only probes
    # (at every HOLD_PROBE-th freeing)
    assert (sched.freeings, sched.holds) == (6, 4)
    assert sched.holds_met < continuous.HOLD_MET


def test_the_wait_is_checked_and_counts_no_wait_for_the_lock(tok):
    model = tiny(tok.vocab_size)
    for bad in (-1.0, float("inf"), float("nan"), 61.0):
        with pytest.raises(ValueError, match="give seconds from 0 to 60"):
            Scheduler(model, tok, max_rows=2, hold=bad)
    sched = Scheduler(model, tok, max_rows=2)
    with sched.lock:  # another user of the model holds it while the first requests come
        first = [sched.submit(Request([1, 2, 3], 4, GREEDY, deliver=lambda e: None)) for _ in range(2)]
        time.sleep(1.0)
    collect(sched, [4, 5], 4)
    for req in first:
        req.cancel()
    sched.close()
    assert 0 < sched.step_s < 0.1  # the steps' own time, not the second spent waiting for the lock


def test_the_python_api_sets_the_wait(tiny_data, tmp_path):
    from lmforge.api import LLM

    llm = LLM.load(make_run(tiny_data, tmp_path / "run"))
    with pytest.raises(ValueError, match="give seconds from 0 to 60"):
        llm.scheduler(2, 2, hold=-1.0)
    sched = llm.scheduler(2, 2, hold=0.0)
    *_, done = sched.run_sync(dict(prompt_ids=[1, 2, 3], max_new_tokens=1, params=GREEDY))
    sched.close()
    assert done.finish_reason == "length" and sched.hold == 0.0


def test_call_runs_on_the_decode_thread_between_steps(tok):
    sched = Scheduler(tiny(tok.vocab_size), tok, max_rows=2, max_queue=0)
    running = sched.submit(Request([1, 2, 3], 40, GREEDY, deliver=lambda e: None))
    where = sched.call(lambda: (threading.current_thread().name, sched.lock.locked())).result(timeout=30)
    assert where == ("lmforge-decode", True)  # the model's own thread, holding its lock
    with pytest.raises(ZeroDivisionError):
        sched.call(lambda: 1 / 0).result(timeout=30)  # the caller gets the exception; the loop goes on
    assert collect(sched, [4, 5], 3).finish_reason == "length"
    running.cancel()
    with sched.wake:  # the loop cannot take calls meanwhile: as many wait as requests may (2 rows + 0)
        waiting = [sched.call(lambda: 1), sched.call(lambda: 2)]
        with pytest.raises(QueueFull, match="wait to be scored"):
            sched.call(lambda: 3)
    assert [f.result(timeout=30) for f in waiting] == [1, 2]
    sched.close()
    with pytest.raises(QueueFull):
        sched.call(lambda: None)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_prompt_scored_a_chunk_at_a_time_has_the_models_own_logprobs(tok, family):
    from lmforge.generate.logprobs import PromptScorer

    model = tiny(tok.vocab_size, family=family)
    ids = tok.encode("the cat sat on the mat and the dog ran to the park")
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    for chunk in (1, 4, len(ids)):
        scorer, steps = PromptScorer(model, ids, 2, tok, chunk), 0
        while not scorer.finished:
            scorer.step()
            steps += 1
        assert steps == -(-(len(ids) - 1) // chunk)  # a forward per chunk of the tokens fed in
        first, *rest = scorer.entries
        assert first["logprob"] is None and first["top_logprobs"] is None and len(rest) == len(ids) - 1
        for k, entry in enumerate(rest, start=1):
            assert entry["token"] == tok.decode([ids[k]])
            assert entry["logprob"] == pytest.approx(float(ref[k - 1, ids[k]]), abs=1e-5)
            assert entry["top_logprobs"][0]["logprob"] == pytest.approx(float(ref[k - 1].max()), abs=1e-5)
