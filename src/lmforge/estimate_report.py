"""`lmforge estimate`'s report: an Estimate as Markdown-friendly lines (also printed by `train --dry-run`)."""

from __future__ import annotations

from .estimate import GIB, Estimate


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def report_lines(est: Estimate) -> list[str]:
    """The estimate as Markdown-friendly lines (summary, memory breakdown, device table)."""
    p, s, m = est.params, est.setting, est.model
    n = p["total"]
    lines = [
        f"model             {m.family}, {m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads, "
        f"vocab {m.vocab_size:,}, sequence {s.seq_len}",
        f"parameters        {n:,} ({n / 1e6:.1f}M; embeddings {p['embedding']:,}, blocks {p['blocks']:,})",
        f"FLOPs per token   {est.flops_per_token:,} (6N + 12*L*C*T, training)",
        f"token budget      {est.total_tokens:,} (global batch {est.global_batch} x {s.seq_len}); "
        f"Chinchilla-optimal ~{est.chinchilla_tokens:,} (20/param): "
        f"{est.total_tokens / est.chinchilla_tokens:.3g}x of it",
        f"training FLOPs    {est.flops_per_token * est.total_tokens:.3e}",
        f"assumed           {s.describe()}",
        *est.notes,
        f"speed on {est.device.name} x{s.gpus}: {est.tokens_per_s:,.0f} tokens/s at an assumed MFU of "
        f"{est.mfu:.0%} -> {_duration(est.total_tokens / est.tokens_per_s / 3600)} for the budget",
        "",
        f"| memory per GPU ({est.device.name}) | bytes |",
        "|---|---|",
    ]
    for k, v in est.memory.items():
        lines.append(f"| {k} | {_gib(v)} |")
    lines.append(f"| **total** | **{_gib(sum(est.memory.values()))}** |")
    lines.append(
        f"| activations without / with full checkpointing | {_gib(est.activations_no_ckpt)} / "
        f"{_gib(est.activations_full_ckpt)} |"
    )
    lines += [
        "",
        "| device | memory | as configured | what makes it fit | tokens/s | time for budget |",
        "|---|---|---|---|---|---|",
    ]
    for r in est.table:
        fit = "fits" if r["fits"] else "does not fit"
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        hours = _duration(r["hours"]) if "hours" in r else "-"
        lines.append(
            f"| {r['device']} | {r['memory'] / GIB:.0f} GiB | {fit} ({_gib(r['needs'])}) | {r['change']} "
            f"| {tps} | {hours} |"
        )
    return lines
