"""CPU inference paths: the one-token decode step and the packed weights for batched decoding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lmforge.generate.layout as layout
from lmforge.generate.engine import GRAPH_MIN_TOKENS, BatchDecoder, graphs_by_default
from lmforge.generate.layout import InferenceLinear, pack_for_batches, use_inference_layout
from lmforge.generate.quant import Int8Linear, quantize_int8
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.step import StaticDecoder, decode_step
from lmforge.model import GPT, ModelConfig
from tests.test_model import FAMILIES  # the four architecture variants the model tests use

GREEDY = SamplingParams(temperature=0.0)


def tiny(name: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, context_len=64, vocab_size=100, **FAMILIES[name])
    return GPT(cfg).eval()


def greedy_rows(model: GPT, prompts: list[list[int]], n: int) -> list[list[int]]:
    dec = BatchDecoder(model, prompts, n, GREEDY)
    while not dec.finished:
        dec.step()
    return dec.generated


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_gives_the_same_logits_as_forward(name, padded):
    model = tiny(name)
    g = torch.Generator().manual_seed(3)
    B, P = 3, 9
    prompt = torch.randint(0, 100, (B, P), generator=g)
    key_mask = torch.ones(B, P + 4, dtype=torch.bool)
    if padded:  # rows of 9, 5 and 2 real tokens, left-padded
        key_mask[1, :4] = False
        key_mask[2, :7] = False
    positions = (key_mask[:, :P].long().cumsum(1) - 1).clamp(min=0)
    caches = [model.new_cache(B, P + 4) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(
                prompt,
                cache=cache,
                positions=positions if padded else None,
                key_mask=key_mask[:, :P] if padded else None,
            )
        for step in range(4):
            idx = torch.randint(0, 100, (B, 1), generator=g)
            pos = positions[:, -1:] + step + 1 if padded else None
            mask = key_mask[:, : P + step + 1] if padded else None
            ref = model(idx, cache=caches[0], positions=pos, key_mask=mask, last_only=True)[:, -1]
            got = decode_step(model, idx, caches[1], pos, mask)
            assert got.shape == (B, 100)
            assert torch.equal(got, ref), (name, padded, step)
    assert caches[0].pos == caches[1].pos == P + 4
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=0, atol=0)


def test_decode_step_refuses_to_run_past_the_context():
    model = tiny("gpt2")
    cache = model.new_cache(1, 64)
    with torch.no_grad():
        model(torch.zeros(1, 64, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="longer than the context"):
        decode_step(model, torch.zeros(1, 1, dtype=torch.long), cache)


@pytest.fixture(params=[False, True], ids=["batches-packed", "every-product-packed"])
def pack_small_layers(request, monkeypatch):
    """Tiny test layers are below the size worth packing; pack them anyway, and count packed products.
    Both policies run on any CPU with oneDNN packing: batches only (AVX2) and every product (AVX-512)."""
    monkeypatch.setattr(layout, "MIN_PACKED_BYTES", 0)
    monkeypatch.setattr(layout, "packs_every_product", lambda: request.param)
    if layout._pack(torch.ones(4, 4)) is None:
        pytest.skip("oneDNN packing is not used on this CPU (needs x86 with AVX2 and a torch with oneDNN)")
    calls = []
    real = layout.packed_linear

    def counting(x, packed, bias):
        calls.append(x.numel() // x.size(-1))
        return real(x, packed, bias)

    monkeypatch.setattr(layout, "packed_linear", counting)
    return calls


def test_packed_linear_matches_f_linear_for_batch_shapes_only(pack_small_layers):
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 48)
    model = torch.nn.Sequential(layer)
    use_inference_layout(model)
    assert isinstance(layer, InferenceLinear) and layer.weight.t().is_contiguous()
    assert pack_for_batches(model) == 32 * 48 * 4
    for rows in (1, 2, 8, 64, 65):
        x = torch.randn(rows, 1, 32)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    one_row = [1] if layout.packs_every_product() else []  # AVX2: one row stays on F.linear
    assert pack_small_layers == [*one_row, 2, 8, 64]  # long products stay on F.linear
    # a weight changed in place after packing is never served from the stale copy
    with torch.no_grad():
        layer.weight.mul_(2)
        x = torch.randn(4, 32)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    calls = len(pack_small_layers)
    assert calls == 3 + len(one_row)
    # with gradients the product is F.linear, and backward works
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and len(pack_small_layers) == calls


def test_batched_greedy_decoding_with_packed_weights_matches_the_plain_model(pack_small_layers):
    reference = tiny("llama", seed=4)
    model = tiny("llama", seed=4)
    use_inference_layout(model)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    greedy_rows(model, prompts[1:2], 5)  # one sequence: a second copy of the weights only for every product
    one_row_packed = layout.packs_every_product()
    packed = [m._packed is not None for m in model.modules() if isinstance(m, InferenceLinear)]
    assert packed and all(p == one_row_packed for p in packed)
    assert (1 in pack_small_layers) == one_row_packed
    got = greedy_rows(model, prompts, 20)
    assert max(pack_small_layers) > 1, "the batch was not decoded with the packed weights"
    assert got == greedy_rows(reference, prompts, 20)
    # and each prompt alone (one row: packed or column-major weights, as the policy says) gives the same
    assert [greedy_rows(model, [p], 20)[0] for p in prompts] == got


def test_eval_speed_decodes_one_sequence_as_generate_does(pack_small_layers):
    from lmforge.eval.speed import decode

    model = use_inference_layout(tiny("gpt2", seed=2))
    prompt = [5, 17, 3, 42]
    tokens, _ = decode(model, prompt, 6, temperature=0.0)
    # the packed copy where one sequence takes it (AVX-512), and the tokens generate gives
    assert (1 in pack_small_layers) == layout.packs_every_product()
    assert tokens == greedy_rows(model, [prompt], 6)[0]


def test_every_product_is_packed_exactly_on_cpus_with_avx512():
    capability = torch.backends.cpu.get_cpu_capability()
    assert layout.packs_every_product() == capability.startswith("AVX512")
    # what the engine asks for one sequence: the packed copies only under that policy
    model = use_inference_layout(tiny("gpt2"))
    made = layout.pack_for_decoding(model, 1)
    assert (made > 0) == (layout.packs_every_product() and layout._pack(torch.ones(384, 512)) is not None)


def test_packing_respects_the_memory_budget_and_quantization_still_applies(pack_small_layers):
    model = use_inference_layout(tiny("gpt2"))
    assert pack_for_batches(model, max_bytes=1000) == 0
    assert all(m._packed is None for m in model.modules() if isinstance(m, InferenceLinear))
    assert pack_for_batches(model) > 0
    quantize_int8(model, kernel="dequant")
    assert not any(isinstance(m, InferenceLinear) for m in model.modules())
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    with torch.no_grad():
        assert model(torch.randint(0, 100, (2, 5))).shape == (2, 5, 100)


def test_a_packed_model_can_be_copied_and_the_copy_packs_again(pack_small_layers):
    model = use_inference_layout(tiny("gpt2"))
    assert pack_for_batches(model) > 0
    twin = copy.deepcopy(model)  # oneDNN's packed tensors cannot be copied: the copy starts unpacked
    layers = [m for m in twin.modules() if isinstance(m, InferenceLinear)]
    assert layers and all(m._packed is None and m.weight.t().is_contiguous() for m in layers)
    assert pack_for_batches(twin) == pack_for_batches(model)
    idx = torch.randint(0, 100, (3, 1))
    with torch.no_grad():
        torch.testing.assert_close(twin(idx), model(idx), rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_static_decoder_gives_the_logits_of_decode_step(name, padded):
    # StaticDecoder's fixed-shape step (what a GPU records as a CUDA graph) attends over the whole zeroed
    # cache under a mask; it must agree with decode_step, which attends over the written slots only.
    model = tiny(name)
    g = torch.Generator().manual_seed(5)
    B, P, steps = 3, 9, 5
    L = P + steps
    prompt = torch.randint(0, 100, (B, P), generator=g)
    key_mask = torch.ones(B, L, dtype=torch.bool)
    if padded:
        key_mask[1, :4] = False
        key_mask[2, :7] = False
    positions = (key_mask[:, :P].long().cumsum(1) - 1).clamp(min=0)
    ref_cache, cache = model.new_cache(B, L), model.new_cache(B, L, zeroed=True)
    static = StaticDecoder(model, cache, key_mask if padded else None)
    with torch.no_grad():
        for c in (ref_cache, cache):
            model(
                prompt,
                cache=c,
                positions=positions if padded else None,
                key_mask=key_mask[:, :P] if padded else None,
            )
        for step in range(steps):
            idx = torch.randint(0, 100, (B, 1), generator=g)
            pos = positions[:, -1:] + step + 1 if padded else None
            mask = key_mask[:, : P + step + 1] if padded else None
            ref = decode_step(model, idx, ref_cache, pos, mask)
            got = static(idx, pos)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert cache.pos == ref_cache.pos == L
    # the same keys and values in the same slots (later layers to float rounding: attention over more
    # slots sums in another order)
    torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.v, ref_cache.v, rtol=1e-5, atol=1e-6)


def test_the_fixed_shape_path_generates_what_the_default_path_does():
    model = tiny("llama")
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    for params, seed in (
        (GREEDY, None),
        (SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.2), 7),
    ):
        runs = []
        for cuda_graph in (False, True):
            dec = BatchDecoder(model, prompts, 12, params, seed=seed, cuda_graph=cuda_graph)
            assert (dec.static is not None) is cuda_graph
            while not dec.finished:
                dec.step()
            runs.append(dec.generated)
        assert runs[0] == runs[1]
    # the default off a GPU is the plain one-token path
    assert BatchDecoder(model, prompts, 32, GREEDY).static is None


def test_cuda_graphs_by_default_only_on_a_gpu_for_longer_generations(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("LMFORGE_CUDA_GRAPHS", raising=False)
    assert graphs_by_default(cuda, GRAPH_MIN_TOKENS)
    assert not graphs_by_default(cuda, GRAPH_MIN_TOKENS - 1)
    assert not graphs_by_default(cpu, 1000)
    monkeypatch.setenv("LMFORGE_CUDA_GRAPHS", "0")
    assert not graphs_by_default(cuda, 1000)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cuda_graph_decoding_matches_eager_decoding_on_a_gpu(name):
    model = tiny(name).cuda()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    runs = []
    for cuda_graph in (False, True):
        dec = BatchDecoder(model, prompts, 20, GREEDY, cuda_graph=cuda_graph)
        while not dec.finished:
            dec.step()
        if cuda_graph:  # recorded once, replayed for every later token
            assert dec.static.graph is not None
        runs.append(dec.generated)
    assert runs[0] == runs[1]
    alone = [greedy_rows(model, [p], 20)[0] for p in prompts]  # 20 new tokens: graphs by default
    assert alone == runs[1]
