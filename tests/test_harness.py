"""lm-evaluation-harness on a run: `--model lmforge` against `--model hf` on the run's HF export.

The tasks are local YAML files over JSONL files this module writes (no network): multiple choice
(loglikelihood), perplexity (loglikelihood_rolling, texts longer than the model's window) and generation
(generate_until). Both model types run in fp32 on the CPU, so their log-likelihoods agree to float rounding
(1e-6 here); 1e-4 leaves room for other BLAS libraries and is still far below what other weights change.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lmforge.api import LLM
from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.config import Config
from lmforge.config_io import config_to_dict
from lmforge.data import Tokenizer
from lmforge.data.chat_template import JINJA, ChatTemplate, with_chat_tokens
from lmforge.eval.run import write_report
from lmforge.model import GPT, ModelConfig
from lmforge.serve.app import create_app

from .conftest import CORPUS_WORDS
from .serve_helpers import serving
from .test_export import make_run

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmforge.eval.harness import HarnessError, LmforgeLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
WORDS = CORPUS_WORDS
TASKS = ["demo_mc", "demo_ppl", "demo_gen"]


def yaml_task(name: str, data: Path, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}"
    )


MC = "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
MC += "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
PPL = "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
PPL_METRICS = ("word_perplexity", "bits_per_byte")
PPL += "metric_list:\n" + "".join(f"  - metric: {m}\n" for m in PPL_METRICS)
GEN = "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{choices[answer]}}'\n"
GEN += "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n  do_sample: false\n"
GEN += "metric_list:\n  - metric: exact_match\n"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, tiny_data):
    """Three task YAMLs over generated JSONL files: 20 multiple-choice items, 8 texts to score whole."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    phrase = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    items = [
        {"question": phrase(4, 9), "choices": [phrase(1, 3) for _ in range(3)], "answer": i % 3}
        for i in range(20)
    ]
    texts = [{"text": phrase(10, 160)} for _ in range(8)]
    # Perplexity must cross windows: some texts are longer than the model's 64 tokens.
    tok = Tokenizer.load(tiny_data)
    assert max(len(tok.encode(t["text"])) for t in texts) > 2 * 64
    for name, rows in (("mc.jsonl", items), ("text.jsonl", texts)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "demo_mc.yaml").write_text(yaml_task("demo_mc", root / "mc.jsonl", MC))
    (root / "demo_ppl.yaml").write_text(yaml_task("demo_ppl", root / "text.jsonl", PPL))
    (root / "demo_gen.yaml").write_text(yaml_task("demo_gen", root / "mc.jsonl", GEN))
    return root


@pytest.fixture(scope="module")
def manager(task_dir):
    return TaskManager(include_path=str(task_dir), include_defaults=False)  # lm-eval's 14k tasks: seconds


def export_hf(run: Path, out: Path) -> Path:
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(out)]) == 0
    return out


def evaluate(model, manager, tasks=TASKS, **kwargs) -> dict:
    """lm-eval's results with every sample logged (no bootstrap: the stderrs are not compared)."""
    return lm_eval.simple_evaluate(
        model=model, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0, **kwargs
    )


def hf_results(folder: Path, manager, **kwargs) -> dict:
    args = {"pretrained": str(folder), "dtype": "float32"}
    return evaluate("hf", manager, model_args=args, device="cpu", batch_size=4, **kwargs)


def loglikelihoods(results: dict, task: str) -> list[float]:
    """Every logged log-likelihood of a task, in document order (each choice of each item)."""
    out = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for resp in sample["resps"]:
            value = resp[0]
            out.append(float(value[0] if isinstance(value, (list, tuple)) else value))
    return out


