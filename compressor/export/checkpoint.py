"""Reading checkpoints: validate a model directory, load a Hugging Face model or a compressor export, its tokenizer.

Every model reference goes through :func:`compressor.core.hub.resolve_model`, so a
Hub repo id works wherever a directory does; weights load from safetensors only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from compressor.core.hub import BIN_ONLY_HINT, check_remote_code, resolve_model
from compressor.export.loader import is_readable_config, load_compressed, read_config
from compressor.export.placement import place_model

__all__ = ["load_model", "load_tokenizer", "load_for_eval", "is_export", "check_checkpoint"]

log = logging.getLogger(__name__)


def is_export(path: str | Path) -> bool:
    """Whether ``path`` holds a compressed-tensors checkpoint :func:`load_compressed` reads."""
    return is_readable_config(read_config(Path(path)).get("quantization_config"))


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


def load_for_eval(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a checkpoint or export for evaluation, placed by accelerate.

    Without ``max_memory`` and ``offload_folder`` this is :func:`compressor.api.load_model`.
    With them, a Hugging Face checkpoint streams into place through ``from_pretrained``
    (modules past the limits are offloaded to CPU, then to ``offload_folder``); an export
    is built on CPU and dispatched by :func:`place_model`.

    Args:
        path: model directory or export.
        dtype: parameter dtype (default: as stored).
        backend: dequant-matmul backend for exports.
        device_map: None (CPU), ``"auto"`` or an accelerate device map.
        max_memory: accelerate ``max_memory`` (see :func:`parse_max_memory`); needs a device map.
        offload_folder: a fresh folder for disk offload; needs a device map.
        device: without a device map, move the model there (one device per process under
            ``accelerate launch``).
        trust_remote_code: allow the checkpoint's own modelling code to run.

    Raises:
        ValueError: ``max_memory`` or ``offload_folder`` without a device map.
    """
    if (max_memory or offload_folder) and device_map is None:
        raise ValueError("max_memory and offload_folder place the model with accelerate: add --device-map auto")
    if not (max_memory or offload_folder):
        model = load_model(path, dtype=dtype, device_map=device_map, backend=backend,
                           trust_remote_code=trust_remote_code)
        return model.to(device) if device is not None and device_map is None else model
    path = Path(path)
    check_checkpoint(path)
    max_memory = dict(max_memory) if max_memory else None  # accelerate converts the sizes in place
    if is_export(path):
        model = load_compressed(path, dtype=dtype, backend=backend)
        return place_model(model, device_map, max_memory, offload_folder)
    from transformers import AutoModelForCausalLM

    check_remote_code(path, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", device_map=device_map,
                                                 max_memory=max_memory, offload_folder=offload_folder,
                                                 use_safetensors=True, trust_remote_code=trust_remote_code)
    log.info("device map: %s", getattr(model, "hf_device_map", None))
    return model.eval()
