"""Export: bit packing, the compressed-tensors writer and the loader."""
