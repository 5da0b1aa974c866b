"""HF export/import across transformers versions, and an imported run trained further in place."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from lmforge.checkpoint import latest_checkpoint, load_model, read_meta
from lmforge.cli import main

from .conftest import FAST, TINY_MODEL
from .test_export import inputs, make_run

ROPE_THETA = 500000.0  # Llama 3's base: far enough from transformers' default 10000 to show in the logits
# A Python with another transformers installed (e.g. 4.45, which reads rope_theta only at the top level of
# config.json); the cross-version test is skipped without it.
COMPAT_PYTHON = os.environ.get("LMFORGE_COMPAT_PYTHON")


def export_llama(tiny_data, tmp_path):
    """(run, HF folder, lmforge's fp32 logits, the input ids) of a tiny Llama with rope_theta=500000."""
    # init_std 0.1: sharper attention than the usual 0.02, so positions (and RoPE's base) show in the logits
    run = make_run(tmp_path, tiny_data, "llama-gqa", rope_theta=ROPE_THETA, init_std=0.1)
    out = tmp_path / "hf"
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(out)]) == 0
    model, cfg, _ = load_model(run)
    idx = inputs(cfg.model.vocab_size, shape=(2, 48))  # long enough for the base to matter
    with torch.no_grad():
        return run, out, model(idx), idx


def hf_logits(folder, idx):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(idx).logits


def edit_config(folder, drop_top_level=False, drop_rope_parameters=False):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    if drop_top_level:
        del cfg["rope_theta"]
    if drop_rope_parameters:
        del cfg["rope_parameters"]["rope_theta"]
    path.write_text(json.dumps(cfg))


def test_hf_export_writes_rope_theta_where_every_transformers_reads_it(tiny_data, tmp_path):
    pytest.importorskip("transformers")
    _, out, ours, idx = export_llama(tiny_data, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == ROPE_THETA
    torch.testing.assert_close(hf_logits(out, idx), ours, atol=1e-4, rtol=0)  # fp32 on both sides
    # Either key alone gives the same model: the top level is what transformers 4.x reads.
    for drop in ("drop_top_level", "drop_rope_parameters"):
        copy = tmp_path / drop
        copy.mkdir()
        for f in out.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        edit_config(copy, **{drop: True})
        torch.testing.assert_close(hf_logits(copy, idx), ours, atol=1e-4, rtol=0)
    # Negative control: without the key, transformers falls back to 10000 and the logits move.
    edit_config(out, drop_top_level=True, drop_rope_parameters=True)
    assert (hf_logits(out, idx) - ours).abs().max() > 1e-3


def test_hf_import_reads_rope_theta_from_either_place_and_refuses_two_values(tiny_data, tmp_path, capsys):
    pytest.importorskip("transformers")
    run, out, _, _ = export_llama(tiny_data, tmp_path)
    for i, drop in enumerate(("drop_top_level", "drop_rope_parameters")):
        copy = tmp_path / drop
        copy.mkdir()
        for f in out.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        edit_config(copy, **{drop: True})
        assert main(["import", f"hf:{copy}", "--out", str(tmp_path / f"imp{i}")]) == 0
        assert load_model(tmp_path / f"imp{i}")[1].model.rope_theta == ROPE_THETA
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (out / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["import", f"hf:{out}", "--out", str(tmp_path / "both")]) == 2
    err = capsys.readouterr().err.strip()
    assert "rope_theta" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "both").exists()


COMPAT_SCRIPT = """
import json, sys
import numpy as np, torch, transformers
folder, logits, ids = sys.argv[1:]
hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
with torch.no_grad():
    out = hf(torch.from_numpy(np.load(ids))).logits.numpy()
print(json.dumps({"version": transformers.__version__, "diff": float(np.abs(out - np.load(logits)).max())}))
"""


@pytest.mark.skipif(not COMPAT_PYTHON, reason="set LMFORGE_COMPAT_PYTHON to a Python with transformers 4.x")
def test_hf_export_matches_in_another_transformers_version(tiny_data, tmp_path):
    _, out, ours, idx = export_llama(tiny_data, tmp_path)
    np.save(tmp_path / "logits.npy", ours.numpy())
    np.save(tmp_path / "ids.npy", idx.numpy())

    def diff() -> float:
        args = [COMPAT_PYTHON, "-c", COMPAT_SCRIPT, str(out), str(tmp_path / "logits.npy")]
        done = subprocess.run([*args, str(tmp_path / "ids.npy")], capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])["diff"]

    assert diff() < 1e-4
    edit_config(out, drop_top_level=True)  # negative control: what this file held before 4.x was written for
    assert diff() > 1e-3


def test_imported_run_trains_further_in_place(tiny_data, tmp_path, capsys):
    pytest.importorskip("transformers")
    run, hf, imp, data2 = (tmp_path / name for name in ("run", "hf", "imp", "data2"))
    common = [*TINY_MODEL, *FAST, "--model.family=llama", "--model.seq_len=16"]
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *common, "--train.max_steps=2"]) == 0
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(hf)]) == 0
    assert main(["import", f"hf:{hf}", "--out", str(imp)]) == 0
    text = tiny_data.parent / "text"
    prep = ["prepare", "--source", str(text), "--out", str(data2), "--tokenizer", str(imp / "tokenizer.json")]
    assert main([*prep, "--val-fraction", "0.1"]) == 0
    imported_step = read_meta(latest_checkpoint(imp))["step"]

    # No model flags: the architecture is the checkpoint's, not train's defaults (context_len 1024, gpt2).
    fast = ["--train.micro_batch_size=2", "--eval.batches=1", "--log.progress=false"]
    train = ["train", "--out", str(imp), "--data", str(data2), *fast]
    assert main([*train, f"--train.max_steps={imported_step + 2}"]) == 0
    meta = read_meta(latest_checkpoint(imp))
    assert meta["step"] == imported_step + 2 and meta["config"]["model"]["family"] == "llama"
    assert meta["tokenizer_id"] and "loader" in meta  # now an ordinary, exactly resumable checkpoint
    assert main([*train, f"--train.max_steps={imported_step + 3}"]) == 0  # and it resumes as one
    assert read_meta(latest_checkpoint(imp))["step"] == imported_step + 3

    # A model setting the user does give must still match the checkpoint.
    capsys.readouterr()
    assert main([*train, f"--train.max_steps={imported_step + 4}", "--model.n_layer=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.n_layer=3 differs from the checkpoint's 2" in err and len(err.splitlines()) == 1

    # The original data: its tokenizer.json lacks the no-op post-processor the HF export added, and the
    # imported config.yaml names the model; both are the same as far as training is concerned.
    assert main(["import", f"hf:{hf}", "--out", str(tmp_path / "imp2")]) == 0
    again = ["train", "--config", str(tmp_path / "imp2/config.yaml"), "--data", str(tiny_data), *fast]
    assert main([*again, "--out", str(tmp_path / "imp2"), "--train.max_steps=1"]) == 0
    assert read_meta(latest_checkpoint(tmp_path / "imp2"))["step"] == 1
