"""FP8 E4M3, FP4 E2M1, E8M0 grids against brute force; float schemes (FP8, NVFP4, MXFP4) in RTN and GPTQ."""

from __future__ import annotations

import struct

import pytest
import torch

from compressor.algorithms.quant.gptq import gptq_quantize
from compressor.core import floats
from compressor.core.scheme import QuantScheme, compute_qparams, dequantize, fake_quant, quantize

FP8 = QuantScheme(type="float", bits=8, group_size=-1, symmetric=True)
NVFP4 = QuantScheme(type="float", bits=4, group_size=16, symmetric=True, scale_format="e4m3")
MXFP4 = QuantScheme(type="float", bits=4, group_size=32, symmetric=True, scale_format="e8m0")


def _decode_bits(code: int, fmt: floats.FloatFormat) -> float:
    """The value of a storage code from the IEEE-style bit fields, written out independently of the module."""
    sign = -1.0 if code >> (fmt.bits - 1) else 1.0
    e = (code >> fmt.mantissa_bits) & ((1 << fmt.exponent_bits) - 1)
    m = code & ((1 << fmt.mantissa_bits) - 1)
    if fmt is floats.E4M3 and e == 15 and m == 7:
        return float("nan")
    if e == 0:
        return sign * m * 2.0 ** (1 - fmt.bias - fmt.mantissa_bits)
    return sign * (1 + m / 2**fmt.mantissa_bits) * 2.0 ** (e - fmt.bias)


@pytest.mark.parametrize("fmt", [floats.E4M3, floats.E2M1], ids=["e4m3", "e2m1"])
def test_every_code_decodes_to_its_bit_fields_and_encodes_back(fmt):
    codes = torch.arange(1 << fmt.bits)
    nan = torch.tensor([_decode_bits(int(c), fmt) != _decode_bits(int(c), fmt) for c in codes])
    codes = codes[~nan]
    stored = codes.to(torch.uint8).view(torch.int8) if fmt.bits == 8 else codes.to(torch.int8)
    values = floats.decode(fmt, stored)
    want = torch.tensor([_decode_bits(int(c), fmt) for c in codes])
    assert torch.equal(values, want)
    assert torch.equal(floats.encode(fmt, values).view(torch.uint8) if fmt.bits == 8 else floats.encode(fmt, values),
                       stored.view(torch.uint8) if fmt.bits == 8 else stored)
    assert values.abs().max() == fmt.max


def test_e4m3_codes_are_torch_float8_bit_patterns():
    v = floats.E4M3.magnitudes().float()
    v = torch.cat([v, -v])
    assert torch.equal(floats.encode(floats.E4M3, v).view(torch.uint8), v.to(torch.float8_e4m3fn).view(torch.uint8))


def _brute_round(x: float, fmt: floats.FloatFormat) -> float:
    """Nearest magnitude by exhaustive search; ties to the even code; saturate at max; keep the sign."""
    mags = fmt.magnitudes().tolist()
    a = min(abs(x), fmt.max)
    best = min(range(len(mags)), key=lambda i: (abs(mags[i] - a), i % 2))
    return -mags[best] if struct.pack(">f", x)[0] & 0x80 else mags[best]


@pytest.mark.parametrize("fmt", [floats.E4M3, floats.E2M1], ids=["e4m3", "e2m1"])
def test_rounding_matches_brute_force_at_midpoints_ties_and_saturation(fmt):
    mags = fmt.magnitudes()
    mids = (mags[1:] + mags[:-1]) / 2
    eps = mids * 2.0**-20
    probes = torch.cat([mags, mids, mids + eps, mids - eps, torch.tensor([fmt.max * 1.01, fmt.max * 1e3, 1e30, 0.0])])
    probes = torch.cat([probes, -probes]).float()
    want = torch.tensor([_brute_round(float(x), fmt) for x in probes])
    for got in (floats.round_to_grid(fmt, probes), floats.round_to_grid_reference(fmt, probes)):
        assert torch.equal(got, want)
        assert torch.equal(torch.signbit(got), torch.signbit(want))


