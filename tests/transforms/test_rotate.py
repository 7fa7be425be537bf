"""Equivalent rotations keep the full-precision logits (fold norms, R1, R2, R4)."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.helpers import tiny_llama
from torch import nn

from compressor.core.arch import find_blocks
from compressor.passes.rtn import rtn_quantize_module
from compressor.core.scheme import QuantScheme
from compressor.runtime.online import online_transforms
from compressor.algorithms.transforms.rotate import rotate_model

IDS = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(0))


def _randomize_norms(model: nn.Module) -> None:
    """Norm weights away from 1, so folding is exercised."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = torch.rand(p.shape, generator=g) + 0.5


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _check_equivalent(model, **kwargs) -> tuple[float, dict]:
    _randomize_norms(model)
    ref = _logits(model)
    q_before = find_blocks(model)[1][0].self_attn.q_proj.weight.clone()
    info = rotate_model(model, **kwargs)
    out = _logits(model)
    assert not torch.allclose(find_blocks(model)[1][0].self_attn.q_proj.weight, q_before)  # it did rotate
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-3  # the criterion
    assert diff <= 1e-5 * ref.abs().max().item()  # fp32 round-off in fact
    return diff, info


# (hidden, inter, tie): 64 = 2^6, 48 = 4 * 12; 80 = 4 * 20, 96 = 8 * 12; GQA: 4 heads over 2 kv heads
@pytest.mark.parametrize("hidden,inter,tie", [(64, 80, True), (48, 96, False), (64, 96, False), (48, 80, True)])
@pytest.mark.parametrize("r1", ["hadamard", "random"])
def test_rotated_llama_keeps_logits(hidden, inter, tie, r1):
    model = tiny_llama(hidden=hidden, inter=inter, tie=tie)
    _, info = _check_equivalent(model, r1=r1, seed=5)
    assert info["untied_embeddings"] is tie and info["r2"] == hidden // 4 and info["r4"] == inter
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    assert len(online_transforms(model)) == 2


@pytest.mark.parametrize("r2,r4", [(False, False), (True, False), (False, True)])
def test_each_rotation_alone_is_exact(r2, r4):
    _, info = _check_equivalent(tiny_llama(hidden=48, inter=80), r2=r2, r4=r4)
    assert (info["r2"] is not None) == r2 and (info["online"] == 2) == r4


def test_online_o_proj_hadamard_is_exact_and_mixes_the_heads():
    """QuaRot's online Hadamard before o_proj: exact, one more run-time module per block, across all heads."""
    model = tiny_llama(hidden=48, inter=80)
    _, info = _check_equivalent(model, online_o=True)
    assert info["online_o"] == 48 and info["r4"] == 80 and info["online"] == 4
    o = find_blocks(model)[1][0].self_attn.o_proj
    q = o.input_transform.matrix(torch.float64)  # (48, 48): every entry ±1/√48, so each head feeds every channel
    assert torch.allclose(q.abs(), torch.full_like(q, 48**-0.5))
    assert sorted(online_transforms(model)) == sorted(f"model.layers.{i}.{m}" for i in range(2)
                                                      for m in ("self_attn.o_proj", "mlp.down_proj"))


