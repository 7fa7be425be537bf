"""The scheduling policy: which pass runs when, on what, with which data.

:func:`run_passes` drives a recipe's passes through the lifecycle declared on
:class:`compressor.core.passes.Pass`:

1. leading whole-model passes (``model_level``: rotate, ostquant) once, on the whole model;
2. every remaining pass's :meth:`~compressor.core.passes.Pass.plan` on the dense model;
3. the block passes: without any calibrated pass, each is applied to the whole model;
   otherwise the sequential block pipeline runs them decoder block by decoder block
   (token ids), or the layer-by-layer pipeline (float inputs such as images), and the
   calibration-free passes then handle their targets outside the blocks;
4. trailing passes (``runs_last``: distill) on the finished model, with a copy of the
   model from before the first pass when one ``wants_teacher``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from compressor.core.arch import find_blocks
from compressor.core.coverage import check_untouched, coverage, format_coverage
from compressor.core.distributed import world
from compressor.core.passes import Pass, Sweep, select_modules
from compressor.core.progress import progress
from compressor.pipeline.layerwise import run_layerwise
from compressor.pipeline.sequential import BlockStream, PipelineConfig, run_sequential

__all__ = ["run_passes", "sweeper", "split_passes", "check_streamable"]

log = logging.getLogger(__name__)

# names of the passes that need data -> (S, L) int64 token ids, or an (S, ...) float tensor of model inputs
CalibrationIds = Callable[[list[str]], torch.Tensor]


def split_passes(passes: list[Pass]) -> tuple[list[Pass], list[Pass], list[Pass]]:
    """``(leading model-level passes, block passes, trailing passes)`` in recipe order.

    Raises:
        ValueError: a model-level pass after a block pass, or a ``runs_last`` pass before another pass.
    """
    n = len(passes)
    while n > 0 and passes[n - 1].runs_last:
        n -= 1
    early = [p.name for p in passes[:n] if p.runs_last]
    if early:
        raise ValueError(f"{early[0]} trains the finished model and must be the last pass: move it to the end of "
                         "the recipe's passes")
    lead = 0
    while lead < n and passes[lead].model_level:
        lead += 1
    late = [p.name for p in passes[lead:n] if p.model_level]
    if late:
        raise ValueError(f"{late[0]} transforms the whole model and must come before {passes[lead].name}: "
                         "move it to the front of the recipe's passes")
    return passes[:lead], passes[lead:n], passes[n:]


class _Sweeper:
    """A checkpoint-free calibration run of the sequential pipeline over one model and calibration set."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor | None, config: PipelineConfig,
                 stream: BlockStream | None = None):
        self.model, self.input_ids, self.stream = model, input_ids, stream
        self.config = replace(config, checkpoint_dir=None)
        self.quiet = config.quiet

    def __call__(self, passes: list[Pass]) -> None:
        if self.input_ids is None:
            raise ValueError(f"{', '.join(p.name for p in passes)}: this plan measures the model on calibration "
                             "data: pass calibration=... to compress()")
        stream = self.stream.reread() if self.stream is not None else None  # only when a plan sweeps
        run_sequential(self.model, passes, self.input_ids, self.config, stream=stream)


def sweeper(model: nn.Module, input_ids: torch.Tensor | None, config: PipelineConfig,
            stream: BlockStream | None = None) -> Sweep:
    """The ``sweep`` a pass's :meth:`~compressor.core.passes.Pass.plan` gets: a checkpoint-free calibration
    run of the sequential pipeline over ``model`` with the given passes; in a streamed run, the sweep reads
    each block from ``stream`` and frees it afterwards, writing nothing
    (:meth:`~compressor.pipeline.sequential.BlockStream.reread`)."""
    return _Sweeper(model, input_ids, config, stream)


