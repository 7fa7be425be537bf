"""Structured pruning maths: score and remove whole MLP channels and attention heads.

Unlike :mod:`compressor.passes.prune` (zeros written into dense weights),
structured pruning deletes rows and columns: a gated MLP loses channels ``c`` of
``gate_proj``/``up_proj`` (rows) and ``down_proj`` (columns); attention loses
query heads (``q_proj`` rows, ``o_proj`` columns) and, in ``head_unit="group"``
mode, whole KV groups (also ``k_proj``/``v_proj`` rows). The same count is
removed from every decoder block, so a plain Hugging Face config describes the
result (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``,
``head_dim``) and it loads with ``AutoModelForCausalLM.from_pretrained``.
The ``prune_structured`` recipe pass (statistics and the per-block loop) is
:mod:`compressor.passes.structured`; the functions here are pure or act on
one block. :func:`compressor.export.pruned.save_pruned` writes the smaller model.

GQA: the query heads of KV group ``g`` are the consecutive heads
``[g * n_rep, (g + 1) * n_rep)`` (``repeat_kv``). ``head_unit="query"`` removes
the same number of query heads from every group (the KV heads and the KV cache
stay; SmolLM2-135M's 9 query / 3 KV heads allow 1 or 2 of 3 per group);
``head_unit="group"`` removes whole KV groups with their query heads.

Scores (higher = keep), compared only within one layer:

* MLP channel, ``magnitude``: ``||gate[c, :]|| * ||up[c, :]|| * ||down[:, c]||``.
* MLP channel, ``activation``: ``||down[:, c]|| * ||h_c||`` with ``h`` the input
  of ``down_proj`` over the calibration tokens: exactly the Frobenius norm of
  the channel's contribution ``down[:, c] h_c^T`` to the MLP output (the
  structured analogue of Wanda, arXiv 2306.11695 eq. 1).
* head / group, ``magnitude``: ``||W_o[:, u]||_F``, its columns of ``o_proj``.
* head / group, ``activation``: ``sqrt(tr(W_u Sigma_u W_u^T))`` with ``Sigma_u``
  the second moment of the unit's slice of ``o_proj``'s input: the RMS norm of
  its contribution to the attention output.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from compressor.algorithms.prune.scores import check_weight
from compressor.core.arch import DecoderLayout, resize_attention, resize_mlp

__all__ = [
    "UnitCovarianceAccumulator",
    "mlp_channel_scores",
    "head_scores",
    "keep_indices",
    "slice_linear",
    "remove_mlp_channels",
    "remove_heads",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- scores (pure)


def mlp_channel_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                       input_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each intermediate channel of a gated MLP.

    Args:
        gate: (I, H) ``gate_proj`` weight; up: (I, H) ``up_proj`` weight;
            down: (H, I) ``down_proj`` weight; any float dtype, finite.
        input_norms: (I,) ``||h_c||`` of ``down_proj``'s input over the
            calibration tokens (or anything proportional, e.g.
            :attr:`InputNormAccumulator.norms`); None for the magnitude score.

    Returns:
        (I,) float32; ``||gate_c|| ||up_c|| ||down_c||`` without ``input_norms``,
        ``||down_c|| ||h_c||`` with them.
    """
    for w in (gate, up, down):
        check_weight(w)
    inter = down.shape[1]
    if gate.shape != up.shape or gate.shape != (inter, down.shape[0]):
        raise ValueError(f"gate {tuple(gate.shape)}, up {tuple(up.shape)} and down {tuple(down.shape)} are not "
                         "the (I, H), (I, H), (H, I) weights of one gated MLP")
    down_norm = down.detach().float().norm(dim=0)  # (I,)
    if input_norms is None:
        return gate.detach().float().norm(dim=1) * up.detach().float().norm(dim=1) * down_norm
    if input_norms.shape != (inter,) or not torch.isfinite(input_norms).all() or (input_norms < 0).any():
        raise ValueError(f"input_norms must be ({inter},) finite and non-negative, got {tuple(input_norms.shape)}")
    return down_norm * input_norms.to(down_norm.device, torch.float32)


