"""Triton dequantize-matmul kernels for the packed compressed-tensors layout.

Importing this package imports triton (an optional dependency) and registers
the ``torch.ops.compressor.dequant_matmul`` custom op. Use it through
:mod:`compressor.kernels.dispatch` (``backend="triton"`` or ``"auto"``), which
imports it lazily. Modules:

* ``_tiles``: device functions reading codes and dequantizing a tile;
* ``kernels``: the decode (split-K GEMV), GEMM and dequantize kernels, autotune configs;
* ``launch``: validation, path choice (``DECODE_MAX_M``, ``DEQUANT_MATMUL_MIN_M``), launches;
* ``ops``: the custom op and its fake implementation.

Whether a kernel runs compiled or in the CPU interpreter is fixed when this
package is first imported: set ``TRITON_INTERPRET=1`` before that.
"""

from compressor.kernels.triton.launch import DECODE_MAX_M, DEQUANT_MATMUL_MIN_M, dequantize, select_path
from compressor.kernels.triton.ops import dequant_matmul

__all__ = ["DECODE_MAX_M", "DEQUANT_MATMUL_MIN_M", "dequant_matmul", "dequantize", "select_path"]