def run_passes(
    model: nn.Module,
    passes: list[Pass],
    *,
    calibration_ids: CalibrationIds | None,
    config: PipelineConfig,
    fingerprint: dict | None = None,
    tokenizer: Any = None,
    seed: int = 0,
    quiet: bool = False,
    stream: BlockStream | None = None,
) -> dict:
    """Run ``passes`` on ``model`` in place, in the order the class docstring of this module gives.

    Args:
        model: the model (any ``nn.Module``; decoder LMs take the sequential pipeline).
        passes: built passes, in recipe order.
        calibration_ids: gives the calibration data for the named passes (called at most twice:
            once for the leading passes, once for the rest); None when the caller has none.
        config: the sequential pipeline's device, cache, batch size and checkpoints.
        fingerprint: identifies the run for checkpoint resume (recipe...); the calibration hash
            and the model config's hash are added here.
        tokenizer, seed: handed to trailing passes (distill draws its own data with them).
        quiet: no progress bars.
        stream: a streamed run (:mod:`compressor.export.stream`): the decoder blocks of ``model`` are on
            ``meta``; each is read when its turn comes and released once done. Every pass must stream.

    Returns:
        Provenance: ``{"calibration": {"sha256", "sequences", "seq_len"}}`` when data was used, and
        ``{"coverage": ...}`` (:func:`compressor.core.coverage.coverage`) when a pass compresses weights.

    Raises:
        ValueError: passes out of order, data missing for a pass that needs it, a
            calibrated pass targeting modules outside the decoder blocks, or a large weight
            the weight passes would leave untouched.
    """
    lead, middle, tail = split_passes(passes)
    for i, p in enumerate(passes):
        if p.plan_for and not any(q.weight_pass == p.plan_for for q in passes[i + 1:]):
            raise ValueError(f"{p.name} plans for a {p.plan_for} pass, but none follows it in the recipe: add one "
                             "after it (e.g. gptq or rtn), or remove it")
    check_untouched(model, passes)  # before any work: a large weight no target reaches is an error, not a skip
    if stream is not None:
        check_streamable(passes)
    if world()[1] > 1:
        check_data_parallel(passes)

    def data(group: list[Pass]) -> torch.Tensor:
        names = [p.name for p in group if p.requires_calibration] or [p.name for p in group]
        if calibration_ids is None:
            raise ValueError(f"pass(es) {names} need calibration data: pass calibration='sotu:1790-1999' "
                             "(or a CalibrationSet / an int64 (S, L) tensor of token ids)")
        return calibration_ids(names)

    info: dict = {}
    teacher = copy.deepcopy(model).eval() if any(p.wants_teacher for p in tail) else None
    lead_ids = None
    if any(p.requires_calibration for p in lead):  # ostquant trains on the calibration set before the pipeline
        lead_ids = data([p for p in lead if p.requires_calibration])
        if lead_ids.is_floating_point():
            raise ValueError("model-level calibrated passes (ostquant) need token ids, not a float tensor of inputs")
    for p in lead:  # whole-model transforms run once, before any block is compressed
        if stream is not None:  # streamed: the parts outside the blocks now, each block when it is read
            p.begin_stream(model)
        elif p.requires_calibration:
            p.apply(model, calibration_ids=lead_ids, quiet=quiet)
        else:
            p.apply(model, quiet=quiet)
    if stream is not None and lead:
        stream = _LeadStream(stream, lead)
    ids = None
    if stream is not None and not any(p.requires_calibration for p in middle):
        _stream_blocks(model, middle, stream, quiet)
    elif not any(p.requires_calibration for p in middle):
        for p in middle:
            p.apply(model, quiet=quiet)
    else:
        ids = lead_ids if lead_ids is not None else data(middle)
        digest = _ids_sha256(ids)
        info["calibration"] = {"sha256": digest, "sequences": ids.shape[0], "seq_len": ids.shape[1]}
        if ids.is_floating_point():  # images or features: no decoder blocks, calibrate layer by layer
            if world()[1] > 1:
                raise ValueError("data-parallel calibration runs decoder blocks on token ids; a model calibrated on "
                                 "float inputs, layer by layer, runs in one process")
            if isinstance(getattr(model, "get_input_embeddings", lambda: None)(), nn.Embedding):
                raise ValueError("this model reads token ids: pass calibration as an int64 (S, L) tensor, "
                                 "a CalibrationSet or a text source, not a float tensor")
            run_layerwise(model, middle, ids, batch_size=config.batch_size, device=config.resolved_device(), quiet=quiet)
        else:
            blocks_name, _ = find_blocks(model)
            outside = _targets_outside_blocks(model, middle, blocks_name)
            run_fingerprint = {**(fingerprint or {}), "calibration_sha256": digest, "model_config": _config_hash(model)}
            sweep = sweeper(model, ids, config, stream)
            for p in middle:  # allocation across layers is decided on the dense model, before any block changes
                p.plan(model, ids, sweep)
            run_sequential(model, middle, ids, config, run_fingerprint, stream=stream)
            for p in middle:
                if outside.get(p.name):
                    p.apply(model, quiet=quiet, only=outside[p.name])
    if stream is not None:
        for p in lead:
            p.end_stream(model)
    for p in tail:
        if ids is None and calibration_ids is not None and not getattr(p.config, "data", None):
            ids = calibration_ids([p.name])
        p.apply(model, teacher=teacher, calibration_ids=ids, tokenizer=tokenizer, seed=seed, quiet=quiet)
    del teacher
    if any(p.weight_pass for p in passes):
        info["coverage"] = coverage(model, passes)
        log.info("%s", format_coverage(info["coverage"]))
    return info


