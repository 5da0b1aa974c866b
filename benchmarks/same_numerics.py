"""A digest of training numerics, for changes that must not touch them (refactors, redesigns).

Trains a tiny GPT-2 and a tiny Llama in fp32 on a generated corpus for 30 steps (an evaluation every 10,
a checkpoint at 15), then resumes a second run from the step-15 checkpoint to step 30, and prints one
JSON object: every per-step training and validation loss, bit for bit, and a SHA-256 of each run's final
weights. Run it before and after a change on the same machine; the two outputs must be identical.

    python benchmarks/same_numerics.py > before.json   # on the old commit
    python benchmarks/same_numerics.py > after.json    # on the new one
    cmp before.json after.json
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmforge.cli import main

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "dog",
    "ran",
    "to",
    "park",
    "while",
    "birds",
    "sang",
    "in",
    "green",
    "trees",
]
COMMON = [
    "--model.n_layer=2",
    "--model.n_head=4",
    "--model.n_embd=32",
    "--model.context_len=64",
    "--model.seq_len=32",
    "--train.micro_batch_size=4",
    "--train.global_batch_size=8",
    "--train.precision=fp32",
    "--train.device=cpu",
    "--train.lr=3e-3",
    "--train.warmup_steps=5",
    "--train.max_steps=30",
    "--eval.every=10",
    "--eval.batches=2",
    "--checkpoint.every=15",
    "--log.every=1",
    "--log.progress=false",
]


def quiet_main(args: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    if code != 0:
        sys.exit(f"lmforge {' '.join(args[:1])} exited {code}")


def losses(run: Path) -> list[str]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        key = {"train": "train_loss", "eval": "val_loss"}.get(r["type"])
        if key:
            out.append(f"{r['type']} {r['step']} {float(r[key]).hex()}")
    return out


def weights_sha256(run: Path) -> str:
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    tensors = load_file(str(ckpt / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digest() -> dict:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="lmforge-numerics-"))
    rng = random.Random(0)
    (root / "text").mkdir()
    for i in range(30):
        words = " ".join(rng.choice(WORDS) for _ in range(300))
        (root / "text" / f"doc{i:03d}.txt").write_text(words + "\n", encoding="utf-8")
    data = root / "data"
    quiet_main(["prepare", "--source", str(root / "text"), "--out", str(data), "--vocab-size", "320"])
    out = {}
    for family in ("gpt2", "llama"):
        straight, resumed = root / f"{family}-straight", root / f"{family}-resumed"
        base = ["train", "--data", str(data), *COMMON, f"--model.family={family}"]
        quiet_main([*base, "--out", str(straight)])
        step15 = straight / "checkpoints" / "step_0000015"
        quiet_main([*base, "--out", str(resumed), f"--resume={step15}"])
        out[family] = {
            "straight": losses(straight),
            "resumed": losses(resumed),
            "straight_weights": weights_sha256(straight),
            "resumed_weights": weights_sha256(resumed),
        }
    return out


if __name__ == "__main__":
    print(json.dumps(digest(), indent=1))
