"""Quantization maths: GPTQ/GPTAQ, AdaRound, batch-norm folding."""
