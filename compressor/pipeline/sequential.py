"""The sequential block pipeline: calibrate and compress one decoder block at a time.

1. capture block 0's inputs with a pre-hook that stops the forward (``lm_head``
   never runs);
2. for each block: move it to the compute device; for each pass, run the
   calibration batches with the pass's hooks collecting statistics, then let
   the pass compress the block; recompute the block's outputs with the
   compressed weights as the next block's inputs (or, with ``propagate:
   full_precision``, keep the outputs its first calibration forward gave before
   any weight changed: one forward per block); checkpoint; offload.

Only one block's weights, its statistics and the activation cache sit on the
compute device. Grad and the KV cache are off. With a :class:`BlockStream` the
block's weights are read when its turn comes and released (written out, freed)
once its outputs have been recomputed, so host memory holds one block too.
"""

from __future__ import annotations

import logging
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from compressor.core.arch import find_blocks
from compressor.core.distributed import check_same, share, world
from compressor.core.memory import trim_heap
from compressor.core.passes import Pass
from compressor.core.progress import progress
from compressor.pipeline.cache import ActivationCache, map_tensors
from compressor.pipeline.checkpoint import BlockCheckpoint
from compressor.runtime.activations import quantizers_bypassed

__all__ = ["PipelineConfig", "BlockStream", "run_sequential", "capture_block_inputs"]

log = logging.getLogger(__name__)

_DROP_KWARGS = ("past_key_values", "past_key_value", "cache", "use_cache", "output_attentions")
FORWARD_DTYPES = ("auto", "model", "float32")
PROPAGATE = ("compressed", "full_precision")
_HALF = (torch.bfloat16, torch.float16)
_UPCAST: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()  # blocks in float32 now


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """How the sequential pipeline runs.

    Attributes:
        device: compute device (``"cpu"``, ``"cuda"``, ``"cuda:1"``); default: CUDA when available.
        cache: where block inputs live: ``"device"``, ``"cpu"`` or ``"disk"``.
        cache_dir: directory for the ``"disk"`` cache (a temporary one by default).
        batch_size: calibration sequences per forward.
        checkpoint_dir: write each finished block there and skip finished blocks on restart.
        quiet: no progress bars.
        forward_dtype: the precision of the calibration forwards: ``"auto"`` (float32 on a CPU when the
            block's weights are bfloat16 / float16, whose CPU matmuls without AMX run several times slower
            than float32 ones; the weights as stored elsewhere), ``"model"`` (as stored) or ``"float32"``.
            The passes always see, and the export always holds, the weights in their stored dtype; block
            outputs go back to the activation cache in the dtype the block's inputs had.
        propagate: what the next block's inputs are. ``"compressed"`` (the default, as GPTQ's reference
            code and llm-compressor): each block's outputs recomputed with its compressed weights, so every
            block is calibrated on the inputs the compressed model gives it; two forwards per block.
            ``"full_precision"``: the block's outputs before it is compressed, taken from the first pass's
            calibration forward itself, so every block is calibrated on the full-precision model's inputs
            with one forward per block. Refused with passes that pair the two streams (GPTAQ's asymmetric
            calibration: they would be one stream) and with ``checkpoint_dir`` (a resumed block comes back
            compressed, and its full-precision outputs are gone).
    """

    device: str | None = None
    cache: str = "device"
    cache_dir: Path | None = None
    batch_size: int = 8
    checkpoint_dir: Path | None = None
    quiet: bool = False
    forward_dtype: str = "auto"
    propagate: str = "compressed"

    def __post_init__(self):
        if self.forward_dtype not in FORWARD_DTYPES:
            raise ValueError(f"forward_dtype={self.forward_dtype!r}: use one of {FORWARD_DTYPES}")
        if self.propagate not in PROPAGATE:
            raise ValueError(f"propagate={self.propagate!r}: use one of {PROPAGATE}")
        if self.propagate == "full_precision" and self.checkpoint_dir is not None:
            raise ValueError("propagate='full_precision' cannot resume from checkpoint_dir: a resumed block comes "
                             "back compressed, without its full-precision outputs; drop one of the two")

    def resolved_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def upcast(self, device: torch.device) -> bool:
        """Whether half-precision blocks run their forwards in float32 on ``device``."""
        return self.forward_dtype == "float32" or (self.forward_dtype == "auto" and device.type == "cpu")


