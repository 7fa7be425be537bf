"""The ``prune`` recipe pass: magnitude, Wanda or SparseGPT, unstructured or N:M.

Statistics are collected here; the maths lives in :mod:`compressor.prune.scores`,
:mod:`compressor.prune.masks` and :mod:`compressor.prune.sparsegpt`. Wanda and
SparseGPT calibrate in the sequential pipeline (each block sees the inputs
produced by the already-pruned blocks before it); magnitude needs no data and
runs like ``rtn``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from compressor.pipeline.inputs import SharedInputs
from compressor.progress import progress
from compressor.prune.masks import SCOPES, check_sparsity, parse_structure, select_mask
from compressor.prune.scores import InputNormAccumulator, magnitude_scores, wanda_scores
from compressor.prune.sparsegpt import sparsegpt_prune
from compressor.prune.state import attach_mask
from compressor.quant.gptq import HessianAccumulator
from compressor.quant.state import is_quantized
from compressor.recipe import Pass, PassConfig, register_pass, select_modules

__all__ = ["PruneConfig", "PrunePass", "METHODS"]

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
_DEFAULT_SCOPE = {"magnitude": "layer", "wanda": "row", "sparsegpt": "layer"}  # as in each method's paper


@dataclass(frozen=True, kw_only=True)
class PruneConfig(PassConfig):
    """Weight pruning of the targeted linears.

    Attributes:
        method: ``"magnitude"`` (|W|, no calibration), ``"wanda"`` (|W| * ||X_j||,
            arXiv 2306.11695) or ``"sparsegpt"`` (OBS mask and weight update,
            arXiv 2301.00774).
        sparsity: fraction of weights pruned, in [0, 1); required for
            ``structure="unstructured"``, omitted for N:M.
        structure: ``"unstructured"`` or ``"N:M"`` (N kept of every M consecutive
            inputs, e.g. ``"2:4"``, 50% sparse).
        scope: comparison group of an unstructured mask: ``"row"`` (every row
            exactly ``floor(s * K)`` pruned) or ``"layer"``; default as in each
            paper (wanda: row, magnitude and sparsegpt: layer).
        block_size: SparseGPT's mask-selection / lazy-update block (columns).
        dampening: SparseGPT's ``lambda`` as a fraction of the mean Hessian diagonal.
    """

    method: str = "sparsegpt"
    sparsity: float | None = None
    structure: str = "unstructured"
    scope: str | None = None
    block_size: int = 128
    dampening: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: use one of {METHODS}")
        if self.structure == "unstructured":
            if self.sparsity is None:
                raise ValueError("prune: set sparsity (the fraction pruned, e.g. 0.5) or a structure such as '2:4'")
            check_sparsity(self.sparsity)
        else:
            parse_structure(self.structure)
            if self.sparsity is not None:
                raise ValueError(f"sparsity={self.sparsity} with structure={self.structure!r}: N:M fixes the "
                                 "sparsity (1 - N/M); remove sparsity")
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}: use one of {SCOPES} (or leave it unset for the method's default)")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size}: use a positive number of columns, e.g. 128")
        if not 0 <= self.dampening < 1:
            raise ValueError(f"dampening={self.dampening}: use a fraction in [0, 1), e.g. 0.01")

    @property
    def target(self) -> float | str:
        """What the maths functions take: the fraction, or the ``"N:M"`` string."""
        return self.sparsity if self.structure == "unstructured" else self.structure.replace(" ", "")

    @property
    def resolved_scope(self) -> str:
        return self.scope or _DEFAULT_SCOPE[self.method]


@register_pass
class PrunePass(Pass):
    """Prune the targeted linears: zeros written into the weight, the mask recorded on the module."""

    name = "prune"
    config_cls = PruneConfig

    def __init__(self, config: PruneConfig):
        super().__init__(config)
        self._inputs = SharedInputs()  # name -> HessianAccumulator | InputNormAccumulator

    @property
    def requires_calibration(self) -> bool:  # type: ignore[override]
        """Wanda and SparseGPT need layer inputs; magnitude does not."""
        return self.config.method != "magnitude"

    # ------------------------------------------------------------ calibration-free (magnitude)

    def apply(self, model: nn.Module, *, quiet: bool = False, only: set[str] | None = None, **context) -> None:
        """Magnitude-prune the targeted linears of ``model`` (restricted to names in ``only`` when given)."""
        if self.requires_calibration:
            raise ValueError(f"prune method={self.config.method!r} needs calibration data: pass calibration=... to "
                             "compress(), or use method='magnitude'")
        layers = [(n, m) for n, m in select_modules(model, self.config)
                  if isinstance(m, nn.Linear) and (only is None or n in only)]
        if not layers and only is None:
            raise ValueError(f"prune: no nn.Linear matches targets={list(self.config.targets)} "
                             f"ignore={list(self.config.ignore)}; check the module names with `compressor inspect`")
        log.info("prune: magnitude %s on %d layers", self.config.target, len(layers))
        for name, module in progress(layers, "prune", quiet=quiet):
            self._magnitude(name, module)

    def compress_block(self, block: nn.Module, prefix: str) -> None:
        """Magnitude-prune the targeted linears inside one block (sequential pipeline)."""
        for name, module in select_modules(block, self.config, prefix):
            if isinstance(module, nn.Linear):
                self._magnitude(name, module)

    def _magnitude(self, name: str, module: nn.Linear) -> None:
        self._check_module(name, module)
        try:
            mask = select_mask(magnitude_scores(module.weight.data), self.config.target, self.config.resolved_scope)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        self._write(name, module, module.weight.data, mask)

    # ------------------------------------------------------------ calibrated (wanda, sparsegpt)

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module]:
        """Hook every targeted linear of ``block`` to accumulate its input statistics.

        Wanda keeps ``2/n sum x_j^2`` per input feature, SparseGPT the full
        Hessian; linears fed the same tensor (q/k/v, gate/up) share one accumulator.

        Returns:
            the observed linears.
        """
        linears = [(n, m) for n, m in select_modules(block, self.config, prefix) if isinstance(m, nn.Linear)]
        for name, module in linears:
            self._check_module(name, module)
        return self._inputs.hook(linears, self._observe)

    def _observe(self, name: str, x: torch.Tensor) -> None:
        cls = InputNormAccumulator if self.config.method == "wanda" else HessianAccumulator
        acc = self._inputs.accumulator(name, x, lambda: cls(x.shape[-1], x.device))
        if acc is not None:
            acc.add(x)

    def end_block(self, block: nn.Module, prefix: str, **context) -> None:
        """Prune the block's targeted linears from the collected statistics."""
        self._inputs.close()
        modules = dict(select_modules(block, self.config, prefix))
        for name, acc in self._inputs.stats.items():
            module = modules[name]
            w = module.weight.data
            try:
                if self.config.method == "wanda":
                    mask = select_mask(wanda_scores(w, acc.norms), self.config.target, self.config.resolved_scope)
                    new = w
                else:
                    res = sparsegpt_prune(w, acc.H, self.config.target, scope=self.config.resolved_scope,
                                          block_size=self.config.block_size, dampening=self.config.dampening)
                    new, mask = res.weight, res.mask
                    log.debug("sparsegpt %s loss %.4g", name, res.loss)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            self._write(name, module, new, mask)
        missing = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in self._inputs.stats]
        if missing:
            log.warning("prune: %d targeted linears saw no calibration input and were left dense: %s",
                        len(missing), ", ".join(missing[:5]))
        self._inputs.clear()

    # ------------------------------------------------------------ shared

    def _check_module(self, name: str, module: nn.Module) -> None:
        if is_quantized(module):
            raise ValueError(f"{name} is already quantized: pruning moves weights off the quantization grid; "
                             "put the prune pass before the quantization pass in the recipe")

    def _write(self, name: str, module: nn.Linear, weight: torch.Tensor, mask: torch.Tensor) -> None:
        attach_mask(module, weight, mask, self.config.method, self.config.structure)
        log.debug("prune %s: %.1f%% zeros", name, 100 * module.sparsity_info.sparsity)
