"""prepare -> train -> generate end to end, metrics, checkpoints, and resume at the right step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge.checkpoint import latest_checkpoint, list_checkpoints, load_model, read_metrics
from lmforge.cli import main
from lmforge.train.optim import lr_at

from .conftest import FAST, TINY_MODEL, make_corpus

# The numbers here follow precision=auto, which differs between CPUs: CI also runs this file with
# LMFORGE_CPU_BF16=1 and =0.
pytestmark = pytest.mark.precision


def train_args(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), *TINY_MODEL, *FAST, *extra]


def test_prepare_train_generate_end_to_end(tmp_path, capsys):
    make_corpus(tmp_path / "text", n_docs=20)
    data = tmp_path / "data"
    assert (
        main(["prepare", "--source", str(tmp_path / "text"), "--out", str(data), "--vocab-size", "300"]) == 0
    )
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    for key in ("tokens", "documents"):
        assert meta["splits"]["train"][key] > 0 and meta["splits"]["val"][key] > 0
    assert meta["val_bytes_per_token"] > 1

    run = tmp_path / "run"
    args = train_args(
        data,
        run,
        "--train.max_steps=30",
        "--train.lr=3e-3",
        "--train.warmup_steps=5",
        "--eval.every=10",
        "--checkpoint.every=10",
        "--checkpoint.keep_last=2",
    )
    assert main(args) == 0
    # the run directory is self-contained and describes itself
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == 300 and saved["train"]["max_steps"] == 30
    assert (run / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    assert [p.name for p in list_checkpoints(run)] == ["step_0000020", "step_0000030"]  # keep_last=2
    assert latest_checkpoint(run).name == "step_0000030"
    ckpt_meta = json.loads((run / "checkpoints/step_0000030/meta.json").read_text())
    assert ckpt_meta["step"] == 30 and ckpt_meta["tokens"] == 30 * 4 * 32
    assert ckpt_meta["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert set(ckpt_meta["files"]) == {"model.safetensors", "train_state.safetensors"}

    records = read_metrics(run)
    train_lines = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train_lines] == list(range(1, 31))
    for key in ("step", "tokens", "train_loss", "lr", "grad_norm", "tok_per_s"):
        assert key in train_lines[0]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["val_bpb"] < 0.8 * evals[0]["val_bpb"]  # it learned
    assert evals[0]["val_loss"] == pytest.approx(
        evals[0]["val_bpb"] * 0.6931471805599453 * meta["val_bytes_per_token"]
    )

    capsys.readouterr()
    gen = ["generate", "--run", str(run), "--prompt", "the cat", "--max-new-tokens", "12", "--seed", "3"]
    assert main(gen) == 0
    first = capsys.readouterr().out
    assert first.startswith("the cat") and len(first.strip()) > len("the cat")
    assert main([*gen, "--stream"]) == 0
    assert capsys.readouterr().out == first  # same seed, same text, streamed or not


def test_both_families_train_by_choosing_a_config(tiny_data, tmp_path):
    for preset in ("tiny", "modern-tiny"):
        run = tmp_path / preset
        assert main(train_args(tiny_data, run, f"--preset={preset}", "--train.max_steps=3")) == 0
        model, cfg, _ = load_model(run)
        assert cfg.model.family == ("llama" if preset.startswith("modern") else "gpt2")
        assert cfg.model.n_layer == 2  # the command line wins over the preset


def test_resume_continues_at_the_right_step_with_identical_results(tiny_data, tmp_path):
    straight = tmp_path / "straight"
    args = ["--train.max_steps=8", "--checkpoint.every=4", "--eval.every=0", "--model.dropout=0.1"]
    assert main(train_args(tiny_data, straight, *args)) == 0

    # Interrupted copy: keep only the step-4 checkpoint and the metrics up to step 4, then run again.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints/step_0000008")
    (resumed / "checkpoints/latest").write_text("step_0000004\n")
    kept = [r for r in read_metrics(straight) if r["step"] <= 4]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert main(train_args(tiny_data, resumed, *args)) == 0

    def losses(run):
        return [(r["step"], r["train_loss"]) for r in read_metrics(run) if r["type"] == "train"]

    assert [s for s, _ in losses(resumed)] == list(range(1, 9))  # continued at step 5, not from 0
    assert losses(resumed) == losses(straight)  # exact float equality
    a = load_file(str(straight / "checkpoints/step_0000008/model.safetensors"))
    b = load_file(str(resumed / "checkpoints/step_0000008/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_architecture_is_refused(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, "--train.max_steps=2")) == 0
    capsys.readouterr()
    assert main(train_args(tiny_data, run, "--train.max_steps=4", "--model.n_layer=3")) == 2
    err = capsys.readouterr().err
    assert "model.n_layer=3 differs from the checkpoint's 2" in err


def test_dry_run_trains_nothing(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, "--dry-run", "--train.max_steps=10")) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "FLOPs per token" in out and "memory estimate" in out
    assert not run.exists()


def test_missing_data_is_one_clear_line(tmp_path, capsys):
    assert main(train_args(tmp_path / "nope", tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert "lmforge prepare" in err and len(err.splitlines()) == 1


def test_schedule_warms_up_then_decays_to_the_floor():
    from lmforge.config import TrainConfig

    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(55, cfg, 100) == pytest.approx(0.55)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)


def test_a_checkpoint_is_saved_at_each_epoch_end(tiny_data, tmp_path):
    from lmforge.data import TokenLoader

    loader = TokenLoader(tiny_data, "train", 32, 4, seed=1337)
    epoch_end = 0
    while loader.epoch == 0:
        loader.next_batch()
        epoch_end += 1
    run = tmp_path / "run"
    args = [
        f"--train.max_steps={epoch_end + 2}",
        "--checkpoint.every=0",
        "--checkpoint.keep_last=5",
        "--eval.every=0",
    ]
    assert main(train_args(tiny_data, run, *args)) == 0
    names = [p.name for p in list_checkpoints(run)]
    assert names == [f"step_{epoch_end:07d}", f"step_{epoch_end + 2:07d}"]
