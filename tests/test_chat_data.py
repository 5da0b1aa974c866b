"""Conversations for instruction tuning: `prepare --chat` (formats, skips, packing), the "chat" batch source,
and the proof that only the assistant's tokens reach the gradient."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmforge.cli import main
from lmforge.data import chat_prepare, load_meta, packing
from lmforge.data.batches import eval_batches, training_batches
from lmforge.data.chat_loader import PackedWindows, masked_targets
from lmforge.data.chat_prepare import prepare_chat
from lmforge.data.chat_records import messages_of
from lmforge.data.chat_template import (
    TEMPLATE_NAME,
    ChatTemplate,
    has_chat_tokens,
    message_problem,
    with_chat_tokens,
)
from lmforge.data.folder import SPLITS, fingerprint
from lmforge.data.packing import best_fit
from lmforge.data.shards import TokenShards
from lmforge.data.stdlib_chat import iter_stdlib_chat
from lmforge.data.tokenizer import Tokenizer, train_tokenizer
from lmforge.model import GPT, ModelConfig
from lmforge.run_dir import RunDir

from .conftest import WORDS

SEQ = 32
# The tokenizer knows the words of the test conversations, so that several fit in a 33-token window.
SAMPLE = ["def add(a, b):\n    return a + b\n", "hello world, ok yes no", " ".join(WORDS * 3)] * 40


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(SAMPLE, "bpe", 320).save(path)
    return path


@pytest.fixture(scope="module")
def template(tok_file) -> ChatTemplate:
    return ChatTemplate(with_chat_tokens(Tokenizer.load(tok_file)))


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _conversations(n: int, seed: int = 0, high: int = 6) -> list[list[dict]]:
    """Valid conversations of varied lengths (some with a system message, some with two turns)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "be brief"}] if rng.random() < 0.3 else []
        for _ in range(rng.choice((1, 1, 2))):
            msgs += [{"role": "user", "content": _words(rng, 1, high)}]
            msgs += [{"role": "assistant", "content": _words(rng, 1, high)}]
        out.append(msgs)
    return out


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _prep(tok_file: Path, sources, out: Path, **kw) -> tuple[dict, list[str]]:
    logs: list[str] = []
    options = {"seq_len": SEQ, "workers": 1, "val_fraction": 0.3, **kw}
    meta = prepare_chat([str(s) for s in sources], out, str(tok_file), progress=logs.append, **options)
    return meta, logs


def _windows(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    meta = load_meta(folder)
    tokens, masks = TokenShards(folder, split, meta), TokenShards(folder, split, meta, masks=True)
    width = meta["seq_len"] + 1
    return tokens.read(0, len(tokens)).reshape(-1, width), masks.read(0, len(masks)).reshape(-1, width)


def _segments(folder: Path) -> list[tuple[tuple, tuple]]:
    """Every conversation in the windows as (ids, mask): an end-of-text id and what follows up to the next;
    a lone end-of-text id is padding, which must have mask 0 and come after every conversation."""
    eos = load_meta(folder)["eos_id"]
    found = []
    for split in SPLITS:
        for row, mask in zip(*_windows(folder, split), strict=True):
            starts = [*np.flatnonzero(row == eos).tolist(), len(row)]
            assert starts[0] == 0  # a window starts with a conversation
            pieces = [(a, b) for a, b in zip(starts, starts[1:], strict=False)]
            real = [(a, b) for a, b in pieces if b - a > 1]
            pad_from = real[-1][1]
            assert not mask[pad_from:].any() and (row[pad_from:] == eos).all()
            found += [(tuple(row[a:b].tolist()), tuple(mask[a:b].tolist())) for a, b in real]
    return sorted(found)


def _rendered(template: ChatTemplate, conversations, width: int = SEQ + 1) -> list[tuple[tuple, tuple]]:
    return sorted((tuple(i[:width]), tuple(m[:width])) for i, m in map(template.render, conversations))


# --- formats and files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, messages",
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "ua"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a"}]},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "ua",
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "s"},
                    {"from": "human", "value": "a"},
                    {"from": "gpt", "value": "b"},
                ]
            },
            "sua",
        ),
        ({"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]}, "ua"),
        ({"instruction": "a", "input": "", "output": "b"}, "ua"),
        ({"instruction": "a", "input": "x", "output": "b", "system": "s"}, "sua"),
        ({"messages": [{"role": "bot", "content": "a"}]}, "unknown_role"),
        ({"conversations": [{"from": "bing", "value": "a"}, {"from": "gpt", "value": "b"}]}, "unknown_role"),
        (
            {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}]},
            "empty_content",
        ),
        ({"messages": [{"role": "user", "content": "a"}]}, "no_assistant_turn"),
        ({"instruction": "a"}, "no_assistant_turn"),
        (
            {"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]},
            "wrong_order",
        ),
        ({"text": "plain"}, "unknown_format"),
        ({"messages": "a"}, "unknown_format"),
        ([1, 2], "unknown_format"),
    ],
)
def test_record_formats_and_reasons(record, messages):
    got = messages_of(record)
    if messages in ("ua", "sua"):
        assert "".join(m["role"][0] for m in got) == messages and got[-1]["content"] == "b"
        assert got[-2]["content"] == ("a\n\nx" if record.get("input") == "x" else "a")
    else:
        assert got == messages


