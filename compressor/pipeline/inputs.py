"""Input statistics of a block's linears, collected by forward pre-hooks (shared by GPTQ and pruning)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from compressor.core.arch import experts_layout

__all__ = ["SharedInputs", "ExpertInputs", "MOE_CALIBRATION", "all_reduce_block"]


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

    def all_reduce(self) -> None:
        """Combine every accumulator over the ranks of a data-parallel run (each shared one once, in
        first-seen order: the same on every rank). Accumulators provide ``all_reduce()``."""
        done: set[int] = set()
        for acc in self.stats.values():
            if id(acc) not in done:
                done.add(id(acc))
                acc.all_reduce()


def all_reduce_block(pass_name: str, inputs: SharedInputs, experts: dict[str, nn.Module]) -> None:
    """Combine a block's linear statistics over the ranks of a data-parallel run (a pass's ``reduce_statistics``).

    Args:
        pass_name: the pass, named in the error.
        inputs: the block's shared linear statistics.
        experts: the block's fused MoE experts modules the pass calibrates (name → module).

    Raises:
        ValueError: when the block has experts: the ranks route different tokens to different experts, so
            their per-expert statistics cannot be summed yet.
    """
    if experts:
        raise ValueError(f"{pass_name}: data-parallel calibration of MoE experts is not supported yet (the ranks "
                         "route different tokens to different experts): run in one process")
    inputs.all_reduce()


MOE_CALIBRATION = ("routed", "all_experts")


class ExpertInputs:
    """Per-expert input statistics of fused MoE experts modules, collected by a forward pre-hook on each.

    For every expert ``e`` and fused parameter ``p`` of the module's
    :class:`compressor.core.arch.ExpertsLayout`, one accumulator (made by ``make(width)``) receives what
    ``p[e]`` multiplies: the tokens the router sends ``e`` (``"routed"``) or every token
    (``"all_experts"``, statistics only: the block's output keeps the real routing).

    Attributes:
        stats: experts module name → ``{"tokens": (E,) int64 routed-token counts, p: [accumulator | None] * E}``.
    """

    def __init__(self, make: Callable[[int, torch.device], Any], moe_calibration: str = "routed"):
        if moe_calibration not in MOE_CALIBRATION:
            raise ValueError(f"moe_calibration={moe_calibration!r}: use 'routed' or 'all_experts'")
        self.stats: dict[str, dict] = {}
        self._make = make
        self._all = moe_calibration == "all_experts"
        self._handles: list = []

    def hook(self, experts: Iterable[tuple[str, nn.Module]], skip: Callable[[], bool] = lambda: False) -> list[nn.Module]:
        """Observe each ``(name, fused-experts module)`` on every forward (not while ``skip()`` is true)."""
        observed = []
        for name, module in experts:
            def pre(mod, args, kwargs, name=name):
                if not skip():
                    self._observe(name, mod, args, kwargs)
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            observed.append(module)
        return observed

    def _observe(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index") if k in kwargs]
        x, index = values[0], values[1]
        x = x.reshape(-1, x.shape[-1])  # (T, H)
        index = index.reshape(x.shape[0], -1)  # (T, top_k)
        layout = experts_layout(module)
        n_experts = getattr(module, layout.params[0][0]).shape[0]
        stats = self.stats.setdefault(
            name, {"tokens": torch.zeros(n_experts, dtype=torch.int64)} | {p: [None] * n_experts for p, _ in layout.params})
        routed = torch.stack([(index == e).any(-1) for e in range(n_experts)])  # (E, T)
        stats["tokens"] += routed.sum(-1).cpu()
        with torch.no_grad():
            for e in range(n_experts):
                tokens = x if self._all else x[routed[e]]
                if not tokens.shape[0]:
                    continue
                for pname, inp in layout.inputs(module, e, tokens).items():
                    if stats[pname][e] is None:
                        stats[pname][e] = self._make(inp.shape[-1], inp.device)
                    stats[pname][e].add(inp)

    def starved(self, name: str, n_experts: int, min_tokens: int) -> list[int]:
        """The experts of ``name`` that saw fewer than ``min_tokens`` routed tokens (none with ``all_experts``,
        where every expert sees every token, unless no batch reached the module)."""
        stats = self.stats.get(name)
        if stats is None:
            return list(range(n_experts))
        if self._all:
            return []
        return [e for e in range(n_experts) if int(stats["tokens"][e]) < min_tokens]

    def close(self) -> None:
        """Remove the hooks (the statistics stay in :attr:`stats` until :meth:`clear`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Drop the statistics."""
        self.stats.clear()
