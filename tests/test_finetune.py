"""`lmforge finetune` (full and LoRA) and `lmforge merge`: a fine-tune starts from exactly the base weights,
grows the vocabulary for added special tokens, resumes bit for bit, trains only adapters under LoRA, and
every reader of runs loads a LoRA run merged."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import AddedToken

from lmforge import LLM
from lmforge import checkpoint as ckpt_io
from lmforge.checkpoint import load_model, read_metrics
from lmforge.cli import EXIT_PREEMPTED, main
from lmforge.config import TrainConfig
from lmforge.data import Tokenizer, load_meta, prepare
from lmforge.data.batches import training_batches
from lmforge.data.chat_template import with_chat_tokens
from lmforge.data.shards import TokenShards
from lmforge.lora import LoRALinear, add_adapters, grow_vocab, merge_adapters, trainable_state
from lmforge.model import GPT, ModelConfig
from lmforge.train.finetune import extension_problem
from lmforge.train.optim import build_optimizer

from .conftest import TINY_MODEL, WORDS, make_corpus

# Everything here computes in fp32 on the CPU, so the equalities below are bitwise where both sides run the
# same arithmetic (a resume against a straight run, a fine-tune's first step against the base model).
PLAIN = ["--train.device=cpu", "--train.precision=fp32", "--log.progress=false", "--log.every=1"]
PLAIN += ["--train.micro_batch_size=4", "--eval.batches=1", "--eval.every=0", "--eval.at_start=false"]


def losses(run):
    return [r["train_loss"] for r in read_metrics(run) if r["type"] == "train"]


def finetune(base, data, out, *extra):
    return main(["finetune", "--from", str(base), "--data", str(data), "--out", str(out), *PLAIN, *extra])


@pytest.fixture(scope="module")
def base(tiny_data, tmp_path_factory):
    """A tiny base run (GPT-2 family: tied embeddings), trained 6 steps."""
    run = tmp_path_factory.mktemp("base") / "run"
    args = ["train", "--data", str(tiny_data), "--out", str(run), *TINY_MODEL, "--model.seq_len=32", *PLAIN]
    assert main([*args, "--train.max_steps=6", "--train.lr=3e-3", "--train.warmup_steps=2"]) == 0
    return run


@pytest.fixture(scope="module")
def chat_data(tiny_data, tmp_path_factory):
    """A data folder whose tokenizer is tiny_data's plus the chat template's special tokens."""
    root = tmp_path_factory.mktemp("sft")
    tokenizer = with_chat_tokens(Tokenizer.load(tiny_data)).save(root / "chat-tokenizer.json")
    make_corpus(root / "text", n_docs=10, seed=1)
    prepare([str(root / "text")], root / "data", tokenizer=str(tokenizer), val_fraction=0.2, workers=1)
    return root / "data"


def first_batch_loss(model, data):
    x, y = training_batches(data, load_meta(data), 32, 4, seed=1337).next_batch()  # the run's first batch
    with torch.no_grad():
        return model(x, y).item()


@pytest.mark.parametrize("lora", [[], ["--lora.rank=4"]], ids=["full", "lora"])
def test_a_finetune_starts_from_exactly_the_base_weights(base, tiny_data, tmp_path, lora):
    run = tmp_path / "sft"
    assert finetune(base, tiny_data, run, "--train.max_steps=1", *lora) == 0
    base_model, _, _ = load_model(base)
    assert losses(run) == [first_batch_loss(base_model, tiny_data)]  # bitwise: same weights, same batch
    fresh = GPT(base_model.cfg)  # negative control: other weights give another first loss
    assert losses(run) != [first_batch_loss(fresh, tiny_data)]
    # the optimizer starts fresh (its step count is this run's one step, not the base's six)
    state = load_file(str(ckpt_io.latest_checkpoint(run) / ckpt_io.STATE_FILE))
    assert state["optim/0/step"].item() == 1
    meta = ckpt_io.verify_checkpoint(ckpt_io.latest_checkpoint(run))
    base_ckpt = ckpt_io.latest_checkpoint(base)
    assert meta["base"]["checkpoint"] == str(base_ckpt.resolve()) and meta["base"]["vocab_size"] == 308
    assert meta["base"]["meta_sha256"] == ckpt_io.read_meta(base_ckpt)["meta_sha256"]
    assert meta["data_fingerprint"] == load_meta(tiny_data)["fingerprint"]
    assert meta["config"]["model"]["vocab_size"] == 308  # the base already has every token: nothing grows


def test_the_vocabulary_grows_with_mean_rows_for_added_special_tokens(base, chat_data, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("lmforge.train.finetune.train", lambda cfg, **kw: seen.update(cfg=cfg, **kw))
    assert finetune(base, chat_data, tmp_path / "sft") == 0
    old = load_file(str(ckpt_io.latest_checkpoint(base) / ckpt_io.MODEL_FILE))["wte.weight"]
    new = seen["init_tensors"]["wte.weight"]
    assert seen["cfg"].model.vocab_size == 312 and seen["base"]["vocab_size"] == 308
    assert torch.equal(new[:308], old[:308])  # every base token keeps its row, bit for bit
    assert torch.equal(new[308:312], old[:308].mean(0).expand(4, -1))
    assert "lm_head.weight" not in seen["init_tensors"]  # tied: the head is the embedding
    model = GPT(seen["cfg"].model)
    ckpt_io.load_model_weights(model, seen["init_tensors"])
    assert model.lm_head.weight is model.wte.weight and torch.equal(model.wte.weight[308:312], new[308:312])


def test_growth_pads_an_untied_head_and_keeps_padding_rows_out_of_the_loss():
    cfg = ModelConfig(family="llama", n_layer=1, n_head=2, n_embd=16, context_len=16, vocab_size=318)
    base = GPT(cfg)
    tensors = {k: v for k, v in base.state_dict().items()}
    grown_cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": 322}).resolved()
    grown = grow_vocab(tensors, 318, grown_cfg)
    for key in ("wte.weight", "lm_head.weight"):
        assert grown[key].shape == (384, 16)  # 320 padded rows -> 384
        assert torch.equal(grown[key][:318], tensors[key][:318])
        assert torch.equal(grown[key][318:322], tensors[key][:318].mean(0).expand(4, -1))
        assert not grown[key][322:].any()  # padding rows: zero, never scored
    model = GPT(grown_cfg)
    model.load_state_dict(grown)
    assert model(torch.tensor([[1, 320]])).shape[-1] == 322  # logits stop at the vocabulary
    assert grow_vocab(tensors, 318, cfg.resolved()) is tensors  # nothing added: nothing grows


def test_a_data_tokenizer_that_is_not_an_extension_is_one_line(base, tmp_path, capsys):
    make_corpus(tmp_path / "text", n_docs=8, seed=2)
    prepare([str(tmp_path / "text")], tmp_path / "other", vocab_size=300, workers=1)  # its own merges
    assert finetune(base, tmp_path / "other", tmp_path / "sft") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not extend the base run's" in err and "--tokenizer" in err
    assert not (tmp_path / "sft").exists()  # refused before anything was written


def test_extension_check_wants_the_same_ids_plus_special_tokens(tiny_data):
    plain = Tokenizer.load(tiny_data)
    assert extension_problem(plain, with_chat_tokens(plain)) is None  # negative control: a real extension
    assert extension_problem(plain, plain) is None
    grown = Tokenizer(type(plain.hf).from_str(plain.hf.to_str()))
    grown.hf.add_tokens([AddedToken("hello world", special=False)])
    assert "not a special token" in extension_problem(plain, grown)
    assert "absent" in extension_problem(with_chat_tokens(plain), plain)  # the data lost the base's tokens


@pytest.mark.parametrize("lora", [[], ["--lora.rank=4"]], ids=["full", "lora"])
def test_a_finetune_resumes_bit_exactly(base, chat_data, tmp_path, monkeypatch, lora):
    flags = ["--train.max_steps=6", "--checkpoint.every=0", "--train.lr=1e-3", *lora]
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert finetune(base, chat_data, straight, *flags) == 0
    monkeypatch.setenv("LMFORGE_TEST_SIGNAL_AT", "SIGTERM@3")
    assert finetune(base, chat_data, run, *flags) == EXIT_PREEMPTED
    monkeypatch.delenv("LMFORGE_TEST_SIGNAL_AT")
    assert finetune(base, chat_data, run, *flags) == 0  # the same command again
    assert len(losses(run)) == 6 and losses(run) == losses(straight)
    a, b = (load_file(str(ckpt_io.latest_checkpoint(r) / ckpt_io.MODEL_FILE)) for r in (straight, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ("blocks.0.attn.c_attn.lora_A" in a) == bool(lora)


def test_a_resumed_finetune_refuses_other_data_or_another_base(base, chat_data, tiny_data, tmp_path, capsys):
    run = tmp_path / "sft"
    assert finetune(base, chat_data, run, "--train.max_steps=2") == 0
    make_corpus(tmp_path / "text", n_docs=10, seed=3)  # other conversations, the same tokenizer
    tokenizer = str(chat_data / "tokenizer.json")
    prepare(
        [str(tmp_path / "text")], tmp_path / "other-data", tokenizer=tokenizer, val_fraction=0.2, workers=1
    )
    other = tmp_path / "other-base"
    args = ["train", "--data", str(tiny_data), "--out", str(other), *TINY_MODEL, "--model.seq_len=32", *PLAIN]
    assert main([*args, "--train.max_steps=1"]) == 0
    capsys.readouterr()
    for base_run, data, said in [
        (base, tmp_path / "other-data", "the data's dataset"),
        (other, chat_data, "is not the base this fine-tune started from"),
    ]:
        assert finetune(base_run, data, run, "--train.max_steps=4") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err, err
    assert main(["train", "--data", str(chat_data), "--out", str(run), *PLAIN, "--train.max_steps=4"]) == 2
    assert "resume it with `lmforge finetune --from" in capsys.readouterr().err
    assert finetune(base, chat_data, run, "--train.max_steps=3") == 0  # the right base and data still resume
    assert len(losses(run)) == 3


def tiny_lora_model(rank=4):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=32, context_len=32, vocab_size=312))
    n = add_adapters(model, rank, 16.0, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], 308)
    return model, n


def test_lora_trains_only_adapters_and_the_base_weights_stay_bitwise(tmp_path):
    model, n = tiny_lora_model()
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "new_rows" not in k}
    # per layer r * (in + out) of c_attn 32->96, c_proj 32->32, c_fc 32->128, c_proj 128->32; 4 new rows of 32
    assert n == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)) + 4 * 32
    opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1), "cpu")
    x = torch.randint(0, 312, (2, 16))
    for _ in range(3):
        model(x, x).backward()
        grads = {name for name, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    assert grads and all("lora_" in k or "new_rows" in k for k in grads)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())  # weight decay left them be
    assert set(trainable_state(model)) == grads  # a checkpoint holds exactly what trains


@pytest.mark.parametrize("bias", [True, False])
def test_the_lora_layer_matches_the_plain_formula_and_its_gradients(bias):
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 96, bias=bias)
    layer = LoRALinear(base, 4, 16.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    a, b = (p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B))
    x = torch.randn(2, 5, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = layer(x)
    ref = F.linear(x_ref, base.weight, base.bias) + F.linear(F.linear(x_ref, a), b) * (16.0 / 4)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    # fp32 both, the same products summed in another order (its own backward computes the transposes):
    # a few ulps of values ~1
    for got, want in (
        (out, ref),
        (x.grad, x_ref.grad),
        (layer.lora_A.grad, a.grad),
        (layer.lora_B.grad, b.grad),
    ):
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert base.weight.grad is None and (not bias or base.bias.grad is None)  # frozen: no gradient at all
    assert (x.grad - F.linear(grad, base.weight.t())).abs().max() > 1e-3  # the adapter's share is in it


def test_merged_logits_equal_adapter_logits():
    model, _ = tiny_lora_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)  # B and the new rows are zero at the start: give them something to merge
    x = torch.tensor([[1, 5, 308, 311, 42, 309]])  # old and new tokens
    with torch.no_grad():
        adapted = model(x)
        merge_adapters(model)
        merged = model(x)
    assert (
        not any(isinstance(m, LoRALinear) for m in model.modules())
        and model.lm_head.weight is model.wte.weight
    )
    # fp32 both ways, summed in another order (x(W + sBA) against xW + s(xA)B): a few ulps of logits ~1 in
    # size, far below 1e-5; a merge that dropped the alpha/r scaling would be off by more than 1e-2.
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=0)
    assert (merged - adapted).abs().max() < 1e-5 < (adapted - GPT(model.cfg)(x)).abs().max()


@pytest.fixture(scope="module")
def lora_run(base, chat_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "run"
    assert finetune(base, chat_data, run, "--train.max_steps=4", "--lora.rank=4", "--train.lr=3e-3") == 0
    return run


def test_lora_prints_its_trainable_count_and_saves_adapters_only(base, chat_data, tmp_path, capsys):
    assert finetune(base, chat_data, tmp_path / "r", "--train.max_steps=1", "--lora.rank=2") == 0
    n = 2 * 2 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)) + 4 * 32
    assert f"LoRA rank 2: training {n:,} of" in capsys.readouterr().out
    saved = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "r") / ckpt_io.MODEL_FILE))
    assert sum(t.numel() for t in saved.values()) == n and "wte.weight" not in saved


def test_a_lora_run_loads_merged_in_llm_and_generate_and_merge_makes_a_plain_run(
    base, lora_run, tmp_path, capsys
):
    model, cfg, _ = load_model(lora_run)
    assert cfg.lora.rank == 4 and not any(isinstance(m, LoRALinear) for m in model.modules())
    # the reference, built by hand: the base's weights, grown, with the saved adapters unmerged
    base_model, base_cfg, _ = load_model(base)
    adapted = GPT(cfg.model)
    ckpt_io.load_model_weights(adapted, grow_vocab(ckpt_io.model_state(base_model), 308, cfg.model))
    add_adapters(adapted, 4, cfg.lora.alpha, cfg.lora.targets, 308)
    adapted.load_state_dict(
        load_file(str(ckpt_io.latest_checkpoint(lora_run) / ckpt_io.MODEL_FILE)), strict=False
    )
    x = torch.tensor([[1, 5, 308, 311, 42, 309, 7]])
    with torch.no_grad():
        want, got, without = adapted.eval()(x), model(x), base_model(x[:, :2])
    assert (got - want).abs().max() < 1e-5  # as test_merged_logits_equal_adapter_logits
    assert (got[:, :2, :308] - without).abs().max() > 1e-3  # the adapters did change the model
    text = LLM.load(lora_run, device="cpu").generate("the cat", max_new_tokens=8, temperature=0)
    merged = tmp_path / "merged"
    assert main(["merge", "--run", str(lora_run), "--out", str(merged)]) == 0
    plain, plain_cfg, _ = load_model(merged)
    assert plain_cfg.lora.rank == 0 and "merged_from" in ckpt_io.read_meta(ckpt_io.latest_checkpoint(merged))
    a, b = model.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    gen = [
        "generate",
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]
    assert main([*gen, "--run", str(merged)]) == 0
    assert main([*gen, "--run", str(lora_run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == out[1] == "the cat" + text
    assert main(["merge", "--run", str(merged), "--out", str(tmp_path / "again")]) == 2  # already plain
    assert "is not a LoRA checkpoint" in capsys.readouterr().err


def test_a_lora_run_whose_base_is_gone_or_changed_is_one_line(base, chat_data, tmp_path, capsys):
    shutil.copytree(base, tmp_path / "base")
    run = tmp_path / "lora"
    assert finetune(tmp_path / "base", chat_data, run, "--train.max_steps=1", "--lora.rank=2") == 0
    gen = ["generate", "--run", str(run), "--prompt", "a", "--max-new-tokens", "2", "--device", "cpu"]
    assert main(gen) == 0
    base_ckpt = ckpt_io.latest_checkpoint(tmp_path / "base")
    meta = ckpt_io.read_meta(base_ckpt)  # the base retrained or replaced: other metadata, another digest
    body = {k: v for k, v in meta.items() if k not in ("format_version", "step", "files", "meta_sha256")}
    sealed = ckpt_io.sealed_meta({**body, "tokens": meta["tokens"] + 1}, meta["step"], meta["files"])
    (base_ckpt / ckpt_io.META_FILE).write_text(json.dumps(sealed))
    capsys.readouterr()
    for said in ("has changed since the fine-tune started", "is missing"):
        assert main(gen) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "base checkpoint" in err and said in err, err
        shutil.rmtree(base_ckpt, ignore_errors=True)  # next: the base is gone


def test_train_refuses_lora_without_a_base(tiny_data, tmp_path, capsys):
    assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--lora.rank=4"]) == 2
    assert "use `lmforge finetune --from BASE_RUN" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_lora_finetune_with_two_ddp_processes_matches_one_process(base, chat_data, tmp_path):
    flags = ["--train.max_steps=3", "--lora.rank=4", "--train.global_batch_size=4", "--train.lr=3e-3"]
    flags = [f for f in PLAIN if not f.startswith("--train.micro_batch_size")] + flags
    one = tmp_path / "one"
    assert main(["finetune", "--from", str(base), "--data", str(chat_data), "--out", str(one), *flags,
                 "--train.micro_batch_size=1"]) == 0  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "lmforge",
    ]
    cmd += ["finetune", "--from", str(base), "--data", str(chat_data), "--out", str(tmp_path / "two"), *flags]
    proc = subprocess.run(
        [*cmd, "--train.micro_batch_size=2"], env=env, capture_output=True, text=True, timeout=250
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    assert losses(tmp_path / "two") == pytest.approx(losses(one), abs=1e-5)


@pytest.fixture(scope="module")
def conversations(base, tmp_path_factory):
    """`prepare --chat` on a few short conversations, with the base run as the tokenizer (and seq_len)."""
    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    words = WORDS

    def say():
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))

    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]}
        )
    ]
    lines += [json.dumps({"instruction": say(), "output": say()}) for _ in range(59)]
    (root / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["prepare", "--chat", "--source", str(root / "chats.jsonl"), "--tokenizer", str(base)]
    assert main([*args, "--out", str(root / "sft"), "--workers", "1", "--val-fraction", "0.2"]) == 0
    return root / "sft"


def test_a_finetune_on_conversations_learns_the_assistant_tokens_only(base, conversations, tmp_path):
    meta = load_meta(conversations)
    assert meta["kind"] == "chat" and meta["seq_len"] == 32 and meta["vocab_size"] == 312
    run = tmp_path / "sft"
    assert finetune(base, conversations, run, "--train.max_steps=1", "--train.data_order=sequential") == 0
    # the reference from the folder's raw shards: the first 4 windows of 33 tokens and their loss masks
    tokens, masks = (TokenShards(conversations, "train", meta, masks=m) for m in (False, True))
    rows = torch.tensor(np.stack([tokens.read(i * 33, 33) for i in range(4)]).astype(np.int64))
    learned = torch.tensor(np.stack([masks.read(i * 33, 33) for i in range(4)]))[:, 1:] == 1
    base_model, _, _ = load_model(base)
    cfg = ModelConfig(**{**base_model.cfg.__dict__, "vocab_size": 312})
    model = GPT(cfg)
    ckpt_io.load_model_weights(model, grow_vocab(ckpt_io.model_state(base_model), 308, cfg))
    with torch.no_grad():
        logits = model(rows[:, :-1]).float()  # (4, 32, 312)
    per_token = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")  # (4, 32)
    assistant_only = per_token[learned].mean().item()
    assert 0 < learned.sum() < learned.numel()  # prompts and padding are there, and answers
    assert losses(run)[0] == pytest.approx(assistant_only, abs=1e-5)  # same numbers summed in another order
    assert abs(per_token.mean().item() - assistant_only) > 1e-2  # negative control: every token's loss


def test_a_lora_finetune_on_conversations_chats(base, conversations, tmp_path):
    run = tmp_path / "lora"
    assert finetune(base, conversations, run, "--train.max_steps=2", "--lora.rank=4") == 0
    llm = LLM.load(run, device="cpu")
    assert llm.model.cfg.vocab_size == 312 and llm.template is not None  # the template's tokens are there
    reply = llm.chat([{"role": "user", "content": "the cat"}], max_new_tokens=6, temperature=0)
    assert isinstance(reply, str)


def test_a_lora_finetune_under_fsdp2_saves_adapter_shards_resumes_and_consolidates(
    base, chat_data, tmp_path, monkeypatch
):
    from lmforge.train.dist_checkpoint import _safe_reader

    flags = ["--train.max_steps=4", "--checkpoint.every=0", "--lora.rank=4", "--train.parallel=fsdp"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert finetune(base, chat_data, straight, *flags) == 0
    monkeypatch.setenv("LMFORGE_TEST_SIGNAL_AT", "SIGTERM@2")
    assert finetune(base, chat_data, run, *flags) == EXIT_PREEMPTED
    monkeypatch.delenv("LMFORGE_TEST_SIGNAL_AT")
    assert finetune(base, chat_data, run, *flags) == 0
    assert losses(run) == losses(straight)  # bit for bit, one process
    saved = {k for k in _safe_reader(ckpt_io.latest_checkpoint(run)).read_metadata().state_dict_metadata}
    model_keys = {k.split(".", 1)[1] for k in saved if k.startswith("model.")}
    assert model_keys and all("lora_" in k or "new_rows" in k for k in model_keys)  # no base weight is saved
    assert main(["consolidate", "--run", str(run)]) == 0
    merged, _, _ = load_model(run / "consolidated")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules()) and merged.cfg.vocab_size == 312
