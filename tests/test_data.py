"""Tests for lmforge.data: sources, tokenizer, shards, prepare and loaders."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data import (
    EOS_TOKEN,
    DataError,
    ShardWriter,
    Tokenizer,
    TokenLoader,
    TokenShards,
    iter_documents,
    iter_eval_batches,
    load_meta,
    prepare,
    train_tokenizer,
)
from lmforge.data.tokenizer_kinds import load_pretrained
from lmforge.safewrite import DiskWriteError

# `lmforge.data.prepare` is shadowed by the re-exported function, so fetch the module itself.
prepare_module = importlib.import_module("lmforge.data.prepare")
encode_module = importlib.import_module("lmforge.data.encode")

TRICKY = [
    "",
    "plain ascii",
    "  leading and trailing spaces  ",
    "tabs\tand\t\ttabs\n\nnewlines\r\nCRLF\n",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "中文字符 日本語のテキスト 한국어",
    "combining e\u0301 and nfc \u00e9, rtl עברית العربية",
    "zero\u200bwidth\u00a0nbsp \x00 nul \x7f del",
    "literal <|endoftext|> inside a document",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n",
]
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "tokens",
    "flow",
    "through",
    "models",
    "and",
    "data",
]


def _text(rng: random.Random, words: int) -> str:
    lines = []
    for _ in range(max(1, words // 8)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(8)))
    return "\n".join(lines) + "\n"


def _corpus(root: Path, docs: int = 40, seed: int = 0) -> Path:
    """A folder of `docs` small distinct .txt files."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (root / f"doc{i:03d}.txt").write_text(f"document {i}\n" + _text(rng, 60 + 10 * (i % 7)))
    return root