@pytest.mark.parametrize("fmt", [floats.E4M3, floats.E2M1], ids=["e4m3", "e2m1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_rounding_equals_the_search_over_every_value(fmt, dtype):
    mags = fmt.magnitudes()
    mids = (mags[1:] + mags[:-1]) / 2
    x = torch.cat([torch.randn(50000) * fmt.max / 3, mags, mids, -mids, torch.tensor([1e4, -1e4, 0.0, -0.0])])
    x = x.to(dtype)
    fast, ref = floats.round_to_grid(fmt, x), floats.round_to_grid_reference(fmt, x)
    assert fast.dtype == dtype and torch.equal(fast, ref) and torch.equal(torch.signbit(fast), torch.signbit(ref))


def test_e4m3_rounding_matches_torch_cast_on_random_values():
    x = torch.randn(20000) * torch.exp2(torch.randint(-12, 10, (20000,)).float())
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(floats.round_to_grid_reference(floats.E4M3, x), want)


def test_e2m1_rounding_matches_compressed_tensors_cast():
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA

    x = torch.linspace(-8, 8, 4001)
    assert torch.equal(floats.round_to_grid(floats.E2M1, x), FP4_E2M1_DATA.cast_to_fp4(x.clone()))


def test_e8m0_round_trip_and_refusals():
    s = torch.exp2(torch.arange(-127, 128).float())
    codes = floats.e8m0_encode(s)
    assert codes.dtype == torch.uint8 and int(codes[0]) == 0 and int(codes[-1]) == 254
    assert torch.equal(floats.e8m0_decode(codes), s)
    with pytest.raises(ValueError, match="powers of two"):
        floats.e8m0_encode(torch.tensor([3.0]))
    with pytest.raises(ValueError, match="NaN"):
        floats.e8m0_decode(torch.tensor([255], dtype=torch.uint8))


def test_mx_scale_follows_compressed_tensors_observer():
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    amax = torch.rand(5000) * torch.exp2(torch.randint(-20, 20, (5000,)).float())
    want = torch.exp2(generate_mx_scales(amax) - 127)
    assert torch.equal(floats.mx_scale(amax), want)


def test_nan_weights_are_refused():
    w = torch.randn(4, 32)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        compute_qparams(w, NVFP4)


def test_float_schemes_validate():
    with pytest.raises(ValueError, match="symmetric"):
        QuantScheme(type="float", bits=4, group_size=16)
    with pytest.raises(ValueError, match="8 .FP8 E4M3. or 4"):
        QuantScheme(type="float", bits=6, symmetric=True)
    with pytest.raises(ValueError, match="type: float"):
        QuantScheme(bits=4, scale_format="e4m3")
    with pytest.raises(ValueError, match="integer grids"):
        _ = FP8.qmin
    assert NVFP4.bits_per_weight(4096) == 4.5 and MXFP4.bits_per_weight(4096) == 4.25


@pytest.mark.parametrize("scheme", [FP8, NVFP4, MXFP4], ids=["fp8", "nvfp4", "mxfp4"])
def test_rtn_is_nearest_grid_point_per_group(scheme):
    torch.manual_seed(0)
    w = torch.randn(8, 64) * torch.linspace(0.01, 3, 64)
    qp = compute_qparams(w, scheme)
    codes = quantize(w, qp, scheme)
    assert codes.dtype == torch.int8
    deq = dequantize(codes, qp, scheme)
    # brute force: every weight against every value of its group's grid
    eff = qp.effective_scale().float().repeat_interleave(scheme.group_width(64), dim=1)[:, :64]
    grid = torch.cat([-scheme.element.magnitudes(), scheme.element.magnitudes()]).float()
    err = (w[..., None] - grid * eff[..., None]).abs()
    assert torch.allclose((w - deq).abs(), err.min(dim=-1).values, rtol=0, atol=1e-6)
    assert torch.equal(fake_quant(deq, qp, scheme), deq)  # on the grid: a fixed point


def test_nvfp4_scales_are_e4m3_under_a_global_scale():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    qp = compute_qparams(w, NVFP4)
    assert qp.global_scale.shape == (1,) and qp.scale.dtype == torch.float32
    assert torch.allclose(qp.global_scale, 448 * 6 / w.abs().max())
    assert torch.equal(qp.scale, qp.scale.to(torch.float8_e4m3fn).float())
    assert float(qp.scale.max()) == 448.0  # the group holding the matrix maximum fills E4M3's range


def test_mse_observer_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(32, 128) ** 3
    for scheme in (FP8, NVFP4, MXFP4):
        mse = QuantScheme(**{**scheme.to_dict(), "observer": "mse"})
        e_minmax = (fake_quant(w, compute_qparams(w, scheme), scheme) - w).abs().pow(2.4).sum()
        e_mse = (fake_quant(w, compute_qparams(w, mse), mse) - w).abs().pow(2.4).sum()
        assert e_mse <= e_minmax


def test_mse_max_grow_maps_a_group_maximum_to_four_when_that_rounds_better():
    # group 0: fifteen 4.5s and a 6. Scaled so the 6 is E2M1's 6, the 4.5s round to 4; scaled so it is 4
    # (ratio 1.5) they are 3 * 1.5 exactly, and nothing rounds. Group 1 holds the matrix maximum 84, so the
    # global scale is 448 * 6 / 84 = 32 and group 0's E4M3 scales 32 and 48 are exact.
    w = torch.cat([torch.tensor([4.5] * 15 + [6.0]), torch.linspace(-84.0, 84.0, 16)])[None]
    shrink = QuantScheme(**{**NVFP4.to_dict(), "observer": "mse", "mse_grid": 20, "mse_norm": 2.0})
    grow = QuantScheme(**{**shrink.to_dict(), "mse_max_grow": 0.5})
    qs, qg = compute_qparams(w, shrink), compute_qparams(w, grow)
    assert float(compute_qparams(w, NVFP4).effective_scale()[0, 0]) == 1.0
    assert float(qg.effective_scale()[0, 0]) == 1.5
    err = {name: float((fake_quant(w, qp, s) - w)[0, :16].pow(2).sum()) for name, qp, s in
           (("shrink", qs, shrink), ("grow", qg, grow))}
    assert err["grow"] == 0.0 and err["shrink"] > 1.0
    assert torch.equal(qg.global_scale, qs.global_scale)  # the matrix's global scale is not searched


def test_mse_max_grow_is_a_superset_of_the_shrink_search():
    torch.manual_seed(0)
    w = torch.randn(32, 128) ** 3
    for scheme in (NVFP4, MXFP4, FP8):
        shrink = QuantScheme(**{**scheme.to_dict(), "observer": "mse", "mse_grid": 10})
        grow = QuantScheme(**{**shrink.to_dict(), "mse_max_grow": 0.5})
        e = [(fake_quant(w, compute_qparams(w, s), s) - w).abs().pow(2.4).sum() for s in (shrink, grow)]
        assert e[1] <= e[0]
    assert "mse_max_grow" not in NVFP4.to_dict() and grow.to_dict()["mse_max_grow"] == 0.5


def test_mse_max_grow_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="float grids"):
        QuantScheme(bits=4, observer="mse", mse_max_grow=0.5)
    with pytest.raises(ValueError, match="observer: mse"):
        QuantScheme(**{**NVFP4.to_dict(), "mse_max_grow": 0.5})
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        QuantScheme(**{**NVFP4.to_dict(), "observer": "mse", "mse_max_grow": -0.1})


@pytest.mark.parametrize("scheme", [FP8, NVFP4, MXFP4], ids=["fp8", "nvfp4", "mxfp4"])
def test_gptq_on_float_grids_halves_the_output_error_of_rtn(scheme):
    torch.manual_seed(0)
    x = torch.randn(1024, 64) @ torch.randn(64, 64)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(32, 64)
    rtn = fake_quant(w, compute_qparams(w, scheme), scheme)
    res = gptq_quantize(w, h, scheme)

    def err(d):
        return float(((d - w) @ h @ (d - w).T).trace())

    assert err(res.weight) < 0.7 * err(rtn)
    assert torch.equal(dequantize(res.codes, res.qparams, scheme).to(w.dtype), res.weight)
    assert torch.equal(fake_quant(res.weight, res.qparams, scheme), res.weight)
    with pytest.raises(ValueError, match="refit"):
        gptq_quantize(w, h, scheme, refit=True)
