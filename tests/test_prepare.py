"""prepare end to end: messy input, determinism across workers, limits, mixtures, interruption, loader order."""

from __future__ import annotations

import gzip
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from lmforge.cli import main
from lmforge.data import DataError, Tokenizer, TokenLoader, TokenShards, load_meta, prepare
from tests.test_data import _corpus, _token_dir

encode_module = importlib.import_module("lmforge.data.encode")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _docs(data: Path, split: str) -> list[str]:
    """The documents of a split, decoded from the shards."""
    tok = Tokenizer.load(data)
    shards = TokenShards(data, split)
    text = tok.decode(shards.read(0, len(shards)))
    return text.split("<|endoftext|>")[:-1]


def _messy(root: Path) -> dict[str, int]:
    """A folder with one of every kind of bad input; returns the exact skip counts it must give."""
    root.mkdir()
    (root / "good1.txt").write_text("good document one\n")
    (root / "good2.md").write_text("# good two\n")
    (root / "sub").mkdir()
    (root / "sub" / "good3.txt").write_text("good three in a subfolder\n")
    (root / "copy.txt").write_text("good document one\n")  # duplicate of good1.txt
    (root / "binary.txt").write_bytes(b"\x00\x01ELF\x02")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.txt").write_text("")
    (root / "blank.md").write_text(" \n\t\n")
    (root / "photo.png").write_bytes(b"\x89PNG\r\n")
    (root / "records.jsonl").write_text(
        '{"text": "good jsonl record"}\n{broken json\n{"title": "no text field"}\n{"text": "   "}\n'
    )
    (root / "broken.json").write_text('{"text": "unterminated')
    (root / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "good gz record"}\n')[:-12])
    (root / "fake.parquet").write_bytes(b"this is not parquet")
    (root / "gone.txt").symlink_to(root / "does-not-exist.txt")  # unreadable
    return {
        "binary": 1,
        "invalid_utf8": 1,
        "empty": 3,  # empty.txt, blank.md, the blank jsonl record
        "unsupported_extension": 1,
        "bad_json": 2,  # one jsonl line, one .json file
        "no_text_field": 1,
        "unreadable": 3,  # dangling link, truncated .gz, fake parquet
        "duplicate": 1,
    }


def test_messy_folder_exact_skips_and_every_good_document_kept(tmp_path: Path) -> None:
    expected = _messy(tmp_path / "messy")
    messages: list[str] = []
    meta = prepare(
        [str(tmp_path / "messy")], tmp_path / "d", vocab_size=300, val_fraction=0.3, progress=messages.append
    )
    assert meta["skipped"] == dict(sorted(expected.items()))
    kept = sorted(_docs(tmp_path / "d", "train") + _docs(tmp_path / "d", "val"))
    good = ["good document one\n", "# good two\n", "good three in a subfolder\n", "good jsonl record"]
    # The truncated .gz still gives the record before the damage, if any survived; here none did.
    assert kept == sorted(good)
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    source = manifest["sources"][0]
    assert source["documents"] == 4 and source["duplicates"] == 1 and source["skipped"] == meta["skipped"]
    assert source["skipped_examples"]["binary"] == ["binary.txt"]
    assert sorted(source["skipped_examples"]["unreadable"]) == ["broken.jsonl.gz", "fake.parquet", "gone.txt"]
    assert set(manifest["files"]) == {"tokenizer.json", *meta["shard_sha256"]}
    warning = next(m for m in messages if m.startswith("warning"))
    assert "binary 1 (binary.txt)" in warning and "latin1.txt" in warning and "duplicate" not in warning


def test_nothing_usable_is_one_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.bin.txt").write_bytes(b"\x00\x00")
    (root / "b.json").write_text("{nope")
    with pytest.raises(
        DataError, match=r"no usable documents .*bad_json 1 \(b.json\); binary 1 \(a.bin.txt\)"
    ) as info:
        prepare([str(root)], tmp_path / "d")
    assert "\n" not in str(info.value) and not (tmp_path / "d").exists()


def test_same_output_for_one_and_two_workers(tmp_path: Path, monkeypatch) -> None:
    corpus = _corpus(tmp_path / "c", docs=60)
    # Small chunks: many chunks in flight across the two workers, finishing in any order.
    monkeypatch.setattr(encode_module, "CHUNK_DOCS", 3)
    monkeypatch.setattr(importlib.import_module("lmforge.data.passes"), "CHUNK_DOCS", 3)  # the feeder's copy
    outs = {}
    for workers in (1, 2):
        prepare([str(corpus)], tmp_path / f"w{workers}", vocab_size=300, val_fraction=0.2, workers=workers)
        outs[workers] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"w{workers}").iterdir())}
    assert outs[1] == outs[2] and len(outs[1]) >= 5
    # Negative control: the comparison does notice a different corpus.
    (corpus / "doc000.txt").write_text("changed\n")
    prepare([str(corpus)], tmp_path / "w3", vocab_size=300, val_fraction=0.2, workers=2)
    changed = {p.name: p.read_bytes() for p in sorted((tmp_path / "w3").iterdir())}
    assert changed.keys() == outs[1].keys() and changed != outs[1]


