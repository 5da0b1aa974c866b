"""lmforge eval: each metric against a direct computation, sliding windows, multiple choice, CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_model, read_metrics, tokenizer_path
from lmforge.cli import main
from lmforge.data import Tokenizer, iter_eval_batches
from lmforge.eval.metrics import evaluate_loss, score_tokens, score_windows, summarize_scores
from lmforge.eval.quality import distinct_n, generation_quality, repetition_rate
from lmforge.eval.run import EvalOptions, evaluate_run
from lmforge.eval.tasks import TaskError, ending_logprobs, evaluate_multiple_choice, read_multiple_choice
from lmforge.generate.params import SamplingParams
from lmforge.model import GPT, ModelConfig

# The numbers here follow precision=auto, which differs between CPUs: CI also runs this file with
# LMFORGE_CPU_BF16=1 and =0.
pytestmark = pytest.mark.precision


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of the shared trained run, so that eval.json written by one test is not seen by another."""
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def tiny_gpt(seed: int = 0, context: int = 32) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=97, context_len=context)
    return GPT(cfg).eval()


# ---- windows and per-token scores -----------------------------------------------------------------


@pytest.mark.parametrize(
    "n,window,stride", [(100, 16, 5), (100, 16, 16), (10, 16, 4), (33, 8, 1), (17, 8, 3)]
)
def test_windows_score_each_target_once_with_enough_context(n, window, stride):
    seen = []
    for i, (start, end, first) in enumerate(score_windows(n, window, stride)):
        assert end - start <= window and start <= first < end
        seen.extend(range(first, end))
        if i > 0:  # every later target sees at least window - stride + 1 tokens of left context
            assert first - start + 1 >= window - stride + 1
    assert seen == list(range(n))


def test_sliding_window_matches_a_direct_computation():
    model = tiny_gpt()
    ids = torch.randint(0, 97, (90,), generator=torch.Generator().manual_seed(1))
    window, stride = 16, 5
    got = score_tokens(model, ids, window, stride, batch_size=3)
    # Direct: every target t predicted from as much left context as a window ending at it allows,
    # given that windows advance by `stride`; computed one target at a time from the window start.
    starts = {}
    for start, end, first in score_windows(ids.numel() - 1, window, stride):
        for t in range(first, end):
            starts[t] = start
    direct = []
    with torch.no_grad():
        for t in range(ids.numel() - 1):
            logits = model(ids[starts[t] : t + 1][None])[0, -1]
            direct.append(F.cross_entropy(logits[None], ids[t + 1 : t + 2]).item())
    assert torch.allclose(got["nll"], torch.tensor(direct), atol=1e-5)
    # stride 1: each target sees exactly min(t + 1, window) tokens
    one = score_tokens(model, ids[:40], window, 1)["nll"]
    with torch.no_grad():
        for t in (0, 5, 15, 16, 30, 38):
            logits = model(ids[max(0, t + 1 - window) : t + 1][None])[0, -1]
            assert one[t].item() == pytest.approx(
                F.cross_entropy(logits[None], ids[t + 1 : t + 2]).item(), abs=1e-5
            )
    # negative control: disjoint windows give other numbers (the stride really changes the context)
    disjoint = score_tokens(model, ids, window, window)["nll"]
    assert not torch.allclose(disjoint, got["nll"], atol=1e-4)


def test_loss_accuracy_and_bpb_match_training_eval_and_direct_formulas(run, tiny_data):
    model, cfg, _ = load_model(run)
    assert type(model.blocks[0].attn.c_attn) is torch.nn.Linear  # scored as trained, not in a decoding layout
    seq_len, batch, n_batches = cfg.model.seq_len, 4, 2
    meta = json.loads((tiny_data / "meta.json").read_text())
    batches = list(iter_eval_batches(tiny_data, "val", seq_len, batch, n_batches))
    # the windows are consecutive: all inputs in order, then the very last target
    ids = torch.cat([*(x.reshape(-1) for x, _ in batches), batches[-1][1].reshape(-1)[-1:]])
    assert ids.numel() == n_batches * batch * seq_len + 1
    n_bytes = (ids.numel() - 1) * meta["val_bytes_per_token"]
    got = summarize_scores(score_tokens(model, ids, seq_len, seq_len), n_bytes)
    want_loss, n = evaluate_loss(model, batches, torch.device("cpu"))
    assert got["tokens"] == n and got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(want_loss), rel=1e-5)
    assert got["bpb"] == pytest.approx(want_loss / (math.log(2) * meta["val_bytes_per_token"]), rel=1e-5)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches])  # (B, T, V)
    y = torch.cat([y for _, y in batches])
    assert got["top1_acc"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    top5 = (logits.topk(5, -1).indices == y[..., None]).any(-1).float().mean().item()
    assert got["top5_acc"] == pytest.approx(top5)
    assert 0 < got["top1_acc"] < got["top5_acc"] < 1
    # the training loop logged the same loss on the same windows at step 40
    logged = [r for r in read_metrics(run) if r["type"] == "eval"][-1]
    assert logged["val_loss"] == pytest.approx(got["loss"], rel=1e-5)


def test_text_bits_per_byte_count_the_text_bytes(run, tmp_path):
    text = "the cat sat on the mat. Ünïcödé bytes count more than characters. " * 8
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    report = evaluate_run(
        run,
        EvalOptions(
            text=str(path), stride=8, speed=False, prompts=None, sampling=SamplingParams(max_new_tokens=4)
        ),
    )
    lm = report["lm"]
    tok = Tokenizer.load(tokenizer_path(run))
    assert lm["tokens"] == len(tok.encode(text))  # every token scored, the first after <|endoftext|>
    n_bytes = len(text.encode("utf-8"))
    assert n_bytes > len(text)
    assert lm["bpb"] == pytest.approx(lm["loss"] * lm["tokens"] / (math.log(2) * n_bytes))
    assert lm["sliding_bpb"] == pytest.approx(lm["sliding_loss"] * lm["tokens"] / (math.log(2) * n_bytes))
    assert lm["sliding_loss"] != lm["loss"] and lm["stride"] == 8


# ---- multiple choice ---------------------------------------------------------------------------------


def write_jsonl(path, rows) -> None:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8"
    )


