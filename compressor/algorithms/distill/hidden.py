"""Intermediate-representation matching: hidden states (or attention outputs) with a layer map.

The student's layer ``i`` is matched to the teacher's layer ``layer_map[i]``
(e.g. a 2x shallower student: ``{0: 1, 1: 3, ...}``), by mean squared error or
by 1 - cosine similarity per token (as in TinyBERT, arXiv 1909.10351, eq. 7,
and DistilBERT's cosine loss, arXiv 1910.01108). When the widths differ a
learnable linear projection maps the student's width to the teacher's
(TinyBERT's W_h); :func:`make_projections` builds them. Attention-output
matching is the same call on the attention blocks' outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compressor.algorithms.distill.losses import reduce_tokens

HIDDEN_KINDS = ("mse", "cosine")


def make_projections(layer_map: Mapping[int, int], student_width: int, teacher_width: int, *,
                     bias: bool = False) -> nn.ModuleDict:
    """One ``nn.Linear(student_width, teacher_width)`` per student layer of ``layer_map``.

    Keys are the student layer indices as strings (``nn.ModuleDict`` needs str keys).
    Empty when the widths are equal (no projection needed). Weights start as a
    (truncated) identity so the initial loss is that of the raw states.
    """
    if student_width == teacher_width:
        return nn.ModuleDict()
    projections = nn.ModuleDict()
    for layer in layer_map:
        proj = nn.Linear(student_width, teacher_width, bias=bias)
        with torch.no_grad():
            proj.weight.zero_()
            n = min(student_width, teacher_width)
            proj.weight[:n, :n] = torch.eye(n)
            if bias:
                proj.bias.zero_()
        projections[str(layer)] = proj
    return projections


def hidden_state_loss(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                      layer_map: Mapping[int, int], *, kind: str = "mse",
                      projections: Mapping[str, nn.Module] | None = None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the mapped layers of the per-token matching loss, averaged over masked tokens.

    Args:
        student_states: per student layer, ``(..., T, Ds)`` float (e.g. ``output_hidden_states``).
        teacher_states: per teacher layer, ``(..., T, Dt)`` float; constants (detached).
        layer_map: ``{student_layer: teacher_layer}`` indices into the two sequences.
        kind: ``"mse"`` (mean over the width of the squared difference, per token) or
            ``"cosine"`` (1 - cosine similarity, per token).
        projections: ``{str(student_layer): module}`` mapping Ds -> Dt, needed when Ds != Dt.
        mask: ``(..., T)`` bool/0-1 tokens that count, or None.

    Returns:
        0-d tensor, float32 (float64 for float64 states).
    """
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"kind={kind!r}: use one of {HIDDEN_KINDS}")
    if not layer_map:
        raise ValueError("layer_map is empty: map at least one student layer to a teacher layer, e.g. {0: 0}")
    projections = projections or {}
    losses = []
    for s_idx, t_idx in layer_map.items():
        if not 0 <= s_idx < len(student_states) or not 0 <= t_idx < len(teacher_states):
            raise ValueError(
                f"layer_map entry {s_idx}: {t_idx} is out of range: the student has {len(student_states)} "
                f"states and the teacher {len(teacher_states)}"
            )
        student = student_states[s_idx]
        teacher = teacher_states[t_idx].detach()
        if str(s_idx) in projections:
            student = projections[str(s_idx)](student)
        if student.shape != teacher.shape:
            raise ValueError(
                f"student layer {s_idx} {tuple(student.shape)} vs teacher layer {t_idx} {tuple(teacher.shape)}: "
                "the token shapes must match and the widths too; pass projections=make_projections(...) "
                "when the widths differ"
            )
        dtype = torch.promote_types(student.dtype, torch.float32)
        student, teacher = student.to(dtype), teacher.to(dtype)
        if kind == "mse":
            per_token = (student - teacher).pow(2).mean(-1)  # (..., T)
        else:
            per_token = 1.0 - F.cosine_similarity(student, teacher, dim=-1)  # (..., T)
        losses.append(reduce_tokens(per_token, mask, "mean"))
    return torch.stack(losses).mean()
