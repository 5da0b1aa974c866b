"""The generation engine: padded batches, per-row positions, stopping, sampling filters, streaming."""

from __future__ import annotations

import pytest
import torch

from lmforge.data import Tokenizer
from lmforge.generate.engine import BatchDecoder, TextStream, generate_texts, stream_text
from lmforge.generate.sampling import SamplingParams, draw, filter_logits, min_p_filter, race, sample_rows
from lmforge.model import GPT, ModelConfig

FAMILIES = {
    "gpt2": dict(family="gpt2"),
    "llama-gqa": dict(family="llama", n_kv_head=2),
}
GREEDY = SamplingParams(temperature=0.0)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    base = dict(n_layer=2, n_head=4, n_embd=32, context_len=64, vocab_size=100)
    return GPT(ModelConfig(**{**base, **kw})).eval()


def run_rows(model, prompts, n, params=GREEDY, seed=None, eos_id=None, use_cache=True):
    dec = BatchDecoder(model, prompts, n, params, seed, eos_id, use_cache)
    while not dec.finished:
        dec.step()
    return dec.generated


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_are_the_same_alone_and_inside_a_padded_batch(family):
    model = tiny(**FAMILIES[family])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    alone = [run_rows(model, [p], 20)[0] for p in prompts]
    batched = run_rows(model, prompts, 20)
    assert batched == alone
    # the reference path (no cache, whole padded sequence each step) agrees too
    assert run_rows(model, prompts, 20, use_cache=False) == alone
    # the logits behind it, and a negative control: padding without positions and mask changes them
    ids = torch.tensor([[0] * 8 + prompts[0]])  # (1, 11), left-padded
    mask = torch.tensor([[False] * 8 + [True] * 3])
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    ref = model(torch.tensor([prompts[0]]))[:, -1]
    masked = model(ids, positions=positions, key_mask=mask, last_only=True)[:, -1]
    assert torch.allclose(masked, ref, atol=1e-5)
    assert not torch.allclose(model(ids)[:, -1], ref, atol=1e-3)


def test_padding_rows_stay_finite_and_rows_stop_on_their_own():
    model = tiny()
    eos = run_rows(model, [[5]], 1)[0][0]  # row 0's first greedy token plays end-of-text
    other = run_rows(model, [[1, 2, 3, 4, 5, 6]], 10)[0]
    expect = other[: other.index(eos) + 1] if eos in other else other
    dec = BatchDecoder(model, [[5], [1, 2, 3, 4, 5, 6]], 10, GREEDY, eos_id=eos)
    while not dec.finished:
        dec.step()
    assert dec.generated[0] == [eos] and dec.finish_reasons[0] == "stop"  # eos ends row 0 at once
    assert dec.generated[1] == expect  # row 1 runs on after row 0 stopped
    assert dec.finish_reasons[1] == ("stop" if eos in other else "length")
    # every slot written so far (padding included) is finite; slots past pos were never written (the
    # cache is allocated uninitialised) and hold whatever memory held
    written = dec.cache.pos
    assert 6 <= written <= 15  # the prompt slots, then one per token fed back
    assert torch.isfinite(dec.cache.k[:, :, :, :written]).all()
    assert torch.isfinite(dec.cache.v[:, :, :, :written]).all()


def test_same_seed_same_sample_alone_or_in_a_batch_and_filters():
    model = tiny(family="llama", n_kv_head=2)
    p = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.2)
    a = run_rows(model, [[1, 2, 3]], 15, p, seed=5)[0]
    b = run_rows(model, [[9, 8, 7, 6, 5], [1, 2, 3]], 15, p, seed=5)[1]
    c = run_rows(model, [[1, 2, 3]], 15, p, seed=6)[0]
    assert a == b and a != c
    logits = torch.tensor([[4.0, 3.0, 0.0, -2.0]])  # probs 0.72, 0.26, 0.013, 0.002
    assert (~torch.isinf(min_p_filter(logits, 0.1))).tolist() == [[True, True, False, False]]
    # repetition penalty: a seen top token loses to the runner-up under greedy
    seen = torch.tensor([[True, False, False, False]])
    assert sample_rows(logits, SamplingParams(temperature=0, repetition_penalty=2.0), seen).item() == 1
    assert sample_rows(logits, SamplingParams(temperature=0), seen).item() == 0
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


def test_frequency_and_presence_penalties_lower_generated_tokens_logits():
    logits = torch.tensor([[4.0, 3.0, 0.0, -2.0]])

    def greedy(counts, **penalties):
        return sample_rows(
            logits, SamplingParams(temperature=0, **penalties), counts=torch.tensor([counts])
        ).item()

    # the top token, generated twice: 4 - 2 x 0.6 = 2.8 loses to 3; 4 - 2 x 0.4 = 3.2 does not
    assert greedy([2.0, 0, 0, 0], frequency_penalty=0.6) == 1
    assert greedy([2.0, 0, 0, 0], frequency_penalty=0.4) == 0
    # presence counts once, however many times: 4 - 1.1 loses, 4 - 0.9 does not
    assert greedy([5.0, 0, 0, 0], presence_penalty=1.1) == 1
    assert greedy([5.0, 0, 0, 0], presence_penalty=0.9) == 0
    assert greedy([1.0, 1.0, 0, 0], frequency_penalty=0.5, presence_penalty=0.5) == 0  # both lose alike
    assert greedy([0, 1.0, 0, 0], presence_penalty=-1.5) == 1  # a negative penalty favours repeats
    assert greedy([2.0, 0, 0, 0]) == 0  # no penalty: counts change nothing
    for name in ("frequency_penalty", "presence_penalty"):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: 2.5})