class BlockStream(Protocol):
    """Where a streamed run's block weights come from and go (:class:`compressor.export.stream.StreamedExport`).

    ``load`` fills block ``index`` (named ``prefix``), whose parameters are on ``meta``, before it is
    processed; ``release`` takes it once it is compressed and has produced the next block's inputs, and
    frees it. ``park`` frees the parameters outside the blocks once block 0's inputs are captured, and
    ``unpark`` reads them back after the last block. ``reread`` gives a stream over the same checkpoint
    that reads each block and frees it again, writing nothing, for a calibration sweep over the unchanged
    model before the run (a pass's :meth:`~compressor.core.passes.Pass.plan`).
    """

    def load(self, index: int, prefix: str, block: nn.Module) -> None: ...

    def release(self, index: int, prefix: str, block: nn.Module) -> None: ...

    def park(self) -> None: ...

    def unpark(self) -> None: ...

    def reread(self) -> "BlockStream": ...


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


def _outside(model: nn.Module, blocks_name: str):
    """Modules not inside the block list (embeddings, rotary, final norm, head)."""
    for name, module in model.named_modules():
        if name == blocks_name or name.startswith(blocks_name + "."):
            continue
        yield module


def _move_tensors(module: nn.Module, device: torch.device) -> None:
    """Move a module's own parameters and buffers (not its children's), keeping ties."""
    for name, p in module.named_parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in module.named_buffers(recurse=False):
        if b is not None:
            module._buffers[name] = b.to(device)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, blocks_name: str, input_ids: torch.Tensor, config: PipelineConfig
) -> ActivationCache:
    """Run the model up to block 0 on every calibration batch and record block 0's inputs.

    Args:
        input_ids: (S, L) int64 calibration sequences.

    Returns:
        An :class:`ActivationCache` with ``ceil(S / batch_size)`` entries.
    """
    device = config.resolved_device()
    cache = ActivationCache(config.cache, device, config.cache_dir)

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        cache.append(hidden, {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS})
        raise _StopForward

    outside = list(_outside(model, blocks_name))
    homes = [(m, next(iter(list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))), None)) for m in outside]
    for m in outside:
        _move_tensors(m, device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], config.batch_size):
            batch = input_ids[start : start + config.batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for m, t in homes:
            if t is not None:
                _move_tensors(m, t.device)
    if len(cache) == 0:
        raise ValueError("no calibration batch reached the first block: the calibration set is empty")
    return cache


def _onload(block: nn.Module, device: torch.device) -> torch.device:
    """Move one block to the compute device; returns where its weights lived."""
    home = next(block.parameters()).device
    block.to(device)
    return home


def _offload(block: nn.Module, home: torch.device) -> None:
    """Move a finished block back to where it lived, freeing the compute device."""
    block.to(home)


@contextmanager
def _forward_precision(block: nn.Module, on: bool):
    """With ``on``, the block's bfloat16 / float16 parameters and buffers are float32 inside the ``with``
    and get their own dtype back on exit (exactly: both widen to float32 without loss); others (float32,
    float8, integer codes) are left alone. :func:`_block_forward` casts the inputs to match."""
    if not on or block in _UPCAST:
        yield
        return
    halves = [(m, kind, name, t.dtype) for m in block.modules()
              for kind, items in (("p", m._parameters), ("b", m._buffers))
              for name, t in items.items() if t is not None and t.dtype in _HALF and t.device.type != "meta"]
    if not halves:
        yield
        return
    for m, kind, name, _ in halves:
        if kind == "p":
            m._parameters[name].data = m._parameters[name].data.float()
        else:
            m._buffers[name] = m._buffers[name].float()
    _UPCAST[block] = True
    try:
        yield
    finally:
        del _UPCAST[block]
        for m, kind, name, dtype in halves:
            if kind == "p":
                m._parameters[name].data = m._parameters[name].data.to(dtype)
            else:
                m._buffers[name] = m._buffers[name].to(dtype)


def _widen(x):
    """Half-precision tensors in ``x`` (nested tuples / lists / dicts) as float32."""
    return map_tensors(lambda t: t.float() if t.dtype in _HALF else t, x)


def _block_forward(block: nn.Module, cache: ActivationCache, i: int) -> torch.Tensor:
    """Block output (B, L, H) for cached batch ``i``, in the dtype of the cached inputs (float32 compute
    inside :func:`_forward_precision`)."""
    hidden, kwargs = cache.hidden(i), cache.kwargs(i)
    if block in _UPCAST:
        dtype = hidden.dtype
        out = block(_widen(hidden), **_widen(kwargs))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.to(dtype)
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    passes: list[Pass],
    input_ids: torch.Tensor,
    config: PipelineConfig = PipelineConfig(),
    fingerprint: dict | None = None,
    stream: BlockStream | None = None,
) -> None:
    """Compress ``model`` in place, block by block, with calibration data.

    Args:
        model: a Hugging Face model (weights anywhere; each block is moved to
            the compute device while it is processed, then back).
        passes: passes in recipe order, driven through the hooks declared on
            :class:`compressor.core.passes.Pass`: calibrated passes through
            ``begin_block`` / ``end_block``, calibration-free ones through ``compress_block``.
        input_ids: (S, L) int64 calibration sequences.
        config: device, cache location, batch size, checkpointing.
        fingerprint: identifies the run for checkpoint resume (recipe, data hash).
        stream: reads each block before it is processed and releases it after (blocks on ``meta`` meanwhile).
    """
    if input_ids.ndim != 2 or input_ids.dtype != torch.int64:
        raise ValueError(f"calibration input_ids must be an int64 (S, L) tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    if config.checkpoint_dir is not None:
        for p in passes:
            if not p.resumable:
                raise ValueError(f"{p.name} does not support checkpoint_dir yet (a block resumed from a checkpoint "
                                 "would come back without what it attached): run without checkpoint_dir")
    fp_next = config.propagate == "full_precision"
    paired = [p.name for p in passes if p.wants_fp_inputs]
    if fp_next and paired:
        raise ValueError(f"propagate='full_precision' leaves one stream, but {paired[0]} pairs the full-precision "
                         "and compressed streams (GPTAQ's asymmetric calibration): use propagate='compressed', or "
                         "calibrate symmetrically (asymmetric: false)")
    ranks = world()[1]
    if ranks > 1:  # data-parallel calibration: this rank's share of the sequences (compressor.core.distributed)
        if input_ids.shape[0] < ranks:
            raise ValueError(f"{input_ids.shape[0]} calibration sequences cannot be shared by {ranks} processes: "
                             "give at least one per process (--num-samples), or launch fewer")
        input_ids = input_ids[share(input_ids.shape[0])]
    device = config.resolved_device()
    up = config.upcast(device)
    blocks_name, blocks = find_blocks(model)
    was_training = model.training
    model.eval()
    ckpt = BlockCheckpoint(config.checkpoint_dir, fingerprint or {}) if config.checkpoint_dir else None
    cache = capture_block_inputs(model, blocks, blocks_name, input_ids, config)
    # passes that reconstruct the full-precision model's block outputs need its activations too
    fp_cache = cache.copy() if any(p.wants_fp_targets for p in passes) else None
    if stream is not None:
        stream.park()
    try:
        for i in progress(range(len(blocks)), "blocks", quiet=config.quiet or world()[0] != 0):
            block, prefix, t0 = blocks[i], f"{blocks_name}.{i}", time.perf_counter()
            if stream is not None:
                stream.load(i, prefix, block)
            home = _onload(block, device)
            nxt = None  # propagate="full_precision": the next block's inputs, from before the block changed
            if ckpt is not None and ckpt.has(i):
                with _forward_precision(block, up):
                    fp_out = _fp_outputs(block, fp_cache)
                ckpt.load(i, block)
            else:
                fp_out, nxt = _compress_block(block, prefix, passes, cache, fp_cache, up, next_inputs=fp_next)
                check_same(list(block.state_dict().values()), f"block {prefix}")  # no-op in one process
                if ckpt is not None and world()[0] == 0:  # the ranks' blocks are the same (checked): one writer
                    ckpt.save(i, block)
            if nxt is not None:  # propagate="full_precision": no forward of the compressed block
                for j, h in enumerate(nxt):
                    cache.set_hidden(j, h)
                del nxt
            else:
                with _forward_precision(block, up):
                    for j in range(len(cache)):
                        cache.set_hidden(j, _block_forward(block, cache, j))
            for j, h in enumerate(fp_out or []):
                fp_cache.set_hidden(j, h)
            _offload(block, home)
            if stream is not None:
                stream.release(i, prefix, block)
            log.info("block %d/%d done (%.1f s)", i + 1, len(blocks), time.perf_counter() - t0)
        if stream is not None:
            stream.unpark()
    finally:
        cache.close()
        if fp_cache is not None:
            fp_cache.close()
        model.train(was_training)


def _fp_outputs(block: nn.Module, fp_cache: ActivationCache | None) -> list[torch.Tensor] | None:
    """The block's outputs on the full-precision stream (weights not yet compressed, activation quantizers
    bypassed)."""
    if fp_cache is None:
        return None
    with quantizers_bypassed(block):
        return [_block_forward(block, fp_cache, j) for j in range(len(fp_cache))]


def _compress_block(block: nn.Module, prefix: str, passes: list[Pass], cache: ActivationCache,
                    fp_cache: ActivationCache | None, up: bool = False, next_inputs: bool = False,
                    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Run the passes on one block.

    Returns:
        its full-precision-stream outputs (None without that stream), and with ``next_inputs`` its outputs on
        ``cache`` before any pass changed it (else None), one (B, L, H) tensor per batch.

    The full-precision outputs come from the uncompressed block: when the first
    pass pairs the streams, its full-precision forwards provide them (one
    forward saved per batch), otherwise they are computed up front. The
    outputs before any change come from the first pass's first calibration
    forwards, run to the end, or are computed up front when the first pass
    needs no calibration.
    """
    paired_first = bool(passes) and passes[0].wants_fp_inputs and not passes[0].staged
    fp_out = nxt = None
    if fp_cache is not None and not paired_first:
        with _forward_precision(block, up):
            fp_out = _fp_outputs(block, fp_cache)
    if next_inputs and not (passes and passes[0].requires_calibration):
        with _forward_precision(block, up):
            nxt = _fp_outputs(block, cache)
    for k, p in enumerate(passes):
        if not p.requires_calibration:
            p.compress_block(block, prefix)
            continue
        stages = [None]
        if p.staged:
            with _forward_precision(block, up):
                stages = _stages(block, prefix, p, cache)
        try:
            for s, stage in enumerate(stages):
                p.stage = stage
                observed = p.begin_block(block, prefix)
                with _forward_precision(block, up):
                    if p.wants_fp_inputs:
                        out = _paired_forwards(block, p, fp_cache, cache, observed,
                                               fp_outputs=k == 0 and paired_first)
                        if k == 0 and paired_first:
                            fp_out = out
                    else:
                        out = _calibration_forwards(block, cache, observed, full=next_inputs and k == 0 and s == 0)
                        nxt = out if out is not None else nxt
                trim_heap()  # the forwards' freed intermediates go back to the OS before the pass's own peak
                if world()[1] > 1:
                    p.reduce_statistics()
                p.end_block(block, prefix, cache=cache, targets=fp_out)
        finally:
            p.stage = None
    return fp_out, nxt


def _stages(block: nn.Module, prefix: str, p: Pass, cache: ActivationCache) -> list[set[str]]:
    """The pass's linears in ``block`` grouped into stages: runs of linears that read the very same input
    tensor, in the order one forward of the first batch enters them (q/k/v, o, gate/up, down in a Llama block).

    Linears the forward never enters join the last stage (the pass then reports them as it would unstaged).
    """
    linears = [(n, m) for n, m in p.block_modules(block, prefix) if isinstance(m, nn.Linear)]  # stage is None here
    seen: list[tuple[str, torch.Tensor]] = []

    def record(name):
        def hook(_module, args, kwargs):
            seen.append((name, args[0] if args else kwargs.get("input")))
        return hook

    handles = [m.register_forward_pre_hook(record(n), with_kwargs=True) for n, m in linears]
    try:
        _block_forward(block, cache, 0)
    finally:
        for h in handles:
            h.remove()
    stages: list[set[str]] = []
    last = None
    for name, x in seen:
        if any(name in st for st in stages):
            continue  # a linear entered twice stays in its first stage
        if stages and x is last:
            stages[-1].add(name)
        else:
            stages.append({name})
        last = x
    rest = {n for n, _ in linears} - set().union(*stages)
    if rest:
        if stages:
            stages[-1] |= rest
        else:
            stages.append(rest)
    log.debug("%s: %s runs in %d stages: %s", prefix, p.name, len(stages), [sorted(s) for s in stages])
    return stages or [set()]


def _paired_forwards(block: nn.Module, p: Pass, fp_cache: ActivationCache, cache: ActivationCache, observed,
                     fp_outputs: bool = False) -> list[torch.Tensor] | None:
    """Batch by batch: the full-precision stream's batch, then the compressed stream's.

    The pass sees both inputs of a layer for the same calibration sequences
    back to back (its ``stream`` attribute says which is running), so it can
    pair them without holding every batch. The block's weights are as the
    earlier passes left them; activation quantizers an earlier pass attached
    (``quantize_activations`` before GPTAQ) act on the compressed stream only.
    With ``fp_outputs`` the full-precision forwards run to the end and their
    block outputs are returned.
    """
    if fp_cache is None:
        raise ValueError(f"{p.name} needs the full-precision stream, but the pipeline keeps none")
    outs: list[torch.Tensor] = []
    runner = _Truncated(block, observed)
    try:
        for j in range(len(cache)):
            p.stream = "fp"
            with quantizers_bypassed(block):  # the uncompressed model quantizes no activation
                out = runner.run(fp_cache, j, full=fp_outputs)
            if fp_outputs:
                outs.append(out)
            p.stream = "compressed"
            runner.run(cache, j)
    finally:
        p.stream = "compressed"
        runner.close()
    return outs if fp_outputs else None


def _calibration_forwards(block: nn.Module, cache: ActivationCache, observed,
                          full: bool = False) -> list[torch.Tensor] | None:
    """Run the cached inputs through ``block`` so the pass's hooks see them.

    ``observed`` is what :meth:`begin_block` returned: the modules whose inputs
    the pass records (then each forward stops right after the last of them has
    been entered, skipping e.g. ``down_proj`` and the residual add), an empty
    list (no forward needed), or None (full forwards). With ``full`` every
    forward runs to the end and the block outputs (B, L, H) per batch are returned.
    """
    runner = _Truncated(block, observed)
    outs: list[torch.Tensor] = []
    try:
        for j in range(len(cache)):
            out = runner.run(cache, j, full=full)
            if full:
                outs.append(out)
    finally:
        runner.close()
    return outs if full else None


class _Truncated:
    """Block forwards that stop once the last observed module has been entered.

    The first forward runs in full and records the order in which the observed
    modules are entered (the pass's own hooks record as usual); later forwards
    raise right after the pass's hook on the last of them, unless asked for a
    full forward. If some observed module never runs (or ``observed`` is None),
    every forward stays full; an empty ``observed`` needs no forward at all.
    """

    def __init__(self, block: nn.Module, observed):
        self.block, self.observed = block, observed
        self.learnt = observed is None
        self.handle = None
        self.stopping = True

    def _stop(self, _module, _args):
        if self.stopping:
            raise _StopForward

    def run(self, cache: ActivationCache, j: int, full: bool = False) -> torch.Tensor | None:
        """Forward batch ``j``; returns the block output of a full forward, else None."""
        if self.observed is not None and len(self.observed) == 0 and not full:
            return None
        if self.learnt or len(self.observed) == 0:
            self.stopping = not full
            try:
                out = _block_forward(self.block, cache, j)
            except _StopForward:
                return None
            finally:
                self.stopping = True
            return out if full else None
        entered: list[nn.Module] = []
        handles = [m.register_forward_pre_hook(lambda mod, _a: entered.append(mod)) for m in self.observed]
        try:
            out = _block_forward(self.block, cache, j)
        finally:
            for h in handles:
                h.remove()
        self.learnt = True
        if {id(m) for m in entered} == {id(m) for m in self.observed}:
            self.handle = entered[-1].register_forward_pre_hook(self._stop)  # runs after the pass's own hook
        return out if full else None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