def generations(results: dict) -> list[str]:
    return [s["resps"][0][0] for s in sorted(results["samples"]["demo_gen"], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def ours(trained_run, manager):
    return evaluate(LmforgeLM(run=str(trained_run), device="cpu", batch_size=4), manager)


@pytest.fixture(scope="module")
def theirs(trained_run, manager, tmp_path_factory):
    return hf_results(export_hf(trained_run, tmp_path_factory.mktemp("hf") / "hf"), manager)


@pytest.fixture(scope="module")
def other_run(tiny_data, tmp_path_factory):
    """Another run of the same shape and tokenizer with other (random) weights; init_std 1 makes its greedy
    text differ from prompt to prompt (byte soup, which both model types must decode alike)."""
    return make_run(tmp_path_factory.mktemp("other"), tiny_data, "gpt2", init_std=1.0)


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_same_accuracy_loglikelihoods_and_generations_as_hf_on_the_export(ours, theirs, other_run, manager):
    for task in ("demo_mc", "demo_ppl"):
        assert max_diff(loglikelihoods(ours, task), loglikelihoods(theirs, task)) < TOL
        assert len(ours["samples"][task]) == {"demo_mc": 20, "demo_ppl": 8}[task]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["demo_mc"][metric] == theirs["results"]["demo_mc"][metric]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["demo_ppl"][metric] == pytest.approx(
            theirs["results"]["demo_ppl"][metric], rel=1e-5
        )
    assert generations(ours) == generations(theirs) and all(generations(ours))
    # Negative control: another run's weights move every number well outside the tolerance.
    other = evaluate(LmforgeLM(run=str(other_run), device="cpu"), manager, tasks=["demo_mc", "demo_ppl"])
    for task in ("demo_mc", "demo_ppl"):
        assert max_diff(loglikelihoods(other, task), loglikelihoods(theirs, task)) > 100 * TOL


def test_lm_eval_scores_a_served_run_through_the_openai_api_as_it_scores_the_run(trained_run, manager):
    """lm-eval's `local-completions` model against `lmforge serve` (a real socket): it finds the tokenizer at
    /tokenize and scores with echo and logprobs. Given the run's context (64) as max_length, it keeps a
    token for the one it asks to draw and scores perplexity in windows of 62 (one less again), so the
    run is scored directly with max_length 62 to have the same windows."""
    llm = LLM.load(trained_run, device="cpu")
    with serving(create_app(llm, model_name="tiny")) as url:
        args = {"base_url": f"{url}/v1/completions", "model": "tiny", "max_length": 64}
        served = evaluate("local-completions", manager, model_args=args)
    direct = evaluate(LmforgeLM(run=str(trained_run), device="cpu", batch_size=4, max_length=62), manager)
    for task in ("demo_mc", "demo_ppl"):
        assert len(loglikelihoods(served, task)) == {"demo_mc": 60, "demo_ppl": 8}[task]
        assert max_diff(loglikelihoods(served, task), loglikelihoods(direct, task)) < TOL
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"]["demo_mc"][metric] == direct["results"]["demo_mc"][metric]
    assert served["results"]["demo_ppl"]["bits_per_byte,none"] == pytest.approx(
        direct["results"]["demo_ppl"]["bits_per_byte,none"], rel=1e-5
    )
    assert generations(served) == generations(direct) and all(generations(served))


def table_values(out: str) -> dict[tuple[str, str], float]:
    """(task, metric) -> value, read from lm-eval's markdown table of results in printed output."""
    values, task = {}, ""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        header = cells[0] == "Tasks" or (cells[0] and set(cells[0]) <= set("-:"))
        if not line.startswith("|") or len(cells) < 7 or header:
            continue
        task = cells[0] or task  # a task's later metrics leave its cell empty
        values[(task, cells[4])] = float(cells[6])
    return values


def gen_requests(contexts, **settings) -> list[Instance]:
    return [Instance("generate_until", {}, (c, dict(settings)), i) for i, c in enumerate(contexts)]


@pytest.fixture(scope="module")
def random_pair(other_run, tmp_path_factory):
    """The random run through both model types: its greedy text varies where the trained run repeats."""
    from lm_eval.models.huggingface import HFLM

    folder = str(export_hf(other_run, tmp_path_factory.mktemp("hf2") / "hf"))
    hf, hf_batched = (HFLM(pretrained=folder, device="cpu", batch_size=n) for n in (1, 3))
    return LmforgeLM(run=str(other_run), device="cpu", batch_size=3), hf, hf_batched


CONTEXTS = ["the cat", "birds sang in the", "park while the dog ran", "green trees and", "a mat"]


def test_generate_until_stops_where_hf_stops(random_pair):
    ours, hf, hf_batched = random_pair
    free = ours.generate_until(gen_requests(CONTEXTS, until=["\n\n"], max_gen_toks=10))
    assert free == hf_batched.generate_until(gen_requests(CONTEXTS, until=["\n\n"], max_gen_toks=10))
    assert len(set(free)) == len(free)  # varied text, so a shifted or mixed-up row would show
    # A stop string taken from inside a generation cuts the generations where it appears, as in HF's.
    stop = next(c for c in free[0][1:] if c != "\ufffd")
    cut = ours.generate_until(gen_requests(CONTEXTS, until=[stop], max_gen_toks=10))
    assert cut == [t.split(stop)[0] for t in free] and cut[0] != free[0]
    assert cut == hf.generate_until(gen_requests(CONTEXTS, until=[stop], max_gen_toks=10))
    short = ours.generate_until(gen_requests(CONTEXTS, until=["\n\n"], max_gen_toks=3))
    assert short == hf.generate_until(gen_requests(CONTEXTS, until=["\n\n"], max_gen_toks=3))
    assert all(len(s) < len(f) for s, f in zip(short, free, strict=True))
    # Sampling at temperature 1 draws other tokens than greedy decoding (a greedy-only model would not).
    sampled = ours.generate_until(gen_requests(CONTEXTS, max_gen_toks=10, do_sample=True, temperature=1.0))
    assert sampled != free


def test_batch_size_does_not_change_the_scores(random_pair):
    ours, _, _ = random_pair
    rng = random.Random(1)
    pairs = [
        (" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 80))), " " + rng.choice(WORDS))
        for _ in range(9)
    ]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    one = LmforgeLM(llm=ours.llm, batch_size=1).loglikelihood(reqs)
    seven = LmforgeLM(llm=ours.llm, batch_size=7).loglikelihood(reqs)
    assert max_diff([s for s, _ in one], [s for s, _ in seven]) < 1e-5
    assert [g for _, g in one] == [g for _, g in seven]


def chat_run(root: Path, tiny_data: Path) -> Path:
    """A run whose tokenizer has the chat template's tokens (random weights, as make_run's)."""
    tok = with_chat_tokens(Tokenizer.load(tiny_data))
    mcfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, context_len=64, vocab_size=tok.vocab_size)
    torch.manual_seed(1)
    model = GPT(mcfg)
    cfg = Config(model=mcfg, out=str(root / "chat"))
    run = Path(cfg.out)
    run.mkdir(parents=True)
    tok.save(run)
    sd = {
        k: v
        for k, v in model.state_dict().items()
        if not (cfg.model.tie_embeddings and k == "lm_head.weight")
    }
    save_checkpoint(run, 1, sd, {}, {"config": config_to_dict(cfg), "tokens": 0})
    return run


def test_chat_template_gives_the_template_ids_and_hf_numbers(tiny_data, tmp_path, manager):
    run = chat_run(tmp_path, tiny_data)
    lm = LmforgeLM(run=str(run), device="cpu")
    template = ChatTemplate.of(lm.llm.tokenizer)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat on"}]
    assert lm.tok_encode(lm.apply_chat_template(messages)) == template.prompt_ids(messages)
    opened = lm.apply_chat_template([*messages, {"role": "assistant", "content": "the mat"}], False)
    ids = lm.tok_encode(opened)
    assert ids == [*template.prompt_ids(messages), *lm.llm.tokenizer.encode("the mat")]
    assert lm.chat_template(True) == JINJA and lm.chat_template(False) is None
    # The same prompts and numbers as lm-eval's HF model on the export, which carries the template's Jinja twin.
    hf = export_hf(run, tmp_path / "hf")
    chat = {"apply_chat_template": True, "limit": 6}
    ours = evaluate(lm, manager, tasks=["demo_mc"], **chat)
    theirs = hf_results(hf, manager, tasks=["demo_mc"], **chat)
    prompt = ours["samples"]["demo_mc"][0]["arguments"][0][0]
    assert prompt.startswith("<|endoftext|><|user|>") and prompt.endswith("<|assistant|>")
    assert prompt == theirs["samples"]["demo_mc"][0]["arguments"][0][0]
    assert max_diff(loglikelihoods(ours, "demo_mc"), loglikelihoods(theirs, "demo_mc")) < TOL
    plain = evaluate(lm, manager, tasks=["demo_mc"], limit=6)  # control: the template changes the numbers
    assert max_diff(loglikelihoods(plain, "demo_mc"), loglikelihoods(ours, "demo_mc")) > 100 * TOL


def test_a_base_run_refuses_chat_templating_in_one_line(trained_run, manager, task_dir, tmp_path, capsys):
    lm = LmforgeLM(run=str(trained_run), device="cpu")
    with pytest.raises(HarnessError, match="has no chat template"):
        evaluate(lm, manager, tasks=["demo_mc"], apply_chat_template=True, limit=2)
    capsys.readouterr()
    args = ["eval", "--run", str(trained_run), "--harness", "demo_mc", "--include-path", str(task_dir)]
    assert main([*args, "--apply-chat-template", "--device", "cpu", "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no chat template" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e.json").exists()


def test_model_args_are_checked(random_pair):
    with pytest.raises(HarnessError, match="pretrained_model"):
        LmforgeLM(run="x", pretrained_model="y")
    with pytest.raises(HarnessError, match="run=RUN_DIR"):
        LmforgeLM()
    llm = random_pair[0].llm
    with pytest.raises(HarnessError, match="its context_len"):
        LmforgeLM(llm=llm, max_length=65)
    with pytest.raises(HarnessError, match="batch_size"):
        LmforgeLM(llm=llm, batch_size="many")
    assert LmforgeLM(llm=llm, batch_size="auto:4", max_length="32").batch_size == 8


def test_cli_harness_prints_the_numbers_and_keeps_eval_json(trained_run, tmp_path, task_dir, ours, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "eval.json").write_text(json.dumps({"lm": {"loss": 1.5}, "checkpoint": "c"}))
    args = ["eval", "--run", str(run), "--harness", "demo_mc,demo_ppl", "--include-path", str(task_dir)]
    capsys.readouterr()
    assert main([*args, "--device", "cpu", "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    assert report["lm"] == {"loss": 1.5} and report["checkpoint"] == "c"  # lmforge's own sections stay
    harness = report["harness"]
    assert harness["lm_eval_version"] == lm_eval.__version__ and harness["n_shot"]["demo_mc"] == 0
    printed = table_values(out)  # lm-eval's table, as `lm_eval` prints it
    assert set(printed) == {
        ("demo_mc", "acc"),
        ("demo_mc", "acc_norm"),
        *(("demo_ppl", m) for m in PPL_METRICS),
    }
    for (task, metric), value in printed.items():
        assert harness["tasks"][task][f"{metric},none"] == pytest.approx(
            ours["results"][task][f"{metric},none"]
        )
        assert value == pytest.approx(harness["tasks"][task][f"{metric},none"], abs=5e-5)  # 4 decimals
    # --num-fewshot and --limit reach lm-eval
    assert main([*args, "--device", "cpu", "--num-fewshot", "2", "--limit", "5"]) == 0
    harness = json.loads((run / "eval.json").read_text())["harness"]
    assert harness["n_shot"]["demo_mc"] == 2 and harness["n_samples"]["demo_mc"]["effective"] == 5


def test_cli_harness_errors_are_one_line(trained_run, task_dir, tmp_path, monkeypatch, capsys):
    import lm_eval.tasks

    # An unknown name makes lmforge index lm-eval's own 14,000 tasks too (many seconds): here, only the folder.
    def only_folder(include_path=None, **kwargs):
        return TaskManager(include_path=include_path, include_defaults=False)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", only_folder)
    base = ["eval", "--run", str(trained_run), "--device", "cpu", "--out", str(tmp_path / "e.json")]
    hub = tmp_path / "hub_task.yaml"  # data on the hub, not in the cache, and the hub out of reach (offline)
    hub.write_text(MC.replace("output_type", "task: hub_task\ndataset_path: nobody/none\noutput_type"))
    cases = [
        ([*base, "--harness", "no_such_task", "--include-path", str(task_dir)], "no task named no_such_task"),
        ([*base, "--harness", str(hub)], "a task's data could not be fetched (Couldn't reach 'nobody/none'"),
        ([*base, "--harness", str(tmp_path / "t.yaml")], "no such task file"),
        ([*base, "--harness", "demo_mc", "--include-path", str(task_dir / "nope")], "no such folder"),
        ([*base, "--harness", "demo_mc", "--data", "x"], "--data: lmforge's own measurements"),
        ([*base, "--limit", "3"], "--limit: only with --harness"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "e.json").exists()


def test_without_lm_eval_harness_says_how_to_install(trained_run, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    capsys.readouterr()
    out = str(tmp_path / "e.json")
    assert main(["eval", "--run", str(trained_run), "--harness", "hellaswag", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'lmforge[eval]'" in err and len(err.splitlines()) == 1


def test_a_full_eval_keeps_the_harness_section_only(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"harness": {"tasks": {}}, "quantization": {"kernel": "x"}, "lm": {}}))
    write_report({"lm": {"loss": 2.0}}, path)
    assert json.loads(path.read_text()) == {"harness": {"tasks": {}}, "lm": {"loss": 2.0}}


# ---- `lm_eval --model lmforge` in a fresh process, as installed ---------------------------------------


def build_wheel(tmp_path: Path, hook: str) -> Path:
    """A wheel (hook build_wheel) or editable wheel (build_editable) of a copy of this source tree."""
    src = tmp_path / "src-copy"
    if not src.exists():
        shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for name in ("pyproject.toml", "setup.py", "README.md"):
            shutil.copy(ROOT / name, src / name)
    out = tmp_path / hook
    code = f"import sys; from setuptools import build_meta; print(build_meta.{hook}(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True, check=True
    )
    return out / done.stdout.strip().splitlines()[-1]


def test_lm_eval_console_script_finds_model_lmforge(tmp_path, trained_run, task_dir, ours):
    wheels = [build_wheel(tmp_path, "build_wheel"), build_wheel(tmp_path, "build_editable")]
    for wheel in wheels:  # pip installs the line at the top of site-packages, from either wheel
        with zipfile.ZipFile(wheel) as z:
            assert z.read("lmforge-lm-eval.pth").decode().startswith("import lmforge.eval.lm_eval_plugin")
            entry_points = z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()
            assert "[lm_eval.models]\nlmforge = lmforge.eval.harness:LmforgeLM" in entry_points
    site = tmp_path / "site"
    zipfile.ZipFile(wheels[0]).extractall(site)
    # The unpacked wheel becomes a site folder (so Python runs its .pth) the way a venv's is: at start-up.
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "sitecustomize.py").write_text(f"import site\nsite.addsitedir({str(site)!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(boot)])}
    lm_eval_script = Path(sys.executable).parent / "lm_eval"
    args = [
        str(lm_eval_script),
        "--model",
        "lmforge",
        "--model_args",
        f"run={trained_run}",
        "--device",
        "cpu",
    ]
    args += ["--tasks", "demo_mc", "--include_path", str(task_dir), "--limit", "10", "--batch_size", "4"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    acc = sum(s["acc"] for s in ours["samples"]["demo_mc"] if s["doc_id"] < 10) / 10
    assert table_values(done.stdout)[("demo_mc", "acc")] == pytest.approx(acc)
    # Negative control: without the finder the .pth installs, lm-eval does not know the name.
    code = (
        "import sys; from lmforge.eval import lm_eval_plugin as p; "
        "sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, p._Finder)]; "
        "from lm_eval.api.registry import get_model; get_model('lmforge')"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "no model for this name" in done.stderr