ITEMS = [
    {"ctx": "the cat sat on the", "endings": ["mat", "dog ran to the park", "trees", "sang"], "label": 0},
    {
        "ctx_a": "the dog ran",
        "ctx_b": "to the",
        "endings": ["park", "a", "birds sang in green trees"],
        "label": "1",
    },
    {"ctx": "birds sang in", "endings": ["green trees", "the", "mat and the cat sat"], "label": 2},
]


def hand_scores(model, tok, context, endings):
    """Sum of log-probabilities of each ending, computed one ending at a time with a plain forward."""
    out = []
    for ending in endings:
        ctx, cont = tok.encode(context), tok.encode(" " + ending)
        seq = torch.tensor([tok.eos_id, *ctx, *cont])
        with torch.no_grad():
            logp = F.log_softmax(model(seq[None, :-1])[0], -1)  # (T, V)
        targets = seq[1:][-len(cont) :]
        out.append(sum(logp[len(seq) - 1 - len(cont) + i, t].item() for i, t in enumerate(targets.tolist())))
    return out


def test_multiple_choice_matches_a_hand_computation(run, tmp_path):
    model, _, _ = load_model(run)
    tok = Tokenizer.load(tokenizer_path(run))
    path = tmp_path / "hs.jsonl"
    write_jsonl(path, ITEMS)
    items = read_multiple_choice(path)
    assert items[1].context == "the dog ran to the" and items[1].label == 1
    best, best_norm = [], []
    for item in items:
        hand = hand_scores(model, tok, item.context, item.endings)
        got = ending_logprobs(model, tok, item)
        assert [g[0] for g in got] == pytest.approx(hand, abs=1e-4)
        assert [g[1] for g in got] == [len(" " + e) for e in item.endings]
        best.append(max(range(len(hand)), key=hand.__getitem__))
        best_norm.append(
            max(range(len(hand)), key=lambda i, h=hand, it=item: h[i] / len(" " + it.endings[i]))
        )
    # The items were written so that summing favours short endings and per-byte averaging long ones.
    assert best != best_norm

    def acc_with(labels):
        rows = [{**row, "label": lab} for row, lab in zip(ITEMS, labels, strict=True)]
        write_jsonl(path, rows)
        return evaluate_multiple_choice(model, tok, read_multiple_choice(path))

    assert acc_with(best)["acc"] == 1.0
    assert acc_with(best_norm)["acc_norm"] == 1.0
    wrong = [
        (b + 1) % len(it["endings"])
        if b == bn
        else next(i for i in range(len(it["endings"])) if i not in (b, bn))
        for b, bn, it in zip(best, best_norm, ITEMS, strict=True)
    ]
    negative = acc_with(wrong)  # negative control: labels that neither rule picks score zero
    assert negative["acc"] == 0.0 and negative["acc_norm"] == 0.0 and negative["items"] == 3


def test_hellaswag_markup_is_removed_from_hellaswag_items_only(tmp_path):
    path = tmp_path / "hs.jsonl"
    row = {
        "ctx": "[header] How to fold a shirt [title] Lay it flat.  [step] Fold",
        "endings": ["a [sub] b", "c"],
    }
    hellaswag = {"activity_label": "Clothing", "source_id": "wikihow~1"}  # HellaSwag's own fields
    write_jsonl(path, [{**row, **hellaswag, "label": 1}, {**row, "label": 1}])
    item, plain = read_multiple_choice(path)
    assert item.context == "How to fold a shirt. Lay it flat. Fold" and item.endings == ("a b", "c")
    assert plain.context == row["ctx"] and plain.endings == tuple(row["endings"])  # as written


