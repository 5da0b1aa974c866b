"""`lmforge quickstart`: the whole path on a prepared folder, ending in Python-looking samples."""

from __future__ import annotations

from lmforge import quickstart
from lmforge.checkpoint import read_metrics
from lmforge.cli import main
from lmforge.quickstart import QUICKSTART_PROMPTS


def test_quickstart_trains_reports_bits_per_byte_and_prints_a_sample_per_prompt(
    tiny_data, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    monkeypatch.setattr(quickstart, "QUICKSTART_TASK_ITEMS", 8)  # its downstream task, kept cheap here
    # tiny_data is reused as it is (a folder that already holds prepared data is never prepared again)
    args = ["quickstart", "--data", str(tiny_data), "--out", str(run), "--max-tokens", "4096"]
    assert main([*args, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "reusing prepared data" in out
    for i, prompt in enumerate(QUICKSTART_PROMPTS, 1):
        assert f"sample {i} of {len(QUICKSTART_PROMPTS)}" in out and prompt in out
    evals = [r for r in read_metrics(run) if r["type"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 2  # 4096 tokens = 2 steps of 8 x 256
    assert all("val_bpb" in r for r in evals)
    assert "val bits per byte:" in out and f"at step {evals[-1]['step']}" in out
    # the embedded downstream task is scored at each evaluation and summed up at the end
    assert all("stdlib-next-line/acc_norm" in r and "centered_acc" in r for r in evals)
    assert "stdlib-next-line/acc_norm (pick the real next line" in out and "(chance 0.250)" in out
