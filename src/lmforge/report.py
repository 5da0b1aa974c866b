"""The report card of a run: what was trained, on what, where and for how long, how it ended, what happened
on the way, and which code did it — read from the run directory alone and written as RUN_DIR/report.md and
RUN_DIR/report.html (one self-contained page: the curves embedded as a data URI, no external assets).

`lmforge train` writes it when a run ends (rank 0; a problem is one warning line, never a failed run) and
`lmforge report RUN_DIR` writes it again at any time. An export's model card (export/model_card.py) is
drawn from the same facts. The history comes from metrics.jsonl: each start of the run writes a start line
(device, precision, world size, checkpoint resumed from, step rolled back from, code version) and each stop
an end line (status, signal, wall time); skipped non-finite steps have their own lines.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

from .errors import LmforgeError
from .run_dir import CHECKPOINT_META, RunDir

SAMPLES_SHOWN = 4  # the samples of the last sampled step, at most this many
INCIDENT_TYPES = ("rollback",)  # other metrics.jsonl lines that are incidents, shown with their fields


class ReportError(LmforgeError):
    """The path is not a run directory."""


def _json(path: Path) -> dict:
    """A JSON object from a file; {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _num(value) -> float | None:
    """A finite number, or None (a metrics value may be null, a string from a hand edit, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def _well_formed(record) -> bool:
    """A metrics line whose step and tokens, where present, are counts (a hand-edited line may not be)."""
    if not isinstance(record, dict):
        return False
    return all(
        k not in record or (isinstance(record[k], int) and not isinstance(record[k], bool))
        for k in ("step", "tokens")
    )


def accuracies(record: dict, prefix: str = "") -> dict[str, float]:
    """Every number under a key naming an accuracy ("acc" in it), nested dicts flattened to a.b.c."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(accuracies(value, f"{name}."))
        elif "acc" in str(key).lower() and _num(value) is not None:
            out[name] = float(value)
    return out


# --- the parts of the facts ----------------------------------------------------------------------


def model_facts(config: dict) -> dict:
    """Architecture, parameters and FLOPs per token from the run's config (empty when unreadable)."""
    from .config import ConfigError
    from .config_io import config_from_dict
    from .model import flops_per_token, param_breakdown

    try:
        cfg = config_from_dict(config)
        m = cfg.model.resolved()
    except (ConfigError, ValueError, TypeError):
        return {}
    keys = ("family", "n_layer", "n_head", "n_kv_head", "n_embd", "seq_len", "context_len", "vocab_size")
    out = {k: getattr(m, k) for k in keys}
    out.update(params=param_breakdown(m)["total"], flops_per_token=flops_per_token(m))
    t = cfg.train
    out["train"] = {
        k: getattr(t, k) for k in ("optimizer", "lr", "warmup_steps", "max_steps", "seed", "precision")
    }
    return out


def hub_datasets(sources: list[str]) -> list[str]:
    """The Hugging Face hub dataset ids among data sources (hf:NAME..., fineweb, c4, ...)."""
    from .data.hub import parse_hf

    out = []
    for source in sources:
        if _on_hf(source):
            try:
                repo = parse_hf(source).repo
            except LmforgeError:
                continue
            if repo not in out:
                out.append(repo)
    return out


def _on_hf(source: str) -> bool:
    from .data.hub import HF_PREFIX, SHORTCUTS

    return source.startswith(HF_PREFIX) or source in SHORTCUTS


def _on_hub(source: str) -> bool:
    """A remote source (Hugging Face or Kaggle), named the same everywhere, unlike a local path."""
    from .data.hub import is_hub_source

    return is_hub_source(source)


def data_facts(run: RunDir, config: dict) -> dict:
    """Where the data came from: sources, tokens, fingerprint and tokenizer (the data folder's meta.json
    and manifest.json; the checkpoint's record of them when the folder has moved)."""
    data = config.get("data")
    meta = _json(Path(data) / "meta.json") if isinstance(data, str) else {}
    manifest = _json(Path(data) / "manifest.json") if isinstance(data, str) else {}
    ckpt = run.latest_checkpoint()
    saved = _json(ckpt / CHECKPOINT_META) if ckpt else {}
    listed = manifest.get("sources") if isinstance(manifest.get("sources"), list) else []
    sources = [s for s in (r.get("source") for r in listed if isinstance(r, dict)) if isinstance(s, str)]
    if not sources and isinstance(meta.get("sources"), list):
        sources = [s for s in meta["sources"] if isinstance(s, str)]
    splits = meta.get("splits") if isinstance(meta.get("splits"), dict) else {}
    return {
        "path": data,
        "found": bool(meta),
        "sources": sources,
        "hub_datasets": hub_datasets(sources),
        "sources_on_hub": [s for s in sources if _on_hub(s)],
        "train_tokens": (splits.get("train") or {}).get("tokens"),
        "val_tokens": (splits.get("val") or {}).get("tokens"),
        "fingerprint": meta.get("fingerprint") or saved.get("data_fingerprint"),
        "tokenizer": meta.get("tokenizer_file") or meta.get("tokenizer"),
        "vocab_size": meta.get("vocab_size"),
        "tokenizer_id": meta.get("tokenizer_id") or saved.get("tokenizer_id"),
    }


def segments(records: list[dict]) -> list[dict]:
    """The run's starts, in order: {"start", "end" (or None), "records"} each; lines older than the first
    start line (a run of an older lmforge) form one segment without a start."""
    out: list[dict] = []
    for r in records:
        if r.get("type") == "start" or not out:
            out.append({"start": r if r.get("type") == "start" else None, "end": None, "records": []})
        if r.get("type") == "end":
            out[-1]["end"] = r
        elif r.get("type") != "start":
            out[-1]["records"].append(r)
    return out


def _segment_wall(seg: dict, following: dict | None) -> float | None:
    """Seconds a start ran: its end line's, or for a start killed without one, until its last heartbeat
    (which the next start recorded)."""
    if seg["end"] is not None:
        return _num(seg["end"].get("wall_s"))
    previous = (following or {}).get("start", {}) or {}
    beat = previous.get("previous") or {}
    start = seg["start"] or {}
    if _num(beat.get("updated")) is not None and _num(start.get("time")) is not None:
        return max(0.0, beat["updated"] - start["time"])
    return None


def compute_facts(segs: list[dict]) -> dict:
    """Device, precision, world size, wall time, throughput, MFU and GPU-hours over every start."""
    setups, wall, timed_tokens, gpu_hours, untimed = [], 0.0, 0, 0.0, 0
    for i, seg in enumerate(segs):
        start = seg["start"] or {}
        setup = (
            start.get("device_name") or start.get("device"),
            start.get("precision"),
            start.get("world_size"),
        )
        if setup[0] and setup not in setups:
            setups.append(setup)
        seconds = _segment_wall(seg, segs[i + 1] if i + 1 < len(segs) else None)
        if seconds is None:
            untimed += 1
            continue
        wall += seconds
        last = seg["end"] or next((r for r in reversed(seg["records"]) if "tokens" in r), {})
        timed_tokens += max(0, (last.get("tokens") or 0) - (start.get("tokens") or 0))
        if str(start.get("device", "")).startswith("cuda"):
            gpu_hours += seconds * (start.get("world_size") or 1) / 3600
    train = [r for s in segs for r in s["records"] if r.get("type") == "train"]
    speeds = [v for v in (_num(r.get("tok_per_s")) for r in train) if v is not None]
    mfus = [v for v in (_num(r.get("mfu")) for r in train) if v is not None]
    return {
        "setups": setups,
        "wall_s": wall if wall else None,
        "untimed_starts": untimed,
        "tok_per_s_steps": statistics.median(speeds) if speeds else None,
        "tok_per_s_overall": timed_tokens / wall if wall else None,
        "mfu": statistics.mean(mfus) if mfus else None,
        "gpu_hours": gpu_hours if gpu_hours else None,
    }


def progress(segs: list[dict]) -> tuple[int, int]:
    """(step, tokens) the run has reached: where its last start stopped or got to. (An end line of an
    earlier start may name a later step that a rollback went back from.)"""
    if not segs:
        return 0, 0
    last = segs[-1]
    lines = [r for r in (last["start"], *last["records"], last["end"]) if r and "step" in r]
    final = max(lines, key=lambda r: r["step"], default={})
    return final.get("step", 0), final.get("tokens") or 0


def results_facts(run: RunDir, records: list[dict], segs: list[dict]) -> dict:
    """Final and best validation, the last train loss, downstream accuracies of the eval lines, and
    `lmforge eval`'s eval.json when there is one."""
    evals = [r for r in records if r.get("type") == "eval" and _num(r.get("val_loss")) is not None]
    train = [r for r in records if r.get("type") == "train" and _num(r.get("train_loss")) is not None]
    scored = [(r.get("step"), accuracies(r)) for r in evals]
    downstream = next(((step, scores) for step, scores in reversed(scored) if scores), None)
    report = _json(run.eval_report)
    steps, tokens = progress(segs)
    out = {
        "evals": evals,
        "final": evals[-1] if evals else None,
        "best": min(evals, key=lambda r: r["val_loss"]) if evals else None,
        "first": evals[0] if evals else None,
        "train_loss": train[-1]["train_loss"] if train else None,
        "steps": steps,
        "tokens": tokens,
        "downstream": {"step": downstream[0], "scores": downstream[1]} if downstream else None,
        "eval_json": None,
    }
    if report:
        lm = report.get("lm") if isinstance(report.get("lm"), dict) else {}
        tasks = report.get("tasks") if isinstance(report.get("tasks"), dict) else {}
        out["eval_json"] = {
            "checkpoint": report.get("checkpoint"),
            "source": report.get("source"),
            "lm": {
                k: lm[k]
                for k in ("loss", "ppl", "bpb", "top1_acc", "top5_acc")
                if _num(lm.get(k)) is not None
            },
            "tasks": {name: accuracies(t) for name, t in tasks.items() if isinstance(t, dict)},
            "harness": harness_facts(report.get("harness")),
        }
    return out


def harness_facts(section) -> dict | None:
    """lm-evaluation-harness's numbers from eval.json's "harness" section: {"checkpoint", "tasks": {task:
    {metric: value}}, "n_shot"}. lm-eval names a metric "acc,none" (metric, filter): the filter is kept only
    when it is not "none"; standard errors are left out."""
    if not isinstance(section, dict) or not isinstance(section.get("tasks"), dict):
        return None
    tasks = {}
    for task, results in section["tasks"].items():
        if not isinstance(results, dict):
            continue
        numbers = {}
        for key, value in results.items():
            metric, _, kind = str(key).partition(",")
            if "stderr" not in metric and _num(value) is not None:
                numbers[metric if kind in ("", "none") else f"{metric} ({kind})"] = float(value)
        if numbers:
            tasks[str(task)] = numbers
    shots = section.get("n_shot") if isinstance(section.get("n_shot"), dict) else {}
    return {"checkpoint": section.get("checkpoint"), "tasks": tasks, "n_shot": shots} if tasks else None


def incidents(segs: list[dict]) -> list[str]:
    """One line per resume, signal, rollback, kill or crash, skipped non-finite steps, early stop and
    divergence, in the order they happened."""
    out = []
    for i, seg in enumerate(segs):
        start, end = seg["start"] or {}, seg["end"]
        if start.get("rolled_back_from") is not None:
            out.append(
                f"rolled back from step {start['rolled_back_from']} to step {start.get('step')}: "
                f"the steps after {start.get('step')} were trained again"
            )
        if start.get("resumed_from"):
            out.append(f"resumed at step {start.get('step')} from {start['resumed_from']}")
        bad = [r.get("step") for r in seg["records"] if r.get("type") == "bad_step"]
        if bad:
            shown = ", ".join(str(s) for s in bad[:10]) + (", …" if len(bad) > 10 else "")
            out.append(f"{len(bad)} non-finite step(s) skipped (no update): step {shown}")
        for r in seg["records"]:
            if r.get("type") in INCIDENT_TYPES:
                fields = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("type", "step"))
                out.append(f"{r['type']} at step {r.get('step')}" + (f": {fields}" if fields else ""))
        if end is None and i + 1 < len(segs):
            # The resume dropped the lines after its checkpoint; its start line kept how far this got.
            kept = max((r.get("step") or 0 for r in seg["records"]), default=start.get("step"))
            last = (segs[i + 1]["start"] or {}).get("rolled_back_from") or kept
            out.append(f"killed or crashed after step {last} (the run wrote no end line)")
        elif end is not None and end.get("status") == "preempted":
            who = end.get("signal") or "a stop signal"
            out.append(f"stopped by {who} at step {end.get('step')}; the checkpoint of that step was saved")
        elif end is not None and end.get("status") in ("diverged", "early_stopped"):
            out.append(f"{end['status'].replace('_', ' ')} at step {end.get('step')}: {end.get('message')}")
    return out


