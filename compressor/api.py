"""Public Python API: load, compress, save, evaluate."""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.atomic import check_output_dir
from compressor.export.compressed_tensors import save_compressed, sparsity_config
from compressor.export.loader import load_compressed, read_config
from compressor.core.arch import find_blocks
from compressor.calibration import ids_sha256
from compressor.core.hub import BIN_ONLY_HINT, check_remote_code, resolve_model
from compressor.pipeline.layerwise import run_layerwise
from compressor.pipeline.sequential import PipelineConfig, run_sequential
from compressor.core.state import is_quantized
from compressor.recipe import Recipe, select_modules

__all__ = ["load_model", "load_tokenizer", "compress", "evaluate", "is_export", "check_checkpoint"]

log = logging.getLogger(__name__)


def is_export(path: str | Path) -> bool:
    """Whether ``path`` holds a compressed-tensors pack-quantized checkpoint."""
    qcfg = read_config(Path(path)).get("quantization_config") or {}
    return qcfg.get("quant_method") == "compressed-tensors" and qcfg.get("format") == "pack-quantized"


def check_checkpoint(path: str | Path) -> None:
    """Validate a model directory before loading: config.json and safetensors headers.

    Raises:
        FileNotFoundError: no such directory, no config.json, or no weights.
        ValueError: a corrupt config, a truncated / corrupt safetensors file, or pickled
            ``*.bin`` weights only (refused: unpickling can run arbitrary code).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    read_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise ValueError(f"{path} holds only pickled PyTorch weights: {BIN_ONLY_HINT}")
        raise FileNotFoundError(f"{path} has no *.safetensors weights: the checkpoint is incomplete")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                keys = list(fh.keys())
                if keys:
                    fh.get_slice(keys[-1])
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file} is corrupt or truncated ({err}); re-download or re-export the checkpoint") from None
        _check_safetensors_size(file)


def _check_safetensors_size(file: Path) -> None:
    """The data section must be as long as the header says (catches truncation)."""
    import json
    import struct

    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{file} is truncated (no header); re-download or re-export the checkpoint")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{file} has a corrupt header; re-download or re-export the checkpoint") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if file.stat().st_size < 8 + n + end:
        raise ValueError(
            f"{file} is truncated: {file.stat().st_size} bytes, header needs {8 + n + end}; "
            "re-download or re-export the checkpoint"
        )


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    backend: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a Hugging Face checkpoint or a compressor export, validated first.

    Args:
        path: model directory, or a Hub repo id (``"Qwen/Qwen3-0.6B"``, resolved through the
            Hub cache, see :func:`compressor.core.hub.resolve_model`).
        dtype: parameter dtype (default: as stored).
        device_map: None (CPU), ``"auto"`` or an accelerate device map.
        backend: kernel backend for exports.
        revision: branch, tag or commit of a repo id.
        trust_remote_code: allow the repo's own modelling code to run (off by default).

    Raises:
        FileNotFoundError / ValueError: see :func:`check_checkpoint` and :func:`compressor.core.hub.resolve_model`;
            custom modelling code without ``trust_remote_code``.
    """
    path = resolve_model(path, revision=revision, trust_remote_code=trust_remote_code)
    check_checkpoint(path)
    if is_export(path):
        return load_compressed(path, dtype=dtype, device_map=device_map, backend=backend)
    check_remote_code(path, trust_remote_code)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    cls = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel
    model = cls.from_pretrained(path, dtype=dtype or "auto", device_map=device_map, use_safetensors=True,
                                trust_remote_code=trust_remote_code)
    model.eval()
    return model


