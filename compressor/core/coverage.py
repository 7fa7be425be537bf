"""Coverage: how much of a model the weight passes target and compress, by kind; and the check that no large
weight is silently left behind.

A pass that quantizes or prunes weights (``Pass.weight_pass``) only touches the
modules its ``targets`` match. In transformers 5 the experts of an MoE are fused
3-D parameters, not ``nn.Linear``: ``targets: [Linear]`` would pass over ~95% of
a Qwen3-30B-A3B and report success. So before any work
:func:`check_untouched` fails on every weight tensor holding at least 1% of the
model's parameters that the passes of a kind leave untouched and do not
``ignore``; after the run :func:`coverage` counts what was compressed.
"""

from __future__ import annotations

import re

from torch import nn

from compressor.core.arch import PARAM_KINDS, parameter_kinds
from compressor.core.passes import Pass, matches, select_modules
from compressor.core.sparsity import MASK_SUFFIX, is_pruned
from compressor.core.state import EXPERT_SUFFIXES, gguf_state, is_experts_quantized, is_quantized

__all__ = ["ignore_entry", "coverage", "format_coverage", "check_untouched", "UNTOUCHED_LIMIT"]

UNTOUCHED_LIMIT = 0.01  # a weight holding this fraction of the parameters may not be skipped silently


def _targeted(model: nn.Module, passes: list[Pass]) -> set[str]:
    """Names of the weights the passes' targets reach and the passes compress (:meth:`Pass.compressible`):
    each such module's own parameters of two or more dimensions (biases and norms are not what a weight pass
    compresses)."""
    out = set()
    for p in passes:
        for name, module in select_modules(model, p.config):
            if p.compressible(module):
                out |= {f"{name}.{n}" for n, w in module.named_parameters(recurse=False) if w.ndim >= 2}
    return out


def _compressed(owner: nn.Module | None, leaf: str) -> bool:
    """Whether parameter ``leaf`` of ``owner`` was quantized or pruned."""
    if owner is None:
        return False
    if leaf == "weight" and (is_quantized(owner) or is_pruned(owner) or gguf_state(owner) is not None):
        return True
    if is_pruned(owner) and leaf + MASK_SUFFIX in owner._buffers:  # pruned fused experts
        return True
    return is_experts_quantized(owner) and leaf + EXPERT_SUFFIXES[0] in owner._buffers


def _matched_but_not_compressed(model: nn.Module, passes: list[Pass]) -> dict[str, list[str]]:
    """Module name -> the passes whose targets match it but which do not compress its kind of module."""
    out: dict[str, list[str]] = {}
    for p in passes:
        for name, module in select_modules(model, p.config):
            if not p.compressible(module):
                out.setdefault(name, []).append(p.name)
    return out


def coverage(model: nn.Module, passes: list[Pass]) -> dict:
    """Parameters compressed / targeted / total, overall and by kind (:data:`compressor.core.arch.PARAM_KINDS`).

    ``targeted``: weights (parameters of two or more dimensions) of the modules the weight passes'
    targets match; ``compressed``: weights of modules now quantized or pruned.

    Returns:
        ``{"total", "targeted", "compressed", "kinds": {kind: {"total", "targeted", "compressed"}}}``
        (parameter counts; kinds without parameters are left out).
    """
    kinds = parameter_kinds(model)
    modules = dict(model.named_modules())
    targeted = _targeted(model, [p for p in passes if p.weight_pass])
    out = {k: {"total": 0, "targeted": 0, "compressed": 0} for k in PARAM_KINDS}
    for name, param in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name)
        row = out[kinds[name]]
        row["total"] += param.numel()
        row["targeted"] += param.numel() if name in targeted else 0
        row["compressed"] += param.numel() if _compressed(owner, leaf) else 0
    kept = {k: v for k, v in out.items() if v["total"]}
    return {key: sum(v[key] for v in kept.values()) for key in ("total", "targeted", "compressed")} | {"kinds": kept}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def format_coverage(cov: dict) -> str:
    """One line: ``coverage: compressed / targeted / total parameters``, then the same per kind."""
    kinds = ", ".join(f"{k} {_count(v['compressed'])}/{_count(v['targeted'])}/{_count(v['total'])}"
                      for k, v in cov["kinds"].items())
    share = cov["compressed"] / cov["targeted"] if cov["targeted"] else 0.0
    return (f"coverage (compressed/targeted/total parameters): {_count(cov['compressed'])}/{_count(cov['targeted'])}/"
            f"{_count(cov['total'])}, {share:.1%} of targeted; {kinds}")


def ignore_entry(module_name: str) -> str:
    """The ``ignore`` pattern for this module in every block: ``re:`` with the block indices generalized."""
    pattern = re.escape(module_name)
    generalized = re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", pattern)
    return module_name if generalized == pattern else f"re:{generalized}$"


def check_untouched(model: nn.Module, passes: list[Pass], limit: float = UNTOUCHED_LIMIT) -> None:
    """Fail when the weight passes of a kind (quantize, prune) leave a large weight tensor untouched.

    A parameter of two or more dimensions holding at least ``limit`` of the model's
    parameters must be targeted by a pass of each kind present in the recipe, or be
    matched by one of their ``ignore`` patterns; input embeddings are exempt (a lookup
    table, which no weight pass compresses).

    Raises:
        ValueError: naming each such tensor, why it is missed, and the ``ignore`` entry that
            says it is meant to stay in full precision.
    """
    total = sum(p.numel() for p in model.parameters())
    kinds = parameter_kinds(model)
    modules = dict(model.named_modules())
    by_kind: dict[str, list[Pass]] = {}
    for p in passes:
        if p.weight_pass:
            by_kind.setdefault(p.weight_pass, []).append(p)
    problems: dict[tuple[str, str, str], list[tuple[str, nn.Parameter]]] = {}  # (passes, ignore entry, why) -> tensors
    for group in by_kind.values():
        targeted = _targeted(model, group)
        unsupported = _matched_but_not_compressed(model, group)
        for name, param in model.named_parameters():
            if param.ndim < 2 or param.numel() < limit * total or name in targeted or kinds[name] == "embeddings":
                continue
            owner_name = name.rpartition(".")[0]
            owner = modules[owner_name]
            if any(matches(owner_name, owner, p.config.ignore) for p in group):
                continue
            if owner_name in unsupported:
                why = (f"{type(owner).__name__} parameters, which {', '.join(unsupported[owner_name])} cannot "
                       "compress yet (fused MoE experts: rtn quantizes the gate/up/down layout, "
                       "compressor.core.arch.experts_layout)")
            elif not isinstance(owner, nn.Linear):
                why = f"{type(owner).__name__} parameters, which no target matches"
            else:
                why = "no target matches them"
            passes_named = ", ".join(sorted({p.name for p in group}))
            problems.setdefault((passes_named, ignore_entry(owner_name), why), []).append((name, param))
    if problems:
        lines = []
        for (passes_named, entry, why), tensors in problems.items():
            share = sum(t.numel() for _, t in tensors) / total
            shown = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors[:3]) + (
                f" and {len(tensors) - 3} more" if len(tensors) > 3 else "")
            lines.append(f"{passes_named} would leave {shown} untouched ({share:.1%} of the parameters, "
                         f"{kinds[tensors[0][0]]}): {why}. If they should stay in full precision, add '{entry}' to "
                         "the ignore list")
        raise ValueError("large weights would stay uncompressed:\n  " + "\n  ".join(lines))
