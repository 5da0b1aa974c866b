"""Named model sizes as plain data. Each entry is a set of `model.*` keys; docs/models.md lists true counts.

Counts are exact for the vocab given (padded to a multiple of 64); `lmforge train --dry-run --preset NAME`
prints them. Where a name promises a size the shape does not have, the comment says what it really counts.
"""

from __future__ import annotations

GPT2_VOCAB = 50257  # GPT-2's byte-level BPE (Radford et al., 2019)

PRESETS: dict[str, dict] = {
    # The quickstart model: small enough to learn something in minutes on a laptop CPU.
    "tiny": dict(family="gpt2", n_layer=6, n_head=8, n_embd=256, context_len=256, vocab_size=4096),
    "small-50m": dict(
        family="gpt2", n_layer=8, n_head=8, n_embd=512, context_len=1024, vocab_size=GPT2_VOCAB
    ),
    # Sized for a Dolma run with a 32k tokenizer.
    "dolma-75m": dict(family="gpt2", n_layer=10, n_head=10, n_embd=640, context_len=1024, vocab_size=32000),
    "fineweb-100m": dict(family="gpt2", n_layer=12, n_head=10, n_embd=640, context_len=512, vocab_size=50000),
    # GPT-2 small (Radford et al., 2019): 12 layers, 768 wide, 12 heads, context 1024.
    "gpt2-124m": dict(
        family="gpt2", n_layer=12, n_head=12, n_embd=768, context_len=1024, vocab_size=GPT2_VOCAB
    ),
    # GPT-2 medium shape (24/1024/16).
    "medium-350m": dict(
        family="gpt2", n_layer=24, n_head=16, n_embd=1024, context_len=1024, vocab_size=GPT2_VOCAB
    ),
    # GPT-2 large is 36 layers x 1280; this 24 x 1536 shape counts about 0.76B parameters.
    "large-800m": dict(
        family="gpt2", n_layer=24, n_head=16, n_embd=1536, context_len=1024, vocab_size=GPT2_VOCAB
    ),
    # The shape users asked for under this name. It counts about 0.76B parameters, not 1.4B:
    # Pythia-1.4B (Biderman et al., 2023) is 24 layers x 2048 wide. Use xl-1.5b for a model of that size.
    "pile-1.4b": dict(
        family="gpt2", n_layer=24, n_head=16, n_embd=1536, context_len=2048, vocab_size=GPT2_VOCAB
    ),
    # 32 layers x 2048 wide: about 1.7B parameters with the GPT-2 vocab.
    "xl-1.5b": dict(
        family="gpt2", n_layer=32, n_head=32, n_embd=2048, context_len=1024, vocab_size=GPT2_VOCAB
    ),
    # Llama-style counterparts (RoPE, RMSNorm, SwiGLU, grouped-query attention). Below 1B they tie the
    # input and output embeddings, as Llama 3.2 1B/3B and SmolLM do, so sizes match their GPT-2 twins.
    "modern-tiny": dict(
        family="llama",
        n_layer=6,
        n_head=8,
        n_kv_head=4,
        n_embd=256,
        context_len=256,
        vocab_size=4096,
        tie_embeddings=True,
    ),
    "modern-124m": dict(
        family="llama",
        n_layer=12,
        n_head=12,
        n_kv_head=4,
        n_embd=768,
        context_len=1024,
        vocab_size=GPT2_VOCAB,
        tie_embeddings=True,
    ),
    "modern-350m": dict(
        family="llama",
        n_layer=24,
        n_head=16,
        n_kv_head=4,
        n_embd=1024,
        context_len=2048,
        vocab_size=GPT2_VOCAB,
        tie_embeddings=True,
    ),
    "modern-1.5b": dict(
        family="llama",
        n_layer=32,
        n_head=32,
        n_kv_head=8,
        n_embd=2048,
        context_len=2048,
        vocab_size=GPT2_VOCAB,
    ),
}


def get_preset(name: str) -> dict:
    """The model keys of a named preset; a ValueError names the known ones."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"preset={name!r} is unknown{hint}: choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


# `lmforge bench`'s default shape: the 6-layer, 384-wide model at sequence 256 that small CPU trainers
# are usually measured with; vocab 4096 as the quickstart's tokenizer.
BENCH_MODEL = dict(
    family="gpt2", n_layer=6, n_head=6, n_embd=384, context_len=256, seq_len=256, vocab_size=4096
)
