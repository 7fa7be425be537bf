"""Per-block checkpoints so an interrupted sequential run resumes where it stopped.

After block ``i`` is compressed its tensors (weights, scales, zero points,
g_idx, pruning masks) and the schemes of its quantized and pruned modules
are written atomically to
``block_{i:05d}.safetensors`` / ``.json``. ``run.json`` pins the recipe and the
calibration set; a checkpoint directory of another run is refused.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from compressor.core.module_state import STATE_KINDS

__all__ = ["BlockCheckpoint"]

log = logging.getLogger(__name__)


class BlockCheckpoint:
    """Save and restore compressed blocks.

    Args:
        directory: checkpoint directory (created).
        fingerprint: identifies the run (recipe, calibration hash, model); a
            directory holding another fingerprint is refused.
    """

    def __init__(self, directory: str | Path, fingerprint: dict):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = self.directory / "run.json"
        if meta.is_file():
            old = json.loads(meta.read_text(encoding="utf-8"))
            if old != fingerprint:
                raise ValueError(
                    f"checkpoint directory {self.directory} belongs to a different run (recipe, calibration data "
                    "or model differ): delete it or choose another --checkpoint-dir"
                )
        else:
            meta.write_text(json.dumps(fingerprint, indent=2, sort_keys=True), encoding="utf-8")

    def _paths(self, i: int) -> tuple[Path, Path]:
        return self.directory / f"block_{i:05d}.safetensors", self.directory / f"block_{i:05d}.json"

    def has(self, i: int) -> bool:
        tensors, meta = self._paths(i)
        return tensors.is_file() and meta.is_file()

    def save(self, i: int, block: nn.Module) -> None:
        """Write block ``i``'s state and every module's extra state (:data:`compressor.core.module_state.STATE_KINDS`:
        quantization schemes, pruning masks...), atomically."""
        tensors_path, meta_path = self._paths(i)
        state = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        # tied / shared tensors inside a block would make safetensors refuse; store copies
        state = {k: v.clone() for k, v in state.items()}
        meta: dict[str, dict] = {kind.key: {} for kind in STATE_KINDS}
        for name, m in block.named_modules():
            for kind in STATE_KINDS:
                described = kind.describe(m)
                if described is not None:
                    meta[kind.key][name] = described
                    state.update({f"{name}.{b}": t for b, t in kind.extra_tensors(m).items()})
        for path, write in ((tensors_path, lambda p: save_file(state, str(p))),
                            (meta_path, lambda p: p.write_text(json.dumps(meta), encoding="utf-8"))):
            tmp = path.with_suffix(path.suffix + ".tmp")
            write(tmp)
            os.replace(tmp, path)

    def load(self, i: int, block: nn.Module) -> None:
        """Restore block ``i`` in place (weights, then every module's extra state)."""
        tensors_path, meta_path = self._paths(i)
        state = load_file(str(tensors_path))
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        device = next(block.parameters()).device
        restored: set[str] = set()  # buffers the kinds put back themselves
        for kind in STATE_KINDS:
            for name, described in meta.get(kind.key, {}).items():
                found = {b: state.pop(f"{name}.{b}") for b in kind.buffers if f"{name}.{b}" in state}
                kind.restore(block.get_submodule(name), described, found, device)
                restored |= {f"{name}.{b}" for b in kind.buffers}
        missing, unexpected = block.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False, assign=True)
        missing = [k for k in missing if k not in restored]
        if missing or unexpected:
            raise ValueError(f"checkpoint {tensors_path} does not match the block (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}): delete the checkpoint directory and start again")
        log.info("block %d restored from %s", i, tensors_path)
