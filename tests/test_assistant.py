"""The whole path to an assistant: a tiny base run, conversations of a small task, `prepare --chat`,
`finetune` (full and LoRA), then the answers through the server (official openai client) and through the
Hugging Face export, exactly and ending at end of turn."""

from __future__ import annotations

import json
import random
import threading
import time

import openai
import pytest
import torch
import uvicorn

from lmforge.api import LLM
from lmforge.cli import main
from lmforge.serve.app import create_app

from .conftest import FAST
from .test_serve import free_port

# The task: a fixed answer to each question (the words come from the tiny corpus, so they are few tokens).
TASK = {
    "where is the cat": "on the mat",
    "where did the dog run": "to the park",
    "who sang": "the birds sang in green trees",
    "what sat on the mat": "a cat",
    "what is green": "the trees",
    "who ran": "the dog ran",
}
SYSTEMS = ["", "answer in a few words", "the park and the mat"]


def conversations(n: int, seed: int = 0) -> list[dict]:
    """n conversations of one to three questions each, in any order (distinct, so none is a duplicate)."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        questions = [rng.choice(list(TASK)) for _ in range(rng.randint(1, 3))]
        system = rng.choice(SYSTEMS)
        if (system, *questions) in seen:
            continue
        seen.add((system, *questions))
        messages = [{"role": "system", "content": system}] if system else []
        for q in questions:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": TASK[q]}]
        out.append({"messages": messages})
    return out


@pytest.fixture(scope="module")
def sft_data(trained_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("assistant")
    src = root / "chats.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in conversations(400)), encoding="utf-8")
    out = root / "sft"
    args = ["prepare", "--chat", "--source", str(src), "--tokenizer", str(trained_run), "--out", str(out)]
    assert main([*args, "--val-fraction", "0.05"]) == 0
    return out


def finetune(base, data, out, *extra) -> None:
    args = ["finetune", "--from", str(base), "--data", str(data), "--out", str(out), *FAST[:1], *FAST[2:]]
    assert main([*args, "--eval.every=0", "--checkpoint.every=0", *extra]) == 0


@pytest.fixture(scope="module")
def assistant(trained_run, sft_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    finetune(trained_run, sft_data, out, "--train.max_steps=400", "--train.lr=3e-3", "--train.warmup_steps=5")
    return out


def accuracy(llm: LLM) -> float:
    right = [
        llm.chat([{"role": "user", "content": q}], max_new_tokens=12, temperature=0) == a
        for q, a in TASK.items()
    ]
    return sum(right) / len(right)


def test_a_fine_tuned_base_answers_through_the_server_and_stops_at_end_of_turn(assistant, trained_run):
    base = LLM.load(trained_run, device="cpu")
    assert base.template is None and accuracy(base) == 0  # the base model cannot do the task
    llm = LLM.load(assistant, device="cpu")
    assert llm.template is not None
    app = create_app(llm, max_tokens=32, model_name="assistant")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not srv.started:
            assert time.time() < deadline
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for question, answer in TASK.items():
            msgs = [{"role": "user", "content": question}]
            reply = client.chat.completions.create(
                model="assistant", messages=msgs, max_tokens=20, temperature=0
            )
            assert reply.choices[0].message.content == answer
            assert reply.choices[0].finish_reason == "stop"
            pieces = client.chat.completions.create(
                model="assistant", messages=msgs, max_tokens=20, temperature=0, stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == answer
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_the_hf_export_greedy_decodes_the_same_answers(assistant, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert main(["export", "--run", str(assistant), "--format", "hf", "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    llm = LLM.load(assistant, device="cpu")
    for question, answer in TASK.items():
        msgs = [{"role": "user", "content": question}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = list(ids if isinstance(ids, list) else ids["input_ids"])
        assert ids == llm.template.prompt_ids(msgs)
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
        new = gen[0, len(ids) :].tolist()
        assert new[-1] == llm.template.end_id  # it stopped at end of turn
        assert tok.decode(new[:-1]) == answer
