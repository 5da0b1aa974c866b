"""Downstream scores while training: task formats, eval.tasks, centered accuracy, the stdlib task."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmforge.checkpoint import read_metrics
from lmforge.cli import main
from lmforge.config import ConfigError, EvalConfig
from lmforge.config_io import load_yaml_config
from lmforge.data import Tokenizer, prepare
from lmforge.data.passes import val_score
from lmforge.data.stdlib_corpus import iter_stdlib
from lmforge.eval import stdlib_task
from lmforge.eval.downstream import Task, centered, load_tasks, score_tasks
from lmforge.eval.tasks import Choice, TaskError, detect_format, read_multiple_choice
from lmforge.model import GPT, ModelConfig
from lmforge.quickstart import QUICKSTART_VAL_FRACTION

from .conftest import FAST, TINY_MODEL
from .conftest import WORDS as TINY_WORDS

HELLASWAG = {"ctx_a": "He opens the box.", "ctx_b": "He", "endings": ["eats it", "reads"], "label": "1"}
ARC = {
    "question": "Which gas do plants take in?",
    "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
}
ARC_NUMBERED = {
    "question": "Q?",
    "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
    "answerKey": "3",
}
MMLU = {"question": "2 + 2 =", "subject": "math", "choices": ["3", "4", "5", "22"], "answer": 1}
MMLU_LETTER = {"question": "Capital of France?", "choices": ["Rome", "Oslo", "Paris"], "answer": "C"}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ---- formats -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows,fmt,expected",
    [
        ([HELLASWAG], "hellaswag", [Choice("He opens the box. He", ("eats it", "reads"), 1)]),
        (
            [ARC, ARC_NUMBERED],
            "arc",
            [
                Choice("Question: Which gas do plants take in?\nAnswer:", tuple(ARC["choices"]["text"]), 1),
                Choice("Question: Q?\nAnswer:", ("x", "y", "z"), 2),
            ],
        ),
        (
            [MMLU, MMLU_LETTER],
            "mmlu",
            [
                Choice("Question: 2 + 2 =\nAnswer:", ("3", "4", "5", "22"), 1),
                Choice("Question: Capital of France?\nAnswer:", ("Rome", "Oslo", "Paris"), 2),
            ],
        ),
    ],
)
def test_each_format_is_detected_by_its_fields_and_read(tmp_path, rows, fmt, expected):
    path = tmp_path / f"{fmt}.jsonl"
    write_jsonl(path, rows)
    assert detect_format(path, rows[0]) == fmt
    assert read_multiple_choice(path) == expected
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))  # an editor's BOM, CRLF
    assert read_multiple_choice(path) == expected


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "a", "target": "b"}, "match no known format: expected HellaSwag (ctx or ctx_a"),
        ({**ARC, "answerKey": "E"}, "answerKey 'E' is not one of the choice labels"),
        ({**ARC, "choices": ["a", "b"]}, "ARC's 'choices' must be an object"),
        ({**MMLU, "answer": 7}, "answer 7 must be an index 0..3 or a letter of ABCD"),
        ({**MMLU, "answer": "E"}, "answer 'E' must be an index"),
        ({**MMLU, "choices": ["only"]}, "MMLU's 'choices' must be a list of at least two strings"),
    ],
)
def test_a_file_of_no_known_format_or_a_bad_item_is_one_line_naming_the_file(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [row])
    with pytest.raises(TaskError, match="bad.jsonl") as e:
        read_multiple_choice(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_eval_tasks_config_accepts_a_list_or_a_comma_string_and_checks_names():
    assert EvalConfig(tasks="a.jsonl, x/b.jsonl").tasks == ["a.jsonl", "x/b.jsonl"]
    assert EvalConfig(tasks=["builtin:stdlib-next-line", "hs=a.jsonl"]).tasks[1] == "hs=a.jsonl"
    with pytest.raises(ConfigError, match="two tasks are named 'a'"):
        EvalConfig(tasks=["a.jsonl", "other/a.jsonl"])
    with pytest.raises(ConfigError, match="without '/'"):
        EvalConfig(tasks=["a/b=x.jsonl"])
    with pytest.raises(ConfigError, match="eval.task_items=0"):
        EvalConfig(task_items=0)


def test_a_bad_task_file_stops_train_before_anything_is_written(tiny_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"prompt": "a", "target": "b"}])
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--out", str(out), *TINY_MODEL, *FAST, "--train.max_steps=2"]
    assert main([*args, f"--eval.tasks=builtin:stdlib-next-line,{bad}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "ARC (question, choices" in err
    assert "Traceback" not in err and not out.exists()


# ---- centered accuracy and the split between ranks -----------------------------------------------------


def test_centered_accuracy_is_zero_at_chance_and_one_when_perfect():
    assert centered(0.25, 0.25) == 0 and centered(1.0, 0.25) == 1 and centered(0.5, 0.5) == 0
    assert centered(0.0, 0.25) == pytest.approx(-1 / 3) and centered(0.625, 0.25) == pytest.approx(0.5)
    two_and_four = Task("t", (Choice("c", ("a", "b"), 0), Choice("c", ("a", "b", "c", "d"), 0)))
    assert two_and_four.chance == pytest.approx((1 / 2 + 1 / 4) / 2)  # averaged per item


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=320, context_len=64)).eval()


def random_items(n: int, seed: int) -> list[Choice]:
    rng = random.Random(seed)
    words = TINY_WORDS
    return [
        Choice(" ".join(rng.choices(words, k=5)), tuple(rng.sample(words, rng.choice((2, 3, 4)))), 0)
        for _ in range(n)
    ]


def test_scores_and_centered_accuracy_against_the_models_own_picks(tiny_data):
    model, tok = tiny_model(), Tokenizer.load(tiny_data / "tokenizer.json")
    items = random_items(12, seed=1)
    picks = [score_tasks(model, tok, [Task("one", (item,))])["one/acc_norm"] for item in items]
    assert set(picks) <= {0.0, 1.0}
    # Relabel each item with the ending acc_norm picks (perfect) and with one it does not (all wrong).
    from lmforge.eval.tasks import predictions

    best = [predictions(model, tok, item)[1] for item in items]
    right = Task("right", tuple(Choice(i.context, i.endings, b) for i, b in zip(items, best, strict=True)))
    wrong = Task(
        "wrong",
        tuple(
            Choice(i.context, i.endings, (b + 1) % len(i.endings)) for i, b in zip(items, best, strict=True)
        ),
    )
    scores = score_tasks(model, tok, [right])
    assert scores["right/acc_norm"] == 1.0 and scores["centered_acc"] == pytest.approx(1.0)
    scores = score_tasks(model, tok, [wrong])  # negative control: below chance is negative
    assert scores["wrong/acc_norm"] == 0.0
    assert scores["centered_acc"] == pytest.approx(-wrong.chance / (1 - wrong.chance))
    both = score_tasks(model, tok, [right, wrong])
    assert both["centered_acc"] == pytest.approx((1 - wrong.chance / (1 - wrong.chance)) / 2)
    assert model.training is False


def test_ranks_score_disjoint_items_with_the_same_number_of_forwards(tiny_data):
    """What DDP/FSDP ranks do: each scores its share, the counts add up to the one-process result, and
    every rank runs as many forwards (a sharded model's forward is a collective)."""
    model, tok = tiny_model(), Tokenizer.load(tiny_data / "tokenizer.json")
    task = Task("t", tuple(random_items(7, seed=2)))
    alone = score_tasks(model, tok, [task])
    world, counts, forwards = 3, [], []
    for rank in range(world):
        calls = []
        handle = model.register_forward_hook(lambda *_, c=calls: c.append(1))
        score_tasks(model, tok, [task], rank, world, sum_over_ranks=lambda v: counts.append(v) or v)
        handle.remove()
        forwards.append(len(calls))
    assert forwards == [3, 3, 3]  # 7 items over 3 ranks: 3, 2 and 2 items, padded to 3 forwards each
    total = [sum(c[i] for c in counts) for i in range(2)]
    assert total[0] / 7 == alone["t/acc"] and total[1] / 7 == alone["t/acc_norm"]


def test_two_fsdp_processes_score_as_one_process(tiny_data, tmp_path):
    """Under FSDP every forward is a collective: 7 items over 2 ranks (4 and 3, padded) neither hang nor
    change the scores of the one-process run (the untrained model at step 0 is the same in both)."""
    import os
    import subprocess
    import sys

    task = tmp_path / "t.jsonl"
    write_jsonl(
        task, [{"ctx": i.context, "endings": list(i.endings), "label": 0} for i in random_items(7, 3)]
    )
    args = [
        "--data",
        str(tiny_data),
        *TINY_MODEL,
        "--model.seq_len=32",
        "--train.max_steps=1",
        "--eval.batches=1",
    ]
    args += [
        "--train.micro_batch_size=2",
        "--train.device=cpu",
        "--train.precision=fp32",
        "--log.progress=false",
    ]
    args += [f"--eval.tasks={task}"]
    assert main(["train", "--out", str(tmp_path / "one"), *args, "--train.global_batch_size=4"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "lmforge",
    ]
    cmd += ["train", "--out", str(tmp_path / "two"), *args, "--train.parallel=fsdp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ([r for r in read_metrics(tmp_path / run) if r["type"] == "eval"] for run in ("one", "two"))
    assert [r["step"] for r in two] == [0, 1]
    for key in ("t/acc", "t/acc_norm", "centered_acc"):
        assert two[0][key] == one[0][key]


# ---- a training run with eval.tasks -----------------------------------------------------------------

# Short words, so that each is one token of the 320-token BPE and the pairs are quick to learn.
WORDS = ["red", "sun", "cat", "dog", "box", "cup", "map", "pen", "hat", "owl", "fig", "jar"]


def successor(word: str) -> str:
    """The word that always follows `word` in the synthetic corpus (a fixed permutation)."""
    return WORDS[(5 * WORDS.index(word) + 3) % len(WORDS)]


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory):
    """A corpus of "w successor(w)." pairs and a 4-choice task: which word follows w."""
    root = tmp_path_factory.mktemp("pairs")
    rng = random.Random(0)
    (root / "text").mkdir()
    for d in range(20):
        pairs = [rng.choice(WORDS) for _ in range(200)]
        (root / "text" / f"d{d}.txt").write_text(" ".join(f"{w} {successor(w)}." for w in pairs) + "\n")
    prepare([str(root / "text")], root / "data", vocab_size=320, val_fraction=0.1)
    rows = []
    for i in range(48):
        w = WORDS[i % len(WORDS)]
        others = rng.sample([x for x in WORDS if x != successor(w)], 3)
        label = rng.randrange(4)
        endings = [*others[:label], successor(w), *others[label:]]
        context = " ".join(f"{x} {successor(x)}." for x in rng.sample(WORDS, 2)) + f" {w}"
        rows.append({"ctx": context, "endings": endings, "label": label})
    write_jsonl(root / "pairs.jsonl", rows)
    return root


def test_training_logs_task_scores_at_each_evaluation_and_they_rise(pairs_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(pairs_data / "data"), "--out", str(out), *TINY_MODEL, *FAST]
    args += ["--train.max_steps=80", "--train.lr=3e-3", "--train.warmup_steps=5", "--eval.every=40"]
    tasks = f"--eval.tasks=[next={pairs_data / 'pairs.jsonl'}, builtin:stdlib-next-line]"
    assert main([*args, tasks, "--eval.task_items=40", "--log.tensorboard=true"]) == 0
    evals = [r for r in read_metrics(out) if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 40, 80]
    keys = ("next/acc", "next/acc_norm", "stdlib-next-line/acc", "stdlib-next-line/acc_norm", "centered_acc")
    for r in evals:
        assert all(k in r for k in keys)
    # An untrained model is near chance (0.25); one that has learned the pairs knows which word follows.
    assert evals[0]["next/acc_norm"] <= 0.45 and evals[-1]["next/acc_norm"] >= 0.8
    assert evals[-1]["centered_acc"] > evals[0]["centered_acc"]
    assert "centered acc" in capsys.readouterr().out
    assert load_yaml_config(out / "config.yaml").eval.tasks[1] == "builtin:stdlib-next-line"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert {"tasks/next/acc", "tasks/centered_acc"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("tasks/centered_acc")] == [0, 40, 80]


# ---- the embedded task --------------------------------------------------------------------------------


def test_stdlib_next_line_is_deterministic_well_formed_and_held_out():
    stdlib_task.stdlib_next_line.cache_clear()
    items = stdlib_task.stdlib_next_line()
    stdlib_task.stdlib_next_line.cache_clear()
    assert stdlib_task.stdlib_next_line() == items  # built again from scratch: the same items
    assert len(items) >= 100
    held, trained = [], set()  # the held-out modules' text; every stripped line of the others
    for doc in iter_stdlib(None):
        if val_score(doc.name) < stdlib_task.HELD_OUT_FRACTION:
            held.append(doc.text)
        else:
            trained.update(line.strip() for line in doc.text.splitlines())
    held_text = "\n".join(held)
    for item in items:
        assert len(item.endings) == 4 and len(set(item.endings)) == 4 and 0 <= item.label < 4
        assert item.separator == "" and all(e.startswith("\n") and e.strip() for e in item.endings)
        # the right ending is the line that follows the context in a held-out module; the others do not
        assert item.context + item.endings[item.label] + "\n" in held_text
        assert item.endings[item.label].strip() not in trained  # not to be recalled from another module
        # each other ending is the right one with a name of the context swapped for another one of it
        right = set(stdlib_task._names(item.endings[item.label]))
        for i, ending in enumerate(item.endings):
            if i != item.label:
                assert item.context + ending + "\n" not in held_text
                (added,) = stdlib_task._names(ending) - right
                (gone,) = right - stdlib_task._names(ending)
                assert {added, gone} <= stdlib_task._names(item.context)
    assert sorted({item.label for item in items}) == [0, 1, 2, 3]
    # the quickstart's data holds these modules out of training
    assert QUICKSTART_VAL_FRACTION >= stdlib_task.HELD_OUT_FRACTION
    assert (
        load_tasks(["builtin:stdlib-next-line"], 10)[0].items
        == load_tasks(["builtin:stdlib-next-line"], 10)[0].items
    )


def test_unknown_builtin_task_names_the_known_one():
    with pytest.raises(
        TaskError, match="unknown builtin task 'builtin:nope': the builtin task is builtin:stdlib"
    ):
        read_multiple_choice("builtin:nope")
