"""Dequantize-matmul kernels: the torch reference (the spec), Triton kernels (``triton/``, optional) and dispatch."""
