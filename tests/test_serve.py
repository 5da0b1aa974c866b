"""`lmforge serve`: the real server on a free local port, called by the official openai client and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from lmforge.api import LLM
from lmforge.cli import main
from lmforge.serve.app import create_app
from tests.gen_helpers import make_endless_run, make_run
from tests.serve_helpers import free_port, serving

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    return make_run(tiny_data, tmp_path_factory.mktemp("serve") / "run", family="llama")


@pytest.fixture(scope="module")
def server(run):
    """The app under uvicorn in a thread, on a real socket; yields its base URL."""
    llm = LLM.load(run, device="cpu")
    with serving(create_app(llm, max_tokens=64, max_body=4096, model_name="tiny")) as url:
        yield url, llm


def test_openai_client_completions_chat_models_and_streaming(server):
    url, llm = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    c = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
    assert c.choices[0].text == llm.generate("the cat", max_new_tokens=12, temperature=0)
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.completion_tokens <= 12 and c.usage.prompt_tokens == len(llm.tokenizer.encode("the cat"))

    pieces = client.completions.create(
        model="tiny", prompt="the cat", max_tokens=12, temperature=0, stream=True
    )
    chunks = list(pieces)
    assert len(chunks) > 2 and "".join(ch.choices[0].text for ch in chunks) == c.choices[0].text
    assert chunks[-1].choices[0].finish_reason == c.choices[0].finish_reason

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    reply = chat.choices[0].message
    assert reply.role == "assistant" and reply.content == llm.chat(msgs, max_new_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=16, temperature=0, stream=True
    )
    deltas = list(stream)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == reply.content
    assert deltas[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    seeded = [
        client.completions.create(model="tiny", prompt="a", max_tokens=10, temperature=1.0, seed=3)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_raw_http_sse_health_and_errors(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as h:
        assert h.get("/health").json() == {"status": "ok", "model": "tiny", "generating": 0, "waiting": 0}
        body = {"prompt": "the", "max_tokens": 5, "temperature": 0, "stream": True}
        with h.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line for line in r.iter_lines() if line]
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
        assert json.loads(events[0][6:])["object"] == "text_completion"

        def err(resp, status, text):
            assert resp.status_code == status, resp.text
            assert text in resp.json()["error"]["message"]

        err(
            h.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
            400,
            "not valid JSON",
        )
        err(h.post("/v1/completions", json={"max_tokens": 5}), 400, "prompt")
        err(h.post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400, "temperature")
        err(h.post("/v1/completions", json={"prompt": "x", "max_tokens": 1000}), 400, "cap of 64")
        err(
            h.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}),
            400,
            "role",
        )
        err(h.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
        err(h.post("/v1/completions", json={"prompt": "x" * 5000}), 413, "4096")
        # chunked upload without a Content-Length: counted while reading
        chunked = h.post("/v1/completions", content=iter([b'{"prompt": "', b"y" * 5000, b'"}']))
        err(chunked, 413, "limit")
        assert h.get("/health").status_code == 200  # still serving


def test_a_stream_sends_the_events_of_one_step_in_one_write(server):
    """Each write is one HTTP chunk: the role arrives with the first piece, and the last piece with the
    finish reason, the usage and [DONE] (fewer writes: each costs the server's event loop a system call)."""
    url, _ = server
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "the cat"}],
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        raw = b""
        while data := conn.recv(65536):
            raw += data
    head, rest = raw.split(b"\r\n\r\n", 1)
    assert b" 200 " in head.split(b"\r\n")[0] and b"transfer-encoding: chunked" in head.lower()
    chunks = []  # each chunk's events
    while True:
        size, rest = rest.split(b"\r\n", 1)
        if not int(size, 16):
            break
        chunks.append([e for e in rest[: int(size, 16)].decode().split("\n\n") if e])
        rest = rest[int(size, 16) + 2 :]
    parsed = [[e if e == "data: [DONE]" else json.loads(e.removeprefix("data: ")) for e in c] for c in chunks]
    first, last = parsed[0], parsed[-1]
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first[1]["choices"][0]["delta"]["content"]  # the first piece, in the same write
    assert last[-1] == "data: [DONE]"
    tokens, reason = last[-2]["usage"]["completion_tokens"], last[-3]["choices"][0]["finish_reason"]
    # all 4 tokens, or fewer when the model ends its text first (whether it does depends on the CPU's numerics)
    assert (reason, tokens) == ("length", 4) or (reason == "stop" and 1 <= tokens < 4), (reason, tokens)
    assert all(len(c) == 1 for c in parsed[1:-1])  # one piece a step between them