def _val_score(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64


@pytest.fixture(scope="module")
def small_tok() -> Tokenizer:
    # Trained on ASCII only: the unicode in TRICKY must round-trip without being seen.
    rng = random.Random(1)
    return train_tokenizer([_text(rng, 400) for _ in range(20)], vocab_size=320)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_tricky_unicode(small_tok: Tokenizer) -> None:
    for text in TRICKY:
        assert small_tok.decode(small_tok.encode(text)) == text
    batch = small_tok.encode_batch(TRICKY)
    assert batch == [small_tok.encode(t) for t in TRICKY]
    assert small_tok.vocab_size == 320
    assert small_tok.decode([small_tok.eos_id]) == EOS_TOKEN


def test_literal_eos_text_is_not_the_eos_token(small_tok: Tokenizer) -> None:
    ids = small_tok.encode("a <|endoftext|> b")
    assert small_tok.eos_id not in ids
    assert small_tok.decode(ids) == "a <|endoftext|> b"


def test_tokenizer_save_load_identical(small_tok: Tokenizer, tmp_path: Path) -> None:
    path = small_tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    for loaded in (Tokenizer.load(tmp_path / "tok"), Tokenizer.load(path)):
        assert loaded.sha256() == small_tok.sha256()
        assert loaded.vocab_size == small_tok.vocab_size and loaded.eos_id == small_tok.eos_id
        for text in TRICKY:
            assert loaded.encode(text) == small_tok.encode(text)
    other = train_tokenizer(["completely different text " * 50], vocab_size=300)
    assert other.sha256() != small_tok.sha256()


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="bpe"):
        train_tokenizer(["x"], kind="sentencepiece")
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["x"], vocab_size=100)
    with pytest.raises(DataError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")
    # --tokenizer given as a path: what is wrong with it, not the list of kinds it is not
    with pytest.raises(DataError, match="does not exist"):
        load_pretrained(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="holds no tokenizer.json"):
        load_pretrained(str(tmp_path))
    with pytest.raises(DataError, match="is none of bpe"):
        load_pretrained("sentencepiece")


# ----------------------------------------------------------------------------- sources


def _messy_folder(root: Path) -> Path:
    root.mkdir()
    (root / "a.txt").write_text("alpha text")
    (root / "b.md").write_text("# title\nbody")
    (root / "c.json").write_text(json.dumps([{"text": "one"}, {"content": "two"}, "three", {"other": 1}]))
    (root / "d.json").write_text(json.dumps({"text": "single"}))
    (root / "e.jsonl").write_text('{"text": "l1"}\n{not json\n\n{"content": "l4"}\n')
    (root / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (root / "bad_utf8.txt").write_bytes(b"\xff\xfe abc")
    (root / "empty.txt").write_text("")
    (root / "blank.md").write_text("   \n")
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".hidden.txt").write_text("hidden")
    (root / "sub").mkdir()
    (root / "sub" / "z.txt").write_text("nested")
    return root


def test_iter_documents_folder(tmp_path: Path) -> None:
    root = _messy_folder(tmp_path / "corpus")
    skipped: dict[str, int] = {}
    docs = list(iter_documents(str(root), skipped=skipped))
    assert [(d.name, d.text) for d in docs] == [
        ("a.txt", "alpha text"),
        ("b.md", "# title\nbody"),
        ("c.json#0", "one"),
        ("c.json#1", "two"),
        ("c.json#2", "three"),
        ("d.json", "single"),
        ("e.jsonl#1", "l1"),
        ("e.jsonl#4", "l4"),
        ("sub/z.txt", "nested"),
    ]
    assert skipped == {
        "binary": 1,
        "invalid_utf8": 1,
        "empty": 2,
        "bad_json": 1,
        "no_text_field": 1,
        "unsupported_extension": 1,
    }
    assert [d.name for d in iter_documents(str(root), max_docs=3)] == ["a.txt", "b.md", "c.json#0"]
    assert [d.name for d in iter_documents(str(root / "e.jsonl"))] == ["e.jsonl#1", "e.jsonl#4"]


def test_iter_documents_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*builtin:stdlib"):
        iter_documents(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="unsupported source scheme 's3:'.*builtin:stdlib"):
        iter_documents("s3:some/dataset")
    with pytest.raises(DataError, match="builtin:stdlib"):
        iter_documents("builtin:nothing")
    (tmp_path / "x.docx").write_text("a,b")
    with pytest.raises(DataError, match="unsupported extension"):
        iter_documents(str(tmp_path / "x.docx"))


def test_builtin_stdlib_corpus() -> None:
    names = [d.name for d in iter_documents("builtin:stdlib", max_docs=400)]
    assert len(names) == 400 and names == sorted(names)
    again = [d.name for d in iter_documents("builtin:stdlib", max_docs=50)]
    assert again == names[:50]
    excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    assert all(name.endswith(".py") and not excluded & set(name.split("/")) for name in names)


def test_builtin_stdlib_is_large_and_skips_tests() -> None:
    # Names and sizes only: tokenizing the whole stdlib would make the suite slow.
    sizes = {d.name: len(d.text) for d in iter_documents("builtin:stdlib")}
    assert len(sizes) > 100 and "os.py" in sizes and "json/decoder.py" in sizes
    assert not any(n.startswith(("test/", "idlelib/idle_test/", "lib2to3/tests/")) for n in sizes)


# ----------------------------------------------------------------------------- shards


def test_shard_writer_splits_and_reader_crosses_boundaries(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "train", "uint16", shard_tokens=7)
    data = np.arange(30, dtype=np.int64) * 1000
    writer.write(data[:5])
    writer.write(list(data[5:23]))
    writer.write(data[23:])
    names = writer.close()
    assert names == [f"train_{i:06d}.bin" for i in range(5)]
    raw = b"".join((tmp_path / n).read_bytes() for n in names)
    assert np.array_equal(np.frombuffer(raw, dtype="<u2"), data)
    meta = {"dtype": "uint16", "splits": {"train": {"tokens": 30, "shards": names}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    shards = TokenShards(tmp_path, "train")
    assert len(shards) == 30
    for start in range(30):
        for length in (0, 1, 6, 8, 30 - start):
            if start + length <= 30:
                got = shards.read(start, length)
                assert got.dtype == np.int64 and np.array_equal(got, data[start : start + length])
    with pytest.raises(IndexError):
        shards.read(25, 6)
    with pytest.raises(DataError, match="out of range"):
        ShardWriter(tmp_path, "val", "uint16").write([70000])


# ----------------------------------------------------------------------------- prepare


def _split_docs(data_dir: Path, split: str, tok: Tokenizer) -> list[str]:
    """Decode a split's shards back into its documents (cut at EOS)."""
    meta = load_meta(data_dir)
    ids = TokenShards(data_dir, split).read(0, meta["splits"][split]["tokens"])
    assert len(ids) == 0 or ids[-1] == tok.eos_id
    cuts = np.flatnonzero(ids == tok.eos_id)
    starts = np.concatenate([[0], cuts[:-1] + 1]) if len(cuts) else []
    return [tok.decode(ids[s:e]) for s, e in zip(starts, cuts, strict=True)]


def test_prepare_small_corpus(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    out = tmp_path / "data"
    messages: list[str] = []
    meta = prepare([str(corpus)], out, vocab_size=300, val_fraction=0.2, progress=messages.append)
    assert messages and meta == load_meta(out)
    for key in (
        "format_version",
        "vocab_size",
        "dtype",
        "eos_id",
        "tokenizer",
        "tokenizer_sha256",
        "sources",
    ):
        assert key in meta
    assert meta["format_version"] == 1 and meta["dtype"] == "uint16" and meta["tokenizer"] == "bpe"
    assert meta["sources"] == [str(corpus)]
    tok = Tokenizer.load(out)
    assert tok.sha256() == meta["tokenizer_sha256"] and tok.vocab_size == meta["vocab_size"]
    assert tok.eos_id == meta["eos_id"]

    texts = {p.name: p.read_text() for p in sorted(corpus.iterdir())}
    decoded = {}
    for split in ("train", "val"):
        info = meta["splits"][split]
        sizes = sum((out / name).stat().st_size for name in info["shards"])
        assert info["tokens"] == sizes // 2 == len(TokenShards(out, split))
        decoded[split] = _split_docs(out, split, tok)
        assert info["documents"] == len(decoded[split]) >= 1
        assert info["bytes"] == sum(len(t.encode()) for t in decoded[split])
    # Documents are whole, split by their name's hash, in source order, and never in both splits.
    expected_val = [t for name, t in texts.items() if _val_score(name) < 0.2]
    assert decoded["val"] == expected_val
    assert decoded["train"] == [t for t in texts.values() if t not in expected_val]
    whole = TokenShards(out, "train").read(0, meta["splits"]["train"]["tokens"])
    assert tok.decode(whole) == "".join(t + EOS_TOKEN for t in decoded["train"])
    assert meta["val_bytes_per_token"] == pytest.approx(
        meta["splits"]["val"]["bytes"] / meta["splits"]["val"]["tokens"]
    )
    assert meta["skipped"] == {}
    assert sorted(os.listdir(tmp_path)) == ["corpus", "data"]  # no temp folders left behind

    # Same input -> same dataset identity, whether written to a new folder or over the old one.
    again = prepare([str(corpus)], tmp_path / "data2", vocab_size=300, val_fraction=0.2)
    assert again["fingerprint"] == meta["fingerprint"]
    assert prepare([str(corpus)], out, vocab_size=300, val_fraction=0.2)["fingerprint"] == meta["fingerprint"]
    # A reused tokenizer file is recorded as such and gives the same tokens.
    reused = prepare([str(corpus)], tmp_path / "data3", tokenizer=str(out), val_fraction=0.2)
    assert reused["tokenizer"] == "file" and reused["fingerprint"] == meta["fingerprint"]


def test_prepare_split_is_stable_when_files_are_added(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus", docs=30)
    before = prepare([str(corpus)], tmp_path / "a", vocab_size=300, val_fraction=0.2)
    tok = Tokenizer.load(tmp_path / "a")
    val_before = set(_split_docs(tmp_path / "a", "val", tok))
    for i in range(10):
        (corpus / f"new{i}.txt").write_text(f"new file {i}\n")
    after = prepare([str(corpus)], tmp_path / "b", tokenizer=str(tmp_path / "a"), val_fraction=0.2)
    val_after = set(_split_docs(tmp_path / "b", "val", tok))
    assert (
        val_before <= val_after
        and after["splits"]["train"]["documents"] > before["splits"]["train"]["documents"]
    )


def test_prepare_guarantees_both_splits(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus", docs=3)
    # With a tiny fraction no name hashes into val; the fallback must still provide one.
    meta = prepare([str(corpus)], tmp_path / "d", vocab_size=300, val_fraction=1e-9)
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 2
    meta = prepare([str(corpus)], tmp_path / "e", vocab_size=300, val_fraction=0.999999)
    assert meta["splits"]["val"]["documents"] == 2 and meta["splits"]["train"]["documents"] == 1
    # A single document is split into a train head and a val tail at a line break.
    single = tmp_path / "one.txt"
    single.write_text(_text(random.Random(3), 2000))
    meta = prepare([str(single)], tmp_path / "f", vocab_size=300, val_fraction=0.1)
    tok = Tokenizer.load(tmp_path / "f")
    head, tail = _split_docs(tmp_path / "f", "train", tok), _split_docs(tmp_path / "f", "val", tok)
    assert len(head) == len(tail) == 1 and head[0] + tail[0] == single.read_text()
    assert head[0].endswith("\n") and meta["val_split"] == "single_document_tail"
    # No usable document at all is an error, and leaves nothing behind.
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.txt").write_text("  \n")
    with pytest.raises(DataError, match="no usable documents"):
        prepare([str(tmp_path / "blank")], tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_prepare_tokenizer_sample_is_bounded_prefix_of_train(tmp_path: Path, monkeypatch) -> None:
    corpus = _corpus(tmp_path / "corpus")
    seen: list[str] = []
    real = prepare_module.train_tokenizer

    def spy(texts, kind="bpe", vocab_size=8192, special_tokens=()):
        seen.extend(texts)
        return real(seen, kind, vocab_size)

    monkeypatch.setattr(prepare_module, "train_tokenizer", spy)
    prepare([str(corpus)], tmp_path / "d", vocab_size=300, val_fraction=0.2, tokenizer_sample_bytes=3000)
    train_text = "".join(p.read_text() for p in sorted(corpus.iterdir()) if _val_score(p.name) >= 0.2)
    assert len("".join(seen).encode()) == 3000 and "".join(seen) == train_text[:3000]


def test_prepare_long_document_pieces_encode_like_whole(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(encode_module, "_PIECE_CHARS", 500)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # A class body: every newline touches whitespace, where a careless cut changes the tokens.
    long_text = "class C:\n" + "".join(
        f"    def f{i}(a):\n        if a:  \n            return {i}\n\n        return a\n" for i in range(80)
    )
    (corpus / "long.txt").write_text(long_text)
    (corpus / "short.txt").write_text("short doc\n")
    # A tokenizer that has learned whitespace merges, whichever split long.txt lands in.
    tok = train_tokenizer([long_text], vocab_size=300)
    tok.save(tmp_path / "tok")
    meta = prepare([str(corpus)], tmp_path / "d", tokenizer=str(tmp_path / "tok"), val_fraction=0.5)
    found = []
    for split in ("train", "val"):
        ids = TokenShards(tmp_path / "d", split).read(0, meta["splits"][split]["tokens"])
        if tok.decode(ids) == long_text + EOS_TOKEN:
            found.append(list(ids))
    assert found == [tok.encode(long_text) + [tok.eos_id]]


def test_prepare_failure_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    corpus = _corpus(tmp_path / "corpus", docs=10)

    class Exploding(ShardWriter):
        def close(self) -> list[str]:
            super().close()  # the shards are complete on disk, then we fail
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "ShardWriter", Exploding)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], tmp_path / "data", vocab_size=300)
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


def test_prepare_failure_while_a_worker_saves_gpt2_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("tiktoken")
    corpus = _corpus(tmp_path / "corpus", docs=10)

    class ExplodingAtOnce(ShardWriter):
        def write(self, ids) -> None:
            raise KeyboardInterrupt  # at the first chunk: a worker is still building tokenizer.json

    monkeypatch.setattr(prepare_module, "ShardWriter", ExplodingAtOnce)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], tmp_path / "data", tokenizer="gpt2", workers=2)
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


def test_prepare_failure_keeps_previous_data(tmp_path: Path, monkeypatch) -> None:
    corpus = _corpus(tmp_path / "corpus", docs=10)
    out = tmp_path / "data"
    first = prepare([str(corpus)], out, vocab_size=300)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real_write = ShardWriter.write

    def failing_write(self, ids):
        real_write(self, ids)
        calls["n"] += 1
        raise RuntimeError("disk full")

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare([str(corpus)], out, vocab_size=320)
    assert calls["n"] == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert load_meta(out)["fingerprint"] == first["fingerprint"]
    assert sorted(os.listdir(tmp_path)) == ["corpus", "data"]


def test_prepare_meta_only_ever_describes_complete_shards(tmp_path: Path, monkeypatch) -> None:
    corpus = _corpus(tmp_path / "corpus", docs=10)
    out = tmp_path / "data"
    events: list[str] = []
    real_write_json, real_install = prepare_module.write_json, prepare_module.install

    def spy_write_json(path: Path, payload: dict) -> None:
        # When meta.json is written, every shard it lists must already be complete on disk,
        # and the folder must still be the hidden temp folder.
        assert path.parent != out
        if path.name == "manifest.json":  # written just before meta.json
            events.append("manifest")
            return real_write_json(path, payload)
        for info in payload["splits"].values():
            sizes = sum((path.parent / n).stat().st_size for n in info["shards"])
            assert sizes == 2 * info["tokens"]
        events.append("meta")
        real_write_json(path, payload)

    def spy_install(tmp: Path, out_dir: Path) -> None:
        assert (tmp / "meta.json").is_file()
        events.append("install")
        real_install(tmp, out_dir)

    monkeypatch.setattr(prepare_module, "write_json", spy_write_json)
    monkeypatch.setattr(prepare_module, "install", spy_install)
    prepare([str(corpus)], out, vocab_size=300)
    assert events == ["manifest", "meta", "install"] and load_meta(out)["format_version"] == 1


def test_prepare_swap_failure_keeps_previous_data(tmp_path: Path, monkeypatch) -> None:
    corpus = _corpus(tmp_path / "corpus", docs=10)
    out = tmp_path / "data"
    first = prepare([str(corpus)], out, vocab_size=300)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = os.replace

    def failing_replace(src, dst) -> None:
        if Path(src).name.startswith(".data.tmp-"):  # the final move of the new folder fails
            raise OSError("simulated crash during the swap")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    # one line for a person: what failed, why, and that the previous data is unchanged
    with pytest.raises(DiskWriteError, match=f"simulated crash during the swap.*; {out} is unchanged"):
        prepare([str(corpus)], out, vocab_size=320)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert load_meta(out)["fingerprint"] == first["fingerprint"]
    assert sorted(os.listdir(tmp_path)) == ["corpus", "data"]


def test_prepare_refuses_foreign_folder(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus", docs=5)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="refusing"):
        prepare([str(corpus)], mine, vocab_size=300)
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "precious"
    # A data folder the user added files to is no longer ours to delete either.
    prepare([str(corpus)], tmp_path / "data", vocab_size=300)
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing"):
        prepare([str(corpus)], tmp_path / "data", vocab_size=300)
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"


def test_prepare_removes_stale_temp_of_dead_run(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus", docs=5)
    dead_pid = 4_000_000
    try:
        os.kill(dead_pid, 0)
        pytest.skip("pid unexpectedly alive")
    except ProcessLookupError:
        pass
    stale = tmp_path / f".data.tmp-{dead_pid}"
    stale.mkdir()
    (stale / "meta.json").write_text("{}")
    prepare([str(corpus)], tmp_path / "data", vocab_size=300)
    assert sorted(os.listdir(tmp_path)) == ["corpus", "data"]


def test_load_meta_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*lmforge prepare"):
        load_meta(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a prepared data folder.*lmforge prepare"):
        load_meta(tmp_path / "empty")


# ----------------------------------------------------------------------------- loaders


def _token_dir(root: Path, tokens: int, shard_tokens: int = 1000) -> Path:
    """A data folder whose train tokens are 0, 1, 2, ... so a window is identified by x[0]."""
    root.mkdir()
    writer = ShardWriter(root, "train", "uint16", shard_tokens)
    writer.write(np.arange(tokens))
    meta = {
        "format_version": 1,
        "vocab_size": 65536,
        "dtype": "uint16",
        "eos_id": 0,
        "splits": {"train": {"tokens": tokens, "shards": writer.close()}},
        "fingerprint": "test",
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _windows(loader: TokenLoader, batches: int) -> list[int]:
    starts = []
    for _ in range(batches):
        x, _y = loader.next_batch()
        starts.extend((x[:, 0] // loader.seq_len).tolist())
    return starts


def test_loader_batches(tmp_path: Path) -> None:
    data = _token_dir(tmp_path / "d", tokens=1601, shard_tokens=333)  # 100 windows of 17 tokens
    loader = TokenLoader(data, "train", seq_len=16, micro_batch_size=4, seed=3)
    assert loader.windows == 100
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x[:, 0] % 16, torch.zeros(4, dtype=torch.int64))  # windows start at stride 16
    # The order is exactly the documented permutation, epoch after epoch.
    fresh = TokenLoader(data, "train", seq_len=16, micro_batch_size=4, seed=3)
    starts = _windows(fresh, 60)  # 240 windows: 2.4 epochs
    expected = [int(w) for e in range(3) for w in np.random.default_rng([3, e]).permutation(100)][:240]
    assert starts == expected and fresh.epoch == 2
    assert sorted(starts[:100]) == list(range(100))  # an epoch visits every window once
    assert _windows(TokenLoader(data, "train", 16, 4, seed=4), 25) != starts[:100]


def test_loader_resume_from_state(tmp_path: Path) -> None:
    data = _token_dir(tmp_path / "d", tokens=161)  # 10 windows
    loader = TokenLoader(data, "train", seq_len=16, micro_batch_size=3, seed=7)
    for _ in range(4):  # 12 windows: crosses into epoch 1
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["epoch"] == 1 and state["position"] == 2
    resumed = TokenLoader(data, "train", seq_len=16, micro_batch_size=3, seed=0)
    resumed.load_state_dict(state)
    for _ in range(5):
        for a, b in zip(loader.next_batch(), resumed.next_batch(), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(data, "train", seq_len=8, micro_batch_size=3).load_state_dict(state)


def test_loader_ranks_partition_each_epoch(tmp_path: Path) -> None:
    data = _token_dir(tmp_path / "d", tokens=641)  # 40 windows
    single = _windows(TokenLoader(data, "train", 16, 4, seed=1), 10)
    ranks = [_windows(TokenLoader(data, "train", 16, 4, seed=1, rank=r, world_size=2), 5) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(single) == list(range(40))
    assert ranks[0] == single[0::2] and ranks[1] == single[1::2]


def test_loader_ranks_stay_in_lockstep_with_odd_window_count(tmp_path: Path) -> None:
    data = _token_dir(tmp_path / "d", tokens=16 * 41 + 1)  # 41 windows: one is left over per epoch
    loaders = [TokenLoader(data, "train", 16, 4, seed=2, rank=r, world_size=2) for r in (0, 1)]
    seen = [_windows(loader, 10) for loader in loaders]  # 40 windows per rank: two epochs of 20
    for epoch in (0, 1):
        perm = np.random.default_rng([2, epoch]).permutation(41)
        for rank in (0, 1):
            assert seen[rank][20 * epoch : 20 * epoch + 20] == perm[rank:40:2].tolist()
    assert [loader.epoch for loader in loaders] == [1, 1]
    assert loaders[0].state_dict() == {**loaders[1].state_dict(), "rank": 0}


def test_loader_errors(tmp_path: Path) -> None:
    data = _token_dir(tmp_path / "d", tokens=50)
    with pytest.raises(DataError, match=r"only 50 tokens.*smaller seq_len"):
        TokenLoader(data, "train", seq_len=64, micro_batch_size=2)
    with pytest.raises(DataError, match="split 'val' not found"):
        TokenLoader(data, "val", seq_len=8, micro_batch_size=2)
    with pytest.raises(DataError, match="lmforge prepare"):
        TokenLoader(tmp_path / "nowhere", "train", seq_len=8, micro_batch_size=2)


def test_iter_eval_batches(tmp_path: Path) -> None:
    data = _token_dir(tmp_path / "d", tokens=16 * 11 + 1)  # 11 windows
    batches = list(iter_eval_batches(data, "train", seq_len=16, batch_size=4, max_batches=None))
    assert len(batches) == 2  # the partial third batch is dropped
    starts = [int(v) for x, _y in batches for v in x[:, 0]]
    assert starts == [16 * i for i in range(8)]
    again = list(iter_eval_batches(data, "train", seq_len=16, batch_size=4, max_batches=1))
    assert (
        len(again) == 1
        and torch.equal(again[0][0], batches[0][0])
        and torch.equal(again[0][1], batches[0][1])
    )
    only = list(iter_eval_batches(data, "train", seq_len=16, batch_size=64, max_batches=None))
    assert len(only) == 1 and only[0][0].shape == (11, 16)
    assert torch.equal(only[0][1][:, :-1], only[0][0][:, 1:])
