"""Layer-adaptive allocation shared by pruning and quantization: the exact knapsack and the network-output probe.

Both the ``prune`` pass's rate-distortion allocation (a sparsity per block) and the ``allocate_bits`` pass (a
bit width and group size per fused group of linears) follow Xu et al. (CVPR 2023, "Efficient Joint
Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks"):

* :func:`unit_distortion` measures, for every unit and candidate, the KL divergence of the causal LM's
  next-token distribution from the unchanged model's when that unit alone is changed (pruned, or rounded to a
  candidate grid), re-running only the decoder blocks from the unit's block onwards;
* with distortions assumed additive over units, :func:`choose` picks one candidate per unit minimising the
  summed distortion subject to a total gain (weights removed, bits saved): a multiple-choice knapsack, solved
  exactly by dynamic programming on an integer budget.

Nothing here knows a pass: the callers give the units, their candidates and what each changes.
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
from compressor.core.distributed import all_reduce_sum, share
from compressor.core.progress import progress

__all__ = ["choose", "unit_distortion"]

log = logging.getLogger(__name__)

# what a unit looks like at one candidate: the modules whose weights change and their new (N, K) weights
Replacement = list[tuple[nn.Module, torch.Tensor]]


def choose(distortion: torch.Tensor, gain: torch.Tensor, need: int) -> list[int]:
    """One candidate per unit minimising the summed distortion with at least ``need`` gain in total.

    Args:
        distortion: (U, C) float64 distortions, finite and non-negative.
        gain: (U, C) int64 non-negative gains in budget units (weights removed, bits saved), already rounded
            in the direction that keeps the caller's budget met.
        need: the total gain required (budget units); <= 0 asks for none.

    Returns:
        the chosen column of each row (``U`` ints).

    Raises:
        ValueError: shapes disagree, or no choice reaches ``need``.
    """
    d = torch.as_tensor(distortion, dtype=torch.float64)
    g = torch.as_tensor(gain, dtype=torch.long)
    if d.ndim != 2 or g.shape != d.shape:
        raise ValueError(f"distortion {tuple(d.shape)} and gain {tuple(g.shape)} must both be (units, candidates)")
    need = max(int(need), 0)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    best = torch.full((need + 1,), float("inf"), dtype=torch.float64)  # best[b]: least distortion gaining >= b
    best[0] = 0.0
    picked = torch.empty(d.shape[0], need + 1, dtype=torch.long)
    budget = torch.arange(need + 1)
    for u in range(d.shape[0]):
        # new[b] = min_c best[max(b - gain[u, c], 0)] + d[u, c]: gaining more than needed counts as enough
        prev = best[(budget[None, :] - g[u][:, None]).clamp_min(0)]  # (C, need + 1)
        cand = torch.where(torch.isinf(prev), inf, prev + d[u][:, None])
        best, picked[u] = cand.min(dim=0)
    if torch.isinf(best[need]):
        raise ValueError("no choice of candidates reaches the budget")
    picks, b = [], need
    for u in reversed(range(d.shape[0])):
        c = int(picked[u, b])
        picks.append(c)
        b = max(b - int(g[u, c]), 0)
    picks.reverse()
    return picks


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
    """Unchanged inputs of every block and the unchanged log-probabilities for one batch.

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
def unit_distortion(
    model: nn.Module,
    input_ids: torch.Tensor,
    unit_blocks: Sequence[int],
    n_candidates: int,
    replacement: Callable[[int, int], Replacement],
    *,
    batch_size: int = 2,
    quiet: bool = False,
    label: str = "probe",
) -> torch.Tensor:
    """KL of the model's output when one unit alone is changed, for every unit and candidate.

    Args:
        model: a Hugging Face causal LM with decoder blocks (left unchanged on return).
        input_ids: (S, T) int64 probe sequences.
        unit_blocks: (U,) the decoder block each unit lies in (the probe re-runs the model from there).
        n_candidates: C, the candidates of every unit.
        replacement: ``replacement(u, c)`` gives the modules of unit ``u`` and their (N, K) weights at
            candidate ``c`` (same shape as the modules' own); an empty list means "unchanged" (distortion 0).
        batch_size: probe sequences per forward.
        quiet: no progress bar.
        label: names the progress bar and the log lines.

    Returns:
        (U, C) float64 distortions: mean over probe tokens of KL(unchanged || changed), in nats, >= 0.

    In a data-parallel run (:mod:`compressor.core.distributed`) each rank probes its share of the
    sequences and the per-rank sums are added up, so every rank returns the same table.
    """
    if input_ids.ndim != 2 or input_ids.dtype != torch.int64:
        raise ValueError(f"probe input_ids must be an int64 (S, T) tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    blocks_name, blocks = find_blocks(model)
    bad = [i for i in unit_blocks if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"unit block {bad[0]} is outside the model's {len(blocks)} decoder blocks")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros(len(unit_blocks), n_candidates, dtype=torch.float64)
    tokens = input_ids.numel()  # every rank's: each adds its tokens' KL / tokens, the ranks' parts sum up
    input_ids = input_ids[share(input_ids.shape[0])]  # all of them in one process
    batches = [input_ids[s : s + batch_size].to(device) for s in range(0, input_ids.shape[0], batch_size)]
    dense = [_block_inputs(model, blocks, b) for b in batches]
    try:
        for u in progress(range(len(unit_blocks)), label, quiet=quiet):
            i, t0 = unit_blocks[u], time.perf_counter()
            for c in range(n_candidates):
                changed = replacement(u, c)
                if not changed:
                    continue
                saved = [(m, m.weight.data) for m, _ in changed]
                try:
                    for m, w in changed:
                        if w.shape != m.weight.shape:
                            raise ValueError(f"replacement weight {tuple(w.shape)} for a {tuple(m.weight.shape)} one")
                        m.weight.data = w.to(m.weight.device, m.weight.dtype)
                    for b, (inputs, reference) in zip(batches, dense):
                        with _start_at(model, blocks_name, blocks, i, inputs[i]):
                            logits = model(input_ids=b, use_cache=False).logits
                        out[u, c] += _kl(reference, logits) / tokens
                finally:
                    for m, w in saved:
                        m.weight.data = w
            log.info("%s unit %d/%d (block %d): KL %s (%.1f s)", label, u + 1, len(unit_blocks), i,
                     " ".join(f"{v:.3g}" for v in out[u].tolist()), time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return all_reduce_sum(out).clamp_min(0.0)
