"""Pruning maths: scores, masks, SparseGPT, layer-wise allocation, structured removal."""
