"""The chat template: ids, loss mask, the tokenizer's new special tokens, and its Jinja twin."""

from __future__ import annotations

import random

import pytest

from lmforge.data.chat_template import (
    END_TOKEN,
    JINJA,
    SPECIAL_TOKENS,
    ChatTemplate,
    has_chat_tokens,
    message_problem,
    with_chat_tokens,
)
from lmforge.data.errors import DataError
from lmforge.data.tokenizer import train_tokenizer

SAMPLE = ["def add(a, b):\n    return a + b\n", "héllo wörld ✓ 日本語 emoji 🙂", "The quick brown fox."] * 40


@pytest.fixture(scope="module")
def base_tok():
    return train_tokenizer(SAMPLE, "bpe", 320)


@pytest.fixture(scope="module")
def chat_tok(base_tok):
    return with_chat_tokens(base_tok)


def test_new_tokens_come_after_the_old_ids(base_tok, chat_tok):
    assert not has_chat_tokens(base_tok) and has_chat_tokens(chat_tok)
    assert chat_tok.vocab_size == base_tok.vocab_size + len(SPECIAL_TOKENS)
    text = "def add(a, b): héllo 🙂"
    assert chat_tok.encode(text) == base_tok.encode(text)
    assert with_chat_tokens(chat_tok) is chat_tok
    with pytest.raises(DataError, match="no chat tokens"):
        ChatTemplate(base_tok)


def test_mask_covers_the_assistant_text_and_its_end_only(chat_tok):
    template = ChatTemplate(chat_tok)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "fox"},
    ]
    ids, mask = template.render(msgs)
    assert len(ids) == len(mask) and ids[0] == chat_tok.eos_id
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    hello, fox = chat_tok.encode("hello"), chat_tok.encode("fox")
    assert learned == [*hello, template.end_id, *fox, template.end_id]
    # Role tokens are never learned; the prompt for a reply ends with the assistant's role token.
    prompt = template.prompt_ids(msgs[:4])
    assert prompt[-1] == template.role_ids["assistant"] and prompt[:-1] == ids[: len(prompt) - 1]


def test_typed_control_tokens_stay_text(chat_tok):
    template = ChatTemplate(chat_tok)
    ids, _ = template.render([{"role": "user", "content": "<|assistant|>" + END_TOKEN}])
    # Only the template's own three control tokens: the user's text never becomes one.
    assert sum(i in template.special_ids for i in ids) == 2


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], None),
        (
            [
                {"role": "system", "content": ""},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
            ],
            None,
        ),
        ([{"role": "bot", "content": "a"}], "unknown role"),
        ([{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}], "empty content"),
        ([{"role": "user", "content": "a"}], "no assistant turn"),
        ([{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}], "wrong order"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
            ],
            "wrong order",
        ),
        ("hello", "not a conversation"),
        ([], "not a conversation"),
    ],
)
def test_message_problems(messages, problem):
    assert message_problem(messages) == problem


def _conversation(rng: random.Random) -> list[dict]:
    alphabet = "abc xyz\n\t😀é日本()[]{}:<>|" + "def return "

    def text():
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))

    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": rng.choice(["", text()])})
    for _ in range(rng.randint(1, 6)):
        msgs += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
    return msgs


def test_jinja_template_gives_the_same_ids(chat_tok):
    from transformers import PreTrainedTokenizerFast

    template = ChatTemplate(chat_tok)
    hf = PreTrainedTokenizerFast(tokenizer_object=chat_tok.hf, eos_token="<|endoftext|>")
    hf.chat_template = JINJA
    rng = random.Random(0)
    for _ in range(200):
        msgs = _conversation(rng)
        for generation_prompt in (False, True):
            theirs = hf.apply_chat_template(msgs, add_generation_prompt=generation_prompt, tokenize=True)
            theirs = list(theirs if isinstance(theirs, list) else theirs["input_ids"])
            assert theirs == template.render(msgs, add_generation_prompt=generation_prompt)[0]
    # Negative control: a template with a newline after each turn gives other ids.
    hf.chat_template = JINJA.replace("'<|end|>' }}", "'<|end|>\n' }}")
    theirs = hf.apply_chat_template(msgs, tokenize=True)
    assert list(theirs if isinstance(theirs, list) else theirs["input_ids"]) != template.render(msgs)[0]
