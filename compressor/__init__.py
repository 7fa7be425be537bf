"""compressor: compress Hugging Face models (quantization, pruning, distillation) and export packed safetensors."""

from __future__ import annotations

__version__ = "0.1.0"

from compressor.api import compress, evaluate, load_model  # noqa: E402
from compressor.export.compressed_tensors import save_compressed  # noqa: E402
from compressor.export.loader import load_compressed  # noqa: E402
from compressor.core.scheme import QuantScheme  # noqa: E402
from compressor.recipe import Recipe  # noqa: E402

__all__ = ["__version__", "compress", "evaluate", "load_model", "save_compressed", "load_compressed", "QuantScheme", "Recipe"]