def head_scores(o_weight: torch.Tensor, width: int, cov: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each unit (a query head, or a KV group) feeding ``o_proj``.

    Args:
        o_weight: (H, U * width) ``o_proj`` weight, finite; unit ``u`` owns the
            columns ``[u * width, (u + 1) * width)``.
        width: columns per unit (``head_dim``, or ``n_rep * head_dim`` for a group).
        cov: (U, width, width) second moment of each unit's slice of
            ``o_proj``'s input (:attr:`UnitCovarianceAccumulator.cov`); None for
            the magnitude score.

    Returns:
        (U,) float32; ``||W_u||_F`` without ``cov``, ``sqrt(tr(W_u cov_u W_u^T))``
        (the RMS norm of the unit's contribution to the output) with it.
    """
    check_weight(o_weight)
    if width < 1 or o_weight.shape[1] % width:
        raise ValueError(f"o_proj has {o_weight.shape[1]} input columns, not a multiple of the unit width {width}")
    units = o_weight.shape[1] // width
    w = o_weight.detach().float().reshape(o_weight.shape[0], units, width)  # (H, U, w)
    if cov is None:
        return w.pow(2).sum((0, 2)).sqrt()
    if cov.shape != (units, width, width) or not torch.isfinite(cov).all():
        raise ValueError(f"cov must be a finite ({units}, {width}, {width}) tensor, got {tuple(cov.shape)}")
    gram = torch.einsum("huw,huv->uwv", w, w)  # (U, w, w) W_u^T W_u
    return (gram * cov.to(gram.device, torch.float32)).sum((1, 2)).clamp_min(0).sqrt()


class UnitCovarianceAccumulator:
    """Running second moment ``1/n sum_x x_u x_u^T`` of each unit's slice of a layer input, (U, w, w) float32.

    The block-diagonal of the input's Hessian, one block per head or KV group:
    U * w^2 floats instead of (U w)^2.
    """

    def __init__(self, units: int, width: int, device: torch.device | str = "cpu"):
        self.units, self.width = units, width
        self.sum = torch.zeros(units, width, width, dtype=torch.float32, device=device)  # (U, w, w)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of layer inputs (..., U * w); non-finite inputs are an error."""
        x = x.reshape(-1, self.units, self.width).to(self.sum.device, torch.float32)  # (T, U, w)
        if not torch.isfinite(x).all():
            raise ValueError("calibration activations contain NaN/inf: check the calibration data and the model weights")
        self.sum += torch.einsum("tuw,tuv->uwv", x, x)
        self.n += x.shape[0]

    @property
    def cov(self) -> torch.Tensor:
        """(U, w, w) float32 mean of ``x_u x_u^T`` over the tokens seen."""
        return self.sum / max(self.n, 1)


def keep_indices(scores: torch.Tensor, remove: int, groups: int = 1) -> torch.Tensor:
    """Indices kept when the ``remove`` lowest scores of each of ``groups`` equal consecutive groups go.

    Args:
        scores: (U,) float scores, higher = keep; finite.
        remove: how many to remove from every group (ties: the lower index goes first).
        groups: number of consecutive equal groups (the KV groups of query heads; 1 otherwise).

    Returns:
        (U - groups * remove,) int64 indices, ascending.
    """
    if scores.ndim != 1 or groups < 1 or scores.shape[0] % groups:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into {groups} equal groups")
    size = scores.shape[0] // groups
    if not 0 <= remove < size:
        raise ValueError(f"cannot remove {remove} of {size} per group: at least one must stay")
    if not torch.isfinite(scores).all():
        raise ValueError("scores have NaN/inf entries: check the weights and the calibration activations")
    order = torch.argsort(scores.detach().reshape(groups, size).cpu(), dim=1, stable=True)  # (G, size)
    kept = order[:, remove:] + torch.arange(groups)[:, None] * size
    return kept.flatten().sort().values


# ---------------------------------------------------------------- removal (in place)


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new ``nn.Linear`` holding the rows (``dim=0``, outputs) or columns (``dim=1``, inputs) ``index``.

    Args:
        linear: the layer, weight (N, K) of any dtype/device; left unchanged.
        index: (n,) int64 indices to keep, ascending.
        dim: 0 keeps output features (and the bias entries), 1 keeps input features.

    Returns:
        a layer of the same dtype and device with weight (n, K) or (N, n).
    """
    if type(linear) is not nn.Linear:
        raise ValueError(f"expected a plain nn.Linear, got {type(linear).__name__}")
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = linear.bias
    if bias is not None:
        bias = bias.detach().index_select(0, index).clone() if dim == 0 else bias.detach().clone()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    out.train(linear.training)
    return out


def _replace(block: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, attr, new)


def remove_mlp_channels(block: nn.Module, layout: DecoderLayout, keep: torch.Tensor) -> None:
    """Keep only the intermediate channels ``keep`` of ``block``'s gated MLP (in place).

    Args:
        block: one decoder block laid out as ``layout``.
        keep: (I',) int64 kept channels, ascending, 0 < I' <= I.
    """
    inter = block.get_submodule(layout.down).in_features
    _check_keep(keep, inter, "MLP channels")
    _replace(block, layout.gate, slice_linear(block.get_submodule(layout.gate), keep, 0))
    _replace(block, layout.up, slice_linear(block.get_submodule(layout.up), keep, 0))
    _replace(block, layout.down, slice_linear(block.get_submodule(layout.down), keep, 1))
    resize_mlp(block.get_submodule(layout.mlp), len(keep))


def remove_heads(block: nn.Module, layout: DecoderLayout, keep_q: torch.Tensor, keep_kv: torch.Tensor,
                 head_dim: int) -> None:
    """Keep only query heads ``keep_q`` and KV heads ``keep_kv`` of ``block``'s attention (in place).

    Every kept query head's KV head must be kept and every kept KV head must keep
    the same number of query heads, so ``repeat_kv`` still pairs them.

    Args:
        block: one decoder block laid out as ``layout``.
        keep_q: (Q',) int64 kept query heads, ascending.
        keep_kv: (KV',) int64 kept KV heads, ascending.
        head_dim: channels per head.
    """
    n_q = block.get_submodule(layout.q).out_features // head_dim
    n_kv = block.get_submodule(layout.k).out_features // head_dim
    _check_keep(keep_q, n_q, "query heads")
    _check_keep(keep_kv, n_kv, "KV heads")
    n_rep = n_q // n_kv
    owners = keep_q // n_rep  # (Q',) KV head of each kept query head
    if not torch.isin(owners, keep_kv).all() or len(keep_q) % len(keep_kv) or not torch.equal(
            torch.bincount(owners, minlength=n_kv)[keep_kv], torch.full((len(keep_kv),), len(keep_q) // len(keep_kv))):
        raise ValueError("kept query heads must all belong to kept KV heads, the same number per KV head")

    def cols(heads: torch.Tensor) -> torch.Tensor:  # (n * head_dim,) channels of the heads
        return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()

    q_idx, kv_idx = cols(keep_q), cols(keep_kv)
    _replace(block, layout.q, slice_linear(block.get_submodule(layout.q), q_idx, 0))
    _replace(block, layout.o, slice_linear(block.get_submodule(layout.o), q_idx, 1))
    if len(keep_kv) < n_kv:
        _replace(block, layout.k, slice_linear(block.get_submodule(layout.k), kv_idx, 0))
        _replace(block, layout.v, slice_linear(block.get_submodule(layout.v), kv_idx, 0))
    resize_attention(block.get_submodule(layout.attention), len(keep_q), len(keep_kv), head_dim)


def _check_keep(keep: torch.Tensor, total: int, what: str) -> None:
    if keep.ndim != 1 or keep.dtype != torch.int64 or len(keep) == 0:
        raise ValueError(f"keep {what}: expected a non-empty (n,) int64 index tensor, got {keep.dtype} {tuple(keep.shape)}")
    if keep.min() < 0 or keep.max() >= total or not (keep[1:] > keep[:-1]).all():
        raise ValueError(f"keep {what}: indices must be ascending, unique and in [0, {total})")





