"""Model structure discovery: the one place that knows where decoder blocks live."""

from __future__ import annotations

from torch import nn

__all__ = ["find_blocks"]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks of a model.

    Looks for the ``nn.ModuleList`` whose children are instances of the classes
    named in ``model._no_split_modules`` (set by Hugging Face models), and falls
    back to the largest ``nn.ModuleList`` by parameter count.

    Returns:
        ``(qualified name, module list)``, e.g. ``("model.layers", ModuleList)``.

    Raises:
        ValueError: no ``nn.ModuleList`` exists (an unsupported architecture).
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of blocks: the sequential pipeline cannot find its "
            "decoder layers; use a calibration-free pass (rtn) or open an issue with the architecture"
        )
    if no_split:
        hits = [(n, m) for n, m in lists if all(type(b).__name__ in no_split for b in m)]
        if hits:
            return max(hits, key=lambda nm: len(nm[1]))
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
