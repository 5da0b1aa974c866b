"""The report card's text: the facts of report.py as titled sections, then as Markdown or as one HTML page.

Everything that comes from the run (sample text, messages, paths, names) is untrusted: the HTML escapes it
all and forbids scripts and network fetches (a Content-Security-Policy), the Markdown escapes table cells
and puts sample text in code fences longer than any backtick run it holds. Control characters a sample
may hold are shown as U+FFFD.
"""

from __future__ import annotations

import base64
import html
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__

PLOT_MISSING = "plots need matplotlib: pip install 'lmforge[plot]', then run: lmforge report RUN_DIR"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass
class Section:
    """A titled part of the report: label/value rows, bullet lines, and samples (prompt, text)."""

    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)


def clean(text: object) -> str:
    """Text for display: control characters (a sample may hold any) replaced by U+FFFD."""
    return _CONTROL.sub("\ufffd", str(text))


def shown_path(path: object, public: bool) -> str:
    """A path as the report shows it: whole, or (`public`, a model card) its last part only, since a
    local path means nothing to a reader elsewhere and may say more than its owner wants."""
    return clean(Path(str(path)).name if public else path)


def num(value, spec: str = ",") -> str:
    """A number in `spec` format, or '?' when it is not known."""
    return "?" if value is None else format(value, spec)


def count(n) -> str:
    """41,504 -> '41.5K'; 1.2e9 -> '1.20B'."""
    if n is None:
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def duration(seconds: float | None) -> str:
    """Seconds as '12.3 s', '4.5 min' or '3.21 h'."""
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def _val(record: dict | None) -> str:
    """'5.6388 (ppl 281.1, 1.937 bits/byte) at step 20' from an eval line."""
    if not record:
        return "-"
    extra = [f"ppl {record['val_ppl']:.1f}"] if isinstance(record.get("val_ppl"), (int, float)) else []
    if isinstance(record.get("val_bpb"), (int, float)):
        extra.append(f"{record['val_bpb']:.3f} bits/byte")
    return (
        f"{record['val_loss']:.4f}"
        + (f" ({', '.join(extra)})" if extra else "")
        + f" at step {record.get('step')}"
    )


def model_section(f: dict) -> Section:
    """What was trained."""
    m, r = f["model"], f["results"]
    s = Section("What was trained")
    if not m:
        s.items.append("config.yaml is missing or unreadable")
        return s
    t, plan = m["train"], f["plan"]
    s.rows += [
        ("architecture", f"{m['family']}: {m['n_layer']} layers, {m['n_embd']} wide, {m['n_head']} heads "
         f"({m['n_kv_head']} key/value)"),
        ("parameters", f"{count(m['params'])} ({m['params']:,})"),
        ("FLOPs per token", f"{m['flops_per_token']:.3g} (training: 6N + 12·L·C·T)"),
        ("sequence length", f"{m['seq_len']} (context {m['context_len']}), vocabulary {m['vocab_size']:,}"),
        ("optimizer", f"{t['optimizer']}, lr {num(t['lr'], 'g')}, warmup {num(t['warmup_steps'])} steps"),
        ("seed", num(t["seed"], "")),
        ("trained", f"{r['steps']:,} of {num(plan['max_steps'])} steps, {r['tokens']:,} tokens"),
    ]  # fmt: skip
    if plan["tokens_per_step"]:
        batch = f"{num(plan['global_batch_size'])} sequences, {plan['tokens_per_step']:,} tokens"
        s.rows.append(("batch per step", batch + f" (accumulation {num(plan['grad_accum'])})"))
    if r["tokens"] and m["params"]:
        s.rows.append(("tokens per parameter", f"{r['tokens'] / m['params']:.2g}"))
    return s


