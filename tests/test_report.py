"""The report card of a run (report.md, report.html) and the model card of an export (README.md)."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import lmforge
from lmforge import report_render
from lmforge.checkpoint import latest_checkpoint, read_metrics
from lmforge.cli import EXIT_PREEMPTED, main
from lmforge.model import GPT, flops_per_token, param_breakdown
from lmforge.model.config import ModelConfig
from lmforge.provenance import code_version
from lmforge.report import hub_datasets, run_facts, write_report

from .conftest import FAST, TINY_MODEL

SRC = Path(lmforge.__file__).resolve().parent
REPORTED = [*FAST, "--log.report=true"]  # FAST turns the report off for every other test


def train_args(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), *TINY_MODEL, *REPORTED, *extra]


def poison(monkeypatch, bad_calls):
    """Training forwards number `bad_calls` (1-based) return a NaN loss: those steps are skipped."""
    real, calls = GPT.forward, {"n": 0}

    def forward(self, idx, targets=None, **kwargs):
        out = real(self, idx, targets, **kwargs)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", forward)


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    """A 12-step run with evaluations, checkpoints, samples, and one non-finite step (step 3)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    args = ["--train.max_steps=12", "--eval.every=6", "--checkpoint.every=6", "--log.sample_every=1"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            poison(mp, {3})
            assert main(train_args(tiny_data, run, *args, "--log.sample_tokens=8")) == 0
    finally:
        torch.set_num_threads(n)
    return run


def evals(run):
    return [r for r in read_metrics(run) if r["type"] == "eval"]


def section(md: str, title: str) -> str:
    """The text of one `## title` section of report.md."""
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


# --- the report card --------------------------------------------------------------------------------


def test_a_finished_run_has_a_report_card_with_its_facts(finished, tiny_data):
    md = (finished / "report.md").read_text(encoding="utf-8")
    page = (finished / "report.html").read_text(encoding="utf-8")
    assert (finished / "report_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training curves](report_curves.png)" in md

    final = evals(finished)[-1]
    assert final["step"] == 12
    results = section(md, "Results")
    assert (
        "| status | finished |" in results
        and f"{final['val_loss']:.4f}" in results
        and "at step 12" in results
    )
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, context_len=64, seq_len=32, vocab_size=308).resolved()
    trained = section(md, "What was trained")
    assert f"({param_breakdown(cfg)['total']:,})" in trained and f"{flops_per_token(cfg):.3g}" in trained
    assert "12 of 12 steps" in trained
    data = section(md, "Data")
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert (
        meta["fingerprint"] in data
        and meta["tokenizer_id"] in data
        and f"{meta['splits']['train']['tokens']:,}" in data
    )
    compute = section(md, "Compute")
    assert "| device | cpu, " in compute and "1 start(s)" in compute and "tokens/s" in compute
    assert "GPU-hours" not in compute and "MFU" not in compute  # CPU: neither is measured
    incidents = section(md, "Resumes and incidents")
    assert "1 non-finite step(s) skipped (no update): step 3" in incidents
    samples = [json.loads(line) for line in (finished / "samples.jsonl").read_text().splitlines()]
    assert section(md, "Samples (step 12)").count("```text") == len([s for s in samples if s["step"] == 12])
    # the HTML holds the same facts and embeds the curves itself
    assert f"{final['val_loss']:.4f}" in page and meta["fingerprint"] in page
    assert page.count("src='data:image/png;base64,") == 1
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", page)  # nothing fetched from anywhere


def test_the_code_version_is_the_git_commit_of_the_source(finished, tmp_path):
    code = run_facts(finished)["code"]
    head = subprocess.run(["git", "-C", str(SRC), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:  # an installed copy: no checkout, so nothing but the version
        assert set(code) == {"lmforge"}
        return
    status = subprocess.run(
        ["git", "-C", str(SRC), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    assert code == {
        "lmforge": lmforge.__version__,
        "commit": head.stdout.strip(),
        "dirty": bool(status.stdout.strip()),
    }
    assert code["commit"] in (finished / "report.md").read_text()
    assert code_version(tmp_path) == {"lmforge": lmforge.__version__}  # not a checkout: no commit claimed


def test_a_signal_then_a_resume_show_in_the_report(tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = ["--train.max_steps=8", "--eval.every=4", "--checkpoint.every=4"]
    monkeypatch.setenv("LMFORGE_TEST_SIGNAL_AT", "SIGTERM@5")
    assert main(train_args(tiny_data, run, *args)) == EXIT_PREEMPTED
    first = section((run / "report.md").read_text(), "Resumes and incidents")
    assert "stopped by SIGTERM at step 5" in first and "resumed" not in first  # written at the stop too
    monkeypatch.delenv("LMFORGE_TEST_SIGNAL_AT")
    assert main(train_args(tiny_data, run, *args)) == 0

    md = (run / "report.md").read_text()
    incidents = section(md, "Resumes and incidents")
    assert "stopped by SIGTERM at step 5; the checkpoint of that step was saved" in incidents
    assert "resumed at step 5 from checkpoints/step_0000005" in incidents
    assert incidents.index("stopped by SIGTERM") < incidents.index("resumed at step 5")
    assert "| status | finished |" in md and "2 start(s)" in section(md, "Compute")
    ends = [r for r in read_metrics(run) if r["type"] == "end"]
    assert [(e["status"], e["signal"], e["step"]) for e in ends] == [
        ("preempted", "SIGTERM", 5),
        ("finished", None, 8),
    ]
    assert run_facts(run)["compute"]["wall_s"] == pytest.approx(sum(e["wall_s"] for e in ends))


def _train_in_child(argv: list[str]) -> None:
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process is killed)
    os.environ["LMFORGE_TEST_SIGNAL_AT"] = "SIGKILL@6"  # killed after step 6: no end line, no report
    os._exit(main(argv))


def test_a_killed_run_then_resumed_shows_the_crash_and_the_rollback(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ["--train.max_steps=8", "--checkpoint.every=4", "--eval.every=0"]
    # a forked child: a real process of its own, killed for good (SIGKILL cannot be caught)
    proc = multiprocessing.get_context("fork").Process(
        target=_train_in_child, args=(train_args(tiny_data, run, *args),)
    )
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -signal.SIGKILL
    assert not (run / "report.md").exists() and latest_checkpoint(run).name == "step_0000004"
    assert max(r["step"] for r in read_metrics(run)) == 5  # step 6 was killed before its line
    assert main(train_args(tiny_data, run, *args)) == 0

    incidents = section((run / "report.md").read_text(), "Resumes and incidents")
    assert "killed or crashed after step 5 (the run wrote no end line)" in incidents
    assert "rolled back from step 5 to step 4: the steps after 4 were trained again" in incidents
    assert "resumed at step 4 from checkpoints/step_0000004" in incidents
    compute = run_facts(run)["compute"]
    assert compute["untimed_starts"] == 0 and compute["wall_s"] > 0  # the killed start timed by its heartbeat


def test_a_resume_from_an_earlier_checkpoint_is_a_rollback_not_a_crash(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ["--train.max_steps=4", "--checkpoint.every=2", "--eval.every=0"]
    assert main(train_args(tiny_data, run, *args)) == 0
    assert main(train_args(tiny_data, run, *args, f"--resume={run / 'checkpoints/step_0000002'}")) == 0
    md = (run / "report.md").read_text()
    incidents = section(md, "Resumes and incidents")
    assert "rolled back from step 4 to step 2" in incidents
    assert "resumed at step 2 from checkpoints/step_0000002" in incidents
    assert "killed" not in incidents  # the first start's end line outlives the rollback
    assert "4 of 4 steps" in section(md, "What was trained")
    assert [r["step"] for r in read_metrics(run) if r["type"] == "train"] == [1, 2, 3, 4]  # steps once each


def test_gpu_runs_show_mfu_and_gpu_hours_over_every_start(finished, tmp_path):
    # the lines a GPU run writes (no GPU here): 8 processes for an hour, then 4 for half an hour
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(finished / "config.yaml", run / "config.yaml")
    start = {"type": "start", "precision": "bf16", "device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3"}
    lines = [
        {**start, "step": 0, "tokens": 0, "time": 0.0, "world_size": 8},
        {"type": "train", "step": 10, "tokens": 1000, "train_loss": 3.0, "tok_per_s": 100.0, "mfu": 0.40},
        {
            "type": "end",
            "step": 10,
            "tokens": 1000,
            "status": "preempted",
            "signal": "SIGUSR1",
            "wall_s": 3600.0,
        },
        {**start, "step": 10, "tokens": 1000, "time": 5000.0, "world_size": 4},
        {"type": "train", "step": 20, "tokens": 2000, "train_loss": 2.5, "tok_per_s": 300.0, "mfu": 0.50},
        {"type": "end", "step": 20, "tokens": 2000, "status": "finished", "signal": None, "wall_s": 1800.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    compute = run_facts(run)["compute"]
    assert compute["gpu_hours"] == pytest.approx(8 * 1.0 + 4 * 0.5) and compute["wall_s"] == 5400.0
    assert compute["mfu"] == pytest.approx(0.45) and compute["tok_per_s_overall"] == pytest.approx(
        2000 / 5400
    )
    write_report(run)
    md = section((run / "report.md").read_text(), "Compute")
    assert "| device | NVIDIA H100 80GB HBM3, bf16, 8 process(es) |" in md and ", 4 process(es) |" in md
    assert "| MFU | 45.0% (mean of logged steps) |" in md and "| GPU-hours | 10 |" in md
    assert "stopped by SIGUSR1 at step 10" in (run / "report.md").read_text()


def test_hostile_text_is_escaped_in_html_and_markdown(finished, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    hostile = "<script>alert(1)</script></pre><img src=x onerror=alert(2)> | ``` \x1b[31m"
    with open(run / "samples.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 99, "tokens": 0, "prompt": "<b>p</b>", "text": hostile}) + "\n")
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"type": "rollback", "step": 12, "reason": hostile}) + "\n")

    def unsafe(page: str) -> bool:
        return bool(re.search(r"<script|<img src=x", page, re.I))  # as markup, not as escaped text

    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    assert not unsafe(page) and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "\x1b" not in page
    md = (run / "report.md").read_text(encoding="utf-8")
    outside_fences = re.sub(r"^(`{3,})text\n.*?^\1$", "", md, flags=re.S | re.M)
    assert not unsafe(outside_fences) and "rollback at step 12" in outside_fences
    assert "<script>alert(1)</script>" in md  # the sample, verbatim inside its code fence

    # negative control: without escaping the same check finds the script
    monkeypatch.setattr(report_render.html, "escape", lambda s, quote=True: s)
    write_report(run)
    assert unsafe((run / "report.html").read_text(encoding="utf-8"))


def test_lmforge_report_regenerates_and_refuses_a_non_run(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for name in ("report.md", "report.html", "report_curves.png"):
        (run / name).unlink()
    report = {
        "checkpoint": str(run / "checkpoints/step_0000012"),
        "source": "x (val)",
        "lm": {"loss": 1.25, "bpb": 0.5},
    }
    (run / "eval.json").write_text(json.dumps(report))
    assert main(["report", str(run)]) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    assert "| lmforge eval | loss 1.2500, bpb 0.5000 on x (val) |" in (run / "report.md").read_text()
    assert (run / "report_curves.png").is_file()

    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a run directory" in err


def test_without_matplotlib_the_report_is_written_without_curves(finished, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "report_curves.png").unlink()
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    write_report(run)
    page, md = (run / "report.html").read_text(), (run / "report.md").read_text()
    assert "<img" not in page and "pip install &#x27;lmforge[plot]&#x27;" in page
    assert "pip install 'lmforge[plot]'" in md and "lmforge report RUN_DIR" in md
    assert not (run / "report_curves.png").exists() and "| status | finished |" in md


def test_a_failing_report_is_one_warning_and_the_run_still_succeeds(tiny_data, tmp_path, monkeypatch, capsys):
    def broken(path):
        raise OSError("disk on fire")

    monkeypatch.setattr("lmforge.report.write_report", broken)
    assert main(train_args(tiny_data, tmp_path / "run", "--train.max_steps=2", "--eval.every=0")) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "report card was not written" in line]
    assert len(warnings) == 1 and "disk on fire" in warnings[0] and "lmforge report" in warnings[0]
    assert not (tmp_path / "run/report.md").exists()


# --- the browser check -------------------------------------------------------------------------------

C0_BLUE = (31, 119, 180)  # matplotlib's first line colour (#1f77b4); the page's styles never use it


def screenshot(page: Path, out: Path) -> int:
    """Open the page in headless Chromium; the number of pixels of the curves' line colour shown."""
    from PIL import Image

    cmd = [
        shutil.which("chromium"),
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={out.parent / 'profile'}",
        "--window-size=1000,1400",
        f"--screenshot={out}",
        page.resolve().as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)  # (H, W, 3)
    return int((np.abs(pixels - np.array(C0_BLUE)).max(axis=-1) <= 12).sum())


def test_the_html_shows_its_curves_in_a_browser(finished, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed: apt-get install -y chromium (Debian) runs this browser check")
    drawn = screenshot(finished / "report.html", tmp_path / "shot.png")
    assert drawn > 500, drawn  # the loss, lr, gradient-norm and tokens/s lines are on screen
    # negative control: the same page with its image data broken shows no curve
    broken = tmp_path / "broken.html"
    page = (finished / "report.html").read_text()
    broken.write_text(page.replace("base64,iVBOR", "base64,AAAA"))
    assert screenshot(broken, tmp_path / "broken.png") < 50


# --- the model card ---------------------------------------------------------------------------------


def card_numbers(card) -> dict[str, float]:
    """{metric type: value} of the card's first model-index result (the run's validation)."""
    first = card.data.eval_results[0]
    return {
        r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_name == first.dataset_name
    }


def matches_run(card, run) -> bool:
    """Whether the card's validation numbers are the run's last evaluation, exactly."""
    final = evals(run)[-1]
    want = {"loss": final["val_loss"], "perplexity": final["val_ppl"], "bpb": final["val_bpb"]}
    return card_numbers(card) == want


def test_hf_export_has_a_model_card_with_the_runs_numbers(finished, tmp_path, capsys):
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    report = {
        "checkpoint": str(run / "checkpoints/step_0000012"),
        "source": "/private/x (val)",
        "lm": {"loss": 1.5, "top1_acc": 0.25},
        "harness": {  # what `lmforge eval --harness` keeps: lm-eval's own metric names
            "checkpoint": str(run / "checkpoints/step_0000012"),
            "tasks": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.375, "acc_stderr,none": 0.05}},
            "n_shot": {"arc_easy": 0},
        },
    }
    (run / "eval.json").write_text(json.dumps(report))
    # the accuracies an eval line may hold (downstream tasks), whatever their keys
    lines = (run / "metrics.jsonl").read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if '"type": "eval"' in line)
    extra = {"tasks": {"hellaswag": {"acc": 0.3125}}, "centered_acc": 0.1}
    lines[last] = json.dumps({**json.loads(lines[last]), **extra})
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "hf"
    assert (
        main(["export", "--run", str(run), "--format", "hf", "--out", str(out), "--license", "Apache-2.0"])
        == 0
    )
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert "lmforge" in card.data.tags and card.data.pipeline_tag == "text-generation"
    assert matches_run(card, run)
    by_name = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert by_name["Loss (lmforge eval)"] == 1.5 and by_name["Next-token accuracy (lmforge eval)"] == 0.25
    tasks = {(r.task_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert tasks[("hellaswag", "accuracy")] == 0.3125 and tasks[("centered_acc", "centered_acc")] == 0.1
    assert "| downstream (step 12) | tasks.hellaswag.acc 0.3125, centered_acc 0.1000 |" in card.content
    assert (
        by_name["arc_easy acc (lm-eval, 0-shot)"] == 0.375
        and "| lm-eval arc_easy (0-shot) | acc 0.3750 |" in card.content
    )
    assert not any("stderr" in name for name in by_name)
    assert "/private" not in card.content and str(tmp_path) not in card.content  # no local paths
    assert "No license was given" not in card.content and "AutoModelForCausalLM" in card.content
    assert "## What was trained" in card.content and "apply_chat_template" not in card.content
    torch.manual_seed(0)
    assert run_snippet(card.content, out).strip()  # the usage snippet runs and prints a continuation

    # negative control: one number changed and the comparison fails
    text = (out / "README.md").read_text()
    final = evals(run)[-1]["val_loss"]
    wrong = tmp_path / "wrong.md"
    wrong.write_text(text.replace(f"value: {final}", f"value: {final + 0.01}", 1))
    assert f"value: {final}" in text and not matches_run(ModelCard.load(wrong), run)


def run_snippet(card_text: str, folder: Path) -> str:
    """Run the card's Python usage snippet on the export `folder`; what it prints."""
    code = re.search(r"```python\n(.*?)```", card_text, re.S).group(1)
    code = re.sub(r"model_dir = .*", f"model_dir = {str(folder)!r}", code)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (the card's own snippet)
    return out.getvalue()


def test_the_hf_cards_chat_snippet_runs_on_a_chat_export(tiny_data, tmp_path):
    from huggingface_hub import ModelCard

    from tests.gen_helpers import make_run

    run = make_run(tiny_data, tmp_path / "chat", chat=True)
    out = tmp_path / "hf"
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert "chat" in card.data.tags and "apply_chat_template" in card.content
    assert "has no validation result" in card.content and not card.data.eval_results  # nothing measured
    torch.manual_seed(0)
    assert run_snippet(card.content, out).endswith(
        "\n"
    )  # it ran to its print (a random model may say nothing)


def test_eval_json_of_another_checkpoint_is_left_out_of_the_card(finished, tmp_path):
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    report = {"checkpoint": "elsewhere/checkpoints/step_0000006", "source": "x", "lm": {"loss": 1.5}}
    (run / "eval.json").write_text(json.dumps(report))  # a path relative to another folder: found by name
    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    card = ModelCard.load(tmp_path / "st/README.md")
    assert card.data.library_name == "lmforge" and card.data.license is None
    assert "No license was given" in card.content
    assert matches_run(card, run) and all(r.metric_value != 1.5 for r in card.data.eval_results)


def test_gguf_card_names_hub_datasets_and_a_chat_tokenizer_gets_a_chat_snippet(finished, tiny_data, tmp_path):
    from huggingface_hub import ModelCard

    from lmforge.data import Tokenizer
    from lmforge.data.chat_template import with_chat_tokens

    assert hub_datasets(["hf:allenai/c4:en@train", "fineweb", "/data/mine", "kaggle:a/b", "c4"]) == [
        "allenai/c4",
        "HuggingFaceFW/fineweb",
    ]
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_data, data)
    shutil.copytree(finished, run)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["sources"].append({"source": "hf:roneneldan/TinyStories", "weight": None})
    (data / "manifest.json").write_text(json.dumps(manifest))
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "data": str(data)}))
    with_chat_tokens(Tokenizer.load(run / "tokenizer.json")).save(run / "tokenizer.json")

    assert main(["export", "--run", str(run), "--format", "gguf", "--out", str(tmp_path / "g")]) == 0
    card = ModelCard.load(tmp_path / "g/README.md")
    assert card.data.library_name == "gguf" and card.data.datasets == ["roneneldan/TinyStories"]
    assert "chat" in card.data.tags and "llama-cli -m model.gguf -cnv" in card.content
    assert "<|user|>" in card.content and matches_run(card, run)


def test_a_license_that_is_no_identifier_is_one_line_and_nothing_is_written(finished, tmp_path, capsys):
    out = tmp_path / "hf"
    assert (
        main(["export", "--run", str(finished), "--format", "hf", "--out", str(out), "--license", "my: own"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--license" in err and not out.exists()
