"""`lmforge serve` with many users: batched decoding, n choices, a bounded queue, time limits, logprobs,
context checks and the OpenAI fields that were refused — through the official client and raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from lmforge.api import LLM
from lmforge.serve.app import create_app
from tests.gen_helpers import make_run
from tests.serve_helpers import free_port, serving

ROOT = Path(__file__).resolve().parents[1]
USAGE = {"include_usage": True}


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    return make_run(tiny_data, tmp_path_factory.mktemp("batching") / "run", family="gpt2")


@pytest.fixture(scope="module")
def served(run):
    llm = LLM.load(run, device="cpu")
    with serving(create_app(llm, max_tokens=96, max_body=8192, model_name="tiny", max_rows=4)) as url:
        yield url, llm


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_greedy_requests_batched_together_equal_each_served_alone(served):
    url, llm = served
    prompts = [f"the {w}" for w in ("cat", "dog", "park", "mat", "birds", "trees", "sat", "ran")]
    lengths = [12, 30, 5, 20, 9, 25, 16, 3]
    client = client_of(url)
    alone = [
        client.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).choices[0].text
        for p, n in zip(prompts, lengths, strict=True)
    ]
    assert alone == [
        llm.generate(p, max_new_tokens=n, temperature=0) for p, n in zip(prompts, lengths, strict=True)
    ]

    def call(i):
        c = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        return c.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(call, range(8)))
    assert together == alone


def test_frequency_and_presence_penalties_as_the_python_api_draws_them(served):
    url, llm = served
    client = client_of(url)
    penalties = dict(frequency_penalty=0.8, presence_penalty=1.2)

    def call(prompt, **kw):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, **kw)

    with ThreadPoolExecutor(2) as pool:  # a penalized request batched with one without
        penalized, plain = pool.map(lambda kw: call("the cat", **kw), [penalties, {}])
    assert penalized.choices[0].text == llm.generate("the cat", max_new_tokens=24, temperature=0, **penalties)
    assert plain.choices[0].text == llm.generate("the cat", max_new_tokens=24, temperature=0)
    assert penalized.choices[0].text != plain.choices[0].text  # negative control: they change the reply
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        call("the cat", presence_penalty=2.5)  # OpenAI's range is [-2, 2]


def test_logit_bias_moves_the_draw_and_logprobs_stay_the_models(served):
    url, llm = served
    client = client_of(url)
    for prompt in (
        "the cat",
        "the dog",
        "the",
        "a cat sat",
    ):  # one whose two likeliest tokens are not the end
        with torch.no_grad():
            logits = llm.model(torch.tensor([llm.tokenizer.encode(prompt)]))[0, -1]
        first = torch.log_softmax(logits.float(), -1)
        top, runner_up = first.topk(2).indices.tolist()
        if llm.tokenizer.eos_id not in (top, runner_up):
            break

    def call(bias, **kw):
        return client.completions.create(
            model="tiny", prompt=prompt, max_tokens=3, temperature=0, logit_bias=bias, **kw
        ).choices[0]

    unbiased = call({}, logprobs=0)  # negative control: the argmax
    assert unbiased.logprobs.tokens[0] == llm.tokenizer.decode([top]) != llm.tokenizer.decode([runner_up])
    # -100 on the argmax: the runner-up is drawn, and its logprob is the model's own, not the biased one
    banned = call({str(top): -100}, logprobs=1)
    assert banned.logprobs.token_logprobs[0] == pytest.approx(float(first[runner_up]), abs=1e-4)
    assert banned.logprobs.tokens[0] == llm.tokenizer.decode([runner_up])
    # +100 on one ordinary token: every draw is that token
    word = llm.tokenizer.encode(" dog")[-1]
    forced = call({str(word): 100}, logprobs=0)
    assert forced.logprobs.tokens == [llm.tokenizer.decode([word])] * 3
    for bad, why in [({"x": 1}, "not a token id"), ({"5": 101}, "outside"), ({"999999": 1}, r"\[0, ")]:
        with pytest.raises(openai.BadRequestError, match=why):
            call(bad)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        call({str(t): 1 for t in range(301)})  # at most 300 tokens


def test_echo_gives_the_prompt_and_its_tokens_logprobs(served):
    url, llm = served
    client = client_of(url)
    ids = llm.tokenizer.encode("the cat sat")
    with torch.no_grad():
        ref = torch.log_softmax(llm.model(torch.tensor([ids]))[0].float(), -1)
    c = client.completions.create(
        model="tiny", prompt="the cat sat", max_tokens=2, temperature=0, echo=True, logprobs=1
    ).choices[0]
    plain = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=2, temperature=0)
    assert c.text == "the cat sat" + plain.choices[0].text
    lp = c.logprobs
    assert lp.tokens[: len(ids)] == [llm.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first
    for k in range(1, len(ids)):
        assert lp.token_logprobs[k] == pytest.approx(float(ref[k - 1, ids[k]]), abs=1e-4)
        assert max(lp.top_logprobs[k].values()) == pytest.approx(float(ref[k - 1].max()), abs=1e-4)
    assert len(lp.tokens) == len(ids) + plain.usage.completion_tokens + (
        plain.choices[0].finish_reason == "stop"
    )
    # max_tokens 0 with echo: the prompt scored, nothing drawn (token-id prompts too, several at once)
    scored = client.completions.create(
        model="tiny", prompt=[ids, ids[:2]], max_tokens=0, echo=True, logprobs=0, temperature=0
    )
    assert [ch.text for ch in scored.choices] == ["the cat sat", llm.tokenizer.decode(ids[:2])]
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[: len(ids)]
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids) + 2
    stream = client.completions.create(
        model="tiny", prompt="the cat sat", max_tokens=2, temperature=0, echo=True, stream=True
    )
    assert "".join(ch.choices[0].text for ch in stream) == c.text  # the prompt comes first
    with pytest.raises(openai.BadRequestError, match="max_tokens=0"):
        client.completions.create(model="tiny", prompt="the", max_tokens=0)  # without echo: nothing to do
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="tiny", prompt=[[1, 10**6]], max_tokens=0, echo=True, logprobs=1)


def test_streamed_logprobs_come_with_their_pieces(served):
    url, _ = served
    client = client_of(url)
    kw = dict(model="tiny", prompt="the dog", max_tokens=12, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**kw).choices[0].logprobs
    chunks = [ch.choices[0] for ch in client.completions.create(**kw, stream=True) if ch.choices]
    assert chunks[0].text == "the dog" and chunks[0].logprobs.token_logprobs[0] is None  # the echo first
    joined: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for key, values in joined.items():
            values += getattr(c.logprobs, key) if c.logprobs else []
    assert joined == whole.model_dump()  # the same entries as one reply, offsets included
    pieces = [c for c in chunks[1:] if c.text]
    assert len(pieces) > 1 and all(c.logprobs.tokens for c in pieces)  # not all with the last chunk
    assert all("".join(c.logprobs.tokens) == c.text for c in pieces)  # each piece's own tokens

    msgs = [{"role": "user", "content": "the cat"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=12, temperature=0, logprobs=True, top_logprobs=1)
    content = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = [ch.choices[0] for ch in client.chat.completions.create(**kw, stream=True) if ch.choices]
    streamed = [e for c in chunks if c.logprobs for e in c.logprobs.content]
    assert streamed == content
    pieces = [c for c in chunks if c.delta.content]
    assert len(pieces) > 1
    for c in pieces:  # a piece's entries hold its exact bytes (the reply's outer whitespace trimmed)
        carried = b"".join(bytes(e.bytes) for e in c.logprobs.content).decode()
        assert carried.strip() == c.delta.content.strip() and carried


def test_an_end_token_has_its_logprob_in_completions_not_in_chat_content(served):
    url, llm = served
    client = client_of(url)
    eos = llm.tokenizer.eos_id
    # +100 on the end token: the first draw ends the reply
    c = client.completions.create(
        model="tiny", prompt="the", max_tokens=4, temperature=0, logprobs=0, logit_bias={str(eos): 100}
    ).choices[0]
    assert c.text == "" and c.finish_reason == "stop"
    assert c.logprobs.tokens == ["<|endoftext|>"] and c.logprobs.token_logprobs[0] < 0  # it was drawn
    msgs = [{"role": "user", "content": "the cat"}]
    chat = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True, logit_bias={str(eos): 100}
    ).choices[0]
    assert chat.message.content == "" and chat.logprobs.content == []


def test_n_choices_and_seeds(served):
    url, llm = served
    client = client_of(url)
    many = client.completions.create(model="tiny", prompt="the", max_tokens=8, temperature=1.0, n=3, seed=7)
    texts = [c.text for c in many.choices]
    assert [c.index for c in many.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert many.usage.prompt_tokens == len(llm.tokenizer.encode("the"))  # a prompt counts once, as OpenAI's
    again = client.completions.create(model="tiny", prompt="the", max_tokens=8, temperature=1.0, n=3, seed=7)
    assert [c.text for c in again.choices] == texts  # seed + i per choice: reproducible
    msgs = [{"role": "user", "content": "the cat"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=6, temperature=0, n=2, stream=True, stream_options=USAGE
    )
    joined, counted = {0: "", 1: ""}, None
    for chunk in stream:
        for choice in chunk.choices:
            joined[choice.index] += choice.delta.content or ""
        counted = chunk.usage or counted
    assert joined == {0: chat.choices[0].message.content, 1: chat.choices[1].message.content}
    one = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert counted.prompt_tokens == chat.usage.prompt_tokens == one.usage.prompt_tokens
    assert counted.completion_tokens == chat.usage.completion_tokens == 2 * one.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="16 generations per request"):
        client.completions.create(model="tiny", prompt=["a"] * 9, max_tokens=2, n=2)


def test_best_of_returns_the_n_most_likely_of_its_draws(served):
    url, _ = served
    client = client_of(url)
    kw = dict(model="tiny", prompt="the dog", max_tokens=6, temperature=1.5, seed=11)
    drawn = client.completions.create(**kw, n=4, logprobs=0)  # the same draws (seed + i per choice)
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.tokens) for c in drawn.choices]
    ranked = [drawn.choices[i].text for i in sorted(range(4), key=lambda i: -means[i])]
    best = client.completions.create(**kw, n=2, best_of=4)
    assert [c.text for c in best.choices] == ranked[:2] and [c.index for c in best.choices] == [0, 1]
    assert ranked[:2] != [c.text for c in drawn.choices[:2]]  # negative control: not just the first two
    assert all(c.logprobs is None for c in best.choices)  # ranked by them, returned only if asked for
    assert best.usage == drawn.usage  # all four were drawn
    for bad, match in [
        (dict(n=3, best_of=2), "best_of=2 must be at least n=3"),
        (dict(best_of=2, stream=True), "equal to it with stream"),
        (dict(suffix="end."), "suffix"),
    ]:
        with pytest.raises(openai.BadRequestError, match=match):
            client.completions.create(model="tiny", prompt="the", max_tokens=2, **bad)


def test_logprobs_are_the_models_own(served):
    url, llm = served
    client = client_of(url)
    c = client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    ids = llm.tokenizer.encode("the cat")
    generated = llm.complete(["the cat"], 5, llm_greedy())[0].token_ids  # the same greedy tokens
    ended = ["<|endoftext|>"] if c.choices[0].finish_reason == "stop" else []  # an end token has one too
    assert (
        lp.tokens == [llm.tokenizer.decode([t]) for t in generated] + ended and len(lp.top_logprobs[0]) == 2
    )
    with torch.no_grad():
        ref = torch.log_softmax(llm.model(torch.tensor([ids + generated]))[0].float(), -1)
    for k, value in enumerate(lp.token_logprobs):
        assert value == pytest.approx(float(ref[len(ids) - 1 + k, generated[k]]), abs=1e-4)
    msgs = [{"role": "user", "content": "the cat"}]
    chat = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    # each entry's bytes are its token's own; together they are the reply's bytes
    assert (
        b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace").strip()
        == (chat.choices[0].message.content)
        or not chat.choices[0].message.content
    )
    assert all(
        len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in content
    )
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
    assert plain.choices[0].logprobs is None  # only when asked for


def llm_greedy():
    from lmforge.generate.params import SamplingParams

    return SamplingParams(temperature=0)


def test_token_bytes_are_exact_where_text_is_not(served):
    _, llm = served
    tok = llm.tokenizer
    ids = tok.encode("héllo ✓ 日本")
    assert b"".join(tok.token_bytes(t) for t in ids) == "héllo ✓ 日本".encode()
    # negative control: decoding token by token loses the bytes of split characters
    assert "".join(tok.decode([t]) for t in ids) != "héllo ✓ 日本" or all(
        len(tok.token_bytes(t)) for t in ids
    )
    assert tok.token_bytes(tok.eos_id) == b"<|endoftext|>"


def test_content_parts_token_id_prompts_and_the_context(served):
    url, llm = served
    client = client_of(url)
    text = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the cat\nsat"}], max_tokens=6, temperature=0
    )
    parts = [{"type": "text", "text": "the cat"}, {"type": "text", "text": "sat"}]
    by_parts = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=6, temperature=0
    )
    assert by_parts.choices[0].message.content == text.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="only text"):
        client.chat.completions.create(
            model="tiny", max_tokens=2,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        )  # fmt: skip
    ids = llm.tokenizer.encode("the cat")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model="tiny", prompt="the cat", max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    two = client.completions.create(model="tiny", prompt=[ids, ids[:1]], max_tokens=3, temperature=0)
    assert len(two.choices) == 2
    with pytest.raises(openai.BadRequestError, match=r"token ids must be in \[0,"):
        client.completions.create(model="tiny", prompt=[10**6], max_tokens=2)
    # the context (128): a prompt plus max_tokens past it is a 400 naming both; without max_tokens the
    # reply is shortened to fit, never the prompt
    long = " ".join(["the cat sat"] * 40)
    n_prompt = len(llm.tokenizer.encode(long))
    assert 40 < n_prompt < 128
    with pytest.raises(openai.BadRequestError, match=f"context is 128 tokens; the prompt takes {n_prompt}"):
        client.completions.create(model="tiny", prompt=long, max_tokens=96)
    fit = client.completions.create(model="tiny", prompt=long, temperature=0, max_tokens=128 - n_prompt)
    assert fit.usage.prompt_tokens == n_prompt and fit.usage.completion_tokens <= 128 - n_prompt
    # the server's cap is at most the context
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 97}).status_code == 400


def test_a_full_queue_answers_429_and_a_time_limit_ends_a_generation(run):
    llm = LLM.load(run, device="cpu")
    with serving(create_app(llm, max_tokens=96, max_rows=1, max_queue=0, timeout=3.0)) as url:
        body = {"prompt": "the", "max_tokens": 96, "temperature": 0.8}
        with ThreadPoolExecutor(12) as pool:  # one row, no queue: all but the first at a time are refused
            answers = list(
                pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=30), range(12))
            )
        refused = [r for r in answers if r.status_code == 429]
        assert refused and any(r.status_code == 200 for r in answers)
        assert {r.status_code for r in answers} == {200, 429}
        assert all(r.headers["retry-after"].isdigit() for r in refused)
        assert "server busy" in refused[0].json()["error"]["message"]
        deadline = time.time() + 10
        while httpx.get(f"{url}/health").json()["generating"]:
            assert time.time() < deadline
            time.sleep(0.01)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
        # more generations than rows and queue together could ever hold: a 400, not a 429 to retry forever
        for extra in ({"n": 2}, {"best_of": 2}, {"prompt": ["a", "b"]}):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2, **extra})
            assert r.status_code == 400 and "holds at most 1 at once" in r.json()["error"]["message"], r.text
    # a generation past the time limit ends with "length" before its max_tokens
    with serving(create_app(llm, max_tokens=96, model_name="tiny", timeout=1e-6)) as url:
        done = client_of(url).completions.create(model="tiny", prompt="the", max_tokens=90, temperature=0.8)
        assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens < 90


async def _burst(url: str, n: int) -> tuple[dict, int]:
    """n streams at once, a third leaving after their first piece, /health polled throughout."""
    outcomes: dict = {}
    health_ok = 0
    finished = asyncio.Event()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n + 5)) as client:

        async def one(i):
            body = {"prompt": "the", "max_tokens": 8, "stream": True}
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    outcomes[r.status_code] = outcomes.get(r.status_code, 0) + 1
                    return
                lines = [line async for line in _lines(r, leave=i % 3 == 0)]
                key = "left" if i % 3 == 0 else ("done" if lines[-1] == "data: [DONE]" else "cut")
                outcomes[key] = outcomes.get(key, 0) + 1

        async def watch():
            nonlocal health_ok
            while not finished.is_set():
                r = await client.get(f"{url}/health", timeout=10)
                health_ok += r.status_code == 200
                await asyncio.sleep(0.1)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(one(i) for i in range(n)))
        finished.set()
        await watcher
    return outcomes, health_ok


async def _lines(response, leave: bool):
    async for line in response.aiter_lines():
        if line:
            yield line
            if leave:
                return


@contextlib.contextmanager
def serve_process(run, *flags: str):
    """`lmforge serve` in its own process (for signals): (the process, its URL); killed at the end if
    still running. Its stderr is a pipe."""
    port = free_port()
    cmd = [sys.executable, "-m", "lmforge", "serve", "--run", str(run), "--port", str(port), "--device", "cpu",
           *flags]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, "lmforge serve did not come up"
                time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_200_concurrent_streams_and_disconnects_never_hang_and_sigterm_stops_it(run):
    with serve_process(run, "--max-rows", "8", "--max-queue", "40") as (proc, url):
        outcomes, health_ok = asyncio.run(_burst(url, 200))
        assert sum(outcomes.values()) == 200 and set(outcomes) <= {"done", "left", 429}, outcomes
        assert outcomes.get(429, 0) > 0 and outcomes.get("done", 0) > 0  # the queue bound was reached
        assert health_ok >= 1
        assert httpx.get(f"{url}/health", timeout=10).json()["generating"] == 0
        # SIGTERM while streams run: the server is gone within 5 s
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={"prompt": "the", "max_tokens": 96, "stream": True}
        ):
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        assert time.monotonic() - start < 5


def test_sigterm_answers_every_request_it_holds(run):
    """Requests waiting for the one row when SIGTERM comes get a 503 to retry, the generation under way
    ends in time (a stream with [DONE]): none is cut off or answered with a 500."""
    with serve_process(run, "--max-rows", "1", "--max-queue", "60") as (proc, url):
        answered: list[int] = []  # requests the server has answered (before the signal)

        def plain(_):
            body = {"prompt": "the", "max_tokens": 96, "temperature": 0.8}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            answered.append(1)
            return r

        def stream(_):
            body = {"prompt": "the", "max_tokens": 96, "temperature": 0.8, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
                lines = [line for line in r.iter_lines() if line]
            answered.append(1)
            return r.status_code, lines

        def held() -> int:  # every request the server has taken: in a row, waiting, or answered
            load = httpx.get(f"{url}/health", timeout=10).json()
            return load["generating"] + load["waiting"] + len(answered)

        with ThreadPoolExecutor(48) as pool:
            plains = [pool.submit(plain, i) for i in range(40)]
            streams = [pool.submit(stream, i) for i in range(8)]
            deadline = time.time() + 30
            while held() < 48:  # all in (one not yet sent would find the port closed, rightly)
                assert time.time() < deadline, "the requests did not queue up"
                time.sleep(0.01)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
            stopped = time.monotonic() - start
            answers = [f.result(timeout=30) for f in plains]
            streamed = [f.result(timeout=30) for f in streams]
        err = proc.stderr.read().decode()
    assert stopped < 5
    assert {r.status_code for r in answers} <= {200, 503} and 503 in {r.status_code for r in answers}
    refused = [r for r in answers if r.status_code == 503]
    assert all("shutting down" in r.json()["error"]["message"] and r.headers["retry-after"] for r in refused)
    assert all(status == 200 and lines[-1] == "data: [DONE]" for status, lines in streamed), streamed
    assert "Traceback" not in err and "Exception" not in err, err


def test_sse_lines_are_json(served):
    url, _ = served
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True, "n": 2}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
    assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 2
