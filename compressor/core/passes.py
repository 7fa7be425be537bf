"""The pass protocol, the pass registry, config I/O and target matching: what every pass and the pipeline share.

A pass is a frozen config (:class:`PassConfig`) plus the hooks the pipeline
calls (:class:`Pass`). The registry maps recipe names to pass classes; it is
filled by the passes themselves (:func:`register_pass`) when
:mod:`compressor.passes` is imported, which :mod:`compressor.recipe` does: this
module never imports a pass.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from compressor.core.arch import is_experts_module
from compressor.core.layers import is_quantizable

__all__ = [
    "PassConfig",
    "Pass",
    "Sweep",
    "register_pass",
    "registered_passes",
    "config_from_dict",
    "matches",
    "select_modules",
]

_REGISTRY: dict[str, type["Pass"]] = {}
EXPERTS_TARGET = "Experts"  # the target that matches every fused MoE experts module


@dataclass(frozen=True, kw_only=True)
class PassConfig:
    """Base of every pass config: which modules the pass touches.

    Attributes:
        targets: class names (``Linear``), ``Experts`` (every fused MoE experts module,
            :func:`compressor.core.arch.is_experts_module`), exact module names, or ``re:`` regexes.
            Default ``["Linear", "Experts"]``: a pass compresses what it can of them
            (:meth:`Pass.compressible`), and the pipeline refuses to leave a large one untouched.
        ignore: same forms; matched modules are skipped. Default ``["lm_head"]``.
    """

    targets: tuple[str, ...] = ("Linear", "Experts")
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
            for pattern in getattr(self, name):
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as err:
                        raise ValueError(f"{name}: bad regular expression {pattern!r}: {err}") from None

    def to_dict(self) -> dict:
        return _to_plain(self)


class Sweep(Protocol):
    """What :meth:`Pass.plan` gets to measure the dense model: ``sweep(passes)`` runs a calibration sweep of the
    sequential pipeline over it with those passes (their hooks see every block's calibration inputs)."""

    quiet: bool  # no progress bars

    def __call__(self, passes: list["Pass"]) -> None: ...


class Pass:
    """A compression pass. Subclasses set ``name`` and ``config_cls`` and implement the hooks they need.

    The pipeline (:func:`compressor.pipeline.schedule.run_passes`) drives every pass
    through this lifecycle, in recipe order; it never checks class names:

    1. :meth:`plan` once, on the dense model, before any pass changes it (layer-wise
       allocation decides here; ``sweep`` runs a calibration sweep of the pipeline).
    2. Whole-model passes (``model_level``, e.g. rotate, ostquant) at the head of the
       recipe: :meth:`apply` once, with ``calibration_ids`` when they need data.
    3. Block passes in the sequential pipeline, decoder block by decoder block:

       * calibrated (``requires_calibration``): :meth:`begin_block` registers hooks and
         returns the modules whose inputs it records; the pipeline runs the calibration
         batches; :meth:`end_block` compresses the block. With ``staged`` the pair runs
         once per stage of linears (``stage`` holds the stage's names meanwhile).
       * calibration-free: :meth:`compress_block`.

       Targets outside the decoder blocks (calibration-free passes only): :meth:`apply`
       with ``only`` = their names. Without any calibrated pass, every pass is just
       :meth:`apply`'d to the whole model.
    4. Trailing passes (``runs_last``, e.g. distill): :meth:`apply` on the finished model,
       with the full-precision ``teacher`` when ``wants_teacher``.

    Capability flags (class attributes; a subclass may make one a property of its config):

    * ``requires_calibration``: calibration data must flow through the model;
    * ``model_level``: transforms the whole model at once, before any block is compressed;
    * ``runs_last``: trains or fixes the finished model, after every other pass;
    * ``wants_teacher``: needs an untouched copy of the model (costs its memory);
    * ``wants_fp_inputs``: the pipeline runs each calibration batch of the full-precision
      stream through the hooks just before the compressed one (``stream`` says which is
      running: ``"fp"`` or ``"compressed"``);
    * ``wants_fp_targets``: needs the full-precision model's block outputs (passed to
      :meth:`end_block` as ``targets``);
    * ``resumable``: what it does to a block survives a block checkpoint (weights and the
      :mod:`compressor.core.module_state` kinds); the pipeline refuses ``checkpoint_dir`` otherwise;
    * ``weight_pass``: ``"quantize"`` or ``"prune"`` when it compresses the weights its targets match
      (None otherwise); the pipeline refuses a recipe whose weight passes of a kind would leave a
      large weight untouched (:func:`compressor.core.coverage.check_untouched`) and reports coverage;
    * ``streams``: works on a streamed run (:mod:`compressor.export.stream`): everything it reads and
      changes lives in the block being processed (and its targets outside the blocks), so blocks can be
      read from the checkpoint when their turn comes and freed after. A model-level pass that streams
      (rotate) transforms the parts outside the blocks once in :meth:`begin_stream`, each block in
      :meth:`load_block` as soon as it is read, and records what it did in :meth:`end_stream`;
    * ``data_parallel``: calibrates data-parallel (:mod:`compressor.core.distributed`): each rank observes
      its share of the calibration data and :meth:`reduce_statistics` sums the statistics over the ranks
      before :meth:`end_block`; the pipeline refuses a multi-process run with a calibrated pass without it;
    * ``sweeps``: its :meth:`plan` runs a calibration sweep over the dense model (OWL and DP allocation);
      in a streamed run the sweep reads every block from the checkpoint and frees it again, so the blocks
      are read twice;
    * ``plan_for``: the weight-pass kind (``"quantize"``) that carries out this pass's plan (allocate_bits);
      the pipeline refuses a recipe with no such pass after it, so a plan is never silently dropped.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[PassConfig]] = PassConfig
    requires_calibration: ClassVar[bool] = False
    model_level: ClassVar[bool] = False
    runs_last: ClassVar[bool] = False
    wants_teacher: ClassVar[bool] = False
    wants_fp_inputs: ClassVar[bool] = False
    wants_fp_targets: ClassVar[bool] = False
    resumable: ClassVar[bool] = True
    weight_pass: ClassVar[str | None] = None
    plan_for: ClassVar[str | None] = None
    streams: ClassVar[bool] = False
    sweeps: ClassVar[bool] = False
    data_parallel: ClassVar[bool] = False

    def __init__(self, config: PassConfig):
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        # set by the sequential pipeline while it runs one stage of a true-sequential pass: the qualified
        # names of that stage's linears (None: every target of the block)
        self.stage: set[str] | None = None
        # set by the pipeline while it runs paired forwards (wants_fp_inputs): which stream the hooks see
        self.stream: str = "compressed"

    @property
    def staged(self) -> bool:
        """Whether the pipeline should calibrate and compress this pass's linears stage by stage
        (``true_sequential`` in its config), each stage seeing the inputs the earlier ones produce."""
        return bool(getattr(self.config, "true_sequential", False))

    def block_modules(self, block: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
        """:func:`select_modules` of ``block``, restricted to the current :attr:`stage`."""
        found = select_modules(block, self.config, prefix)
        return found if self.stage is None else [(n, m) for n, m in found if n in self.stage]

    def compressible(self, module: nn.Module) -> bool:
        """Whether this pass compresses ``module`` when its targets match it (coverage counts only these).

        Default: the layers :func:`compressor.core.layers.is_quantizable` handles (``nn.Linear``,
        HF ``Conv1D``, ``nn.Conv2d``); a pass that also compresses fused MoE experts says so here.
        """
        return is_quantizable(module)

    # ------------------------------------------------------------ hooks (defaults: nothing to do)

    def plan(self, model: nn.Module, input_ids: torch.Tensor | None, sweep: Sweep) -> None:
        """Decide what needs the whole dense model before anything changes (e.g. per-layer sparsity).

        Args:
            model: the dense model.
            input_ids: (S, L) int64 calibration ids, or None.
            sweep: runs the sequential pipeline over the model with the given passes (calibration only).
        """

    def apply(self, model: nn.Module, **context: Any) -> None:
        """Compress the whole ``model`` at once (no block loop); see the class docstring for ``context``."""
        raise NotImplementedError(f"{self.name} does not run on a whole model outside the block pipeline")

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module] | None:
        """Register calibration hooks on ``block``; returns the observed modules (None: full forwards)."""
        raise NotImplementedError(f"{self.name} collects no calibration statistics")

    def end_block(self, block: nn.Module, prefix: str, **context: Any) -> None:
        """Compress ``block`` from the statistics collected since :meth:`begin_block`.

        ``context``: ``cache`` (the block's input cache) and ``targets`` (its full-precision outputs,
        when ``wants_fp_targets``).
        """
        raise NotImplementedError(f"{self.name} collects no calibration statistics")

    def reduce_statistics(self) -> None:
        """Combine the statistics collected since :meth:`begin_block` over the ranks of a data-parallel run,
        so that every rank's :meth:`end_block` sees the statistics of all the calibration data."""
        raise NotImplementedError(f"{self.name} does not calibrate data-parallel")

    def compress_block(self, block: nn.Module, prefix: str) -> None:
        """Compress ``block`` without calibration data (sequential pipeline, calibration-free pass)."""
        raise NotImplementedError(f"{self.name} does not run inside the block pipeline")

    def begin_stream(self, model: nn.Module) -> None:
        """A streamed run of a model-level pass: check and plan on ``model``, whose decoder blocks are on
        ``meta``, and transform what lives outside them (embeddings, final norm, head)."""
        raise NotImplementedError(f"{self.name} does not run streamed")

    def load_block(self, block: nn.Module, prefix: str, index: int) -> None:
        """A streamed run of a model-level pass: transform decoder block ``index`` (named ``prefix``) just read
        from the checkpoint, before any block pass sees it."""
        raise NotImplementedError(f"{self.name} does not run streamed")

    def end_stream(self, model: nn.Module) -> None:
        """A streamed run of a model-level pass: every block has been through :meth:`load_block`."""
        raise NotImplementedError(f"{self.name} does not run streamed")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Name → pass class for every pass registered so far (:mod:`compressor.passes` registers the built-in ones)."""
    return dict(_REGISTRY)


# ---------------------------------------------------------------- config I/O


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type of a config field."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return config_from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        return tuple(value)
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def config_from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from a mapping, rejecting unknown keys.

    Raises:
        ValueError: naming the unknown key, the closest valid one and the path.
    """
    import difflib

    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown key {path!r} for {cls.__name__}{hint} Valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where or cls.__name__}: {err}") from None


# ---------------------------------------------------------------- targets


def matches(name: str, module: nn.Module, patterns: tuple[str, ...]) -> bool:
    """Whether a module matches any pattern: class name (or a base class's), exact name, ``re:`` regex, or
    ``Experts`` for a fused MoE experts module."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == EXPERTS_TARGET and is_experts_module(module):
            return True
        elif pattern == name or any(cls.__name__ == pattern for cls in type(module).__mro__):
            return True
    return False


def select_modules(model: nn.Module, config: PassConfig, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module matching ``targets`` and not ``ignore``."""
    out = []
    for name, module in model.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if full and matches(full, module, config.targets) and not matches(full, module, config.ignore):
            out.append((full, module))
    return out
