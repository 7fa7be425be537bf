"""AdaRound: learned rounding beats round-to-nearest on linear and convolution layers."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import tiny_llama
from torch import nn

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.algorithms.quant.adaround import AdaRoundConfig, adaround_quantize
from compressor.core.layers import layer_view
from compressor.core.scheme import QuantScheme, compute_qparams, fake_quant

CFG = AdaRoundConfig(iters=150, batch_size=64, lr=5e-2)  # reg_weight: the default


def _err(fwd, x, w, ref):
    with torch.no_grad():
        return (fwd(x, w) - ref).pow(2).sum(1).mean().item()


def _check(module: nn.Module, x: torch.Tensor, scheme: QuantScheme, bound: float):
    w, fwd, to_weight = layer_view(module)
    with torch.no_grad():
        ref = fwd(x, w)
        torch.testing.assert_close(ref, module(x))  # the view's forward is the module's forward
    res = adaround_quantize(w, fwd, x, ref, scheme, CFG)
    s = compute_qparams(w, scheme).scale
    idx = torch.arange(w.shape[1]) // scheme.group_width(w.shape[1])
    ratio = w / s[:, idx]
    zp = 0 if scheme.symmetric else compute_qparams(w, scheme).zero_point[:, idx]
    q = res.codes.float() - zp
    assert ((q == torch.floor(ratio)) | (q == torch.floor(ratio) + 1) | (res.codes == scheme.qmin) | (res.codes == scheme.qmax)).all()
    rtn = fake_quant(w, compute_qparams(w, scheme), scheme)
    assert _err(fwd, x, res.weight, ref) < bound * _err(fwd, x, rtn, ref)
    assert to_weight(res.weight).shape == module.weight.shape


def test_linear():
    torch.manual_seed(0)
    layer = nn.Linear(48, 24)
    x = torch.randn(256, 48) @ (torch.eye(48) + 0.5 * torch.randn(48, 48) / 7)
    _check(layer, x, QuantScheme(bits=3, group_size=16), 0.9)


def test_hf_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    layer = Conv1D(24, 48)  # nx=48 inputs, nf=24 outputs, weight (48, 24)
    nn.init.normal_(layer.weight, std=0.2)
    _check(layer, torch.randn(256, 48), QuantScheme(bits=3, group_size=-1, symmetric=True), 0.97)


@pytest.mark.parametrize("groups", [1, 8])
def test_conv2d_regular_and_depthwise(groups):
    torch.manual_seed(2)
    layer = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    # image-like inputs: spatially smooth and correlated across channels (i.i.d. noise leaves nothing to learn)
    g = torch.Generator().manual_seed(5)
    x = nn.functional.avg_pool2d(torch.randn(64, 8, 10, 10, generator=g), 3, 1)[..., :6, :6]
    x = torch.einsum("nchw,dc->ndhw", x, torch.eye(8) + 0.6 * torch.randn(8, 8, generator=g) / 8**0.5)
    _check(layer, x, QuantScheme(bits=4, group_size=-1), 0.8)


def test_pass_on_a_tiny_model_exports_bit_exactly(tmp_path):
    ids = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(layers=1)
    recipe = Recipe.from_dict({"passes": [{"adaround": {"scheme": {"bits": 4, "group_size": 16}, "iters": 20, "batch_size": 32}}]})
    compress(model, recipe, calibration=ids)
    ref = model(ids).logits
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    assert torch.equal(load_compressed(out)(ids).logits, ref)


def test_bad_config_and_layers():
    with pytest.raises(ValueError, match="beta"):
        AdaRoundConfig(beta_start=1.0, beta_end=2.0)
    with pytest.raises(ValueError, match="supports"):
        layer_view(nn.Embedding(4, 4))


def test_block_granularity_beats_rtn(tmp_path):
    """Block-wise AdaRound on a tiny Llama: lower logit error than RTN, export reloads bit-exactly."""
    ids = torch.randint(0, 96, (16, 24), generator=torch.Generator().manual_seed(0))
    test = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(1))
    fp = tiny_llama(layers=2)
    with torch.no_grad():
        ref = fp(test).logits
    scheme = {"bits": 3, "group_size": 16}
    rtn = tiny_llama(layers=2)
    compress(rtn, Recipe.from_dict({"passes": [{"rtn": {"scheme": scheme}}]}))
    model = tiny_llama(layers=2)
    recipe = Recipe.from_dict({"passes": [{"adaround": {"scheme": scheme, "granularity": "block", "iters": 150,
                                                        "batch_size": 96, "lr": 0.05}}]})
    compress(model, recipe, calibration=ids)
    with torch.no_grad():
        err = lambda m: (m(test).logits - ref).pow(2).mean().item()  # noqa: E731
        assert err(model) < 0.85 * err(rtn)  # measured 0.75x
        out = save_compressed(model, tmp_path / "e", recipe=recipe)
        assert torch.equal(load_compressed(out)(test).logits, model(test).logits)


@pytest.mark.parametrize("groups,out,kernel,stride,padding,dilation", [
    (1, 6, 3, 1, 1, 1), (4, 4, 3, 2, 0, 1), (2, 6, (3, 1), (1, 2), (1, 0), 2), (1, 5, 1, 1, 0, 1),
])
def test_conv_rows_reproduce_the_convolution(groups, out, kernel, stride, padding, dilation):
    from compressor.core.layers import conv_positions, conv_rows, rows_forward

    torch.manual_seed(3)
    conv = nn.Conv2d(4, out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = torch.randn(3, 4, 9, 8)
    full = conv(x)  # (N, O, Ho, Wo)
    assert conv_positions(x, conv) == full.shape[0] * full.shape[2] * full.shape[3]
    pos = torch.randperm(conv_positions(x, conv))[:17]
    rows = conv_rows(x, conv, pos)
    assert rows.shape == (17, groups, conv.weight[0].numel())
    got = rows_forward(rows, conv.weight.reshape(out, -1), conv.bias)
    want = full.permute(0, 2, 3, 1).reshape(-1, out)[pos]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_conv_with_unsupported_padding_is_refused():
    from compressor.core.layers import conv_rows

    with pytest.raises(ValueError, match="padding"):
        conv_rows(torch.randn(1, 2, 5, 5), nn.Conv2d(2, 2, 3, padding="same"), torch.tensor([0]))


def test_asymmetric_reconstruction_needs_the_fp_stream():
    from compressor.passes.adaround import AdaRoundPass

    layer = nn.Sequential(nn.Linear(8, 8))
    p = AdaRoundPass(AdaRoundConfig(iters=2, targets=("Linear",), ignore=(), asymmetric=True))
    p.begin_block(layer, "m")
    with torch.no_grad():
        layer(torch.randn(4, 8))
    with pytest.raises(ValueError, match="asymmetric"):
        p.end_block(layer, "m")


@pytest.mark.parametrize("asymmetric", [True, False])
def test_layer_granularity_in_the_sequential_pipeline(asymmetric):
    """Both reconstructions run block by block and beat round-to-nearest on the logits."""
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    fp = tiny_llama(layers=2)
    with torch.no_grad():
        ref = fp(ids).logits
    scheme = {"bits": 2, "group_size": 16}
    out = {}
    for method, extra in (("rtn", {}), ("adaround", {"iters": 60, "batch_size": 64, "lr": 5e-2, "asymmetric": asymmetric})):
        model = tiny_llama(layers=2)
        compress(model, Recipe.from_dict({"passes": [{method: {"scheme": scheme, **extra}}]}), calibration=ids)
        with torch.no_grad():
            out[method] = (model(ids).logits - ref).pow(2).mean().item()
    assert out["adaround"] < out["rtn"], out


@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, group_size=16, symmetric=False),
                                    QuantScheme(bits=3, group_size=-1, symmetric=True),
                                    QuantScheme(bits=4, group_size=24, symmetric=False)],  # 40 columns: ragged
                         ids=["g16-asym", "per-channel-sym", "ragged"])
@pytest.mark.parametrize("pruned", [False, True])
def test_soft_weight_is_the_clamped_formula_and_so_are_its_gradients(scheme, pruned):
    """``soft()`` writes ``s (clamp(floor + h(V) + zp, qmin, qmax) - zp)`` without the clamp and the column
    gather (a speed-up): same values and gradients (to float round-off), wherever codes sit against the ends."""
    from compressor.algorithms.quant.adaround import _h, soft_rounding

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 40, generator=g) * torch.linspace(0.1, 3, 40)
    mask = torch.rand(12, 40, generator=g) > 0.3 if pruned else None
    r = soft_rounding(w, scheme, learn_scale=True, mask=mask)
    with torch.no_grad():
        r.V.add_(torch.randn(r.V.shape, generator=g) * 3)  # rounding variables anywhere, h(V) at 0 and 1 too
        r.log_s.add_(torch.randn(r.log_s.shape, generator=g) * 0.2)

    def clamped(h):
        q = torch.clamp(r.floor + h + r.zp, scheme.qmin, scheme.qmax)
        out = (q - r.zp) * torch.exp(r.log_s)[:, r.idx]
        return out if mask is None else out * mask

    grads = []
    for weight in (lambda: clamped(_h(r.V)), lambda: r.soft()):
        r.V.grad = r.log_s.grad = None
        out = weight()
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        grads.append((out.detach(), r.V.grad.clone(), r.log_s.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert bool((r.step == 0).any()) and bool((r.step == 1).any())  # codes at an end of the grid were covered
