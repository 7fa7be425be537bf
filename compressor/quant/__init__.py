"""Quantization: schemes, round-to-nearest and data-driven passes."""
