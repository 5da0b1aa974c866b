"""`lmforge plot`: the curves of one or more runs from their metrics.jsonl, on one chart.

Four panels against tokens seen: train and val loss, learning rate, gradient norm, tokens/s. matplotlib is
imported only here (the `plot` extra).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .errors import LmforgeError
from .run_dir import RunDir


class PlotError(LmforgeError):
    """A run cannot be plotted (no metrics yet) or the output type is unknown."""


PANELS = [  # (title, metrics.jsonl key, record type)
    ("loss", "train_loss", "train"),
    ("learning rate", "lr", "train"),
    ("gradient norm", "grad_norm", "train"),
    ("tokens/s", "tok_per_s", "train"),
]


def series(run: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """(tokens, values) per metric of a run: train_loss, val_loss, lr, grad_norm, tok_per_s."""
    records = RunDir(run).read_metrics()
    if not records:
        raise PlotError(f"{run}: no {RunDir.metrics} records yet (is it a RUN_DIR of `lmforge train`?)")
    out: dict[str, tuple[list[float], list[float]]] = {}
    for kind, keys in (("train", ("train_loss", "lr", "grad_norm", "tok_per_s")), ("eval", ("val_loss",))):
        rows = [r for r in records if r.get("type") == kind]
        for key in keys:
            pts = [(r["tokens"], r[key]) for r in rows if r.get(key) is not None and "tokens" in r]
            out[key] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def matplotlib_pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no window); PlotError without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotError("plotting needs matplotlib: pip install 'lmforge[plot]'") from e
    return plt


def chart(runs: list[str | Path]):
    """The four panels of the runs as a matplotlib Figure (the caller saves and closes it)."""
    plt = matplotlib_pyplot()
    from matplotlib.ticker import EngFormatter

    data = {str(r): series(r) for r in runs}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (title, key, _), ax in zip(PANELS, axes.flat, strict=True):
        for i, (name, s) in enumerate(data.items()):
            color = colors[i % len(colors)]
            label = Path(name).name or name
            ax.plot(*s[key], color=color, label=f"{label} train" if key == "train_loss" else label)
            if key == "train_loss" and s["val_loss"][0]:
                ax.plot(*s["val_loss"], "o--", color=color, label=f"{label} val")
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 250k, 1.5M: whole numbers collide at this width
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.flat[0].set_ylabel("cross-entropy (nats/token)")
    axes.flat[0].legend(fontsize="small")
    if len(data) > 1:
        axes.flat[3].legend(fontsize="small")
    return fig


def _png(fig, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed (its memory freed) either way."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        matplotlib_pyplot().close(fig)
    return buf.getvalue()


def chart_png(runs: list[str | Path], dpi: int = 110) -> bytes:
    """The runs' chart as PNG bytes (what the report card embeds)."""
    return _png(chart(runs), dpi)


def plot_runs(runs: list[str | Path], out: str | Path):
    """Draw the runs into `out` (.png or .html); returns the matplotlib Figure (closed)."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".html"):
        raise PlotError(f"--out {out}: write a .png or an .html file")
    fig = chart(runs)
    png = _png(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".png":
        out.write_bytes(png)
    else:
        img = base64.b64encode(png).decode("ascii")
        names = ", ".join(html.escape(str(r)) for r in runs)
        out.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>lmforge: {names}</title></head>"
            f"<body><h3>{names}</h3><img alt='training curves' src='data:image/png;base64,{img}'></body></html>\n",
            encoding="utf-8",
        )
    return fig