def test_inputs_that_were_500s_are_400s_or_answered(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as h:
        surrogate = b'{"prompt": "a\\ud800b", "max_tokens": 2}'  # JSON text with a lone surrogate
        r = h.post("/v1/completions", content=surrogate, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
        deep = b'{"prompt": ' + b"[" * 1900 + b"]" * 1900 + b"}"  # under the 4096-byte cap, too deep to parse
        r = h.post("/v1/completions", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
        r = h.post("/v1/completions", json={"prompt": "the", "max_tokens": 3, "seed": 2**70})
        assert r.status_code == 400 and "seed=" in r.json()["error"]["message"]
        # a temperature that overflows the logits when divided by decodes greedily, as 0 does
        tiny = h.post("/v1/completions", json={"prompt": "the", "max_tokens": 4, "temperature": 1e-300})
        greedy = h.post("/v1/completions", json={"prompt": "the", "max_tokens": 4, "temperature": 0})
        assert (
            tiny.status_code == 200
            and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
        )
        assert h.get("/health").status_code == 200


def test_more_concurrent_streams_than_worker_threads_are_all_answered(server):
    """anyio runs sync work in 40 threads; 41 streams waiting for the model inside threads hung the server."""
    url, _ = server
    body = {"prompt": "the", "max_tokens": 3, "temperature": 0, "stream": True}

    def one_stream(_):
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            return r.status_code, [line for line in r.iter_lines() if line][-1]

    with concurrent.futures.ThreadPoolExecutor(max_workers=60) as pool:
        results = list(pool.map(one_stream, range(60)))
        health = httpx.get(f"{url}/health", timeout=10)  # answered while the streams run
    assert results == [(200, "data: [DONE]")] * 60 and health.status_code == 200


def test_a_client_that_leaves_mid_stream_frees_the_model_at_once(server):
    url, llm = server
    body = {"prompt": "the", "max_tokens": 64, "temperature": 0.8, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        next(line for line in r.iter_lines() if line)  # one piece, then hang up
    deadline = time.time() + 10
    # the generation's row is dropped at the batcher's next step
    while httpx.get(f"{url}/health", timeout=10).json()["generating"]:
        assert time.time() < deadline, "the generation kept its row after the client left"
        time.sleep(0.01)
    quick = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=10)
    assert quick.status_code == 200


def test_concurrent_requests_are_all_answered(server):
    url, llm = server
    prompts = [f"the {w}" for w in ("cat", "dog", "park", "mat", "birds", "trees")]

    def call(p: str) -> str:
        body = {"prompt": p, "max_tokens": 10, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(call, prompts))
    assert got == [llm.generate(p, max_new_tokens=10, temperature=0) for p in prompts]


def test_serve_command_binds_localhost(run):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "serve",
        "--run",
        str(run),
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""}, stdout=subprocess.PIPE
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, "lmforge serve did not come up"
                time.sleep(0.2)
        assert r.json()["status"] == "ok"
        # bound to 127.0.0.1 only: another loopback address (answered by a 0.0.0.0 bind) is refused
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.2:{port}/health", timeout=2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_refuses_a_busy_port_in_one_line(run, capsys):
    from lmforge.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--run", str(run), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1


def test_an_api_key_guards_v1_and_the_official_client_sends_it(run):
    llm = LLM.load(run, device="cpu")
    app = create_app(llm, max_tokens=16, max_body=4096, model_name="tiny", api_key="s3cret")
    with serving(app) as url:
        body = {"prompt": "the", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=10)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        assert httpx.get(f"{url}/tokenizer_info", timeout=10).status_code == 401  # the tokenizer's routes too
        assert httpx.post(f"{url}/tokenize", json={"prompt": "the"}, timeout=10).status_code == 401
        key = {"Authorization": "Bearer s3cret"}
        assert (
            httpx.post(f"{url}/tokenize", json={"prompt": "the"}, headers=key, timeout=10).status_code == 200
        )
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # open, for load balancers
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="tiny", prompt="the", max_tokens=2).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_the_tokenizer_over_http_reads_special_tokens_as_tokenizers_loaded_elsewhere_do(server):
    url, llm = server
    tok = llm.tokenizer
    with httpx.Client(base_url=url, timeout=30) as h:
        info = h.get("/tokenizer_info").json()
        assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == llm.context_len
        assert info["chat_template"] is None  # a base run: no template
        text = "the cat<|endoftext|>sat"
        r = h.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        assert r["tokens"] == tok.encode("the cat") + [tok.eos_id] + tok.encode("sat") and r["count"] == len(
            r["tokens"]
        )
        assert tok.encode(text) != r["tokens"]  # the completions endpoints read that text as text
        assert h.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
        bad = h.post("/detokenize", json={"tokens": [tok.vocab_size]})
        assert bad.status_code == 400 and "token ids" in bad.json()["error"]["message"]
        assert h.post("/tokenize", json={"text": "no prompt"}).status_code == 400


def test_serving_beyond_this_machine_needs_a_key_or_insecure(run, monkeypatch, capsys):
    from lmforge.serve import check_exposure

    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    assert main(["serve", "--run", str(run), "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert "--host 0.0.0.0 lets other machines reach the server, and no API key is set" in err
    assert len(err.splitlines()) == 1
    check_exposure("0.0.0.0", "key", insecure=False)  # a key, or --insecure, or loopback: allowed
    check_exposure("0.0.0.0", None, insecure=True)
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, None, insecure=False)


def test_openai_fields_max_completion_tokens_include_usage_and_unknown_model(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "the cat"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=3, temperature=0)
    assert chat.usage.completion_tokens <= 3  # was ignored: up to the server's default length
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=4, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(model="tiny", prompt="the", max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain)  # no usage chunk unless asked for
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist"):
        client.completions.create(model="gpt-4", prompt="the", max_tokens=2)
    assert client.models.retrieve("tiny").id == "tiny"  # was a 404
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist"):
        client.models.retrieve("gpt-4")

    # a developer message (OpenAI's newer name for the system's) is the system turn (was a 400)
    def reply(role):
        turns = [{"role": role, "content": "be brief"}, *msgs]
        return client.chat.completions.create(model="tiny", messages=turns, max_tokens=6, temperature=0)

    assert reply("developer").choices[0].message.content == reply("system").choices[0].message.content
    assert reply("developer").usage.prompt_tokens == reply("system").usage.prompt_tokens
    assert reply("developer").usage.prompt_tokens != reply("user").usage.prompt_tokens  # not just any turn

    # what the server cannot do is a 400, not silently left undone; what it may leave undone is answered
    tool = {
        "type": "function",
        "function": {"name": "add", "parameters": {"type": "object", "properties": {}}},
    }
    ask = dict(model="tiny", messages=msgs, max_tokens=2, temperature=0)
    for field, match in [
        (dict(response_format={"type": "json_object"}), "does not constrain replies to JSON"),
        (dict(tools=[tool], tool_choice="required"), "does not call tools"),
    ]:
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(**ask, **field)
    answered = [
        dict(response_format={"type": "text"}),
        dict(tools=[tool]),
        dict(tools=[tool], tool_choice="auto"),
    ]
    for field in answered:
        answer = client.chat.completions.create(**ask, **field).choices[0]
        assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")


def test_a_client_that_leaves_frees_the_model_when_a_key_is_set(tiny_data, tmp_path):
    """The key check sits between the client and the stream: a client that leaves must still end its
    generation (before continuous batching it did not: the generation ran on to max_tokens, 11 s here)."""
    llm = LLM.load(make_endless_run(tiny_data, tmp_path / "endless"), device="cpu")
    app = create_app(llm, max_tokens=8000, max_body=4096, api_key="s3cret")
    with serving(app, join_timeout=20) as url:
        body = {"prompt": "the", "max_tokens": 8000, "stream": True}  # this model never stops early
        auth = {"Authorization": "Bearer s3cret"}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(20):  # a few pieces, then hang up
                next(lines)
            # not vacuous: the generation is still running as the client leaves
            assert httpx.get(f"{url}/health", timeout=10).json()["generating"] == 1
        left = time.time()
        while httpx.get(f"{url}/health", timeout=10).json()["generating"]:
            assert time.time() - left < 3, "the generation went on after its client left"
            time.sleep(0.01)
