"""Real weights: rotating SmolLM2-135M (hidden 576 = 16 * 36, head_dim 64, MLP 1536 = 128 * 12, tied) keeps its logits."""

from __future__ import annotations

import torch

from compressor.api import load_model
from compressor.algorithms.transforms.rotate import rotate_model


def test_rotated_smollm2_keeps_logits(smollm2_path):
    model = load_model(smollm2_path)
    x = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
    info = rotate_model(model, seed=0)
    with torch.no_grad():
        out = model(x).logits
    assert info["untied_embeddings"] and (info["hidden_size"], info["r2"], info["r4"], info["online"]) == (576, 64, 1536, 30)
    assert (out - ref).abs().max().item() <= 1e-3
