"""`lmforge status RUN_DIR`: where a run stands, read from its status.json heartbeat, metrics and checkpoints."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from .errors import LmforgeError
from .run_dir import RunDir

STALE_AFTER = 600.0  # seconds without a heartbeat after which a run on another host counts as gone


class WatchError(LmforgeError):
    """The path is not a run directory."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): the signal test is all there is


def run_status(run: str | Path) -> dict:
    """Step, tokens, last loss, best val, ETA, last checkpoint and liveness of a run, as a dict."""
    run = Path(run)
    files = RunDir(run)
    if not files.looks_like_run():
        raise WatchError(
            f"{run}: not a run directory (no {RunDir.config} or {RunDir.metrics}); give a RUN_DIR"
        )
    beat = files.read_status()
    records = files.read_metrics()
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and r.get("val_loss") is not None]
    last = train[-1] if train else {}
    now = time.time()
    out: dict = {
        "run": str(run),
        "state": beat.get("state", "unknown"),
        "step": max(beat.get("step") or 0, last.get("step") or 0),
        "max_steps": beat.get("max_steps") or _config_max_steps(files),
        "tokens": max(beat.get("tokens") or 0, last.get("tokens") or 0),
        "last_loss": last.get("train_loss"),
        "tok_per_s": last.get("tok_per_s"),
        "heartbeat_age": now - beat["updated"] if "updated" in beat else None,
    }
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        out["best_val_loss"], out["best_val_step"] = best["val_loss"], best["step"]
    ckpt = files.latest_checkpoint()
    if ckpt is not None:
        out["last_checkpoint"] = str(ckpt)
        out["checkpoint_age"] = now - ckpt.stat().st_mtime
    out["alive"] = False
    if out["state"] == "running":
        if beat.get("host") == socket.gethostname():
            out["alive"] = pid_alive(int(beat.get("pid", -1)))
        else:
            out["alive"] = out["heartbeat_age"] is not None and out["heartbeat_age"] < STALE_AFTER
        if not out["alive"]:
            out["state"] = "dead"  # the process is gone without writing an end state (killed, crashed)
    if out["alive"] and out["tok_per_s"] and out["max_steps"] and out["step"]:
        per_step = out["tokens"] / out["step"]
        out["eta_s"] = max(0, out["max_steps"] - out["step"]) * per_step / out["tok_per_s"]
    return out


def _config_max_steps(run: RunDir) -> int | None:
    train = run.read_config().get("train")
    return train.get("max_steps") if isinstance(train, dict) else None


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def format_status(s: dict) -> list[str]:
    """The status as a few aligned lines."""
    what = {
        "running": "running",
        "finished": "finished",
        "preempted": "stopped by a signal (run the same command to resume)",
        "early_stopped": "early-stopped",
        "diverged": "diverged (non-finite steps)",
        "dead": "not running: the process ended without finishing (killed or crashed); run it again to resume",
        "unknown": f"unknown (no {RunDir.status}: written by runs of this version)",
    }.get(s["state"], s["state"])
    total = f"/{s['max_steps']}" if s.get("max_steps") else ""
    loss = f"{s['last_loss']:.4f}" if s.get("last_loss") is not None else "-"
    lines = [
        f"run          {s['run']}",
        f"state        {what}" + (f" (alive, heartbeat {_ago(s['heartbeat_age'])})" if s["alive"] else ""),
        f"step         {s['step']}{total}",
        f"tokens       {s['tokens']:,}",
        f"last loss    {loss}" + (f" | {s['tok_per_s']:,.0f} tok/s" if s.get("tok_per_s") else ""),
    ]
    if "best_val_loss" in s:
        lines.append(f"best val     {s['best_val_loss']:.4f} (step {s['best_val_step']})")
    if "eta_s" in s:
        lines.append(f"ETA          {_ago(s['eta_s']).replace(' ago', '')}")
    if "last_checkpoint" in s:
        lines.append(f"checkpoint   {s['last_checkpoint']} ({_ago(s['checkpoint_age'])})")
    else:
        lines.append("checkpoint   none yet")
    return lines