def status_of(run: RunDir, segs: list[dict]) -> str:
    """How the run stands: the last end line's status, else running or killed (from its heartbeat)."""
    last = segs[-1] if segs else {"end": None}
    if last["end"] is not None:
        return str(last["end"].get("status"))
    from .watch import run_status

    state = run_status(run.path).get("state", "unknown")  # a run of an older lmforge: its heartbeat's
    return "ended without an end line (killed or crashed)" if state == "dead" else state


def samples(run: RunDir) -> list[dict]:
    """The samples of the last step that generated any (at most SAMPLES_SHOWN)."""
    rows = []
    if run.samples.is_file():
        for line in run.samples.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    if not rows:
        return []
    last = rows[-1].get("step")
    return [r for r in rows if r.get("step") == last][:SAMPLES_SHOWN]


def run_facts(path: str | Path) -> dict:
    """Everything the report card shows, as a JSON-able dict."""
    run = RunDir(path)
    if not run.looks_like_run():
        raise ReportError(
            f"{path}: not a run directory (no {RunDir.config} or {RunDir.metrics}); give a RUN_DIR"
        )
    records = [r for r in run.read_metrics() if _well_formed(r)]
    config = run.read_config()
    segs = segments(records)
    codes = [s["start"]["code"] for s in segs if s["start"] and isinstance(s["start"].get("code"), dict)]
    last_start = next((s["start"] for s in reversed(segs) if s["start"]), {})
    plan_keys = ("max_steps", "global_batch_size", "grad_accum", "tokens_per_step")
    plan = {k: last_start.get(k) for k in plan_keys}
    if plan["max_steps"] is None:  # a run of an older lmforge: what its config says
        plan["max_steps"] = (config.get("train") or {}).get("max_steps")
    return {
        "run": run.path.resolve().name,
        "path": str(run.path),
        "status": status_of(run, segs),
        "starts": len(segs),
        "model": model_facts(config),
        "plan": plan,
        "data": data_facts(run, config),
        "compute": compute_facts(segs),
        "results": results_facts(run, records, segs),
        "incidents": incidents(segs),
        "samples": samples(run),
        "code": codes[-1] if codes else None,
        "code_changed": len({json.dumps(c, sort_keys=True) for c in codes}) > 1,
    }


