"""Dequantize-matmul kernels: the torch reference (the spec) and dispatch."""
