"""Public Python API: compress (load, run a recipe, export) and evaluate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.atomic import check_output_dir, check_output_file
from compressor.core.distributed import barrier, init_from_env
from compressor.core.hub import resolve_model
from compressor.core.state import is_quantized
from compressor.export.checkpoint import check_checkpoint, is_export, load_model, load_tokenizer
from compressor.export.compressed_tensors import save_compressed, sparsity_config
from compressor.export.gguf import gguf_missing, save_gguf
from compressor.export.pruned import save_pruned
from compressor.export.stream import StreamedExport, load_skeleton
from compressor.pipeline.schedule import check_streamable, run_passes
from compressor.pipeline.sequential import PipelineConfig
from compressor.recipe import Recipe

# load_model, load_tokenizer, is_export and check_checkpoint live in compressor.export.checkpoint; the API offers them too
__all__ = ["load_model", "load_tokenizer", "compress", "evaluate", "is_export", "check_checkpoint"]

log = logging.getLogger(__name__)



def compress(
    model: nn.Module | str | Path,
    recipe: Recipe,
    *,
    calibration: Any = None,
    output: str | Path | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    pipeline: PipelineConfig | None = None,
    quiet: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    stream: bool = False,
) -> nn.Module:
    """Run a recipe on a model and optionally export it.

    Args:
        model: an ``nn.Module`` (modified in place), a checkpoint directory or a Hub repo id.
        recipe: the passes to run.
        calibration: data for calibrated passes (gptq, adaround): a
            :class:`~compressor.calibration.CalibrationSet`, an int64 (S, L)
            tensor of token ids, or a source string such as ``"sotu:1790-1999"``
            (128 windows of 512 tokens, seeded by ``recipe.seed``); LLMs run the
            sequential block pipeline. A float tensor (S, ...) of model inputs
            (e.g. images (S, 3, H, W)) runs the layer-by-layer pipeline instead.
        output: export directory (checked before any work; written atomically): a packed
            compressed-tensors export when a layer is quantized, else a plain Hugging Face
            checkpoint (pruned models; structured pruning makes its matrices smaller). A recipe with a
            ``gguf`` pass writes one GGUF file for llama.cpp instead: ``output`` names the ``.gguf`` file.
        tokenizer: saved beside the export; loaded from the checkpoint when
            ``model`` is a path.
        overwrite: replace an existing ``output``.
        pipeline: device, activation cache, batch size and checkpointing of the
            sequential pipeline.
        quiet: no progress bars.
        revision: branch, tag or commit when ``model`` is a Hub repo id.
        trust_remote_code: allow the repo's own modelling code to run (off by default).
        stream: read each decoder block from the checkpoint's safetensors when its turn comes and write it
            into the export as soon as it is compressed (:mod:`compressor.export.stream`): host memory holds
            one block, not the model. Needs ``model`` as a path or repo id, an ``output``, and passes that
            work block by block (rotate, rtn, gptq, prune with uniform, OWL or per-linear DP allocation).

    Returns:
        The compressed model (quantized linears hold on-grid weights); after a streamed run, its decoder
        blocks are on ``meta`` (their weights are in the export).
    """
    passes = recipe.build()
    if not passes:
        raise ValueError("the recipe has no passes: add one, e.g. '- rtn: {scheme: {bits: 4, group_size: 64}}'")
    gguf_mix = _gguf_mix(passes)
    if output is not None and gguf_mix is not None:
        if why := gguf_missing():
            raise ValueError(why)
        if Path(output).suffix != ".gguf":
            raise ValueError(f"a recipe with a gguf pass writes one llama.cpp file: name it *.gguf, not {output}")
        check_output_file(output, overwrite)
    elif output is not None:
        check_output_dir(output, overwrite)
    if stream:
        _check_stream(model, passes, output)
    source, streamed = None, None
    if isinstance(model, (str, Path)):
        path = resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)
        source = str(path)
        if stream:  # the skeleton in memory; blocks read and written one by one (compressor.export.stream)
            model, reader = load_skeleton(path, trust_remote_code=trust_remote_code)
            streamed = StreamedExport(model, reader, output, write=init_from_env()[0] == 0)  # rank 0 writes
        else:
            model = load_model(path, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            tokenizer = load_tokenizer(path, required=False, trust_remote_code=trust_remote_code)
    torch.manual_seed(recipe.seed)
    info: dict = {"source_model": source, "seed": recipe.seed} | ({"streamed": True} if streamed else {})

    def calibration_ids(names: list[str]) -> torch.Tensor:
        return _calibration_ids(calibration, tokenizer, recipe.seed, names)

    rank, ranks = init_from_env()  # under torchrun / accelerate launch: calibrate data-parallel, rank 0 writes
    if ranks > 1:
        info["processes"] = ranks
    try:
        info |= run_passes(model, passes, calibration_ids=calibration_ids if calibration is not None else None,
                           config=pipeline or PipelineConfig(quiet=quiet), fingerprint={"recipe": recipe.to_dict()},
                           tokenizer=tokenizer, seed=recipe.seed, quiet=quiet, stream=streamed)
        if output is not None and rank == 0:
            _write(model, output, recipe, tokenizer, info, gguf_mix, overwrite, quiet, streamed)
    finally:
        if streamed is not None:
            streamed.close()
    barrier()  # every rank returns once rank 0's export is written
    return model


def _write(model, output, recipe, tokenizer, info, gguf_mix, overwrite, quiet, streamed) -> None:
    """The export of a finished :func:`compress`: a GGUF file, a compressed-tensors directory, or a pruned
    checkpoint."""
    if gguf_mix is not None:
        if tokenizer is None:
            raise ValueError("a GGUF file carries the tokenizer: pass tokenizer=... (or the model as a path)")
        info["gguf"] = save_gguf(model, output, tokenizer=tokenizer, mix=gguf_mix, overwrite=overwrite, quiet=quiet)
    elif streamed is not None or any(is_quantized(m) for m in model.modules()):
        save_compressed(model, output, tokenizer=tokenizer, recipe=recipe, overwrite=overwrite, info=info,
                        stream=streamed)
    else:  # pruned only: a plain (possibly smaller) checkpoint, the zeros and removed units in its weights
        sparsity = sparsity_config(model)
        if sparsity is not None:
            info["sparsity_config"] = sparsity
        save_pruned(model, output, tokenizer=tokenizer, recipe=recipe, overwrite=overwrite, info=info)


def _check_stream(model: Any, passes: list, output: Any) -> None:
    """Refuse a streamed run that could not finish, before any work."""
    if not isinstance(model, (str, Path)):
        raise ValueError("stream=True reads the checkpoint block by block: give the model as a directory or Hub "
                         "repo id, not an nn.Module (a model already in memory needs no streaming)")
    if output is None:
        raise ValueError("stream=True writes each block into the export as soon as it is compressed: give output=...")
    check_streamable(passes)
    if not any(p.weight_pass == "quantize" for p in passes):
        raise ValueError("a streamed run writes a compressed-tensors export, so the recipe must quantize: add a "
                         "quantization pass (rtn, gptq), or run pruning alone without stream")


def _gguf_mix(passes: list) -> str | None:
    """The mix of the recipe's ``gguf`` pass (None without one).

    Raises:
        ValueError: a gguf pass is combined with another quantizing pass, which the GGUF file could not hold.
    """
    mixes = [p.config.mix for p in passes if p.name == "gguf"]
    if not mixes:
        return None
    others = [p.name for p in passes if p.weight_pass == "quantize" and p.name != "gguf"]
    if len(mixes) > 1 or others:
        raise ValueError(f"a gguf pass chooses every linear's llama.cpp format itself: drop {others or 'the second gguf pass'} "
                         "from the recipe (transforms such as rotate and pruning may run before it)")
    return mixes[0]


def _calibration_ids(calibration: Any, tokenizer: Any, seed: int, names: list[str]) -> torch.Tensor:
    from compressor.calibration import CalibrationSet, calibration_set

    if calibration is None:
        raise ValueError(f"pass(es) {names} need calibration data: pass calibration='sotu:1790-1999' "
                         "(or a CalibrationSet / an int64 (S, L) tensor of token ids)")
    if isinstance(calibration, CalibrationSet):
        return calibration.input_ids
    if isinstance(calibration, str):
        if tokenizer is None:
            raise ValueError("a calibration source string needs a tokenizer: pass tokenizer=... or token ids")
        return calibration_set(calibration, tokenizer, seed=seed).input_ids
    if isinstance(calibration, torch.Tensor) and calibration.ndim == 2 and calibration.dtype == torch.int64:
        return calibration
    if isinstance(calibration, torch.Tensor) and calibration.is_floating_point():
        if not torch.isfinite(calibration).all():
            raise ValueError("calibration inputs contain NaN/inf: clean the calibration data")
        return calibration
    raise ValueError("calibration must be a CalibrationSet, an int64 (S, L) tensor of token ids, a float tensor of "
                     f"inputs (images), or a source string; got {type(calibration).__name__}"
                     + (f" {calibration.dtype} {tuple(calibration.shape)}" if isinstance(calibration, torch.Tensor) else ""))






def evaluate(
    model: nn.Module | str | Path,
    *,
    dataset: str = "sotu:2010-2021",
    tokenizer: Any = None,
    ctx: int = 512,
    stride: int | None = None,
    max_tokens: int | None = 32768,
    batch_size: int = 4,
    device_map: str | dict | None = None,
    quiet: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Perplexity of a model (object, directory or Hub repo id) on a text source.

    ``dataset`` is any source :func:`compressor.calibration.load_text` reads.
    Returns a :class:`compressor.eval.perplexity.PerplexityResult`.
    """
    from compressor.calibration import load_text, tokenize
    from compressor.eval.perplexity import perplexity

    if isinstance(model, (str, Path)):
        path = resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)
        model = load_model(path, device_map=device_map, trust_remote_code=trust_remote_code)
        tokenizer = tokenizer or load_tokenizer(path, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise ValueError("evaluate needs a tokenizer when given a model object")
    ids = tokenize(load_text(dataset), tokenizer)
    return perplexity(model, ids, ctx=ctx, stride=stride, max_tokens=max_tokens, batch_size=batch_size, quiet=quiet)
