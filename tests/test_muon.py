"""train.optimizer=muon and train.schedule=wsd: which parameters Muon steps, its update against a plain
reference formula and torch.optim.Muon, bit-exact resume, config errors, and the memory estimate."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from lmforge.checkpoint import read_metrics
from lmforge.cli import main
from lmforge.config import ConfigError, TrainConfig
from lmforge.model import GPT, ModelConfig
from lmforge.train import muon as muon_mod
from lmforge.train.optim import build_optimizer, lr_at, set_lr

from .conftest import FAST, TINY_MODEL

MUON = ["--train.optimizer=muon", "--train.muon_lr=0.03", "--train.lr=3e-3", "--train.warmup_steps=2"]


def names_of(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_muon_steps_the_block_matrices_and_adamw_everything_else(family):
    # gpt2: biases, LayerNorms, learned positions, tied head; llama: RMSNorm, QK-norm, untied head.
    cfg = ModelConfig(family=family, n_layer=2, n_head=4, n_embd=32, context_len=64, vocab_size=64)
    if family == "llama":
        cfg = ModelConfig(**{**cfg.__dict__, "qk_norm": True, "n_kv_head": 2})
    model = GPT(cfg)
    opt = build_optimizer(
        model, TrainConfig(optimizer="muon", weight_decay=0.1, muon_weight_decay=0.05), "cpu"
    )
    decay, no_decay, muon = opt.param_groups
    matrices = {
        f"blocks.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert muon["muon"] and names_of(model, muon["params"]) == matrices
    assert muon["lr"] == 0.02 and muon["weight_decay"] == 0.05 and muon["momentum"] == 0.95
    assert not decay["muon"] and not no_decay["muon"]
    if family == "llama":  # the untied output head is a classifier: AdamW, with decay
        assert names_of(model, decay["params"]) == {"lm_head.weight"}
        assert {"blocks.0.attn.q_norm.weight", "wte.weight", "ln_f.weight"} <= names_of(
            model, no_decay["params"]
        )
    else:  # the head is the embedding: no decay, as before
        assert names_of(model, decay["params"]) == set()
        assert {"wte.weight", "wpe.weight", "blocks.1.attn.c_attn.bias"} <= names_of(
            model, no_decay["params"]
        )
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # every parameter is in exactly one group
    grouped = [n for g in opt.param_groups for n in names_of(model, g["params"])]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())


def reference_muon(w, grads, lr, decay, momentum, nesterov, adjust):
    """The Muon update written plainly in float64: momentum, Nesterov, quintic Newton-Schulz, shape lr."""
    a, b, c = 3.4445, -4.7750, 2.0315
    w, buf = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    rows, cols = w.shape
    scale = {"original": max(1, rows / cols) ** 0.5, "match_rms_adamw": 0.2 * max(rows, cols) ** 0.5}[adjust]
    for g in grads:
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g
        u = (1 - momentum) * g + momentum * buf if nesterov else buf
        x = u.T if rows > cols else u
        x = x / x.norm()
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        o = x.T if rows > cols else x
        w = w * (1 - lr * decay) - lr * scale * o
    return w


def muon_alone(w, **settings):
    p = torch.nn.Parameter(w.clone())
    group = {"params": [p], "muon": True, "ns_steps": 5, **settings}
    return p, muon_mod.MuonAdamW([group], lr=1e-3)


@pytest.mark.parametrize(
    "shape, adjust", [((24, 40), "original"), ((40, 24), "original"), ((40, 24), "match_rms_adamw")]
)
def test_muon_step_equals_a_plain_reference_formula(shape, adjust):
    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.1
    grads = [torch.randn(*shape) * 0.01 for _ in range(3)]
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.95, lr_adjust=adjust)
    p, opt = muon_alone(w, nesterov=True, **settings)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    moved = (p.detach().double() - w.double()) / 0.02  # the step in units of lr: entries ~0.1-0.5
    ref = (reference_muon(w, grads, 0.02, 0.1, 0.95, True, adjust) - w.double()) / 0.02
    # fp32 against float64: five Newton-Schulz steps amplify fp32 rounding (~6e-8) by at most the
    # polynomial's slope at zero (3.4445) per step, 3.4445^5 ~ 480, so ~3e-5 at worst; measured ~2e-6.
    torch.testing.assert_close(moved, ref, atol=5e-5, rtol=0)
    # negative control: the same steps without Nesterov are far outside that tolerance
    plain = (reference_muon(w, grads, 0.02, 0.1, 0.95, False, adjust) - w.double()) / 0.02
    assert (moved - plain).abs().max() > 100 * 5e-5


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_step_is_torch_optim_muon_on_a_plain_matrix(monkeypatch):
    # torch.optim.Muon orthogonalises in bf16; in bf16 here too, the same operations give the same bits.
    monkeypatch.setattr(muon_mod, "ns_dtype", lambda device: torch.bfloat16)
    torch.manual_seed(1)
    for shape in ((16, 48), (48, 16)):
        w = torch.randn(*shape)
        ours, opt = muon_alone(
            w, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, lr_adjust="original"
        )
        theirs = torch.nn.Parameter(w.clone())
        ref = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
        for _ in range(3):
            g = torch.randn(*shape)
            ours.grad, theirs.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
        assert torch.equal(ours, theirs)


def test_one_optimizer_steps_as_adamw_and_muon_side_by_side():
    # The AdamW half of the combined optimizer is torch's AdamW itself: the combined optimizer gives the
    # same bits as torch.optim.AdamW on the AdamW groups next to a Muon-only optimizer on the matrices.
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, context_len=64, vocab_size=64)
    torch.manual_seed(0)
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    train = TrainConfig(optimizer="muon", weight_decay=0.1)
    combined = build_optimizer(a, train, "cpu")
    split = build_optimizer(b, train, "cpu").param_groups
    adamw = torch.optim.AdamW(split[:2], lr=6e-4, betas=(0.9, 0.95))
    muon = muon_mod.MuonAdamW(split[2:], lr=6e-4)
    idx = torch.randint(0, 64, (2, 16))
    for model, opts in ((a, [combined]), (b, [adamw, muon])):
        for _ in range(3):
            model(idx, idx).backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert not torch.equal(sa["wte.weight"], GPT(cfg).state_dict()["wte.weight"])  # it trained


def test_wsd_holds_the_peak_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)  # warmup as cosine's
    assert [lr_at(s, cfg, 100) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]  # stable
    assert lr_at(80, cfg, 100) == pytest.approx(1 - 0.9 * 1 / 20)  # the first of 20 decay steps
    assert lr_at(89, cfg, 100) == pytest.approx(1 - 0.9 * 10 / 20)
    assert lr_at(99, cfg, 100) == pytest.approx(0.1)  # the last step trains at the floor
    sqrt = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_shape="1-sqrt")
    assert lr_at(84, sqrt, 100) == pytest.approx(1 - math.sqrt(5 / 20))
    assert lr_at(99, sqrt, 100) == 0.0


def test_muon_groups_follow_the_schedule_from_their_own_peak():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, context_len=16, vocab_size=32))
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05, warmup_steps=4)
    opt = build_optimizer(model, cfg, "cpu")
    assert set_lr(opt, 1, cfg, 20) == pytest.approx(0.5e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5e-3, 0.5e-3, 0.025])


@pytest.mark.parametrize(
    "key, value, expect",
    [
        ("optimizer", "sgd", "must be adamw, adamw8bit or muon"),
        ("schedule", "linear", "must be cosine or wsd"),
        ("decay_fraction", 0.0, "must be in (0, 1]"),
        ("decay_shape", "cosine", "must be linear or 1-sqrt"),
        ("muon_lr", 0.0, "must be in (0, 1]"),
        ("muon_momentum", 1.0, "must be in [0, 1)"),
        ("muon_weight_decay", -0.1, "must be >= 0"),
        ("muon_lr_adjust", "spectral", "must be original, match_rms_adamw or none"),
        ("muon_ns_steps", 0, "must be in [1, 20]"),
    ],
)
def test_bad_muon_and_schedule_settings_are_one_line_naming_the_key(key, value, expect):
    with pytest.raises(ConfigError, match=rf"^train\.{key}=") as e:
        TrainConfig(**{key: value})
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_a_bad_key_on_the_command_line_exits_2_with_one_line(tiny_data, tmp_path, capsys):
    args = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), *TINY_MODEL, *FAST]
    assert main([*args, "--train.optimizer=muon", "--train.muon_momentum=1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.muon_momentum=1.5: must be in [0, 1)" in err and "\n" not in err
    assert not (tmp_path / "r").exists()


def train_losses(run):
    return [(r["step"], r["train_loss"], r["lr"]) for r in read_metrics(run) if r["type"] == "train"]


def interrupted_copy(straight, resumed, at):
    """The straight run as it was when step `at` had been saved: later checkpoints and metrics removed."""
    shutil.copytree(straight, resumed)
    for ckpt in (resumed / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > at:
            shutil.rmtree(ckpt)
    (resumed / "checkpoints/latest").write_text(f"step_{at:07d}\n")
    kept = [r for r in read_metrics(straight) if r["step"] <= at]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(MUON, id="muon-cosine"),
        # decay_fraction 0.75 of 8 steps: steps 2-7 decay, so the resume at step 4 lands mid-decay
        pytest.param(
            ["--train.schedule=wsd", "--train.decay_fraction=0.75", "--train.warmup_steps=2"],
            id="adamw-wsd-mid-decay",
        ),
        pytest.param([*MUON, "--train.schedule=wsd", "--train.decay_fraction=0.75"], id="muon-wsd-mid-decay"),
    ],
)
def test_save_then_resume_is_bit_exact(tiny_data, tmp_path, flags, monkeypatch):
    base = ["train", "--data", str(tiny_data), *TINY_MODEL, *FAST, "--eval.every=0", "--checkpoint.every=4"]
    args = [*base, "--train.max_steps=8", *flags]
    straight = tmp_path / "straight"
    assert main([*args, "--out", str(straight)]) == 0
    resumed = tmp_path / "resumed"
    interrupted_copy(straight, resumed, 4)
    assert main([*args, "--out", str(resumed)]) == 0
    assert train_losses(resumed) == train_losses(straight)  # exact float equality, lr included
    lrs = [lr for _, _, lr in train_losses(straight)]
    if "--train.schedule=wsd" in flags:  # the resumed steps were in the decay, each below the last
        assert lrs[3] > lrs[4] > lrs[5] > lrs[6] > lrs[7]
    if "--train.optimizer=muon" not in flags:
        return
    # negative control: a resume that loses Muon's momentum buffers is not exact, so the check above sees them
    from lmforge.train import dist_checkpoint

    real = dist_checkpoint.load_optimizer

    def without_momentum(opt, tensors, groups):
        real(opt, {k: v for k, v in tensors.items() if not k.endswith("momentum_buffer")}, groups)

    monkeypatch.setattr(dist_checkpoint, "load_optimizer", without_momentum)
    lost = tmp_path / "lost"
    interrupted_copy(straight, lost, 4)
    assert main([*args, "--out", str(lost)]) == 0
    assert train_losses(lost)[:4] == train_losses(straight)[:4]
    assert train_losses(lost)[5:] != train_losses(straight)[5:]


def test_muon_state_is_what_the_estimate_counts():
    from lmforge.estimate import optimizer_bytes

    cfg = ModelConfig(
        family="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, context_len=64, vocab_size=100
    )
    model = GPT(cfg)
    idx = torch.randint(0, 100, (2, 16))
    for kind in ("adamw", "muon"):
        opt = build_optimizer(model, TrainConfig(optimizer=kind), "cpu")
        model(idx, idx).backward()
        opt.step()
        held = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.ndim)
        assert held == optimizer_bytes(cfg, kind), kind  # AdamW's 0-d step counters aside
        model.zero_grad()
    assert optimizer_bytes(cfg, "muon") < optimizer_bytes(cfg, "adamw")