def check_data_parallel(passes: list[Pass]) -> None:
    """Refuse, before any work, a multi-process run (:mod:`compressor.core.distributed`) that a pass cannot
    share: every calibrated pass must sum its statistics over the ranks, and none may train or transform
    the whole model.

    Raises:
        ValueError: naming the passes and the way out (one process).
    """
    lead, _, tail = split_passes(passes)
    names = [p.name for p in passes if (p.requires_calibration and not p.data_parallel) or p in lead or p in tail]
    if names:
        raise ValueError(f"{', '.join(dict.fromkeys(names))} cannot calibrate data-parallel yet: run in one process "
                         "(without torchrun / accelerate launch); data-parallel runs take rtn, gptq (GPTAQ too) and prune "
                         "(any method and allocation)")


def check_streamable(passes: list[Pass]) -> None:
    """Refuse, before any work, a recipe a streamed run cannot carry out.

    Raises:
        ValueError: a pass that reads or changes more than one block at a time (whole-model transforms,
            allocation across layers, distillation, a GGUF file), naming it and the way out.
    """
    tail = split_passes(passes)[2]
    names = [p.name for p in passes if not p.streams or p in tail]
    if names:
        raise ValueError(f"{', '.join(dict.fromkeys(names))} cannot run streamed yet (it reads or changes the whole "
                         "model, not one block at a time): run without --stream (stream=False), which loads the "
                         "whole model into memory; streamed runs take rotate, hadamard_inputs, awq, rtn, gptq "
                         "(GPTAQ too), adaround, distill_blocks (block-wise distillation, in place of distill) and prune with "
                         "uniform, N:M, OWL or DP (dp_distortion 'relative' / 'absolute') allocation")


class _LeadStream:
    """A :class:`~compressor.pipeline.sequential.BlockStream` that hands each block, as soon as it is read, to
    the leading model-level passes of a streamed run (rotate), in recipe order, before any block pass."""

    def __init__(self, inner: BlockStream, lead: list[Pass]):
        self.inner, self.lead = inner, lead

    def load(self, index: int, prefix: str, block: nn.Module) -> None:
        self.inner.load(index, prefix, block)
        for p in self.lead:
            p.load_block(block, prefix, index)

    def release(self, index: int, prefix: str, block: nn.Module) -> None:
        self.inner.release(index, prefix, block)

    def park(self) -> None:
        self.inner.park()

    def unpark(self) -> None:
        self.inner.unpark()

    def reread(self) -> "_LeadStream":
        """The inner stream's re-read, each block handed to the leading passes as it is read: an allocation
        sweep measures the model the run compresses (rotated), not the checkpoint."""
        return _LeadStream(self.inner.reread(), self.lead)


def _stream_blocks(model: nn.Module, passes: list[Pass], stream: BlockStream, quiet: bool) -> None:
    """Calibration-free passes on a streamed model: each block read, compressed, released; then the targets
    outside the blocks."""
    blocks_name, blocks = find_blocks(model)
    outside = _targets_outside_blocks(model, passes, blocks_name)
    for i in progress(range(len(blocks)), "blocks", quiet=quiet):
        prefix = f"{blocks_name}.{i}"
        stream.load(i, prefix, blocks[i])
        for p in passes:
            p.compress_block(blocks[i], prefix)
        stream.release(i, prefix, blocks[i])
    for p in passes:
        if outside.get(p.name):
            p.apply(model, quiet=quiet, only=outside[p.name])


def _ids_sha256(ids: torch.Tensor) -> str:
    """sha256 of the calibration data: of the token ids (as :func:`compressor.calibration.ids_sha256`), or of a
    float tensor's bytes."""
    if ids.is_floating_point():
        return hashlib.sha256(ids.cpu().contiguous().numpy().tobytes()).hexdigest()
    from compressor.calibration import ids_sha256

    return ids_sha256(ids)


def _targets_outside_blocks(model: nn.Module, passes: list[Pass], blocks_name: str) -> dict[str, set[str]]:
    """Targets of each pass outside the decoder blocks; calibrated passes may not have any."""
    out = {}
    for p in passes:
        names = {n for n, m in select_modules(model, p.config) if isinstance(m, nn.Linear)
                 and not n.startswith(blocks_name + ".")}
        if names and p.requires_calibration:
            raise ValueError(f"{p.name} targets {sorted(names)[:3]} outside the decoder blocks ({blocks_name}); the "
                             f"sequential pipeline calibrates block modules only: add them to ignore, or quantize "
                             "them with an rtn pass")
        out[p.name] = names
    return out


def _config_hash(model: nn.Module) -> str:
    text = json.dumps(model.config.to_dict(), sort_keys=True, default=str) if hasattr(model, "config") else type(model).__name__
    return hashlib.sha256(text.encode()).hexdigest()