def test_every_format_and_file_type_reaches_the_windows(tmp_path, tok_file, template):
    convs = _conversations(24, seed=1)
    src = tmp_path / "src"
    src.mkdir()
    _jsonl(src / "a.jsonl", [{"messages": c} for c in convs[:6]])
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]} for m in c]} for c in convs[6:12]]  # fmt: skip
    (src / "b.json").write_text(json.dumps(sharegpt), encoding="utf-8")
    alpaca = [
        {"instruction": "say", "input": _words(random.Random(i), 1, 4), "output": f"ok {i}"} for i in range(6)
    ]
    with gzip.open(src / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in alpaca))
    pq.write_table(pa.Table.from_pylist([{"messages": c, "id": 1} for c in convs[12:18]]), src / "d.parquet")
    pq.write_table(
        pa.Table.from_pylist(alpaca[:3] + [{"instruction": "x", "input": None, "output": "y"}]),
        src / "e.parquet",
    )
    (src / "f.json").write_text(json.dumps({"messages": convs[18]}), encoding="utf-8")
    meta, _ = _prep(tok_file, [src], tmp_path / "out")
    expected = convs[:19] + [
        [
            {"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
            {"role": "assistant", "content": r["output"]},
        ]
        for r in alpaca + alpaca[:3]
    ]
    expected.append([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    assert meta["skipped"].get("duplicate") == 3  # alpaca[:3] is in both c.jsonl.gz and e.parquet
    assert {k: v for k, v in meta["skipped"].items() if k != "duplicate"} == {}
    assert _segments(tmp_path / "out") == _rendered(template, expected[:-4] + expected[-1:])
    assert meta["kind"] == "chat" and meta["chat_template"] == TEMPLATE_NAME and meta["seq_len"] == SEQ
    assert has_chat_tokens(Tokenizer.load(tmp_path / "out")) and meta["base_vocab_size"] == 320


def test_a_folder_of_malformed_files_never_stops_prepare(tmp_path, tok_file, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = [{"messages": c} for c in _conversations(6, seed=2)]
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (src / "bad_json.jsonl").write_text("not json\n" + json.dumps(ok) + "\n")
    _jsonl(src / "roles.jsonl", [{"messages": [{"role": "bot", "content": "a"}]}, {"conversations": [{"from": "bing", "value": "x"}]}])  # fmt: skip
    _jsonl(src / "empty_content.jsonl", [{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}])  # fmt: skip
    _jsonl(src / "no_answer.jsonl", [{"messages": [{"role": "user", "content": "q"}]}, {"instruction": "q"}])
    _jsonl(src / "order.jsonl", [{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}])  # fmt: skip
    _jsonl(src / "unknown.jsonl", [{"text": "plain"}, [1, 2]])
    (src / "binary.jsonl").write_bytes(b"\x00\x01\x02" * 10)
    (src / "latin1.json").write_bytes('{"messages": "caf\xe9"}'.encode("latin-1"))
    (src / "nothing.jsonl").write_text("")
    (src / "notes.txt").write_text("a text file is not a conversation")
    (src / "broken.parquet").write_bytes(b"PAR1 this is no parquet PAR1")
    (src / "broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (src / "deep.jsonl").write_text("[" * 100_000 + "\n")
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]), src / "text.parquet")
    _jsonl(src / "zz_good.jsonl", good)
    meta, logs = _prep(tok_file, [src], tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {
        "bad_json": 1, "unknown_role": 2, "empty_content": 1, "no_assistant_turn": 2, "wrong_order": 1,
        "unknown_format": 4, "binary": 1, "invalid_utf8": 1, "empty": 1, "unsupported_extension": 1,
        "unreadable": 2, "json_too_deep": 1, "duplicate": 0,
    }  # fmt: skip
    reasons = {k: v for k, v in reasons.items() if v}
    assert manifest["skipped"] == reasons and meta["skipped"] == reasons
    assert manifest["sources"][0]["skipped_examples"]["wrong_order"] == ["order.jsonl#1"]
    warning = next(line for line in logs if line.startswith("warning: skipped"))
    assert all(reason in warning for reason in reasons) and "roles.jsonl#1" in warning
    assert meta["packing"]["conversations"] == 7  # the six good ones and bad_json.jsonl's second line
    # Nothing usable at all: one line, exit 2, nothing written.
    for name in ("zz_good.jsonl", "bad_json.jsonl"):
        (src / name).unlink()
    capsys.readouterr()
    argv = ["prepare", "--chat", "--source", str(src), "--tokenizer", str(tok_file), "--seq-len", "32"]
    assert main([*argv, "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no usable conversations" in err and "Traceback" not in err
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none*"))


# --- packing ---------------------------------------------------------------------------------------------


def _best_fit_reference(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing written the plain way: scan every open bin."""
    bins: list[list[int]] = []
    free: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = min(lengths[item], capacity)
        fits = [(free[b], b) for b in range(len(bins)) if free[b] >= need]
        b = min(fits)[1] if fits else len(bins)
        if not fits:
            bins.append([])
            free.append(capacity)
        bins[b].append(item)
        free[b] -= need
    return [sorted(b) for b in bins]


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_matches_the_plain_algorithm(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(10, 50), 60]) for _ in range(300)]
    bins = best_fit(lengths, 50)
    assert bins == _best_fit_reference(lengths, 50)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 50 for b in bins if len(b) > 1)


def test_packing_keeps_conversations_whole_and_cuts_long_ones(tmp_path, tok_file, template):
    # Sixty that fit a window of SEQ + 1 tokens (from 2 to 33), then one to cut and one with nothing to learn.
    convs = [c for c in _conversations(90, seed=3) if len(template.render(c)[0]) <= SEQ + 1][:60]
    assert len(convs) == 60 and max(len(template.render(c)[0]) for c in convs) > SEQ - 4
    long_answer = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "the cat sat " * 30}]
    long_prompt = [{"role": "user", "content": "the dog ran " * 30}, {"role": "assistant", "content": "ok"}]
    src = _jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in [*convs, long_answer, long_prompt]])
    meta, logs = _prep(tok_file, [src], tmp_path / "out")
    assert _segments(tmp_path / "out") == _rendered(template, [*convs, long_answer])
    packed = meta["packing"]
    assert packed["cut"] == 1 and packed["cut_tokens"] == len(template.render(long_answer)[0]) - (SEQ + 1)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["cut_examples"] == ["c.jsonl#61"] and meta["skipped"] == {"too_long": 1}
    assert any(line.startswith("note: cut 1 conversations") for line in logs)
    real = sum(len(template.render(c)[0]) for c in convs) + SEQ + 1
    assert packed["conversation_tokens"] == real and packed["fill"] == pytest.approx(real / (packed["windows"] * (SEQ + 1)), abs=1e-6)  # fmt: skip


def test_any_worker_count_gives_the_same_bytes(tmp_path, tok_file, monkeypatch):
    # Small chunks and packing buffers, so that both are many and the pool really interleaves.
    monkeypatch.setattr(chat_prepare, "CHUNK_DOCS", 7)
    monkeypatch.setattr(packing, "BUFFER_TOKENS", 300)
    src = _jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in _conversations(150, seed=4)])
    metas = [_prep(tok_file, [src], tmp_path / f"w{n}", workers=n)[0] for n in (1, 2)]
    assert metas[0] == metas[1] and metas[0]["packing"]["windows"] > 10
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "w2").iterdir()) and "train_000000.mask" in files
    for name in files:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_the_fingerprint_covers_the_masks_and_a_failure_leaves_nothing(tmp_path, tok_file, monkeypatch):
    src = _jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in _conversations(40, seed=5)])
    meta, _ = _prep(tok_file, [src], tmp_path / "out")
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "out").glob("*_*.*")}
    assert {"train_000000.mask", "val_000000.mask"} <= set(digests) and digests == meta["shard_sha256"]
    assert fingerprint(meta["tokenizer_sha256"], digests) == meta["fingerprint"]
    tokens_only = {k: v for k, v in digests.items() if not k.endswith(".mask")}
    assert fingerprint(meta["tokenizer_sha256"], tokens_only) != meta["fingerprint"]

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(packing.WindowPacker, "flush", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prep(tok_file, [src], tmp_path / "other")
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".other*"))


# --- the batch source ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok_file) -> Path:
    root = tmp_path_factory.mktemp("chat")
    src = _jsonl(root / "c.jsonl", [{"messages": c} for c in _conversations(160, seed=6, high=9)])
    _prep(tok_file, [src], root / "data", val_fraction=0.1)
    return root / "data"


def _take(source, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [source.next_batch() for _ in range(n)]


def test_resume_continues_exactly_and_ranks_split_the_windows(folder):
    meta = load_meta(folder)
    windows = meta["splits"]["train"]["windows"]
    straight = _take(training_batches(folder, meta, SEQ, 3, seed=7), windows // 3 + 4)  # into epoch 1
    first = training_batches(folder, meta, SEQ, 3, seed=7)
    _take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = training_batches(folder, meta, SEQ, 3, seed=7)
    resumed.load_state_dict(state)
    rest = _take(resumed, len(straight) - 5)
    assert resumed.epoch == 1
    for (x, y), (x2, y2) in zip(straight[5:], rest, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # Two ranks read disjoint windows that together make the epoch; another seed, another order.
    ranks = [training_batches(folder, meta, SEQ, 1, seed=7, rank=r, world_size=2) for r in (0, 1)]
    per_rank = windows // 2
    seen = [[loader.window_index(0, p) for p in range(per_rank)] for loader in ranks]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 2 * per_rank
    other = training_batches(folder, meta, SEQ, 1, seed=8, rank=0, world_size=2)
    assert [other.window_index(0, p) for p in range(per_rank)] != seen[0]
    # The batches are those windows.
    windows_view = PackedWindows(folder, "train", SEQ)
    x, y = ranks[1].next_batch()
    x2, y2 = windows_view.batch([seen[1][0]])
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_targets_are_minus_one_exactly_where_the_mask_is_zero(folder):
    meta = load_meta(folder)
    for split, batches in (
        (
            "train",
            [PackedWindows(folder, "train", SEQ).batch(list(range(meta["splits"]["train"]["windows"])))],
        ),
        ("val", list(eval_batches(folder, meta, SEQ, 2, None))),
    ):
        tokens, masks = _windows(folder, split)
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        n = len(x)
        assert torch.equal(x, torch.from_numpy(tokens[:n, :-1]))
        learned = torch.from_numpy(masks[:n, 1:] == 1)
        assert (
            torch.equal(y[learned], torch.from_numpy(tokens[:n, 1:])[learned]) and (y[~learned] == -1).all()
        )
        assert learned.any() and (~learned).any() and x.dtype == y.dtype == torch.int64
    with pytest.raises(Exception, match="seq_len=32"):
        training_batches(folder, meta, 16, 2, seed=0)


def _assistant_targets(rows: np.ndarray, template: ChatTemplate) -> np.ndarray:
    """Which targets are an assistant's text or its end of turn, read from the ids alone (not the mask)."""
    role_of = {v: k for k, v in template.role_ids.items()}
    learn = np.zeros(rows.shape, dtype=bool)
    for r, row in enumerate(rows):
        role = None
        for j, token in enumerate(row.tolist()):
            if token in role_of:
                role = role_of[token]
            elif token == template.end_id:
                learn[r, j], role = role == "assistant", None
            elif token == template.start_id:
                role = None
            else:
                learn[r, j] = role == "assistant"
    return learn[:, 1:]


def _check_masking(model: GPT, x: torch.Tensor, targets, plain: np.ndarray, other: np.ndarray, learn) -> None:
    """The loss's gradient w.r.t. the logits is 0 at every target outside the assistant's turns, and
    the parameter gradients are the same whatever those targets are."""
    grads = []
    for rows in (plain, other):
        logits = []
        hook = model.lm_head.register_forward_hook(
            lambda _m, _i, out, kept=logits: out.retain_grad() or kept.append(out)
        )
        model.zero_grad()
        model(x, targets=torch.from_numpy(targets(rows))).backward()
        hook.remove()
        per_position = logits[0].grad.abs().sum(-1)  # (B, T)
        assert (per_position[~learn] == 0).all(), "gradient at a prompt or padding target"
        assert (per_position[learn] > 0).all()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True)), "prompt targets changed the gradient"


def test_only_the_assistant_tokens_reach_the_gradient_and_the_unmasked_control_fails(folder, template):
    meta = load_meta(folder)
    source = training_batches(folder, meta, SEQ, 4, seed=0)
    windows = [source.window_index(0, p) for p in range(4)]
    x, y = source.next_batch()
    tokens, masks = _windows(folder, "train")
    rows, mask = tokens[windows], masks[windows]
    learn = torch.from_numpy(_assistant_targets(rows, template))
    assert torch.equal(y, torch.from_numpy(masked_targets(rows, mask)))  # the batch is the masked window
    assert torch.equal(learn, y >= 0) and 0 < learn.float().mean() < 1  # the mask is the template's
    # The same windows with every target outside an assistant turn (user and system text, role tokens,
    # padding) changed: only the targets move, the inputs stay.
    other = rows.copy()
    outside = np.concatenate([np.zeros((len(rows), 1), bool), ~learn.numpy()], axis=1)
    other[outside] = (other[outside] + 1 + np.arange(outside.sum()) % 7) % 300
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=SEQ, vocab_size=meta["vocab_size"]))
    _check_masking(model, x, lambda r: masked_targets(r, mask), rows, other, learn)
    # Negative control: the plain next tokens as targets (no mask) fail the same check.
    with pytest.raises(AssertionError, match="gradient at a prompt or padding target"):
        _check_masking(model, x, lambda r: r[:, 1:].astype(np.int64), rows, other, learn)


# --- builtin:stdlib-chat and the command -------------------------------------------------------------------


def test_stdlib_chat_conversations_are_valid_varied_and_fixed():
    first = []
    for name, messages in iter_stdlib_chat(None):
        first.append((name, messages))
        if len(first) == 300:
            break
    assert all(message_problem(m) is None for _, m in first) and len({n for n, _ in first}) == 300
    assert any(m[0]["role"] == "system" for _, m in first)
    assert any(sum(x["role"] == "assistant" for x in m) == 2 for _, m in first)  # two-turn shapes
    assert any(m[-1]["content"].startswith("```python\ndef ") for _, m in first)  # the function itself
    again = [item for item, _ in zip(iter_stdlib_chat(None), range(300), strict=False)]
    assert again == first


def test_prepare_chat_command_with_a_run_directory(tmp_path, tok_file, capsys):
    run = RunDir(tmp_path / "base")
    run.path.mkdir()
    run.write_config({"model": {"n_layer": 2, "seq_len": 512, "context_len": 512}})
    Tokenizer.load(tok_file).save(run.tokenizer)
    out = tmp_path / "sft"
    argv = [
        "prepare",
        "--chat",
        "--source",
        "builtin:stdlib-chat",
        "--tokenizer",
        str(run.path),
        "--out",
        str(out),
    ]
    assert main([*argv, "--max-docs", "40", "--workers", "1", "--val-fraction", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "fill" in printed and printed.count("wrote ") == 1
    meta = load_meta(out)
    assert meta["kind"] == "chat" and meta["seq_len"] == 512 and meta["sources"] == ["builtin:stdlib-chat"]
    assert meta["packing"]["conversations"] + meta["skipped"].get("too_long", 0) == 40
    assert has_chat_tokens(Tokenizer.load(out)) and meta["vocab_size"] == 324


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tokenizer", "bpe", "--seq-len", "32"], "does not train a new 'bpe'"),
        (["--tokenizer", "runs/none", "--seq-len", "32"], "--tokenizer 'runs/none' does not exist"),
        (["--seq-len", "32", "--stride", "8"], "--stride cannot be used with --chat"),
        ([], "pass --seq-len"),
        (["--seq-len", "32", "--source", "builtin:stdlib"], "with --chat use builtin:stdlib-chat"),
    ],
)
def test_prepare_chat_refuses_in_one_line(tmp_path, tok_file, capsys, extra, message):
    src = _jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in _conversations(4)])
    argv = [
        "prepare",
        "--chat",
        "--source",
        str(src),
        "--tokenizer",
        str(tok_file),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_plain_prepare_refuses_the_conversation_builtin(tmp_path, capsys):
    assert main(["prepare", "--source", "builtin:stdlib-chat", "--out", str(tmp_path / "o")]) == 2
    assert "prepare it with --chat" in capsys.readouterr().err


def test_hub_datasets_of_conversations_stream_like_files(tmp_path, monkeypatch):
    from lmforge.data.chat_records import ChatRecords, conversation_text
    from lmforge.data.files import Skips
    from lmforge.data.hub import MIRROR_ENV
    from lmforge.data.sources import iter_documents

    convs = _conversations(3, seed=9)
    repo = tmp_path / "mirror" / "org" / "chats"
    repo.mkdir(parents=True)
    _jsonl(
        repo / "train.jsonl",
        [{"messages": c} for c in convs] + [{"messages": [{"role": "user", "content": "q"}]}],
    )
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror"))
    skipped = Skips()
    docs = list(iter_documents("hf:org/chats", skipped=skipped, text_field=ChatRecords()))
    assert [d.text for d in docs] == [conversation_text(c) for c in convs]
    assert skipped == {"no_assistant_turn": 1} and docs[0].name == "hf:org/chats:@train#0"