def test_top_k_draws_among_the_candidates_with_the_filtered_distribution():
    # sample_rows draws among the top-k candidates only; its frequencies are the softmax of the whole
    # filtered vocabulary (temperature, top-k, then top-p and min-p), which is what the filters define
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.3, 3.0, 0.0, 1.0, -3.0]])
    for p in (
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.3, top_k=5, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=6, min_p=0.1),
    ):
        want = filter_logits(logits, p).softmax(-1)[0]
        torch.manual_seed(0)
        got = torch.bincount(sample_rows(logits.repeat(100_000, 1), p), minlength=8).float() / 100_000
        assert torch.allclose(got, want, atol=0.01), (p, got, want)
        assert (got[want == 0] == 0).all()  # a filtered-out token is never drawn


def test_long_prompt_is_cut_from_the_left_with_a_warning():
    model = tiny()
    with pytest.warns(UserWarning, match="cut to its last 54"):
        dec = BatchDecoder(model, [list(range(1, 90)), [1, 2]], 10, GREEDY)
    assert dec.prompts[0] == list(range(36, 90)) and dec.total == 64
    while not dec.finished:
        dec.step()
    assert [len(g) for g in dec.generated] == [10, 10]


def test_stop_strings_and_text_streaming(tiny_data):
    tok = Tokenizer.load(tiny_data / "tokenizer.json")
    model = tiny(vocab_size=tok.vocab_size)
    full = generate_texts(model, tok, ["the cat", ""], 30, GREEDY)
    assert all(c.finish_reason in ("stop", "length") for c in full)
    text = full[0].text
    assert "".join(stream_text(model, tok, "the cat", 30, GREEDY)) == text
    stop = text[5:8]  # cut at a stop string found mid-reply
    assert stop and text.find(stop) >= 0
    cut = generate_texts(model, tok, ["the cat"], 30, GREEDY, stop=[stop])[0]
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(stream_text(model, tok, "the cat", 30, GREEDY, stop=[stop])) == cut.text
    # TextStream holds back a possible stop-string start and releases it when it does not complete
    ts = TextStream(lambda ids: "".join(chr(97 + i) for i in ids), stop=["bcx"])
    assert [ts.push(0), ts.push(1), ts.push(2), ts.push(3)] == ["a", "", "", "bcd"]
    assert not ts.stopped


@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece", "word", "char"])
def test_text_stream_decodes_a_short_window_and_gives_the_whole_text(kind):
    """Pieces put together are the decoded text (multi-byte characters split over tokens, a decoder
    that adds spaces between tokens or joins "##" pieces), and each push decodes only the last few
    tokens: a long reply costs the same per token as a short one."""
    from lmforge.data.tokenizer import train_tokenizer

    text = "Le café coûte 3€ — ça va? 漢字とかな。 Emoji 🙂🚀; def f(x):\n    return x ** 2  # don't\n"
    tok = train_tokenizer([text * 10], kind, 300 if kind in ("wordpiece", "word", "char") else 400)
    longest = 0

    def decode(ids):
        nonlocal longest
        longest = max(longest, len(ids))
        return tok.decode(ids)

    noise = [(7 * i) % tok.vocab_size for i in range(200)]  # broken characters, unknown pieces
    for ids, window in ((tok.encode(text * 4), 8), (noise, None)):
        stream, longest = TextStream(decode), 0
        pieces = [stream.push(t) for t in ids]
        assert "".join(pieces) + stream.flush() == tok.decode(ids).rstrip("\ufffd")
        assert window is None or (len(ids) > 100 and longest <= window)


def test_draw_samples_each_row_from_its_probabilities_and_its_own_generator():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0]).repeat(100_000, 1)
    torch.manual_seed(0)
    freq = torch.bincount(draw(probs), minlength=4).float() / len(probs)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.01) and freq[3] == 0
    # a row's draw depends on its own generator only, not on the rows beside it
    rows = torch.rand(3, 50).softmax(-1)
    alone = draw(rows[1:2], [torch.Generator().manual_seed(7)])
    together = draw(rows, [torch.Generator().manual_seed(s) for s in (1, 7, 9)])
    assert together[1] == alone[0]
    assert draw(torch.eye(4)).tolist() == [0, 1, 2, 3]  # a certain outcome is always drawn
    # ... even when the uniform draw is exactly 0 (-log 0 = inf would zero every score)
    assert race(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3)).tolist() == [2]
