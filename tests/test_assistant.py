"""The whole path to an assistant: a tiny base run, conversations of a small task, `prepare --chat`,
`finetune` (full and LoRA), then the answers through the server (official openai client) and through the
Hugging Face export, exactly and ending at end of turn.

The base is pretrained on phrases that use the task's words (never its question-answer pairs). LoRA
trains the blocks alone: a token the base never saw keeps its initial, near-zero embedding, so the
adapters cannot tell two such questions apart, and a base trained on shuffled words has a head too
unsure to answer confidently. On `conftest.make_corpus`'s base LoRA stays at the answers' marginal
distribution (val loss ~3.2 at any rank, learning rate and length tried, 0% of the task) while a full
fine-tune, whose embeddings train, learns it."""

from __future__ import annotations

import json
import random

import openai
import pytest
import torch
from safetensors.torch import load_file

from lmforge.api import LLM
from lmforge.cli import main
from lmforge.serve.app import create_app

from .conftest import FAST, TINY_MODEL
from .serve_helpers import serving

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


def phrases(n: int, seed: int = 0) -> list[str]:
    """Lines of a tiny grammar over the task's words: the tail of a statement, or a question, at random."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(["the", "a"]), rng.choice(["cat", "dog", "birds"])]
        words += rng.choice([["sat", "on"], ["ran", "to"], ["sang", "in"]])
        words += [rng.choice(["the", "a"]), rng.choice(["mat", "park", "green trees"])]
        out.append(" ".join(words[rng.randrange(len(words)) :]) + ".")
        subject = [rng.choice(["the", "a"]), rng.choice(["cat", "dog", "birds", "trees"])]
        verb = rng.choice(["run", "sang", "sat", "ran", "green"])
        out.append(
            " ".join([rng.choice(["where is", "where did", "who", "what", "what is"]), *subject, verb]) + "?"
        )
    return out


@pytest.fixture(scope="module")
def task_base(tmp_path_factory):
    """A tiny base pretrained for 200 steps on phrases of the task's words (a few seconds)."""
    root = tmp_path_factory.mktemp("task_base")
    text = root / "text"
    text.mkdir()
    for i in range(30):
        (text / f"doc{i:02d}.txt").write_text("\n".join(phrases(60, seed=i)) + "\n", encoding="utf-8")
    assert main(["prepare", "--source", str(text), "--out", str(root / "data"), "--vocab-size", "320"]) == 0
    out = root / "base"
    args = ["train", "--data", str(root / "data"), "--out", str(out), *TINY_MODEL, *FAST, "--eval.every=0"]
    assert main([*args, "--train.max_steps=200", "--train.lr=1e-2", "--train.warmup_steps=5"]) == 0
    return out


@pytest.fixture(scope="module")
def sft_data(task_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("assistant")
    src = root / "chats.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in conversations(400)), encoding="utf-8")
    out = root / "sft"
    args = ["prepare", "--chat", "--source", str(src), "--tokenizer", str(task_base), "--out", str(out)]
    assert main([*args, "--val-fraction", "0.05"]) == 0
    return out


def finetune(base, data, out, *extra) -> None:
    args = ["finetune", "--from", str(base), "--data", str(data), "--out", str(out), *FAST[:1], *FAST[2:]]
    assert main([*args, "--eval.every=0", "--checkpoint.every=0", *extra]) == 0


# Steps to the whole task from task_base, measured: full fine-tune 150 -> 6/6; LoRA rank 8 at lr 1e-2,
# fp32: 300 -> 5/6, 400 -> 6/6; bf16 (precision=auto on a CPU with native bf16): 400 -> 5/6, 500 -> 6/6.
# Both get a margin.
FULL_STEPS, LORA_STEPS = 200, 600


@pytest.fixture(scope="module")
def assistant(task_base, sft_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    steps = f"--train.max_steps={FULL_STEPS}"
    finetune(task_base, sft_data, out, steps, "--train.lr=3e-3", "--train.warmup_steps=5")
    return out


def accuracy(llm: LLM) -> float:
    right = [
        llm.chat([{"role": "user", "content": q}], max_new_tokens=12, temperature=0) == a
        for q, a in TASK.items()
    ]
    return sum(right) / len(right)


def test_a_fine_tuned_base_answers_through_the_server_and_stops_at_end_of_turn(assistant, task_base):
    base = LLM.load(task_base, device="cpu")
    assert base.template is None and accuracy(base) == 0  # the base model cannot do the task
    llm = LLM.load(assistant, device="cpu")
    assert llm.template is not None
    with serving(create_app(llm, max_tokens=32, model_name="assistant")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
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


def test_lora_reaches_the_whole_task_with_more_steps_than_a_full_fine_tune(task_base, sft_data, tmp_path):
    out = tmp_path / "lora"
    steps = f"--train.max_steps={LORA_STEPS}"
    finetune(task_base, sft_data, out, steps, "--train.lr=1e-2", "--train.warmup_steps=5", "--lora.rank=8")
    saved = load_file(out / "checkpoints" / f"step_{LORA_STEPS:07d}" / "model.safetensors")
    assert saved and all("lora_" in k or "new_rows" in k for k in saved)  # adapters alone: a LoRA run
    assert accuracy(LLM.load(out, device="cpu")) == 1  # read through the adapters, merged on load


def test_eval_scores_a_fine_tune_on_its_conversations_and_refuses_data_in_other_tokens(
    assistant, task_base, sft_data, tmp_path, capsys
):
    import numpy as np

    prompts = tmp_path / "p.txt"
    prompts.write_text("the\n", encoding="utf-8")
    quick = ["--no-speed", "--prompts", str(prompts), "--batch-size", "1", "--batches", "1000"]
    out = tmp_path / "e.json"
    assert main(["eval", "--run", str(assistant), *quick, "--out", str(out)]) == 0  # its own data: chats
    lm = json.loads(out.read_text())["lm"]
    meta = json.loads((sft_data / "meta.json").read_text())
    masks = [np.fromfile(p, dtype=np.uint8) for p in sorted(sft_data.glob("val_*.mask"))]
    windows = np.concatenate(masks).reshape(-1, meta["seq_len"] + 1)
    assert lm["tokens"] == int(windows[:, 1:].sum())  # the assistants' tokens, not prompts or padding
    assert lm["loss"] < 1.0 and "bpb" not in lm  # learned (6 of 6 answers); no bytes to divide by
    # the fine-tune reads its base's text (its tokenizer only adds the chat tokens) ...
    text = task_base.parent / "data"
    assert main(["eval", "--run", str(assistant), "--data", str(text), *quick, "--out", str(out)]) == 0
    assert "bpb" in json.loads(out.read_text())["lm"]
    # ... the base cannot read the conversations' chat tokens: one line, no report written over
    capsys.readouterr()
    before = out.read_text()
    assert main(["eval", "--run", str(task_base), "--data", str(sft_data), *quick, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is in another tokenizer's tokens than this run's" in err and len(err.splitlines()) == 1
    assert out.read_text() == before
