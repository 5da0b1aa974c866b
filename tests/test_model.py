"""The model: shapes for both families, exact parameter counts, learning, KV-cache equivalence."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.generate.engine import BatchDecoder
from lmforge.generate.layout import use_inference_layout
from lmforge.generate.sampling import SamplingParams, top_k_filter, top_p_filter
from lmforge.model import (
    GPT,
    ModelConfig,
    count_params,
    flops_per_token,
    param_breakdown,
)

FAMILIES = {
    "gpt2": dict(family="gpt2"),
    "llama": dict(family="llama", n_kv_head=2),
    "llama-qknorm-mha": dict(family="llama", qk_norm=True),
    "gpt2-untied-nobias": dict(family="gpt2", bias=False, tie_embeddings=False),
    "llama-relu2-qknorm": dict(family="llama", mlp="relu2", qk_norm=True, n_kv_head=2),
}


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, n_embd=32, context_len=64, vocab_size=100)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_shapes_and_param_count(name):
    torch.manual_seed(0)
    cfg = tiny(**FAMILIES[name])
    model = GPT(cfg)
    idx = torch.randint(0, 100, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 100)  # padded vocab (128) never leaks out
    loss = model(idx, idx)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert count_params(model) == param_breakdown(cfg)["total"]


def test_family_switches_change_the_architecture():
    gpt, llama = GPT(tiny(family="gpt2")), GPT(tiny(family="llama", n_kv_head=2))
    assert gpt.wpe is not None and llama.wpe is None
    assert isinstance(gpt.blocks[0].ln_1, torch.nn.LayerNorm) and isinstance(
        llama.blocks[0].ln_1, torch.nn.RMSNorm
    )
    assert gpt.lm_head.weight is gpt.wte.weight and llama.lm_head.weight is not llama.wte.weight
    # GQA: k and v get 2 heads of 8, q gets 4 heads of 8 -> fused projection is (4 + 2*2) * 8 wide
    assert llama.blocks[0].attn.c_attn.out_features == 64
    assert llama.blocks[0].mlp.c_fc.out_features == 2 * 256  # SwiGLU gate|up, hidden rounded to 256


def test_relu2_mlp_squares_the_relu_and_keeps_the_state_dict_keys():
    swiglu, relu2 = GPT(tiny(family="llama")), GPT(tiny(family="llama", mlp="relu2"))
    assert swiglu.state_dict().keys() == relu2.state_dict().keys()  # checkpoints and exports read it alike
    mlp = relu2.blocks[0].mlp
    assert mlp.c_fc.out_features == 4 * 32  # one projection, 4x wide, as GPT-2's (no gate)
    h = torch.randn(3, 128)
    assert torch.equal(mlp.act(h), F.relu(h) * F.relu(h))
    from lmforge.config import ConfigError
    from lmforge.config_io import config_from_dict

    with pytest.raises(ConfigError, match="model.mlp='relu3': must be 'gelu' or 'swiglu' or 'relu2'"):
        config_from_dict({"model": {"mlp": "relu3"}})


def test_loss_matches_plain_cross_entropy_and_ignores_padding_rows():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 100, (2, 9))
    tgt = torch.randint(0, 100, (2, 9))
    tgt[0, :3] = -1
    logits = model(idx)
    ref = F.cross_entropy(logits.reshape(-1, 100), tgt.reshape(-1), ignore_index=-1)
    assert torch.allclose(model(idx, tgt), ref, atol=1e-6)


def test_gpt2_124m_preset_counts_like_gpt2():
    from lmforge.presets import get_preset

    cfg = ModelConfig(**get_preset("gpt2-124m"))
    p = param_breakdown(cfg)
    # GPT-2 small has 124,439,808 parameters with vocab 50257; padding to 50304 adds 47*768.
    assert p["total"] == 124_439_808 + 47 * 768
    assert (
        flops_per_token(cfg)
        == 6 * (p["total"] - p["embedding"] - p["position"] + 50304 * 768) + 12 * 12 * 768 * 1024
    )


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tiny_model_overfits_one_batch(name):
    torch.manual_seed(0)
    model = GPT(tiny(**FAMILIES[name]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 100, (4, 32))
    y = torch.roll(x, -1, dims=1)
    first = None
    for _ in range(150):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.1


def decode(model, prompt, max_new_tokens, params, seed=None, use_cache=True) -> list[int]:
    """New token ids of one prompt, from the engine's BatchDecoder (what generate and LLM decode with)."""
    dec = BatchDecoder(model, [prompt], max_new_tokens, params, seed, use_cache=use_cache)
    while not dec.finished:
        dec.step()
    return dec.generated[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_same_with_and_without_kv_cache(name):
    torch.manual_seed(1)
    model = GPT(tiny(**FAMILIES[name])).eval()
    prompt = torch.randint(0, 100, (7,)).tolist()
    greedy = SamplingParams(temperature=0.0)
    with_cache = decode(model, prompt, 40, greedy, use_cache=True)
    without = decode(model, prompt, 40, greedy, use_cache=False)
    assert len(with_cache) == 40
    assert with_cache == without


@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt2-untied-nobias"])
def test_inference_layout_changes_memory_order_only(name):
    torch.manual_seed(2)
    model = GPT(tiny(**FAMILIES[name])).eval()
    reference = GPT(tiny(**FAMILIES[name])).eval()
    reference.load_state_dict(model.state_dict())
    use_inference_layout(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    assert model.cfg.tie_embeddings is False or model.lm_head.weight is model.wte.weight
    for (key, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert a.shape == b.shape and torch.equal(a, b), key
    idx = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx), atol=1e-5, rtol=1e-5)
    prompt = idx[0].tolist()
    greedy = SamplingParams(temperature=0.0)
    assert decode(model, prompt, 30, greedy) == decode(reference, prompt, 30, greedy)
    use_inference_layout(model)  # idempotent
    assert all(m.weight.t().is_contiguous() for m in linears)


def test_inference_layout_leaves_non_fp32_weights_alone():
    # bf16 products on column-major CPU weights take a slow path: the layout is for fp32 only
    model = use_inference_layout(GPT(tiny()).eval().to(torch.bfloat16))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear and m.weight.is_contiguous() for m in linears)