def load_tokenizer(path: str | Path, required: bool = True, *, revision: str | None = None,
                   trust_remote_code: bool = False):
    """The tokenizer saved in a model directory (or Hub repo id); None when absent and not ``required``."""
    from transformers import AutoTokenizer

    path = resolve_model(path, revision=revision, trust_remote_code=trust_remote_code)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")):
        if required:
            raise FileNotFoundError(f"{path} has no tokenizer files: save the tokenizer with the model or pass one")
        log.warning("%s has no tokenizer; the export will not include one", path)
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


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
            checkpoint (pruned models; structured pruning makes its matrices smaller).
        tokenizer: saved beside the export; loaded from the checkpoint when
            ``model`` is a path.
        overwrite: replace an existing ``output``.
        pipeline: device, activation cache, batch size and checkpointing of the
            sequential pipeline.
        quiet: no progress bars.
        revision: branch, tag or commit when ``model`` is a Hub repo id.
        trust_remote_code: allow the repo's own modelling code to run (off by default).

    Returns:
        The compressed model (quantized linears hold on-grid weights).
    """
    if output is not None:
        check_output_dir(output, overwrite)
    source = None
    if isinstance(model, (str, Path)):
        path = resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)
        source = str(path)
        model = load_model(path, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            tokenizer = load_tokenizer(path, required=False, trust_remote_code=trust_remote_code)
    passes = recipe.build()
    if not passes:
        raise ValueError("the recipe has no passes: add one, e.g. '- rtn: {scheme: {bits: 4, group_size: 64}}'")
    blocked = [p for p in passes if getattr(p, "not_exportable", None)]
    if output is not None and blocked:  # fail before the long pipeline, not at export
        raise ValueError(f"{blocked[0].name}: {blocked[0].not_exportable}; run compress without output and "
                         "evaluate the model in memory")
    torch.manual_seed(recipe.seed)
    info: dict = {"source_model": source, "seed": recipe.seed}
    tail = _trailing_passes(passes)  # distill: after everything else, on the whole model
    passes = passes[: len(passes) - len(tail)]
    teacher = copy.deepcopy(model).eval() if any(getattr(p, "wants_teacher", False) for p in tail) else None
    lead = _leading_model_passes(passes)
    lead_ids = None
    if any(p.requires_calibration for p in lead):  # ostquant trains on the calibration set before the pipeline
        lead_ids = _calibration_ids(calibration, tokenizer, recipe.seed, [p.name for p in lead if p.requires_calibration])
        if lead_ids.is_floating_point():
            raise ValueError("model-level calibrated passes (ostquant) need token ids, not a float tensor of inputs")
    for p in lead:  # whole-model transforms (rotate, ostquant) run once, before any block is compressed
        if p.requires_calibration:
            p.apply(model, calibration_ids=lead_ids, quiet=quiet)
        else:
            p.apply(model, quiet=quiet)
    passes = passes[len(lead):]
    ids = None
    if not any(p.requires_calibration for p in passes):
        for p in passes:
            p.apply(model, quiet=quiet)
    else:
        ids = lead_ids if lead_ids is not None else _calibration_ids(
            calibration, tokenizer, recipe.seed, [p.name for p in passes if p.requires_calibration])
        digest = hashlib.sha256(ids.cpu().contiguous().numpy().tobytes()).hexdigest() if ids.is_floating_point() else ids_sha256(ids)
        info["calibration"] = {"sha256": digest, "sequences": ids.shape[0], "seq_len": ids.shape[1]}
        config = pipeline or PipelineConfig(quiet=quiet)
        if ids.is_floating_point():  # images or features: no decoder blocks, calibrate layer by layer
            if isinstance(getattr(model, "get_input_embeddings", lambda: None)(), nn.Embedding):
                raise ValueError("this model reads token ids: pass calibration as an int64 (S, L) tensor, "
                                 "a CalibrationSet or a text source, not a float tensor")
            run_layerwise(model, passes, ids, batch_size=config.batch_size, device=config.resolved_device(), quiet=quiet)
        else:
            blocks_name, _ = find_blocks(model)
            outside = _targets_outside_blocks(model, passes, blocks_name)
            fingerprint = {"recipe": recipe.to_dict(), "calibration_sha256": digest, "model_config": _config_hash(model)}
            for p in passes:  # allocation across layers is decided on the dense model, before any block changes
                if hasattr(p, "plan"):
                    p.plan(model, ids, config)
            run_sequential(model, passes, ids, config, fingerprint)
            for p in passes:
                if outside.get(p.name):
                    p.apply(model, quiet=quiet, only=outside[p.name])
    for p in tail:
        if ids is None and calibration is not None and not getattr(p.config, "data", None):
            ids = _calibration_ids(calibration, tokenizer, recipe.seed, [p.name])
        p.apply(model, teacher=teacher, calibration_ids=ids, tokenizer=tokenizer, seed=recipe.seed, quiet=quiet)
    del teacher
    if output is not None:
        if any(is_quantized(m) for m in model.modules()):
            save_compressed(model, output, tokenizer=tokenizer, recipe=recipe, overwrite=overwrite, info=info)
        else:  # pruned only: a plain (possibly smaller) checkpoint, the zeros and removed units in its weights
            from compressor.algorithms.prune.structured import save_pruned

            sparsity = sparsity_config(model)
            if sparsity is not None:
                info["sparsity_config"] = sparsity
            save_pruned(model, output, tokenizer=tokenizer, recipe=recipe, overwrite=overwrite, info=info)
    return model


def _trailing_passes(passes: list) -> list:
    """The passes that run last on the whole model (``runs_last = True``, e.g. distill) at the tail of the recipe.

    Raises:
        ValueError: such a pass is followed by another kind of pass.
    """
    n = len(passes)
    while n > 0 and getattr(passes[n - 1], "runs_last", False):
        n -= 1
    early = [p.name for p in passes[:n] if getattr(p, "runs_last", False)]
    if early:
        raise ValueError(f"{early[0]} trains the finished model and must be the last pass: move it to the end of "
                         "the recipe's passes")
    return passes[n:]


def _leading_model_passes(passes: list) -> list:
    """The model-level passes (``model_level = True``, e.g. rotate) at the head of the recipe.

    Raises:
        ValueError: a model-level pass comes after a block-level one.
    """
    n = 0
    while n < len(passes) and passes[n].model_level:
        n += 1
    late = [p.name for p in passes[n:] if p.model_level]
    if late:
        raise ValueError(f"{late[0]} transforms the whole model and must come before {passes[n].name}: "
                         "move it to the front of the recipe's passes")
    return passes[:n]


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


def _targets_outside_blocks(model: nn.Module, passes: list, blocks_name: str) -> dict[str, set[str]]:
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
    import json

    text = json.dumps(model.config.to_dict(), sort_keys=True, default=str) if hasattr(model, "config") else type(model).__name__
    return hashlib.sha256(text.encode()).hexdigest()


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
