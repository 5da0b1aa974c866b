"""Shared fixtures: a tiny prepared corpus and tiny model settings."""

from __future__ import annotations

import os
import random
import tempfile

# No test touches the network: Hugging Face libraries read these when they are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Built tokenizers are cached in a folder of this test session, never in the user's home.
os.environ["LMFORGE_CACHE"] = tempfile.mkdtemp(prefix="lmforge-test-cache-")

import pytest  # noqa: E402
import torch

from lmforge.data import prepare

# Short sequences, small batches, a metrics line every step, no progress bar, no report card (drawing its
# curves would add about a second to every run; tests/test_report.py turns it on).
FAST = [
    "--train.micro_batch_size=4",
    "--model.seq_len=32",
    "--eval.batches=2",
    "--log.every=1",
    "--log.progress=false",
    "--log.report=false",
]
TINY_MODEL = ["--model.n_layer=2", "--model.n_head=4", "--model.n_embd=32", "--model.context_len=64"]


# The tiny corpus's words, "the" three times as likely; WORDS: each once, in the same order.
CORPUS_WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "the",
    "dog",
    "ran",
    "to",
    "the",
    "park",
    "while",
    "birds",
    "sang",
    "in",
    "green",
    "trees",
]
WORDS = list(dict.fromkeys(CORPUS_WORDS))


def make_corpus(root, n_docs: int = 30, words: int = 300, seed: int = 0) -> None:
    """Deterministic little documents with enough structure to learn."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(CORPUS_WORDS) for _ in range(words))
        (root / f"doc{i:03d}.txt").write_text(text + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared DATA_DIR (byte-level BPE, vocab 320) built once per test session."""
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root / "text")
    out = root / "data"
    prepare([str(root / "text")], out, vocab_size=320, val_fraction=0.1)
    return out


@pytest.fixture(autouse=True)
def _threads():
    # Tiny models run fastest single-threaded, and results do not depend on the machine's core count.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    """A tiny run trained for 40 steps on tiny_data (a few seconds), with a val line at step 40."""
    from lmforge.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    args = ["train", "--data", str(tiny_data), "--out", str(out), *TINY_MODEL, *FAST]
    args += ["--train.max_steps=40", "--train.lr=3e-3", "--train.warmup_steps=5", "--eval.every=40"]
    assert main(args) == 0
    return out
