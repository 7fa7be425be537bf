"""The ``allocate_bits`` pass: a bit width and group size per fused group of linears under a bits-per-weight budget.

Mixed precision by rate-distortion, the allocation the ``prune`` pass's ``dp`` uses (Xu et al., CVPR 2023):
on the model as it stands before any weight is quantized, every unit (the linears a runtime fuses: q/k/v,
o, gate/up, down, one unit per block each) is rounded alone to a candidate grid and the KL divergence of
the model's next-token distribution from the unrounded model's is measured on a few calibration sequences
(:func:`compressor.algorithms.allocate.unit_distortion`). ``distortion: output`` measures every unit at
every candidate (units x candidates forwards); the default ``scaled`` measures each unit once, at the
widest candidate within the budget (where the choices are made), and scales that KL to the other candidates
by their layer-output error
``sum tr(dW H dW^T)`` on the same probe tokens (the second-order view: for small weight errors the KL is a
quadratic form in them, here with the unit's input Hessian standing in for its curvature), so it costs
units forwards. Assuming the distortions add up, the exact knapsack
(:func:`compressor.algorithms.allocate.choose`) picks one candidate per unit minimising the summed KL under
the budget, counting each candidate's scales and zero points (:meth:`QuantScheme.bits_per_weight`).

The pass changes no weight: it leaves ``allocated_bits = (bits, group_size)`` on each planned linear, and
the quantization pass after it (``rtn``, ``gptq``, ``adaround``, ``awq``) quantizes that linear at its own
scheme with those two fields replaced (:func:`compressor.core.state.allocated_scheme`). The export then has
one config group per scheme. Units are whole fused groups, so vLLM's fused qkv / gate-up layers get one
scheme each.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from compressor.algorithms.allocate import choose, unit_distortion
from compressor.core.arch import experts_layout, find_blocks, fused_groups
from compressor.core.coverage import ignore_entry
from compressor.core.passes import (
    Pass,
    PassConfig,
    Sweep,
    register_pass,
    select_modules,
)
from compressor.core.scheme import QuantScheme, compute_qparams, fake_quant
from compressor.core.state import ALLOCATED_BITS

__all__ = ["AllocateBitsConfig", "AllocateBitsPass", "parse_candidate", "candidate_name"]

log = logging.getLogger(__name__)

_CANDIDATE = re.compile(r"^w([2-8])(?:g(\d+)|pc)$")
DEFAULT_CANDIDATES = ("w2g64", "w3g64", "w3pc", "w4g64", "w4pc", "w8pc")
DISTORTIONS = ("scaled", "output")


def parse_candidate(text: str) -> tuple[int, int]:
    """``"w3g64"`` -> ``(3, 64)``, ``"w4pc"`` -> ``(4, -1)`` (per output channel).

    Raises:
        ValueError: anything else, with the accepted forms.
    """
    m = _CANDIDATE.match(str(text).strip().lower())
    if not m or (m.group(2) is not None and int(m.group(2)) < 1):
        raise ValueError(f"candidate {text!r}: use w<bits>g<group> or w<bits>pc, bits 2-8 (e.g. w3g64, w4pc)")
    return int(m.group(1)), int(m.group(2)) if m.group(2) else -1


def candidate_name(bits: int, group_size: int) -> str:
    """The inverse of :func:`parse_candidate`."""
    return f"w{bits}pc" if group_size == -1 else f"w{bits}g{group_size}"


@dataclass(frozen=True, kw_only=True)
class AllocateBitsConfig(PassConfig):
    """Mixed-precision allocation.

    Attributes:
        target_bpw: the budget, bits per weight over every planned linear, scales and zero points counted
            (16-bit scales; an asymmetric grid's zero point at the code width), e.g. 3.5.
        candidates: the grids a unit may take, ``w<bits>g<group>`` or ``w<bits>pc``.
        scheme: the grid the probe rounds with, its ``bits`` and ``group_size`` replaced by each candidate's;
            give it the quantization pass's ``symmetric`` / ``observer`` so the probe rounds as that pass will.
        probe: calibration sequences the KL is measured on (each measurement costs one forward over them
            from the unit's block on).
        distortion: ``"scaled"`` (default: one KL per unit, at the widest candidate within ``target_bpw``,
            scaled to the others by their layer-output error) or ``"output"`` (a KL for every unit and candidate: candidates times
            the probe's cost).
        batch_size: probe sequences per forward.
    """

    target_bpw: float | None = None
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    scheme: QuantScheme = field(default_factory=QuantScheme)
    probe: int = 2
    distortion: str = "scaled"
    batch_size: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_bpw is None or isinstance(self.target_bpw, bool) \
                or not isinstance(self.target_bpw, (int, float)) or not 1 < self.target_bpw <= 16:
            raise ValueError(f"allocate_bits: target_bpw={self.target_bpw!r}: give the budget in bits per weight, "
                             "e.g. target_bpw: 3.5")
        if not self.candidates:
            raise ValueError("allocate_bits: candidates is empty: list grids such as [w3g64, w4g64, w4pc]")
        seen = [parse_candidate(c) for c in self.candidates]
        if len(set(seen)) != len(seen):
            raise ValueError(f"allocate_bits: candidates {list(self.candidates)} repeat a grid")
        if self.scheme.is_float:
            raise ValueError(f"allocate_bits mixes integer widths; scheme {self.scheme.describe()} is a float grid")
        if self.distortion not in DISTORTIONS:
            raise ValueError(f"allocate_bits: distortion={self.distortion!r}: use one of {DISTORTIONS}")
        if self.probe < 1 or self.batch_size < 1:
            raise ValueError(f"allocate_bits: probe={self.probe}, batch_size={self.batch_size}: use positive counts")

    @property
    def grids(self) -> list[tuple[int, int]]:
        """``(bits, group_size)`` of every candidate, in order."""
        return [parse_candidate(c) for c in self.candidates]


@register_pass
class AllocateBitsPass(Pass):
    """Plan a bit width and group size per fused group of linears; the next quantization pass applies them."""

    name = "allocate_bits"
    config_cls = AllocateBitsConfig
    requires_calibration = True  # the probe runs the model on calibration sequences
    plan_for = "quantize"  # rtn / gptq / adaround / awq + a quantizer apply the plan

    def __init__(self, config: AllocateBitsConfig):
        super().__init__(config)
        self.allocation: dict[str, str] | None = None  # linear name -> candidate, after plan
        self.distortion: torch.Tensor | None = None  # (units, candidates) KL, after plan
        self.units: list[list[str]] = []
        self.achieved_bpw: float | None = None

    def plan(self, model: nn.Module, input_ids: torch.Tensor | None, sweep: Sweep | None = None) -> dict[str, str]:
        """Measure every unit at every candidate and choose under the budget; mark the planned linears.

        Args:
            model: the model before any weight is quantized (rotations, when the recipe has them, applied).
            input_ids: (S, T) int64 calibration ids; the first ``probe`` sequences are used.
            sweep: unused (the probe runs the model itself).

        Returns:
            linear name -> candidate name (also :attr:`allocation`); each planned linear gets
            ``allocated_bits = (bits, group_size)``.
        """
        cfg = self.config
        if input_ids is None:
            raise ValueError("allocate_bits measures the model on calibration data: pass calibration=... to compress()")
        found = select_modules(model, cfg)
        experts = [n for n, m in found if experts_layout(m) is not None]
        if experts:
            raise ValueError(f"allocate_bits does not allocate over fused MoE experts yet ({experts[0]}, "
                             f"{len(experts)} modules): add '{ignore_entry(experts[0])}' to its ignore (they keep "
                             "the quantization pass's scheme)")
        linears = [(n, m) for n, m in found if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"allocate_bits: no nn.Linear matches targets={list(cfg.targets)} "
                             f"ignore={list(cfg.ignore)}; check the module names with `compressor inspect`")
        blocks_name, blocks = find_blocks(model)
        outside = [n for n, _ in linears if not n.startswith(blocks_name + ".")]
        if outside:
            raise ValueError(f"allocate_bits allocates inside the decoder blocks; {outside[0]} is outside them: add "
                             f"'{outside[0]}' to its ignore (it keeps the quantization pass's scheme)")
        modules = dict(linears)
        self.units = fused_groups([n for n, _ in linears])
        unit_blocks = [int(u[0][len(blocks_name) + 1:].split(".")[0]) for u in self.units]
        grids = cfg.grids
        bits = torch.full((len(self.units), len(grids)), math.inf, dtype=torch.float64)  # (U, C) storage bits
        for u, names in enumerate(self.units):
            for c, (b, g) in enumerate(grids):
                widths = [modules[n].in_features for n in names]
                if g == -1 or all(g <= k for k in widths):
                    scheme = replace(cfg.scheme, bits=b, group_size=g)
                    bits[u, c] = sum(scheme.bits_per_weight(modules[n].in_features) * modules[n].weight.numel()
                                     for n in names)
        weights = sum(m.weight.numel() for _, m in linears)
        per_weight = [[float(bits[u, c]) / sum(modules[n].weight.numel() for n in names) for c in range(len(grids))]
                      for u, names in enumerate(self.units)]  # (U, C) bits per weight, inf where inapplicable
        smallest = float(bits.min(dim=1).values.sum()) / weights
        if smallest > cfg.target_bpw:
            raise ValueError(f"allocate_bits: target_bpw={cfg.target_bpw} is below the smallest the candidates reach "
                             f"({smallest:.3f} bits per weight): add smaller candidates (e.g. w2g64) or raise it")

        def rounded(u: int, c: int) -> list[tuple[nn.Module, torch.Tensor]]:
            """Unit ``u``'s linears with their weights on candidate ``c``'s grid (RTN, the probe's scheme)."""
            if math.isinf(bits[u, c]):
                return []
            scheme = replace(cfg.scheme, bits=grids[c][0], group_size=grids[c][1])
            return [(modules[n], _rtn(modules[n].weight.data, scheme)) for n in self.units[u]]

        ids = input_ids[: cfg.probe]
        quiet = bool(getattr(sweep, "quiet", False))
        if cfg.distortion == "output":
            log.info("allocate_bits: probing %d units x %d candidates on %d x %d tokens", len(self.units),
                     len(grids), ids.shape[0], ids.shape[1])
            measured = unit_distortion(model, ids, unit_blocks, len(grids), rounded, batch_size=cfg.batch_size,
                                       quiet=quiet, label="allocate_bits probe")
        else:
            errors = _output_errors(model, ids, self.units, modules, rounded, len(grids), cfg.batch_size)  # (U, C)
            ref = _reference(bits, torch.tensor(per_weight), cfg.target_bpw)  # (U,) where each unit's KL is measured
            log.info("allocate_bits: probing %d units at the candidate nearest the budget on %d x %d tokens",
                     len(self.units), ids.shape[0], ids.shape[1])
            kl = unit_distortion(model, ids, unit_blocks, len(grids),
                                 lambda u, c: rounded(u, c) if c == int(ref[u]) else [],
                                 batch_size=cfg.batch_size, quiet=quiet, label="allocate_bits probe")
            at_ref = kl.gather(1, ref[:, None])  # (U, 1)
            measured = at_ref * errors / errors.gather(1, ref[:, None]).clamp_min(1e-30)
        self.distortion = torch.where(torch.isinf(bits), math.inf, measured)
        picks = _knapsack(self.distortion, bits, cfg.target_bpw * weights)
        self.allocation = {}
        for names, c in zip(self.units, picks):
            for n in names:
                setattr(modules[n], ALLOCATED_BITS, grids[c])
                self.allocation[n] = cfg.candidates[c]
        self.achieved_bpw = float(sum(bits[u, c] for u, c in enumerate(picks))) / weights
        counts = Counter(cfg.candidates[c] for c in picks)
        log.info("allocate_bits: %d units at %.3f bits per weight (budget %.3f): %s", len(picks), self.achieved_bpw,
                 cfg.target_bpw, ", ".join(f"{n} x{counts[n]}" for n in cfg.candidates if counts[n]))
        return self.allocation

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module]:
        """Nothing to observe: the plan was made before the pipeline."""
        return []

    def end_block(self, block: nn.Module, prefix: str, **context) -> None:
        """Nothing to do: the plan changes no weight (the quantization pass after this one applies it)."""


def _reference(bits: torch.Tensor, per_weight: torch.Tensor, target: float) -> torch.Tensor:
    """(U,) the candidate each unit's KL is measured at in ``scaled`` mode: the widest applicable grid at or under
    the budget (where the knapsack's decisions lie, so the scaling extrapolates least there), else the narrowest."""
    ok = ~torch.isinf(bits)
    under = ok & (per_weight <= target)
    widest_under = torch.where(under, per_weight, -math.inf).argmax(dim=1)
    narrowest = torch.where(ok, per_weight, math.inf).argmin(dim=1)
    return torch.where(under.any(dim=1), widest_under, narrowest)


def _rtn(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """(N, K) ``w`` rounded to nearest on ``scheme``'s grid, in ``w``'s dtype."""
    w32 = w.float()
    return fake_quant(w32, compute_qparams(w32, scheme), scheme).to(w.dtype)


@torch.no_grad()
def _output_errors(model: nn.Module, ids: torch.Tensor, units: list[list[str]], modules: dict[str, nn.Module],
                   rounded, n_candidates: int, batch_size: int) -> torch.Tensor:
    """(U, C) float64 layer-output error of every unit at every candidate on the probe tokens:
    ``sum over the unit's linears of tr(dW H dW^T)``, ``H = X^T X`` over the unit's (shared) input rows."""
    hess: dict[int, torch.Tensor] = {}

    def hook(u: int):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            hess[u] = hess.get(u, 0) + x.T @ x
        return record

    handles = [modules[names[0]].register_forward_pre_hook(hook(u)) for u, names in enumerate(units)]
    try:
        for s in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[s : s + batch_size].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = torch.full((len(units), n_candidates), math.inf, dtype=torch.float64)
    for u in range(len(units)):
        for c in range(n_candidates):
            changed = rounded(u, c)
            if not changed:
                continue
            total = 0.0
            for m, q in changed:
                dw = q.float() - m.weight.float()  # (N, K)
                total += float((dw @ hess[u].to(dw.device) * dw).double().sum())
            out[u, c] = total
    return out


def _knapsack(distortion: torch.Tensor, bits: torch.Tensor, budget: float, resolution: int | None = None) -> list[int]:
    """One candidate per unit minimising the summed distortion with at most ``budget`` storage bits in total.

    Args:
        distortion: (U, C) float64; ``inf`` where a candidate does not apply.
        bits: (U, C) float64 storage bits; ``inf`` where a candidate does not apply.
        budget: total bits allowed.
        resolution: budget units of the dynamic programme (default ``max(20000, 200 U)``); each candidate's
            saving is rounded down, so the budget is always met.
    """
    finite = torch.where(torch.isinf(bits), -math.inf, bits)
    top = finite.max(dim=1).values  # (U,) the costliest applicable candidate of each unit
    saved = torch.where(torch.isinf(bits), 0.0, top[:, None] - bits)  # (U, C) bits saved against it
    scale = float(top.sum())
    units = resolution or max(20000, 200 * bits.shape[0])
    need_bits = scale - budget
    if need_bits <= 0:
        need = 0
    else:
        need = math.ceil(need_bits / scale * units)
    gain = torch.floor(saved / scale * units).long()
    try:
        return choose(distortion, gain, need)
    except ValueError:
        raise ValueError(f"allocate_bits: no choice of candidates fits {budget:.0f} bits at the dynamic programme's "
                         "resolution: raise target_bpw a little or add smaller candidates") from None
