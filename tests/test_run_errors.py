"""Inputs a careless user gives `lmforge train` that used to be tracebacks: one line each, exit 2."""

from __future__ import annotations

import pytest
import torch

from lmforge.cli import main

from .conftest import FAST, TINY_MODEL


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_on_a_machine_without_a_gpu(tiny_data, tmp_path, capsys):
    args = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--train.device=cuda"]
    assert main([*args, *TINY_MODEL, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "lmforge: error: train.device='cuda': no CUDA GPU is visible; use --train.device=cpu or auto"
    )
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_data_too_short_for_the_windows_is_refused_before_the_run_folder_is_made(tiny_data, tmp_path, capsys):
    long = ["--model.seq_len=4096", "--model.context_len=4096"]  # more than the tiny val split holds
    args = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), *TINY_MODEL, *FAST, *long]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "fewer than seq_len + 1 = 4097: use a smaller seq_len or prepare more data" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "r").exists()  # no half-made run to resume


def test_a_data_folder_given_as_a_run_is_named_as_one(tiny_data, capsys):
    assert main(["generate", "--run", str(tiny_data), "--prompt", "the"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"lmforge: error: '{tiny_data}' is a data folder, not a run: pass a RUN_DIR "
        f"(`lmforge train --data {tiny_data} --out RUN_DIR` makes one)"
    )  # it said to train into the data folder


def test_data_naming_a_file(tiny_data, tmp_path, capsys):
    meta = tiny_data / "meta.json"
    assert main(["train", "--data", str(meta), "--out", str(tmp_path / "r"), *TINY_MODEL, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"lmforge: error: data folder '{meta}' is a file: pass the folder that `lmforge prepare --out` wrote"
    )


def test_prepare_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    from lmforge.data.shards import ShardWriter

    from .conftest import make_corpus

    make_corpus(tmp_path / "text", n_docs=5, words=50)
    out = tmp_path / "data"

    def full(self, ids):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardWriter, "write", full)
    args = ["prepare", "--source", str(tmp_path / "text"), "--out", str(out), "--vocab-size", "300"]
    assert main([*args, "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error: could not write the prepared data") and "No space left" in err
    assert err.endswith(f"free space; {out} is unchanged") and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".data.tmp-*"))  # nothing half-written stays


def test_a_run_trained_with_a_relative_data_path_is_evaluated_from_elsewhere(
    tiny_data, tmp_path, monkeypatch
):
    import os

    monkeypatch.chdir(tiny_data.parent)
    run = tmp_path / "run"
    args = ["train", "--data", tiny_data.name, "--out", str(run), *TINY_MODEL, *FAST, "--train.max_steps=2"]
    assert main(args) == 0
    monkeypatch.chdir(tmp_path)  # another folder: "data" relative to it does not exist
    assert not os.path.exists(tiny_data.name)
    out = tmp_path / "eval.json"
    eval_args = ["eval", "--run", str(run), "--batches", "1", "--no-speed", "--max-new-tokens", "2"]
    assert main([*eval_args, "--out", str(out), "--device", "cpu"]) == 0
    assert out.is_file()
