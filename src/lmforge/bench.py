"""`lmforge bench`: training-step throughput of lmforge next to the same model built with HF transformers.

Both sides get identical weights (lmforge's initialisation copied into the HF model through the export
mapping), the same AdamW settings, the same batches and the same loss (mean cross-entropy over all
positions), so the ratio measures the implementations and nothing else. Throughput is timed over
`steps` optimizer steps after `warmup` untimed ones (the first steps pay for allocation, autotuning and,
with compile, tracing).

MFU (model FLOPs utilisation) = achieved FLOP/s / the device's dense bf16 peak, with training FLOPs per
token 6N + 12*L*C*T (Kaplan et al. 2020; PaLM appendix B): N the matmul parameters, L layers, C width,
T sequence length. It is reported only where the peak is known (device.PEAK_BF16_FLOPS).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from .device import autocast, peak_flops, pick_device, pick_precision
from .errors import LmforgeError
from .model import GPT, ModelConfig
from .model.gpt import flops_per_token

IMPLEMENTATIONS = ("lmforge", "hf")


class BenchError(LmforgeError):
    """A benchmark that cannot run as asked."""


@dataclasses.dataclass
class StepResult:
    """Throughput of one implementation on one shape."""

    name: str
    ms_per_step: float
    tokens_per_s: float
    mfu: float | None
    peak_mem_bytes: int | None
    losses: list[float]


def random_batches(vocab_size: int, batch: int, seq_len: int, seed: int) -> Iterator[tuple]:
    """Endless (x, y) pairs of uniform random tokens; a fixed seed gives the same stream."""
    g = torch.Generator().manual_seed(seed)
    while True:
        data = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=g)
        yield data[:, :-1].contiguous(), data[:, 1:].contiguous()


def data_batches(data_dir: str | Path, batch: int, seq_len: int, seed: int) -> Iterator[tuple]:
    """Endless (x, y) pairs from a prepared DATA_DIR's train split, in the training loader's order."""
    from .data.loader import TokenLoader

    loader = TokenLoader(data_dir, "train", seq_len, batch, seed=seed)
    while True:
        yield loader.next_batch()


def hf_twin(model: GPT) -> torch.nn.Module:
    """The same architecture and weights as a transformers GPT2LMHeadModel / LlamaForCausalLM."""
    try:
        import transformers
    except ImportError as e:
        raise BenchError("--compare hf needs transformers: pip install 'lmforge[hf]'") from e
    from .export import ExportError
    from .export.hf import to_hf

    try:
        state, hf_cfg = to_hf(model)
    except ExportError as e:
        raise BenchError(f"--compare hf: {e}") from e
    kind = hf_cfg.pop("model_type")
    hf_cfg.pop("architectures")
    config_cls = transformers.GPT2Config if kind == "gpt2" else transformers.LlamaConfig
    model_cls = transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.LlamaForCausalLM
    # No special-token ids: GPT2Config's defaults (50256) fall outside small vocabularies and warn.
    config = config_cls(**hf_cfg, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "sdpa"  # transformers' default; stated so the comparison is explicit
    hf = model_cls(config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # GPT-2's causal-mask buffers and a tied head are the only keys allowed to differ.
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))]
    if missing or unexpected:
        raise BenchError(f"--compare hf: weights did not map (missing {missing}, unexpected {unexpected})")
    return hf


def _loss_fn(name: str, model: torch.nn.Module, vocab_size: int) -> Callable:
    if name == "lmforge":
        return lambda x, y: model(x, y)

    def hf_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, vocab)
        return F.cross_entropy(logits.float().view(-1, vocab_size), y.view(-1))

    return hf_loss


def _optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # Same optimizer on both sides: AdamW over every parameter, fused on CUDA, foreach on CPU.
    fused = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=fused)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(
    name: str,
    model: torch.nn.Module,
    batches: Iterator[tuple],
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str,
    flops_per_tok: int,
    vocab_size: int,
) -> StepResult:
    """Run warmup + steps optimizer steps; time the last `steps` of them."""
    model.train()
    opt = _optimizer(model, device)
    loss_fn = _loss_fn(name, model, vocab_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[float] = []
    tokens = 0
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also a sync point: every step is complete before the next
        if i >= warmup:
            tokens += x.numel()
    _sync(device)
    elapsed = time.perf_counter() - start
    tps = tokens / elapsed
    peak = peak_flops(device)
    return StepResult(
        name=name,
        ms_per_step=1000 * elapsed / max(1, steps),
        tokens_per_s=tps,
        mfu=tps * flops_per_tok / peak if peak else None,
        peak_mem_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        losses=losses,
    )


def bench_training(
    model_cfg: ModelConfig,
    batch: int,
    steps: int = 20,
    warmup: int = 3,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    compare: tuple[str, ...] = ("hf",),
    data: str | None = None,
    seed: int = 0,
) -> list[StepResult]:
    """Time training steps of lmforge and each implementation in `compare` on the same shape and batches."""
    for name in compare:
        if name not in IMPLEMENTATIONS or name == "lmforge":
            raise BenchError(f"--compare {name!r}: the implementation to compare with must be 'hf'")
    dev = pick_device(device)
    prec = pick_precision(precision, dev)
    cfg = model_cfg.resolved()
    torch.manual_seed(seed)
    reference = GPT(cfg)  # the weights every implementation starts from
    fpt = flops_per_token(cfg, cfg.seq_len)
    results = []
    for name in ("lmforge", *compare):
        model = hf_twin(reference) if name == "hf" else GPT(cfg)
        if name == "lmforge":
            model.load_state_dict(reference.state_dict())
        model.to(dev)
        run = torch.compile(model) if compile else model
        batches = (
            data_batches(data, batch, cfg.seq_len, seed)
            if data
            else random_batches(cfg.vocab_size, batch, cfg.seq_len, seed)
        )
        results.append(time_training(name, run, batches, steps, warmup, dev, prec, fpt, cfg.vocab_size))
        del model, run
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


def report(results: list[StepResult], cfg: ModelConfig, batch: int, console) -> None:
    """Print one row per implementation, with ratios against the first compared one and a loss check."""
    from rich import box
    from rich.table import Table

    base = results[1] if len(results) > 1 else None
    table = Table(  # light rules and no edge padding: the eight columns fit 80 characters
        title=f"training step, batch {batch} x seq {cfg.seq_len}, {cfg.family} L{cfg.n_layer} C{cfg.n_embd}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in (
        "code",
        "ms/step",
        "tokens/s",
        "vs " + (base.name if base else "-"),
        "MFU",
        "peak mem",
        "first loss",
        "last loss",
    ):
        table.add_column(col, justify="left" if col == "code" else "right")
    for r in results:
        table.add_row(
            r.name,
            f"{r.ms_per_step:.1f}",
            f"{r.tokens_per_s:,.0f}",
            f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base else "-",
            f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-",
            f"{r.peak_mem_bytes / 2**30:.2f} GiB" if r.peak_mem_bytes is not None else "-",
            f"{r.losses[0]:.4f}",
            f"{r.losses[-1]:.4f}",
        )
    console.print(table)
    if base:
        # Same weights and batches: the first losses must agree, or the comparison is not like for like.
        gap = abs(results[0].losses[0] - base.losses[0])
        console.print(
            f"first-step loss difference vs {base.name}: {gap:.2e}", highlight=False, soft_wrap=True
        )
        # The end of the curve: a mean over the last steps smooths out batch-to-batch noise.
        n = min(10, len(base.losses))
        ours, theirs = (sum(r.losses[-n:]) / n for r in (results[0], base))
        console.print(
            f"mean loss of the last {n} steps: {results[0].name} {ours:.4f}, {base.name} {theirs:.4f} "
            f"({abs(ours - theirs) / theirs:.2%} apart)",
            highlight=False,
            soft_wrap=True,
        )