# --- writing ------------------------------------------------------------------------------------


def write_report(path: str | Path) -> list[Path]:
    """Write RUN_DIR/report.md and RUN_DIR/report.html (and the curves they show, when matplotlib is
    installed); returns the files written."""
    from .plot import PlotError, chart_png
    from .report_render import PLOT_MISSING, report_html, report_markdown
    from .safewrite import write_atomic

    run = RunDir(path)
    facts = run_facts(path)
    try:
        png, note = chart_png([run.path]), None
    except PlotError as e:  # no matplotlib, or no lines to draw yet
        png, note = None, PLOT_MISSING if "matplotlib" in str(e) else str(e)
    written = []
    if png is not None:
        write_atomic(run.report_curves, png, "the report's curves")
        written.append(run.report_curves)
    write_atomic(
        run.report_md, report_markdown(facts, RunDir.report_curves if png else None, note), "the report"
    )
    write_atomic(run.report_html, report_html(facts, png, note), "the report")
    return [*written, run.report_md, run.report_html]


def write_report_quietly(path: str | Path, say: Callable[[str], None]) -> None:
    """write_report for the end of a training run: any problem is one warning line, never an error."""
    try:
        write_report(path)
    except Exception as e:  # a finished run stays finished whatever the report meets
        say(f"warning: the report card was not written ({type(e).__name__}: {e}); try: lmforge report {path}")
    else:
        say(f"wrote {RunDir(path).report_html} (the run's report card)")