def _tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"head_dim": 16} if model_type == "qwen3" else {}
    cfg = AutoConfig.for_model(model_type, vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               tie_word_embeddings=True, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_families_keep_logits(model_type):
    """Qwen2 has q/k/v biases (v's is rotated by R2); Qwen3 has per-head q/k norms and head_dim 16 ≠ 48 / 4."""
    model = _tiny(model_type)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.normal_(0, 0.5)
    _check_equivalent(model)


def test_down_proj_hooks_see_the_rotated_input():
    """A pre-hook registered after rotation (as GPTQ's) records x Q, the input the fused weight multiplies."""
    model = tiny_llama(hidden=48, inter=96)
    down = find_blocks(model)[1][0].mlp.down_proj
    seen = []
    handle = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    _logits(model)
    rotate_model(model)
    down.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    handle.remove()
    _logits(model)
    q = down.input_transform.matrix(torch.float32)
    torch.testing.assert_close(seen[1], seen[0] @ q, rtol=0, atol=1e-5)


def test_deepcopy_keeps_the_online_rotation():
    model = tiny_llama()
    ref = _logits(model)
    rotate_model(model)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(_logits(clone), ref, rtol=0, atol=1e-5)
    assert len(online_transforms(clone)) == 2


def test_state_dict_keys_unchanged_but_lm_head_untied():
    model = tiny_llama(tie=False)
    keys = set(model.state_dict())
    rotate_model(model)
    assert set(model.state_dict()) == keys


def test_unsupported_size_leaves_the_model_intact():
    model = tiny_llama(hidden=64, inter=92)  # 92 = 4 * 23: no Hadamard construction
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="size 92: supported sizes"):
        rotate_model(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    _check_equivalent(model, r4=False)  # fused rotations still work


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_unsupported_architecture(model_type):
    from transformers import AutoConfig, AutoModel

    kw = {"n_embd": 32, "n_layer": 1, "n_head": 2} if model_type == "gpt2" else \
        {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    model = AutoModel.from_config(AutoConfig.for_model(model_type, vocab_size=64, **kw))
    with pytest.raises(ValueError, match=f"no rotation layout for model_type='{model_type}'.*supported"):
        rotate_model(model)


def test_refuses_twice_quantized_and_bad_kind():
    model = tiny_llama()
    rotate_model(model)
    with pytest.raises(ValueError, match="already rotated"):
        rotate_model(model)
    model = tiny_llama()
    rtn_quantize_module(find_blocks(model)[1][0].mlp.up_proj, QuantScheme(bits=4, group_size=-1))
    with pytest.raises(ValueError, match="before quantization passes"):
        rotate_model(model)
    with pytest.raises(ValueError, match="'hadamard' .* or 'random'"):
        rotate_model(tiny_llama(), r1="spin")


def test_rows_and_columns_are_rotated_in_chunks_as_one_product():
    """rotate_rows / rotate_columns (the embedding, readers, writers and R4 of a rotation) give W Q and Qᵀ W
    whatever the chunk; an OnlineHadamard stands for its matrix without building it."""
    from compressor.algorithms.transforms.rotate import rotate_columns, rotate_rows
    from compressor.runtime.online import OnlineHadamard

    g = torch.Generator().manual_seed(0)
    w = torch.randn(11, 12, generator=g)
    q = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0]
    for chunk in (1, 3, 11, 64):
        rows, cols = nn.Parameter(w.clone()), nn.Parameter(w.T.contiguous().clone())
        with torch.no_grad():
            rotate_rows(rows, q, chunk=chunk)
            rotate_columns(cols, q, chunk=chunk)
        torch.testing.assert_close(rows.data, (w.double() @ q).float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cols.data, (q.T @ w.T.double()).float(), rtol=1e-6, atol=1e-6)
        assert rows.dtype == cols.dtype == torch.float32 and rows.requires_grad
    hadamard = OnlineHadamard(12)
    rows = nn.Parameter(w.clone().to(torch.bfloat16))
    with torch.no_grad():
        rotate_rows(rows, hadamard, chunk=4)
    assert rows.dtype == torch.bfloat16
    assert torch.equal(rows.data, (w.to(torch.bfloat16).double() @ hadamard.matrix(torch.float64)).to(torch.bfloat16))


@pytest.mark.parametrize("n", [12, 576, 2048, 3072, 5120])
def test_the_fast_randomized_hadamard_is_the_dense_matrix(n):
    """R1's fast transform (what rotate applies to rows) equals the dense randomized Hadamard the seed gives;
    rows and columns rotated through it equal the dense products."""
    from compressor.algorithms.transforms.fusion import FastRandomHadamard
    from compressor.algorithms.transforms.rotate import rotate_columns, rotate_rows
    from compressor.core.hadamard import random_hadamard

    q = random_hadamard(n, seed=5)
    fast = FastRandomHadamard(n, seed=5)
    x = torch.randn(7, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast(x), x @ q, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.matrix(), q, rtol=0, atol=1e-12)
    w = torch.randn(5, n, generator=torch.Generator().manual_seed(1))
    a, b = w.clone(), w.clone()
    rotate_rows(a, fast, chunk=2)
    rotate_rows(b, q)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    a, b = w.T.clone(), w.T.clone()  # (n, 5): a writer's weight
    rotate_columns(a, fast, chunk=3)
    rotate_columns(b, q)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
