"""Exports of a fine-tuned run carry its chat template: HF (tokenizer files, generation config) and GGUF."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmforge.api import LLM
from lmforge.data.chat_template import END_TOKEN, JINJA, SPECIAL_TOKENS, ChatTemplate
from lmforge.data.tokenizer import EOS_TOKEN
from lmforge.export import export_run
from tests.gen_helpers import follow_chain, make_run
from tests.test_chat_template import _conversation as conversation

REPLY = "the cat sat ✓"


@pytest.fixture(scope="module")
def chat_run(tiny_data, tmp_path_factory):
    """A chat run whose greedy reply is REPLY then <|end|>, after which it would go on ("the ...")."""
    probe = make_run(tiny_data, tmp_path_factory.mktemp("probe") / "run", chat=True)
    template = ChatTemplate(LLM.load(probe, device="cpu").tokenizer)
    ids = template.tokenizer.encode(REPLY)
    path = [template.role_ids["assistant"], *ids, template.end_id, ids[0]]
    chain = dict(zip(path[:-1], path[1:], strict=True))
    out = tmp_path_factory.mktemp("chat") / "run"
    return make_run(tiny_data, out, chat=True, edit=follow_chain(chain), tie_embeddings=False), template


@pytest.fixture(scope="module")
def hf_export(chat_run, tmp_path_factory):
    pytest.importorskip("transformers")
    return export_run(chat_run[0], "hf", tmp_path_factory.mktemp("hf") / "out")


def ids_of(encoded) -> list[int]:
    """apply_chat_template's ids: a list (transformers 4) or a BatchEncoding (5)."""
    return list(encoded if isinstance(encoded, list) else encoded["input_ids"])


def test_hf_export_gives_apply_chat_template_the_same_ids(chat_run, hf_export, tmp_path):
    transformers = pytest.importorskip("transformers")
    template, out = chat_run[1], hf_export
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == JINJA
    # transformers 4 reads the template from tokenizer_config.json only: the same template is there.
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "chat_template.jinja").read_text() == config["chat_template"] == JINJA
    (tmp_path / "config-only").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "config-only" / name).write_bytes((out / name).read_bytes())
    from_config = transformers.AutoTokenizer.from_pretrained(tmp_path / "config-only")
    rng = random.Random(1)
    for _ in range(200):
        messages = conversation(rng)
        for prompt in (False, True):
            ours = template.render(messages, add_generation_prompt=prompt)[0]
            assert ids_of(tok.apply_chat_template(messages, add_generation_prompt=prompt)) == ours
            assert ids_of(from_config.apply_chat_template(messages, add_generation_prompt=prompt)) == ours
    # The special tokens are declared: end of turn is eos, and decoding can leave them all out.
    assert tok.eos_token == END_TOKEN and tok.bos_token == EOS_TOKEN
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert set(SPECIAL_TOKENS) <= set(from_config.all_special_tokens)
    prompt = template.prompt_ids(messages)
    assert tok.decode(prompt, skip_special_tokens=True) == "".join(m["content"] for m in messages)


def test_hf_generate_stops_at_end_of_turn(chat_run, hf_export):
    transformers = pytest.importorskip("transformers")
    template, out = chat_run[1], hf_export
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [template.end_id, template.tokenizer.eos_id]
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "hello"}]
    prompt = torch.tensor([ids_of(tok.apply_chat_template(messages, add_generation_prompt=True))])
    with torch.no_grad():
        done = model.generate(prompt, max_new_tokens=20, do_sample=False)[0, prompt.size(1) :].tolist()
        # Negative control: with end-of-text as the only eos, generation runs through the end of turn.
        on = model.generate(
            prompt, max_new_tokens=20, do_sample=False, eos_token_id=template.tokenizer.eos_id
        )[0, prompt.size(1) :].tolist()
    reply = template.tokenizer.encode(REPLY)
    assert done == [*reply, template.end_id]
    assert tok.decode(done, skip_special_tokens=True) == REPLY
    assert len(on) == 20 and on[: len(done)] == done


def test_a_base_run_exports_as_before(tiny_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    run = make_run(tiny_data, tmp_path / "base")
    out = export_run(run, "hf", tmp_path / "hf")
    assert not (out / "chat_template.jinja").exists()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and "additional_special_tokens" not in config
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template is None and tok.eos_token == EOS_TOKEN
    eos = LLM.load(run, device="cpu").tokenizer.eos_id
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos
    reader = gguf.GGUFReader(str(export_run(run, "gguf", tmp_path / "gguf") / "model.gguf"))
    assert "tokenizer.chat_template" not in reader.fields
    assert "tokenizer.ggml.eot_token_id" not in reader.fields
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == eos


def test_gguf_export_carries_the_template_and_end_of_turn(chat_run, tmp_path):
    gguf = pytest.importorskip("gguf")
    run, template = chat_run
    reader = gguf.GGUFReader(str(export_run(run, "gguf", tmp_path / "gguf") / "model.gguf"))

    def value(key):
        return reader.fields[key].contents()

    assert value("tokenizer.chat_template") == JINJA
    assert value("tokenizer.ggml.eos_token_id") == value("tokenizer.ggml.eot_token_id") == template.end_id
    assert value("tokenizer.ggml.bos_token_id") == template.tokenizer.eos_id
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    for token in SPECIAL_TOKENS:  # control tokens, which llama.cpp never splits from text
        i = template.tokenizer.hf.token_to_id(token)
        assert tokens[i] == token and types[i] == int(gguf.TokenType.CONTROL)
