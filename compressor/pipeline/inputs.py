"""Input statistics of a block's linears, collected by forward pre-hooks (shared by GPTQ and pruning)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["SharedInputs"]


class SharedInputs:
    """One accumulator per observed linear; linears fed the very same tensor (q/k/v, gate/up) share one.

    Attributes:
        stats: linear name → accumulator, in first-seen order.
    """

    def __init__(self):
        self.stats: dict[str, Any] = {}
        self._handles: list = []
        self._last: tuple[torch.Tensor, Any] | None = None

    def hook(self, linears: Iterable[tuple[str, nn.Module]], observe: Callable[[str, torch.Tensor], None]) -> list[nn.Module]:
        """Call ``observe(name, x)`` with each linear's input (..., K) on every forward; returns the linears."""
        self._last = None
        observed = []
        for name, module in linears:
            self._handles.append(module.register_forward_pre_hook(lambda _m, args, name=name: observe(name, args[0])))
            observed.append(module)
        return observed

    def accumulator(self, name: str, x: torch.Tensor, make: Callable[[], Any]) -> Any | None:
        """The accumulator to add ``x`` to for ``name`` (made by ``make`` on first use), or None when
        ``x`` is the tensor the previous linear just received: its accumulator already holds it."""
        last = self._last
        if last is not None and last[0] is x:
            self.stats.setdefault(name, last[1])
            return None
        acc = self.stats.get(name)
        if acc is None:
            acc = self.stats[name] = make()
        self._last = (x, acc)
        return acc

    def close(self) -> None:
        """Remove the hooks (the statistics stay in :attr:`stats` until :meth:`clear`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def clear(self) -> None:
        """Drop the statistics."""
        self.stats.clear()
