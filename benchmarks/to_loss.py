"""Tokens and seconds two recipes need to reach a target validation loss, trained side by side.

    PYTHONPATH=src python benchmarks/to_loss.py --data DATA_DIR \\
        [--baseline configs/tiny.yaml] [--candidate configs/speedrun-tiny.yaml] [--tokens 400000] \\
        [--seeds 1337,1338] [--eval-tokens 10240] [--eval-windows 80] [--out runs/to_loss] [--target LOSS]

Both recipes train with `lmforge train` on the same data, budget and validation windows, in the order
baseline, candidate, baseline, candidate, ... (one pair per seed), so a machine whose speed drifts slows
both alike. The target is, for each seed, the baseline's final validation loss (or --target). The tokens
a run needs are interpolated linearly between the two evaluations around the crossing; its seconds are
training time only (`tok_per_s` of every step excludes evaluations and checkpoints), read at that token
count. Prepare the data with a held-out share, e.g.
`lmforge prepare --source builtin:stdlib --val-fraction 0.05 --vocab-size 4096 --out data/stdlib-val5`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from lmforge.checkpoint import read_metrics
from lmforge.cli import EXIT_PREEMPTED
from lmforge.presets import get_preset


def recipe_shape(config: str) -> tuple[int, int]:
    """(micro-batch, tokens per optimizer step) of a one-process run of a config file."""
    d = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    model = {**(get_preset(d["preset"]) if d.get("preset") else {}), **(d.get("model") or {})}
    seq = model.get("seq_len") or model.get("context_len", 1024)
    train = d.get("train") or {}
    micro = train.get("micro_batch_size", 16)
    return micro, (train.get("global_batch_size") or micro) * seq


def train(config: str, out: Path, args: argparse.Namespace, seed: int) -> Path:
    """One run of `lmforge train`, evaluating every ~eval_tokens on the shared validation windows."""
    micro, per_step = recipe_shape(config)
    if args.eval_windows % micro:
        sys.exit(f"--eval-windows {args.eval_windows} is not a multiple of {config}'s micro-batch {micro}")
    run = out / f"{Path(config).stem}-seed{seed}"
    flags = [
        f"--train.max_tokens={args.tokens}",
        f"--train.seed={seed}",
        f"--eval.every={max(1, round(args.eval_tokens / per_step))}",
        f"--eval.batches={args.eval_windows // micro}",
        "--log.every=1",
        "--log.progress=false",
        "--checkpoint.every=50",  # a run that is killed resumes from here (saves are not timed)
        "--checkpoint.keep_last=1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "train",
        "--config",
        config,
        "--data",
        args.data,
        "--out",
        str(run),
    ]
    print(f"training {run.name} ...", flush=True)
    shutil.rmtree(run, ignore_errors=True)  # always a fresh run
    for _ in range(5):
        code = subprocess.run([*cmd, *flags], stdout=subprocess.DEVNULL).returncode
        if code == 0:
            return run
        if code != EXIT_PREEMPTED and code >= 0:
            sys.exit(f"{run.name}: lmforge train exited with code {code}")
        # Stopped or killed by a signal: the same command resumes from the last checkpoint exactly (the
        # metrics of steps after it are dropped and trained again), and every step's time is its own.
        print(f"{run.name} was stopped by a signal ({code}): resuming", flush=True)
    sys.exit(f"{run.name}: stopped by signals five times")


def curves(run: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(tokens, val loss) of every evaluation, and (tokens, training seconds so far) after every step."""
    evals, clock, seconds, before = [], [(0, 0.0)], 0.0, 0
    for r in read_metrics(run):
        if r["type"] == "eval":
            evals.append((r["tokens"], r["val_loss"]))
        elif r["type"] == "train":
            seconds += (r["tokens"] - before) / r["tok_per_s"]
            before = r["tokens"]
            clock.append((r["tokens"], seconds))
    return evals, clock


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """y at x on the polyline through points (sorted by x)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def tokens_to(evals: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the validation loss first reaches target (linear between evaluations); None: never."""
    for (t0, l0), (t1, l1) in zip(evals, evals[1:], strict=False):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1) if l0 > target else t0
    return None


def summary(run: Path, target: float) -> dict:
    """What the table shows for one run."""
    evals, clock = curves(run)
    tokens = tokens_to(evals, target)
    return {
        "run": run.name,
        "final_val_loss": evals[-1][1],
        "tokens_to_target": tokens,
        "seconds_to_target": None if tokens is None else interpolate(clock, tokens),
        "total_tokens": clock[-1][0],
        "total_seconds": clock[-1][1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--baseline", default="configs/tiny.yaml")
    ap.add_argument("--candidate", default="configs/speedrun-tiny.yaml")
    ap.add_argument("--tokens", type=int, default=400_000)
    ap.add_argument("--seeds", default="1337,1338")
    ap.add_argument("--eval-tokens", type=int, default=10_240, help="tokens between evaluations (both runs)")
    ap.add_argument("--eval-windows", type=int, default=80, help="validation windows per evaluation")
    ap.add_argument("--out", default="runs/to_loss")
    ap.add_argument("--target", type=float, default=None, help="default: the baseline's final val loss")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        base_run = train(args.baseline, out, args, seed)
        cand_run = train(args.candidate, out, args, seed)
        target = args.target if args.target is not None else curves(base_run)[0][-1][1]
        base, cand = summary(base_run, target), summary(cand_run, target)
        rows.append({"seed": seed, "target": target, "baseline": base, "candidate": cand})
    (out / "to_loss.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print_table(rows)


def _pct(part: float | None, whole: float | None) -> str:
    return "never" if part is None or not whole else f"{100 * part / whole:.1f}%"


def print_table(rows: list[dict]) -> None:
    """A Markdown table: one line per run, then the candidate against the baseline per seed."""
    print("| seed | run | target | final val loss | tokens to target | seconds to target | of baseline's |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["baseline"]
        for side in ("baseline", "candidate"):
            s = r[side]
            tok = "never" if s["tokens_to_target"] is None else f"{s['tokens_to_target']:,.0f}"
            sec = "never" if s["seconds_to_target"] is None else f"{s['seconds_to_target']:.0f}"
            ratio = (
                f"{_pct(s['tokens_to_target'], b['tokens_to_target'])} tokens, "
                f"{_pct(s['seconds_to_target'], b['seconds_to_target'])} seconds"
            )
            print(
                f"| {r['seed']} | {s['run']} | {r['target']:.4f} | {s['final_val_loss']:.4f} | {tok} | {sec} | "
                f"{ratio} |"
            )
    for r in rows:
        gap = r["baseline"]["final_val_loss"] - r["candidate"]["final_val_loss"]
        print(f"seed {r['seed']}: the candidate ends {gap:.3f} nats below the baseline")


if __name__ == "__main__":
    main()
