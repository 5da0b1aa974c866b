"""Chatting with a fine-tuned run: every way of using a model speaks the chat template.

The runs here are tiny random models whose tokenizer holds the template's special tokens (what a
fine-tuned run has). Where a test needs a known reply, the model is edited so that greedy decoding
follows a fixed chain of tokens (`follow_chain`): after <|assistant|> it writes REPLY, then <|end|>.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket

import openai
import pytest

from lmforge.api import LLM
from lmforge.cli import main
from lmforge.data.chat_template import ROLE_TOKENS, ChatTemplate
from lmforge.generate import engine
from lmforge.generate.chat import format_turns
from lmforge.generate.engine import ControlIds, generate_texts
from lmforge.generate.sampling import SamplingParams
from lmforge.serve.app import create_app
from tests.gen_helpers import follow_chain, make_run
from tests.serve_helpers import serving

REPLY = "the cat sat ✓"  # seven distinct tokens; the three of "✓" are one character only together
GREEDY = SamplingParams(temperature=0.0)
CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "héllo 日本 🙂"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "the cat"},
        {"role": "user", "content": "and <|assistant|> then?"},
    ],
]


@pytest.fixture(scope="module")
def template(tiny_data, tmp_path_factory):
    run = make_run(tiny_data, tmp_path_factory.mktemp("tpl") / "run", chat=True)
    return ChatTemplate(LLM.load(run, device="cpu").tokenizer)


def chain_run(tiny_data, out, template, last_to: int | None = None, **kw):
    """A chat run that replies REPLY and then writes `last_to` (default <|end|>), which leads back to
    REPLY's first token: without stopping there, the reply would run on to max_new_tokens."""
    ids = template.tokenizer.encode(REPLY)
    last_to = template.end_id if last_to is None else last_to
    path = [template.role_ids["assistant"], *ids, last_to]
    chain = dict(zip(path[:-1], path[1:], strict=True))
    chain.setdefault(last_to, ids[0])
    return make_run(tiny_data, out, chat=True, edit=follow_chain(chain), tie_embeddings=False, **kw)


@pytest.fixture(scope="module")
def replier(tiny_data, tmp_path_factory, template):
    return LLM.load(chain_run(tiny_data, tmp_path_factory.mktemp("chain") / "run", template), device="cpu")


def test_a_fine_tuned_run_generates_from_the_template_ids(replier, template, monkeypatch):
    assert replier.template is not None and replier.template.end_id == template.end_id
    seen = []
    real_init = engine.BatchDecoder.__init__

    def spy(self, model, prompts, *args, **kwargs):
        seen.append([list(p) for p in prompts])
        real_init(self, model, prompts, *args, **kwargs)

    monkeypatch.setattr(engine.BatchDecoder, "__init__", spy)
    for messages in CONVERSATIONS:
        *_, done = replier.stream_events(messages, 8, GREEDY)
        assert seen[-1] == [template.prompt_ids(messages)]
        assert done.prompt_tokens == len(template.prompt_ids(messages))
    # Only the template's own control tokens: the typed "<|assistant|>" stays text.
    assert seen[-1][0].count(template.role_ids["assistant"]) == 2


def test_a_reply_ends_at_end_of_turn_without_it(replier, template, tiny_data, tmp_path):
    assert replier.chat(CONVERSATIONS[0], max_new_tokens=30, temperature=0) == REPLY
    *pieces, done = replier.stream_events(CONVERSATIONS[2], 30, GREEDY)
    assert "".join(pieces) == done.text == REPLY and done.finish_reason == "stop"
    assert done.token_ids == template.tokenizer.encode(REPLY)  # <|end|> is not one of the reply's tokens
    # Negative control: the same ids without the template's end of turn run on through <|end|>.
    prompt = template.prompt_ids(CONVERSATIONS[0])
    (free,) = generate_texts(replier.model, replier.tokenizer, [prompt], 30, GREEDY)
    assert free.text.startswith(REPLY + "<|end|>" + "the") and free.finish_reason == "length"
    # ... and a run that never writes <|end|> (REPLY, REPLY, ...) replies up to max_new_tokens.
    first = template.tokenizer.encode(REPLY)[0]
    endless = LLM.load(chain_run(tiny_data, tmp_path / "endless", template, last_to=first), device="cpu")
    *_, done = endless.stream_events(CONVERSATIONS[0], 30, GREEDY)
    assert done.finish_reason == "length" and len(done.token_ids) == 30


