"""Describe a model directory or export without loading its weights: ``compressor inspect``'s text and plots
(the reading is :mod:`compressor.export.summary`)."""

from __future__ import annotations

from pathlib import Path

from compressor.core.coverage import format_coverage
from compressor.export.summary import layer_sparsity, summarize

__all__ = ["summarize", "format_summary", "layer_sparsity", "format_sparsity", "format_bits", "plot_sparsity",
           "plot_bits"]


def format_summary(info: dict) -> str:
    lines = [
        f"{info['path']}  ({info['architecture']})",
        f"  size on disk       {info['size_bytes'] / 1e6:.2f} MB (weights {info['weights_bytes'] / 1e6:.2f} MB)",
        f"  parameters         {info['params']:,}",
        f"  quantized layers   {info['quantized_layers']}",
        f"  bits per weight    {info['bits_per_weight']} (quantized layers, incl. scales/zero points)",
        f"  bits per parameter {info['model_bits_per_param']} (whole model)",
    ]
    for name, s in info["schemes"].items():
        lines.append(f"  {name}: {s['scheme']} on {s['targets']}")
    if info["ignore"]:
        lines.append(f"  not quantized      {', '.join(info['ignore'][:8])}{' ...' if len(info['ignore']) > 8 else ''}")
    lines.append(f"  loads with         {'; '.join(info['loaders'])}")
    if info.get("coverage"):
        lines.append(f"  {format_coverage(info['coverage'])}")
    return "\n".join(lines)


def format_sparsity(sparsity: dict[str, float]) -> str:
    """One line per layer (name, sparsity in %), then the weight-unweighted mean."""
    return _per_layer(sparsity, lambda s: f"{100 * s:6.2f}%", "  no linear layers found")


def format_bits(bits: dict[str, float]) -> str:
    """One line per quantized layer (name, stored bits per weight with scales and zero points), then the mean
    over layers (unweighted; the summary's ``bits per weight`` is the weight-weighted one)."""
    return _per_layer(bits, lambda b: f"{b:6.3f}", "  no quantized layers found")


def _per_layer(values: dict[str, float], cell, empty: str) -> str:
    """One line per layer (name, ``cell(value)``), then the unweighted mean over layers; ``empty`` when none."""
    if not values:
        return empty
    width = max(len(n) for n in values)
    lines = [f"  {name:<{width}}  {cell(v)}" for name, v in values.items()]
    lines.append(f"  {'mean over layers':<{width}}  {cell(sum(values.values()) / len(values))}")
    return "\n".join(lines)


def plot_sparsity(sparsity: dict[str, float], path: str | Path, title: str | None = None) -> Path:
    """Bar chart of per-layer sparsity in checkpoint order (the allocation across depth); writes a PNG.

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
        ValueError: no layers.
    """
    return _plot_layers({n: 100 * s for n, s in sparsity.items()}, path, "sparsity (%)", (0, 100),
                        title or "per-layer sparsity")


def plot_bits(bits: dict[str, float], path: str | Path, title: str | None = None) -> Path:
    """Bar chart of each quantized layer's stored bits per weight in checkpoint order (a mixed-precision
    allocation across depth); writes a PNG.

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
        ValueError: no layers.
    """
    return _plot_layers(bits, path, "bits per weight (scales included)", (0, max(bits.values(), default=1) * 1.1),
                        title or "per-layer bits per weight")


def _plot_layers(values: dict[str, float], path: str | Path, ylabel: str, ylim: tuple[float, float],
                 title: str) -> Path:
    from compressor.eval.report import matplotlib_missing

    why = matplotlib_missing()
    if why:
        raise ImportError(why)
    if not values:
        raise ValueError("no linear layers to plot")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(values)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.05), 4), dpi=120)
    for kind in kinds:
        idx = [i for i, n in enumerate(names) if n.rsplit(".", 1)[-1] == kind]
        ax.bar(idx, [values[names[i]] for i in idx], width=1.0, label=kind)
    ax.set_xlabel("layer (checkpoint order)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.legend(fontsize=7, ncol=min(len(kinds), 4))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
