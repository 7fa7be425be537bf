"""Writing a pruned (unquantized) model as a plain Hugging Face checkpoint: the zeros and removed units in its weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from compressor.core.arch import LAYOUTS, find_blocks, head_counts
from compressor.core.atomic import atomic_directory, write_manifest
from compressor.core.state import is_experts_quantized, is_quantized
from compressor.runtime.online import online_transforms

__all__ = ["save_pruned"]

log = logging.getLogger(__name__)


def _check_config_shapes(model: nn.Module) -> None:
    """Every block must have the shapes its config describes, or a plain loader would fail.

    Only families in :data:`compressor.core.arch.LAYOUTS` without extra features (the ones structured
    pruning handles) can have been pruned structurally; other models are not checked.
    """
    config = model.config
    layout = LAYOUTS.get(getattr(config, "model_type", None))
    if layout is None or layout.features:
        return
    _, _, head_dim = head_counts(config)
    want = {layout.q: config.num_attention_heads * head_dim, layout.k: config.num_key_value_heads * head_dim,
            layout.gate: config.intermediate_size}
    blocks_name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for path, out in want.items():
            got = block.get_submodule(path).out_features
            if got != out:
                raise ValueError(f"{blocks_name}.{i}.{path} has {got} outputs but the config says {out}: the blocks "
                                 "were pruned unevenly; a plain checkpoint needs the same shapes in every block")


def save_pruned(model: nn.Module, output: str | Path, *, tokenizer: Any = None, recipe: Any = None,
                info: dict | None = None, overwrite: bool = False) -> Path:
    """Save an unquantized (e.g. structurally pruned) model as a plain Hugging Face directory, atomically.

    ``model.save_pretrained`` writes into a temporary sibling directory that is
    renamed into place only when complete; ``recipe.yaml`` and a sha256
    manifest are written beside the weights.

    Args:
        model: a Hugging Face model without quantized layers or online transforms.
        output: destination directory; must not exist unless ``overwrite``.
        tokenizer: saved beside the weights when given.
        recipe: a :class:`compressor.Recipe`, saved as ``recipe.yaml``.
        info: extra provenance (seed, calibration hash, source model) for the manifest.
        overwrite: replace an existing directory (only once the new one is complete).

    Returns:
        The output path.
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ValueError(f"save_pruned writes Hugging Face models (save_pretrained); got {type(model).__name__}: "
                         "save its state_dict with torch.save instead")
    quantized = [n for n, m in model.named_modules() if is_quantized(m) or is_experts_quantized(m)]
    if quantized:
        raise ValueError(f"{len(quantized)} layers are quantized (e.g. {quantized[0]}): export them with "
                         "compressor.export.compressed_tensors.save_compressed, not save_pruned")
    online = online_transforms(model)
    if online:
        raise ValueError(f"{online[0]} rotates its input online, which a plain checkpoint cannot record: "
                         "rotate with r4=false or evaluate in memory")
    _check_config_shapes(model)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe is not None:
            recipe.save(tmp / "recipe.yaml")
        write_manifest(tmp, {**(info or {}), **({"recipe": recipe.to_dict()} if recipe is not None else {})})
    log.info("wrote %s", output)
    return Path(output)
