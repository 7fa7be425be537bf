"""Reports of evaluation rows: a plain-text table, JSON, Markdown and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "table_columns", "format_value", "format_table", "format_markdown", "write_json", "write_markdown",
           "plot_ppl_vs_bits", "matplotlib_missing"]

COLUMNS = ["label", "ppl", "kl_to_base", "top1_agree", "task_acc", "task_acc_norm", "bits_per_weight", "size_mb",
           "prefill_tok_s", "decode_tok_s", "backend"]
"""Fixed columns of the printed table and the Markdown report, in order (the JSON has every field)."""

_DIGITS = {"ppl": 4, "kl_to_base": 5, "top1_agree": 4, "task_acc": 3, "task_acc_norm": 3, "bits_per_weight": 3,
           "size_mb": 1, "prefill_tok_s": 1, "decode_tok_s": 1, "decode_ms": 2, "peak_mem_mb": 1}


def format_value(col: str, value: Any) -> str:
    """A cell: ``-`` for None, floats rounded per column."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{_DIGITS.get(col, 4)}f}"
    return str(value)


def table_columns(rows: list[dict]) -> list[str]:
    """:data:`COLUMNS`, then each lm-evaluation-harness metric (``<task>/<metric>``) the rows have,
    in first-seen order, without its ``_stderr`` and ``samples`` fields (those stay in the JSON)."""
    extra: list[str] = []
    for row in rows:
        for key in row:
            if "/" in key and key not in extra and "_stderr" not in key and not key.endswith("/samples"):
                extra.append(key)
    return COLUMNS + extra


def _cells(rows: list[dict], cols: list[str]) -> list[list[str]]:
    return [[format_value(c, r.get(c)) for c in cols] for r in rows]


def format_table(rows: list[dict], cols: list[str] | None = None) -> str:
    """Rows as an aligned plain-text table (Markdown-compatible pipes); columns default to :func:`table_columns`."""
    cols = cols or table_columns(rows)
    cells = _cells(rows, cols)
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep] + [line(r) for r in cells])


def format_markdown(rows: list[dict], meta: dict | None = None, cols: list[str] | None = None) -> str:
    """A Markdown report: the settings as a bullet list, then the table."""
    lines = ["# Evaluation", ""]
    for k, v in (meta or {}).items():
        lines.append(f"- {k}: `{v}`")
    if meta:
        lines.append("")
    lines.append(format_table(rows, cols))
    return "\n".join(lines) + "\n"


def write_json(rows: list[dict], path: str | Path, meta: dict | None = None) -> Path:
    """Write ``{"settings": meta, "rows": rows}`` as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": meta or {}, "rows": rows}, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def write_markdown(rows: list[dict], path: str | Path, meta: dict | None = None) -> Path:
    """Write :func:`format_markdown` to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_markdown(rows, meta), encoding="utf-8")
    return path


def matplotlib_missing() -> str | None:
    """Why a plot cannot be drawn here (a sentence naming the fix), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed: `pip install matplotlib` (or `pip install compressor[plot]`) to write --plot"
    return None


def plot_ppl_vs_bits(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Scatter perplexity against bits per weight, one labelled point per row; writes a PNG.

    Rows without ``ppl`` or ``bits_per_weight`` are left out.

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
        ValueError: no row has both values.
    """
    why = matplotlib_missing()
    if why:
        raise ImportError(why)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    points = [(r["bits_per_weight"], r["ppl"], r.get("label", r.get("model", "?"))) for r in rows
              if r.get("bits_per_weight") is not None and r.get("ppl") is not None]
    if not points:
        raise ValueError("no model has both a perplexity and bits per weight to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    for x, y, label in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("bits per weight (quantized layers, incl. scales and zero points)")
    ax.set_ylabel("perplexity")
    if max(p[1] for p in points) / max(min(p[1] for p in points), 1e-9) > 10:
        ax.set_yscale("log")
    xs = [p[0] for p in points]
    if min(xs) > 0 and max(xs) / min(xs) > 4:  # 2-bit ... 32-bit: a log2 axis keeps the low-bit points apart
        ax.set_xscale("log", base=2)
        ticks = sorted({b for b in (2, 3, 4, 6, 8, 16, 32) if min(xs) / 1.5 <= b <= max(xs) * 1.5})
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.margins(x=0.3, y=0.1)  # room for the labels
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "perplexity against bits per weight")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