def test_role_tokens_are_never_sampled_inside_a_reply(template, tiny_data, tmp_path):
    roles = set(template.role_ids.values())
    # Greedy: after REPLY this model's best token is <|user|>; the reply cannot write it.
    to_user = chain_run(tiny_data, tmp_path / "g", template, last_to=template.role_ids["user"])
    greedy = LLM.load(to_user, device="cpu")
    *_, done = greedy.stream_events(CONVERSATIONS[0], 20, GREEDY)
    assert done.text.startswith(REPLY) and "<|" not in done.text and not roles & set(done.token_ids)
    prompt = template.prompt_ids(CONVERSATIONS[0])
    control = ControlIds.of(stop=[template.end_id])  # negative control: the end of turn, no mask
    (free,) = generate_texts(greedy.model, greedy.tokenizer, [prompt], 20, GREEDY, control=control)
    assert free.text.startswith(REPLY + ROLE_TOKENS["user"])

    # Sampling: every logit is constant, the role tokens' ~10 above the rest (99% of the probability).
    def role_heavy(model):
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = 1.0  # the final hidden state is e_0 whatever the input
        for token in roles:
            model.lm_head.weight[token, 0] = 10.0

    heavy_run = make_run(tiny_data, tmp_path / "s", chat=True, edit=role_heavy, tie_embeddings=False)
    heavy = LLM.load(heavy_run, device="cpu")
    for seed in range(4):
        reply = heavy.chat(CONVERSATIONS[0], max_new_tokens=20, temperature=1.0, top_k=None, seed=seed)
        assert reply and "<|" not in reply
    sampled = SamplingParams(temperature=1.0, top_k=None)
    (free,) = generate_texts(heavy.model, heavy.tokenizer, [prompt], 20, sampled, seed=0, control=control)
    assert roles & set(free.token_ids)  # negative control: unmasked, they are what gets sampled


def test_a_long_history_drops_the_oldest_turns_counted_in_template_tokens(replier, template):
    system = {"role": "system", "content": "You answer in one line."}
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"the cat sat {i} on the mat"}
        for i in range(15)
    ]
    budget = replier.context_len - 16
    assert len(template.prompt_ids([system, *turns])) > budget  # the whole history does not fit
    got = replier.chat_prompt([system, *turns], max_new_tokens=16).prompt
    keep = max(
        k for k in range(1, len(turns) + 1) if len(template.prompt_ids([system, *turns[-k:]])) <= budget
    )
    assert got == template.prompt_ids([system, *turns[-keep:]]) and len(got) <= budget
    # Counted in the transcript's tokens instead ("User: ..." lines), fewer turns would be kept.
    lines = [(m["role"], m["content"]) for m in [system, *turns]]

    def transcript_tokens(k: int) -> int:
        return len(replier.tokenizer.encode(format_turns([lines[0], *lines[-k:]])))

    assert max(k for k in range(1, len(turns) + 1) if transcript_tokens(k) <= budget) < keep


def test_session_chat_and_generate_commands_reply_through_the_template(replier, tiny_data, tmp_path, capsys):
    session = replier.session(30, GREEDY)
    assert "".join(session.send("hello")) == REPLY
    assert "".join(session.send("again")) == REPLY
    assert session.history[1] == ("assistant", REPLY) and len(session.history) == 4

    run = chain_run(tiny_data, tmp_path / "run", replier.template)
    flags = ["--run", str(run), "--temperature", "0", "--max-new-tokens", "30", "--device", "cpu"]
    assert main(["generate", *flags, "--chat", "--prompt", "hello"]) == 0
    assert capsys.readouterr().out == REPLY + "\n"
    assert main(["generate", *flags, "--chat", "--stream", "--prompt", "hello"]) == 0
    assert capsys.readouterr().out == REPLY + "\n"
    src = tmp_path / "p.txt"
    src.write_text("hello\nhow are you\n")
    assert (
        main(["generate", *flags, "--chat", "--input", str(src), "--output", str(tmp_path / "r.jsonl")]) == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["completion"], r["finish_reason"]) for r in rows] == [(REPLY, "stop")] * 2
    assert main(["generate", *flags, "--chat"]) == 2
    assert "--chat replies to --prompt" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdin", io.StringIO("hello\n/quit\n"))  # what input() reads
        assert main(["chat", *flags]) == 0
    out = capsys.readouterr().out
    assert "chat template lmforge-chat-v1" in out and REPLY + "\n" in out


