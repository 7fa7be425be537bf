"""compressor: compress Hugging Face models (quantization, pruning, distillation) and export packed safetensors.

The names below load on first use (PEP 562), so ``import compressor.core.scheme``
does not pull in the API, the passes and transformers' model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from compressor._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "compress": "compressor.api",
    "evaluate": "compressor.api",
    "load_model": "compressor.export.checkpoint",
    "save_compressed": "compressor.export.compressed_tensors",
    "load_compressed": "compressor.export.loader",
    "QuantScheme": "compressor.core.scheme",
    "Recipe": "compressor.recipe",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from compressor.api import compress, evaluate  # noqa: F401
    from compressor.core.scheme import QuantScheme  # noqa: F401
    from compressor.export.checkpoint import load_model  # noqa: F401
    from compressor.export.compressed_tensors import save_compressed  # noqa: F401
    from compressor.export.loader import load_compressed  # noqa: F401
    from compressor.recipe import Recipe  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compressor' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