def test_sampling_is_seeded_and_filters_work():
    torch.manual_seed(2)
    model = GPT(tiny()).eval()
    p = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3)
    a = decode(model, [1, 2, 3], 30, p, seed=5)
    b = decode(model, [1, 2, 3], 30, p, seed=5)
    c = decode(model, [1, 2, 3], 30, p, seed=6)
    assert a == b and a != c
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0]  # 0.87, 0.12, ...: p=0.8 keeps only the top token, p=0.9 the top two
    assert probs[1] > 0.8
    assert (~torch.isinf(top_p_filter(logits, 0.8))).sum() == 1
    assert (~torch.isinf(top_p_filter(logits, 0.9))).sum() == 2


def test_prompt_longer_than_context_is_cut_from_the_left_with_a_warning():
    model = GPT(tiny()).eval()
    with pytest.warns(UserWarning, match="cut"):
        out = decode(model, list(range(1, 80)), 5, SamplingParams(temperature=0))
    assert len(out) == 5


def model_imports(source: str) -> set[str]:
    """Top-level names of what a module imports; a relative import that leaves model/ counts as 'lmforge'."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level > 1:  # `from ..x`: out of model/
            names.add("lmforge")
    return names


def test_the_model_package_imports_only_torch_and_itself():
    # model/ is the model alone: the decoding machinery lives in generate/, which imports model/, never
    # the other way round; outside the standard library, torch is all model/ may need.
    allowed = {"torch"} | set(sys.stdlib_module_names)
    for path in sorted(Path(__file__).resolve().parents[1].glob("src/lmforge/model/*.py")):
        assert model_imports(path.read_text()) <= allowed, path.name
    assert model_imports("from ..generate.layout import InferenceLinear") - allowed == {"lmforge"}  # control
    # Modules already loaded when Python starts (an installed lmforge's lm-eval hook, a .pth file) are
    # not model/'s doing: count what importing lmforge.model adds.
    code = (
        "import sys; before = set(sys.modules) - {'lmforge'}; import lmforge.model as m; "
        "[getattr(m, n) for n in m.__all__]; "
        "print(' '.join(sorted(x for x in set(sys.modules) - before if x.startswith('lmforge'))))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root / "src")
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) == {"lmforge", "lmforge.model"} | {
        f"lmforge.model.{name}" for name in ("config", "gpt", "kv_cache")
    }


def test_qk_norm_under_bf16_autocast_warns_nothing_and_matches_fp32():
    cfg = ModelConfig(
        family="llama", qk_norm=True, n_layer=2, n_head=4, n_embd=32, context_len=16, vocab_size=64
    )
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, 64, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's mixed-dtype RMSNorm fallback warned here
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert torch.allclose(low.float(), model(x), atol=0.1)  # bf16's rounding, not another function