def test_generate_chat_on_a_base_run_is_the_transcript_reply(tiny_data, tmp_path, capsys):
    run = make_run(tiny_data, tmp_path / "base")
    llm = LLM.load(run, device="cpu")
    assert llm.template is None and isinstance(llm.chat_prompt(CONVERSATIONS[0], 8).prompt, str)
    assert llm.chat_prompt(CONVERSATIONS[0], 8).prompt == format_turns([("user", "hello")])
    args = ["generate", "--run", str(run), "--chat", "--prompt", "hello", "--temperature", "0"]
    assert main([*args, "--max-new-tokens", "12", "--device", "cpu"]) == 0
    expected = llm.chat(CONVERSATIONS[0], max_new_tokens=12, temperature=0)
    assert capsys.readouterr().out == expected + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving_llm(llm: LLM):
    """The server for llm on a free local port, in a thread; yields an official openai client for it."""
    with serving(create_app(llm, max_tokens=64, max_body=8192, model_name="tiny")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def chat_both_ways(client, messages, max_tokens) -> tuple[str, str, str, str]:
    """(text, finish reason) of a chat request without and with streaming."""
    args = dict(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0)
    whole = client.chat.completions.create(**args).choices[0]
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    return whole.message.content, whole.finish_reason, streamed, chunks[-1].choices[0].finish_reason


def test_the_server_replies_as_llm_chat_does_streamed_or_not(replier, tiny_data, tmp_path):
    with serving_llm(replier) as client:
        for messages in CONVERSATIONS:
            assert chat_both_ways(client, messages, 30) == (REPLY, "stop", REPLY, "stop")
    random_run = LLM.load(make_run(tiny_data, tmp_path / "random", chat=True, seed=3), device="cpu")
    with serving_llm(random_run) as client:
        for messages in CONVERSATIONS:
            text, reason, streamed, streamed_reason = chat_both_ways(client, messages, 24)
            assert text == streamed == random_run.chat(messages, max_new_tokens=24, temperature=0)
            assert reason == streamed_reason and text and "<|user|>" not in text


def test_a_base_run_streams_the_reply_it_returns(tiny_data, tmp_path):
    """A transcript reply that ends in spaces: it was returned without them and streamed with them."""
    tok = LLM.load(make_run(tiny_data, tmp_path / "probe"), device="cpu").tokenizer
    last = tok.encode(format_turns([("user", "hello")]))[-1]  # the ":" of "Assistant:"
    space, cat = tok.encode(" ")[0], tok.encode("cat")[0]
    run = make_run(
        tiny_data,
        tmp_path / "base",
        edit=follow_chain({last: space, space: cat, cat: space}),
        tie_embeddings=False,
    )
    llm = LLM.load(run, device="cpu")
    (raw,) = generate_texts(llm.model, llm.tokenizer, [format_turns([("user", "hello")])], 7, GREEDY)
    assert raw.text == " cat cat cat " and raw.finish_reason == "length"  # spaces on both sides
    reply = llm.chat(CONVERSATIONS[0], max_new_tokens=7, temperature=0)
    assert reply == "cat cat cat"
    with serving_llm(llm) as client:
        assert chat_both_ways(client, CONVERSATIONS[0], 7) == (reply, "length", reply, "length")


def test_the_served_tokenizer_gives_the_chat_template_that_tools_render_to_the_same_ids(replier, template):
    # what lm-eval's remote tokenizer does with a fine-tuned run's server: render the template it gets from
    # /tokenizer_info (Jinja), then read the text through /tokenize
    import httpx
    import jinja2

    with serving(create_app(replier, model_name="tiny")) as url, httpx.Client(base_url=url, timeout=30) as h:
        info = h.get("/tokenizer_info").json()
        jinja = jinja2.Environment().from_string(info["chat_template"])
        for messages in CONVERSATIONS[
            :2
        ]:  # the third holds a role token's text, which such tools read as one
            text = jinja.render(messages=messages, add_generation_prompt=True)
            ids = h.post("/tokenize", json={"prompt": text}).json()["tokens"]
            assert ids == template.prompt_ids(messages)