def test_code_items_are_scored_as_written(tmp_path):
    """Brackets and indentation are content outside HellaSwag (lm-evaluation-harness does the same)."""
    path = tmp_path / "code.jsonl"
    write_jsonl(path, [{"ctx": "x = a", "endings": ["[0]", "(0)", "banana"], "label": 0}])
    (item,) = read_multiple_choice(path)
    assert item.context == "x = a" and item.endings == ("[0]", "(0)", "banana")


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{not json', "hs.jsonl:2: not valid JSON"),
        ('{"ctx": "a", "label": 0}', "hs.jsonl:1: 'endings' must be a list"),
        ('{"endings": ["b", "c"], "label": 0}', "hs.jsonl:1: no context"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 5}', "hs.jsonl:1: label 5 is outside 0..1"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": "x"}', "hs.jsonl:1: 'label' must be an integer"),
        ("[1, 2]", "hs.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_task_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "hs.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(TaskError, match=message.replace(".", r"\.").replace("[", r"\[")):
        read_multiple_choice(path)


# ---- generation quality ------------------------------------------------------------------------------


def test_generation_quality_on_known_strings():
    texts = ["a b a b", "c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)  # a b c of a b a b c
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)  # (a b) (b a) of (a b) (b a) (a b)
    assert repetition_rate(["a b c d a b c d"]) == pytest.approx(1 / 5)  # 5 four-grams, "a b c d" twice
    assert repetition_rate(["one two three four five", "x"]) == 0.0  # no repeats; "x" has no 4-gram
    assert repetition_rate(["go go go go go go"]) == pytest.approx(2 / 3)  # 3 four-grams, all the same
    q = generation_quality(["a b a b", "c"], [7, 3])
    assert q["mean_tokens"] == 5 and q["mean_words"] == 2.5 and q["samples"] == 2
    assert distinct_n(["x y z"], 1) == 1.0 and distinct_n([""], 1) == 0.0


# ---- the command -------------------------------------------------------------------------------------


def test_cli_eval_writes_eval_json(run, tiny_data, tmp_path, capsys):
    hs = tmp_path / "hs.jsonl"
    write_jsonl(hs, ITEMS)
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "the cat"}, json.dumps("the dog"), {"prompt": ""}])
    capsys.readouterr()
    args = ["eval", "--run", str(run), "--data", str(tiny_data), "--batches", "2", "--batch-size", "4"]
    args += ["--tasks", f"hellaswag={hs}", "--prompts", str(prompts), "--max-new-tokens", "12"]
    assert main(args) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    lm = report["lm"]
    for key in ("loss", "ppl", "bpb", "top1_acc", "top5_acc", "sliding_ppl", "sliding_bpb"):
        assert math.isfinite(lm[key]) and key in out
    logged = [r for r in read_metrics(run) if r["type"] == "eval"][-1]
    assert lm["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)  # same windows as training's eval
    assert lm["bpb"] == pytest.approx(logged["val_bpb"], rel=1e-5)
    assert lm["stride"] == 16 and lm["window"] == 32
    assert report["tasks"]["hellaswag"]["items"] == 3 and "acc_norm" in out
    gen = report["generation"]
    assert gen["samples"] == 3 and 0 < gen["mean_tokens"] <= 12 and 0 <= gen["distinct_2"] <= 1
    speed = report["speed"]
    assert speed["prefill_tok_s"] > 0 and speed["decode_tok_s"] > 0 and speed["ttft_ms"] > 0
    assert speed["peak_mem_mb"] > 10 and "decode_tok_s" in out
    other = tmp_path / "elsewhere.json"
    assert main([*args, "--no-speed", "--out", str(other)]) == 0
    assert "speed" not in json.loads(other.read_text())


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--text", "MISSING.txt"], "text file 'MISSING.txt' does not exist"),
        (["--tasks", "hs=MISSING.jsonl"], "task file 'MISSING.jsonl' does not exist"),
        (["--tasks", "hs"], "--tasks hs: write it as NAME=FILE.jsonl"),
        (["--tasks", "hs=BAD.jsonl"], "BAD.jsonl:2: not valid JSON"),
        (["--prompts", "MISSING.txt"], "--prompts MISSING.txt: no such file"),
        (["--stride", "99"], "--stride 99: must be between 1 and the model's window (32 tokens)"),
        (["--quantize", "int4"], "--quantize int4: the supported value is int8"),
        (["--data", "NOWHERE", "--text", "x"], "give --data or --text, not both"),
        (["--data", "NOWHERE"], "data folder 'NOWHERE' does not exist"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(run, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD.jsonl").write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{oops\n')
    out = tmp_path / "report.json"
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--no-speed", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".report.json*"))
