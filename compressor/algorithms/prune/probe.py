"""Network-output distortion of pruning one decoder block at a time.

The rate-distortion allocation of Xu et al. (ICCV 2023, "Efficient Joint
Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks")
measures, for every layer and candidate sparsity, the distortion of the
*network's output* when that layer alone is pruned, and relies on these
distortions adding up. :func:`output_distortion` measures exactly that on a
causal LM, with a decoder block as the unit: the KL divergence of the model's
next-token distribution from the dense model's, averaged over probe tokens.

Each probe re-runs only the blocks from the pruned one onwards: the dense
inputs of every block are recorded once, and the model's forward is made to
start at block ``i`` by swapping its block list for ``blocks[i:]`` and
substituting the recorded hidden state at the first of them. Unlike the
sequential pipeline, this runs the whole model where it lives (it is a
planning step on the dense model).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compressor.core.arch import find_blocks
from compressor.core.progress import progress

__all__ = ["output_distortion"]

log = logging.getLogger(__name__)


def _parent(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent, _, attr = dotted.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


@contextlib.contextmanager
def _start_at(model: nn.Module, blocks_name: str, blocks: nn.ModuleList, i: int, hidden: torch.Tensor):
    """Make ``model``'s forward run only ``blocks[i:]``, starting from ``hidden``."""
    parent, attr = _parent(model, blocks_name)

    def substitute(_module, args, kwargs):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = blocks[i].register_forward_pre_hook(substitute, with_kwargs=True)
    if i:
        parent._modules[attr] = nn.ModuleList(list(blocks)[i:])  # bypass __setattr__: blocks stay registered nowhere else
    try:
        yield
    finally:
        handle.remove()
        parent._modules[attr] = blocks


def _block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Dense inputs of every block and the dense log-probabilities for one batch.

    Returns:
        ``[(B, T, H)] * len(blocks)`` hidden states and (B, T, V) float32 log-probs.
    """
    seen: list[torch.Tensor] = []

    def record(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    if len(seen) != len(blocks):
        raise ValueError(f"{len(seen)} of {len(blocks)} decoder blocks ran: the model's forward skips blocks")
    return seen, F.log_softmax(logits.float(), dim=-1)


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Summed KL(reference || softmax(logits)) over tokens; reference are (B, T, V) log-probs."""
    logq = F.log_softmax(logits.float(), dim=-1)
    return float((reference.exp() * (reference - logq)).sum())


@torch.no_grad()
def output_distortion(
    model: nn.Module,
    input_ids: torch.Tensor,
    grid: Sequence[float],
    masks: Callable[[int, float], list[tuple[nn.Module, torch.Tensor]]],
    *,
    batch_size: int = 2,
    quiet: bool = False,
) -> torch.Tensor:
    """KL of the model's output when one block alone is pruned, for every block and sparsity.

    Args:
        model: a dense Hugging Face causal LM (left unchanged on return).
        input_ids: (S, T) int64 probe sequences.
        grid: (C,) candidate sparsities.
        masks: ``masks(i, s)`` gives the modules of block ``i`` to prune at
            sparsity ``s`` and their (N, K) bool keep-masks (True = kept).
        batch_size: probe sequences per forward.
        quiet: no progress bar.

    Returns:
        (L, C) float64 distortions: mean over probe tokens of
        KL(dense || pruned), in nats; 0 where the mask keeps everything.
    """
    if input_ids.ndim != 2 or input_ids.dtype != torch.int64:
        raise ValueError(f"probe input_ids must be an int64 (S, T) tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    blocks_name, blocks = find_blocks(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros(len(blocks), len(grid), dtype=torch.float64)
    tokens = input_ids.numel()
    batches = [input_ids[s : s + batch_size].to(device) for s in range(0, input_ids.shape[0], batch_size)]
    dense = [_block_inputs(model, blocks, b) for b in batches]
    try:
        for i in progress(range(len(blocks)), "dp probe", quiet=quiet):
            t0 = time.perf_counter()
            for c, s in enumerate(grid):
                if s <= 0:
                    continue
                pruned = masks(i, s)
                saved = [(m, m.weight.data.clone()) for m, _ in pruned]
                try:
                    for m, keep in pruned:
                        m.weight.data.mul_(keep.to(m.weight.device, m.weight.dtype))
                    for b, (inputs, reference) in zip(batches, dense):
                        with _start_at(model, blocks_name, blocks, i, inputs[i]):
                            logits = model(input_ids=b, use_cache=False).logits
                        out[i, c] += _kl(reference, logits) / tokens
                finally:
                    for m, w in saved:
                        m.weight.data.copy_(w)
            log.info("dp probe block %d/%d: KL %s (%.1f s)", i + 1, len(blocks),
                     " ".join(f"{v:.3g}" for v in out[i].tolist()), time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return out.clamp_min(0.0)
