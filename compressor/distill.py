"""Distill a saved student from a saved teacher: load both, draw the data, train, export (``compressor distill``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from compressor.pipeline.trainer import DistillConfig, DistillResult, distill

__all__ = ["distill_checkpoint", "load_student"]

log = logging.getLogger(__name__)

PRUNED_ZEROS = 0.25  # a layer with more exact zeros than this is treated as pruned (dense layers have almost none)


def load_student(path: str | Path) -> nn.Module:
    """Load a student for training: an export is unpacked to trainable layers; masks are read from exact zeros.

    Args:
        path: a compressor export (pack-quantized) or a plain Hugging Face
            checkpoint (e.g. pruned by ``compressor compress``); a directory or a Hub repo id.

    Returns:
        The model in float32 on CPU, with quantization state and pruning masks attached.
    """
    from compressor.algorithms.distill.students import trainable_from_export
    from compressor.core.hub import resolve_model
    from compressor.core.sparsity import attach_mask, is_pruned
    from compressor.export.checkpoint import is_export, load_model

    path = resolve_model(path)
    model = load_model(path, dtype=torch.float32)
    if is_export(path):
        trainable_from_export(model)
    skip = model.get_input_embeddings()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not is_pruned(m) and m.weight is not getattr(skip, "weight", None):
            zeros = m.weight == 0
            if zeros.float().mean() > PRUNED_ZEROS:
                attach_mask(m, m.weight.data, ~zeros, "loaded", "unstructured")
    return model


def distill_checkpoint(
    teacher: str | Path,
    student: str | Path,
    output: str | Path,
    *,
    data: str = "sotu:1790-1999",
    samples: int = 256,
    seq_len: int = 256,
    config: DistillConfig = DistillConfig(),
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    overwrite: bool = False,
    losses_json: str | Path | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> DistillResult:
    """Distill ``student`` from ``teacher`` on ``samples`` windows of ``data``, then export it.

    Args:
        teacher: Hugging Face checkpoint (the original model): a directory or a Hub repo id.
        student: compressor export or checkpoint (the compressed model), a directory or a Hub
            repo id; same tokenizer.
        output: where the distilled student is written (atomically): a packed
            export when it is quantized, else a plain checkpoint.
        data: a text source (``"sotu:1790-1999"``, a .txt/.jsonl path).
        samples: training windows drawn (seeded by ``config.seed``).
        seq_len: tokens per window.
        config: the trainer's settings.
        checkpoint_dir: resumable trainer checkpoints (default: ``<output>.ckpt``).
        resume: continue from ``checkpoint_dir`` when it holds a checkpoint.
        overwrite: replace an existing ``output``.
        losses_json: also write ``{"losses": [[step, loss], ...], ...}`` there (main process).
        revision: branch, tag or commit of the teacher when it is a Hub repo id.
        trust_remote_code: allow the teacher repo's own modelling code to run (off by default).

    Returns:
        :class:`~compressor.pipeline.trainer.DistillResult`.
    """
    from accelerate import PartialState

    from compressor.calibration import calibration_set
    from compressor.core.atomic import check_output_dir
    from compressor.core.hub import resolve_model
    from compressor.core.state import is_quantized
    from compressor.export.checkpoint import load_model, load_tokenizer
    from compressor.export.compressed_tensors import save_compressed
    from compressor.export.pruned import save_pruned

    output = Path(output)
    check_output_dir(output, overwrite)
    teacher_path = resolve_model(teacher, revision=revision, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(teacher_path, trust_remote_code=trust_remote_code)
    windows = calibration_set(data, tokenizer, n=samples, seq_len=seq_len, seed=config.seed).input_ids
    teacher_model = load_model(teacher_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    student_model = load_student(student)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else output.with_name(output.name + ".ckpt")
    result = distill(teacher_model, student_model, windows, config, output_dir=ckpt, resume=resume)
    if PartialState().is_main_process:
        info = {"distill": {"teacher": str(teacher), "student": str(student), "data": data, "samples": samples,
                            "seq_len": seq_len, "steps": result.steps_done, "tokens_seen": result.tokens_seen}}
        if any(is_quantized(m) for m in student_model.modules()):
            save_compressed(student_model, output, tokenizer=tokenizer, overwrite=overwrite, info=info)
        else:
            save_pruned(student_model, output, tokenizer=tokenizer, overwrite=overwrite, info=info)
        if losses_json is not None:
            Path(losses_json).write_text(json.dumps({"losses": result.losses, "steps_done": result.steps_done,
                                                     "tokens_seen": result.tokens_seen, "wall_s": result.wall_s}),
                                         encoding="utf-8")
        log.info("distilled %s -> %s in %.1f s (%d steps, final loss %.4f)", student, output, result.wall_s,
                 result.steps_done, result.losses[-1][1] if result.losses else float("nan"))
    PartialState().wait_for_everyone()
    return result