def data_section(f: dict, public: bool = False) -> Section:
    """On what (`public`: local paths by their last part only, for a model card)."""
    d = f["data"]
    s = Section("Data")

    def where(path) -> str:
        return clean(path) if path in d["sources_on_hub"] else shown_path(path, public)

    if not public:
        s.rows.append(("data folder", clean(d["path"]) + ("" if d["found"] else " (not found now)")))
    if d["sources"]:
        s.rows.append(("sources", ", ".join(where(p) for p in d["sources"])))
    if d["hub_datasets"]:
        s.rows.append(("Hugging Face datasets", clean(", ".join(d["hub_datasets"]))))
    if d["train_tokens"] is not None:
        s.rows.append(("tokens", f"{num(d['train_tokens'])} train, {num(d['val_tokens'])} validation"))
    if d["fingerprint"]:
        s.rows.append(("data fingerprint", clean(d["fingerprint"])))
    if d["tokenizer"]:
        s.rows.append(("tokenizer", f"{shown_path(d['tokenizer'], public)}, vocabulary {d['vocab_size']}"))
    if d["tokenizer_id"]:
        s.rows.append(("tokenizer id", clean(d["tokenizer_id"])))
    return s


def compute_section(f: dict) -> Section:
    """Where and for how long."""
    c = f["compute"]
    s = Section("Compute")
    for device, precision, world in c["setups"]:
        s.rows.append(("device", f"{clean(device)}, {precision}, {world} process(es)"))
    untimed = f" (without {c['untimed_starts']} start(s) that left no time)" if c["untimed_starts"] else ""
    s.rows.append(("wall time", duration(c["wall_s"]) + f" over {f['starts']} start(s){untimed}"))
    if c["tok_per_s_steps"] is not None:
        overall = c["tok_per_s_overall"]
        with_evals = f", {overall:,.0f} with evaluations and checkpoints" if overall else ""
        s.rows.append(
            ("throughput", f"{c['tok_per_s_steps']:,.0f} tokens/s (median of logged steps){with_evals}")
        )
    if c["mfu"] is not None:
        s.rows.append(("MFU", f"{100 * c['mfu']:.1f}% (mean of logged steps)"))
    if c["gpu_hours"] is not None:
        s.rows.append(("GPU-hours", f"{c['gpu_hours']:.3g}"))
    return s


def results_section(f: dict, public: bool = False) -> Section:
    """How it ended."""
    r = f["results"]
    s = Section("Results")
    s.rows.append(("status", clean(f["status"])))
    s.rows.append(("final validation loss", _val(r["final"])))
    if r["best"] and r["best"] is not r["final"]:
        s.rows.append(("best validation loss", _val(r["best"])))
    if r["first"] and r["first"]["step"] != (r["final"] or {}).get("step"):
        s.rows.append(("first validation loss", _val(r["first"])))
    if r["train_loss"] is not None:
        s.rows.append(("last train loss", f"{r['train_loss']:.4f}"))
    if r["downstream"]:
        scores = ", ".join(f"{clean(k)} {v:.4f}" for k, v in r["downstream"]["scores"].items())
        s.rows.append((f"downstream (step {r['downstream']['step']})", scores))
    e = r["eval_json"]
    if e:
        lm = ", ".join(f"{k} {v:.4f}" for k, v in e["lm"].items())
        source = shown_path(e["source"], public)
        s.rows.append(("lmforge eval", f"{lm} on {source}" if lm else source))
        for task, scores in (e["harness"] or {"tasks": {}})["tasks"].items():
            shots = (e["harness"]["n_shot"] or {}).get(task)
            label = f"lm-eval {clean(task)}" + (f" ({shots}-shot)" if shots is not None else "")
            s.rows.append((label, ", ".join(f"{clean(k)} {v:.4f}" for k, v in scores.items())))
        for name, scores in e["tasks"].items():
            s.rows.append(
                (f"task {clean(name)}", ", ".join(f"{clean(k)} {v:.4f}" for k, v in scores.items()))
            )
    return s


def history_section(f: dict) -> Section:
    """Resumes and incidents."""
    s = Section("Resumes and incidents")
    s.items = [clean(line) for line in f["incidents"]] or [
        "none: the run trained in one start, without incident"
    ]
    return s


def code_section(f: dict) -> Section:
    """Which code."""
    s = Section("Code")
    code = f["code"] or {}
    s.rows.append(("lmforge", clean(code.get("lmforge", "?"))))
    if code.get("commit"):
        dirty = " with uncommitted changes" if code.get("dirty") else " (clean tree)"
        s.rows.append(("git commit", clean(code["commit"]) + dirty))
    if f["code_changed"]:
        s.items.append("the run was resumed with other code; this is the last start's")
    return s