def test_pool_really_uses_other_processes(tmp_path: Path) -> None:
    data = tmp_path / "d"
    prepare([str(_corpus(tmp_path / "c", 10))], data, vocab_size=300, val_fraction=0.2, workers=1)
    pool = encode_module.EncodePool(Tokenizer.load(data), 2)
    try:
        assert os.getpid() not in {pool._pool.submit(os.getpid).result() for _ in range(4)}
    finally:
        pool.close()


_PG_IN_A_CYCLE = """
import gc, sys, torch.distributed as dist
from lmforge.data import Tokenizer
from lmforge.data.encode import EncodePool
# What an in-process one-rank FSDP run can leave behind: a gloo process group, its threads running,
# reachable only through a reference cycle once the group is destroyed. With automatic collection
# off, the cycle is still there when the pool forks, whatever the allocations before it.
gc.disable()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
cycle = [dist.group.WORLD]
cycle.append(cycle)
dist.destroy_process_group()
del cycle
pool = EncodePool(Tokenizer.load(sys.argv[1]), 2)
# A worker's collector must not meet the group: its destructor waits for threads the fork left behind.
assert pool._pool.submit(gc.collect).result(timeout=20) >= 0
pool.close()
"""


def test_pool_workers_survive_a_process_group_left_by_earlier_training(tmp_path: Path) -> None:
    data = tmp_path / "d"
    prepare([str(_corpus(tmp_path / "c", 10))], data, vocab_size=300, val_fraction=0.2, workers=1)
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run(
        [sys.executable, "-c", _PG_IN_A_CYCLE, str(data)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_duplicates_dropped_and_max_tokens_stops_at_target(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "c", docs=30)
    (corpus / "zz_copy.txt").write_text((corpus / "doc003.txt").read_text())
    full = prepare([str(corpus)], tmp_path / "full", vocab_size=300, val_fraction=0.2)
    assert full["skipped"] == {"duplicate": 1}
    assert full["splits"]["train"]["documents"] + full["splits"]["val"]["documents"] == 30
    total = full["splits"]["train"]["tokens"] + full["splits"]["val"]["tokens"]
    tok = Tokenizer.load(tmp_path / "full")
    longest = max(len(tok.encode(p.read_text())) + 1 for p in corpus.iterdir())
    limited = prepare(
        [str(corpus)],
        tmp_path / "lim",
        tokenizer=str(tmp_path / "full"),
        val_fraction=0.2,
        max_tokens=total // 2,
    )
    got = limited["splits"]["train"]["tokens"] + limited["splits"]["val"]["tokens"]
    assert total // 2 <= got < total // 2 + longest  # stops at the first document boundary past the target
    manifest = json.loads((tmp_path / "lim" / "manifest.json").read_text())
    assert manifest["truncated_by"] == "max_tokens" and manifest["sources"][0]["tokens"] == got


def test_mixture_proportions_within_two_percent(tmp_path: Path) -> None:
    sources = []
    for name, words in (
        ("web", "alpha beta gamma"),
        ("code", "def f(x): return x"),
        ("books", "once upon a time"),
    ):
        root = tmp_path / name
        root.mkdir()
        for i in range(400 if name != "books" else 150):
            (root / f"{i:04d}.txt").write_text(f"{name} {i} " + (words + "\n") * (3 + i % 7))
        sources.append(str(root))
    weights = [0.5, 0.3, 0.2]
    meta = prepare(
        [f"{s}:{w}" for s, w in zip(sources, weights, strict=True)],
        tmp_path / "d",
        vocab_size=320,
        val_fraction=0.05,
    )
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    rows = manifest["sources"]
    # Weights are shares of the text (UTF-8 bytes), so which documents are chosen does not
    # depend on the tokenizer; every source's tokens are in the manifest too.
    total = sum(r["bytes"] for r in rows)
    assert [r["bytes"] / total for r in rows] == pytest.approx(weights, abs=0.02)
    assert (
        sum(r["tokens"] for r in rows) == meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    )
    assert [r["weight"] for r in rows] == weights and meta["sources"][0].endswith(":0.5")
    # books (smallest share of the largest corpus) runs out first and ends the mixture.
    assert rows[2]["documents"] == 150 and rows[0]["documents"] < 400


def test_cli_prepare_flags_reach_meta(tmp_path: Path, monkeypatch, capsys) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    lines = [json.dumps({"body": f"record {i} " + "words here " * (i % 5 + 1)}) for i in range(40)]
    (corpus / "r.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "d"
    code = main(
        [
            "prepare", "--source", str(corpus), "--out", str(out), "--tokenizer", "word", "--vocab-size", "60",
            "--text-field", "body", "--special-tokens", "<|a|>,<|b|>", "--workers", "2", "--max-docs", "30",
            "--val-fraction", "0.2", "--seq-len", "16", "--stride", "8",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("wrote ") == 1 and "bytes/token" in printed  # one summary, not two
    meta = load_meta(out)
    assert meta["val_windows"] == {"seq_len": 16, "stride": 8} and meta["tokenizer"] == "word"
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 30
    assert "<|a|>" in Tokenizer.load(out).hf.get_vocab() and meta["special_tokens"] == ["<|a|>", "<|b|>"]
    assert (
        main(
            [
                "prepare",
                "--source",
                str(corpus),
                "--out",
                str(tmp_path / "e"),
                "--seq-len",
                "8",
                "--stride",
                "9",
            ]
        )
        == 2
    )


def test_progress_bar_shows_rates(tmp_path: Path) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200)
    prepare([str(_corpus(tmp_path / "c", 10))], tmp_path / "d", vocab_size=300, console=console)
    shown = buffer.getvalue()  # what the live bar rendered before it was erased
    assert "docs (" in shown and "MB/s" in shown and "tokens" in shown


def test_cli_and_prepare_start_without_torch() -> None:
    # Importing torch costs seconds; prepare and --help never need it.
    code = (
        "import sys, lmforge.cli, lmforge.commands, lmforge.data, lmforge.data.prepare; "
        "sys.exit('torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0, "torch was imported"


def _children(pid: int) -> list[int]:
    """Child process ids of pid (Linux /proc; empty elsewhere)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie waiting to be reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_killed_prepare_leaves_nothing_training_accepts(tmp_path: Path) -> None:
    out = tmp_path / "data"
    script = (
        "import sys; from lmforge.data import prepare; "
        f"prepare(['builtin:stdlib'], {str(out)!r}, tokenizer='gpt2', workers=2)"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.DEVNULL)
    tmp = tmp_path / f".data.tmp-{proc.pid}"
    deadline = time.monotonic() + 60
    # Kill it (no chance to clean up) once shards are being written.
    while not (tmp / "train_000000.bin").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "prepare finished before it could be interrupted"
    workers = _children(proc.pid)
    assert workers or not sys.platform.startswith("linux"), "the pool's workers were not found"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The pool's workers do not outlive it as orphans waiting on their task queue.
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "pool workers outlived the killed prepare"
    assert not out.exists()
    with pytest.raises(DataError, match="does not exist"):
        load_meta(out)
    with pytest.raises(DataError):
        TokenLoader(out, "train", seq_len=8, micro_batch_size=1)
    # The next run sweeps the dead run's temp folder and installs a complete one.
    prepare([str(_corpus(tmp_path / "c", 10))], out, vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "data"]


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_loader_order_and_exact_resume(tmp_path: Path, order: str) -> None:
    data = _token_dir(tmp_path / "d", tokens=161)  # 10 windows of 16 tokens
    loader = TokenLoader(data, "train", seq_len=16, micro_batch_size=3, seed=5, order=order)
    starts = []
    for _ in range(4):  # 12 windows: crosses into epoch 1
        starts += (loader.next_batch()[0][:, 0] // 16).tolist()
    if order == "sequential":
        assert starts == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    else:
        assert starts[:10] != list(range(10)) and sorted(starts[:10]) == list(range(10))
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = TokenLoader(data, "train", seq_len=16, micro_batch_size=3, seed=0, order=order)
    resumed.load_state_dict(state)
    for _ in range(5):
        for a, b in zip(loader.next_batch(), resumed.next_batch(), strict=True):
            assert torch.equal(a, b)
    other = "random" if order == "sequential" else "sequential"
    with pytest.raises(DataError, match="order"):
        TokenLoader(data, "train", seq_len=16, micro_batch_size=3, order=other).load_state_dict(state)


def test_sequential_order_splits_ranks(tmp_path: Path) -> None:
    data = _token_dir(tmp_path / "d", tokens=161)  # 10 windows
    seen = []
    for rank in range(2):
        loader = TokenLoader(data, "train", 16, 2, rank=rank, world_size=2, order="sequential")
        seen.append([int(w) for _ in range(2) for w in loader.next_batch()[0][:, 0] // 16])
    assert seen == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_a_val_fraction_that_takes_every_document_still_trains_the_tokenizer(tmp_path: Path, capsys) -> None:
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "a", "dog", "ran", "far", "away"]
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"doc{i}.txt").write_text(" ".join(words[(i + k) % len(words)] for k in range(300)))
    out = tmp_path / "d"
    assert (
        main(
            [
                "prepare",
                "--source",
                str(src),
                "--out",
                str(out),
                "--vocab-size",
                "300",
                "--val-fraction",
                "0.9999",
            ]
        )
        == 0
    )
    meta = load_meta(out)
    assert meta["splits"]["train"]["documents"] == 1  # every document hashed to val; one moved to train
    assert meta["vocab_size"] > 256 + 1 + 10  # merges learned from it (it learned none: bytes only)
    said = capsys.readouterr().out
    assert "note: the tokenizer learned" in said and "of the 300 asked for" in said  # fewer than asked: said
    assert "(1 doc), val" in said and "(11 docs), vocab" in said  # one document is not "1 docs"