def sections(facts: dict, public: bool = False) -> list[Section]:
    """The report's sections in order; `public` (a model card) leaves out the samples and local paths."""
    out = [results_section(facts, public), model_section(facts), data_section(facts, public)]
    out.append(compute_section(facts))
    out += [history_section(facts), code_section(facts)]
    if not public and facts["samples"]:
        step = facts["samples"][0].get("step")
        out.append(
            Section(
                f"Samples (step {step})",
                samples=[(clean(r.get("prompt", "")), clean(r.get("text", ""))) for r in facts["samples"]],
            )
        )
    return out


def title(facts: dict) -> str:
    return f"Report card: {clean(facts['run'])}"


def stamp() -> str:
    return f"written {time.strftime('%Y-%m-%d %H:%M')} by lmforge {__version__}"


# --- Markdown ------------------------------------------------------------------------------------


def md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: HTML characters and pipes escaped, one line."""
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def md_fence(text: str) -> str:
    """Text in a fenced code block that nothing inside can close."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def markdown_sections(secs: list[Section], level: str = "##") -> str:
    """Sections as Markdown (headings at `level`)."""
    out = []
    for s in secs:
        out.append(f"{level} {md_cell(s.title)}\n")
        if s.rows:
            out.append("| | |\n|---|---|")
            out += [f"| {md_cell(k)} | {md_cell(v)} |" for k, v in s.rows]
            out.append("")
        out += [f"- {md_cell(item)}" for item in s.items]
        if s.items:
            out.append("")
        for prompt, text in s.samples:
            out += [f"Prompt: `{md_cell(prompt).replace('`', '')}`\n", md_fence(prompt + text), ""]
    return "\n".join(out)


def report_markdown(facts: dict, image: str | None, note: str | None) -> str:
    """report.md: the sections, the curves as a linked image (or why there are none)."""
    secs = sections(facts)
    head = f"# {md_cell(title(facts))}\n\n{stamp()}\n\n"
    curves = (
        f"## Curves\n\n![training curves]({image})\n\n"
        if image
        else f"## Curves\n\n{md_cell(note or '')}\n\n"
    )
    return head + markdown_sections(secs[:1]) + "\n" + curves + markdown_sections(secs[1:])


# --- HTML ----------------------------------------------------------------------------------------

# No script may run and nothing may be fetched: the page is the file alone, images only as data URIs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 62rem; margin: 1.5rem auto; padding: 0 1rem;
  color: #222; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; } h2 { font-size: 1.15rem; margin-top: 1.6rem;
  border-bottom: 1px solid #ddd; }
.stamp { color: #777; font-size: 0.85rem; }
table { border-collapse: collapse; } td { padding: 0.2rem 0.8rem 0.2rem 0; vertical-align: top; }
td:first-child { color: #555; white-space: nowrap; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.6rem; white-space: pre-wrap; word-break: break-word; }
"""


def _html_section(s: Section) -> str:
    e = html.escape
    parts = [f"<h2>{e(s.title)}</h2>"]
    if s.rows:
        parts.append(
            "<table>" + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in s.rows) + "</table>"
        )
    if s.items:
        parts.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in s.items) + "</ul>")
    for prompt, text in s.samples:
        parts.append(f"<pre><b>{e(prompt)}</b>{e(text)}</pre>")
    return "\n".join(parts)


def report_html(facts: dict, png: bytes | None, note: str | None) -> str:
    """report.html: one page with everything inline (styles, the curves as a data URI)."""
    secs = sections(facts)
    if png is not None:
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        curves = f"<h2>Curves</h2>\n<img id='curves' alt='training curves' src='{src}'>"
    else:
        curves = f"<h2>Curves</h2>\n<p>{html.escape(note or '')}</p>"
    body = "\n".join([_html_section(secs[0]), curves, *(_html_section(s) for s in secs[1:])])
    name = html.escape(title(facts))
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>\n"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">\n"
        f"<title>{name}</title>\n<style>{STYLE}</style></head>\n<body>\n"
        f"<h1>{name}</h1>\n<p class='stamp'>{html.escape(stamp())}</p>\n{body}\n</body></html>\n"
    )
