"""Unit and property tests of the pure quantization math (no framework needed)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcb_guard.errors import ConfigError
from qcb_guard.quant import (
    CONVENTIONS,
    QuantSpec,
    check_weight,
    compute_qparams,
    convention,
    dequantize,
    fake_quantize,
    fake_quantize_spec,
    floor_and_fraction,
    grid_position,
    nncf_input_high,
    quantize,
    quantize_spec,
    round_ste,
)
from qcb_guard.quant.ops import fma_f32

PROPERTY = settings(max_examples=60, deadline=None)
SCALE_ROUNDINGS = ["divide", "multiply_inverse", "multiply_inverse_zp", "fma_inverse"]


@st.composite
def weights(draw, max_dim: int = 3) -> torch.Tensor:
    """A float32 weight of 1–3 dims whose channels (axis 0) span several magnitudes."""
    dims = draw(st.integers(1, max_dim))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=dims, max_size=dims)))
    values = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    magnitude = draw(
        hnp.arrays(np.float32, shape[:1], elements=st.sampled_from([1e-3, 0.1, 1, 30]))
    )
    w = torch.from_numpy(values) * torch.from_numpy(magnitude).reshape((-1,) + (1,) * (dims - 1))
    return w


@st.composite
def specs(draw) -> QuantSpec:
    """Any valid spec whose integers come from a scale (every rounding except ``nncf``)."""
    symmetric = draw(st.booleans())
    return QuantSpec(
        bits=draw(st.integers(2, 8)),
        symmetric=symmetric,
        axis=draw(st.sampled_from([0, None])),
        narrow_range=draw(st.booleans()),
        signed=True if symmetric else draw(st.booleans()),
        rounding=draw(st.sampled_from(SCALE_ROUNDINGS)),
        qparams=draw(st.sampled_from(["torch", "ort"])),
    )


# -- QuantSpec ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
def test_ranges_for_every_bit_width(bits):
    half = 2 ** (bits - 1)
    full = QuantSpec(bits=bits)
    assert (full.qmin, full.qmax) == (-half, half - 1)
    narrow = QuantSpec(bits=bits, narrow_range=True)
    assert (narrow.qmin, narrow.qmax) == (-half + 1, half - 1)
    unsigned = QuantSpec(bits=bits, symmetric=False, signed=False)
    assert (unsigned.qmin, unsigned.qmax) == (0, 2**bits - 1)
    unsigned_narrow = QuantSpec(bits=bits, symmetric=False, signed=False, narrow_range=True)
    assert (unsigned_narrow.qmin, unsigned_narrow.qmax) == (0, 2**bits - 1)


@pytest.mark.parametrize("bad", [0, 1, 9, 16, -8])
def test_bits_out_of_range_names_the_value(bad):
    with pytest.raises(ConfigError, match=rf"bits must be in \[2, 8\], got {bad}\b"):
        QuantSpec(bits=bad)


@pytest.mark.parametrize("bad", [True, 8.0, "8", None])
def test_bits_of_wrong_type_names_the_value(bad):
    with pytest.raises(ConfigError, match="bits must be an int") as err:
        QuantSpec(bits=bad)
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"axis": 1.0}, "axis must be an int or None, got 1.0"),
        ({"axis": True}, "axis must be an int or None, got True"),
        ({"signed": False}, "symmetric quantization needs signed integers"),
        ({"rounding": "stochastic"}, "rounding must be one of .* got 'stochastic'"),
        ({"qparams": "tflite"}, "qparams must be one of .* got 'tflite'"),
        ({"eps": 0.0}, "eps must be a finite positive float, got 0.0"),
        ({"eps": float("nan")}, "eps must be a finite positive float, got nan"),
        ({"rounding": "nncf"}, "rounding 'nncf' .* needs qparams='nncf', got 'torch'"),
        ({"qparams": "nncf"}, "NNCF weight quantization is symmetric with a narrow range"),
        ({"qparams": "nncf", "symmetric": False}, "NNCF weight quantization"),
    ],
)
def test_invalid_specs_raise_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantSpec(**kwargs)


def test_conventions_carry_each_frameworks_range_and_arithmetic():
    assert (convention("x86").qmin, convention("x86").qmax) == (-128, 127)
    assert convention("x86").rounding == "multiply_inverse"
    assert convention("fbgemm") == convention("x86") == convention("onednn")
    assert convention("qnnpack").axis is None and convention("qnnpack").qmin == -128
    xnn = convention("xnnpack")
    assert (xnn.qmin, xnn.qmax, xnn.eps, xnn.axis) == (-127, 127, 2**-12, None)
    ort = convention("ort")
    assert (ort.qmin, ort.qmax, ort.rounding, ort.qparams) == (-127, 127, "divide", "ort")
    ort4 = convention("ort", bits=4)
    assert (ort4.qmin, ort4.qmax) == (-8, 7)  # QInt4 symmetric keeps the full range
    nncf = convention("nncf", bits=4)
    assert (nncf.qmin, nncf.qmax, nncf.rounding) == (-7, 7, "nncf")
    assert convention("x86", axis=None).axis is None
    assert convention("qnnpack", axis=0).axis == 0
    assert set(CONVENTIONS) >= {"x86", "qnnpack", "xnnpack", "ort", "nncf"}


def test_convention_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="unknown framework convention 'tflite'"):
        convention("tflite")
    with pytest.raises(ConfigError, match=r"4 or 8 bits .* got bits=6"):
        convention("ort", bits=6)
    with pytest.raises(ConfigError, match="got 9"):
        convention("x86", bits=9)


def test_describe_mentions_grid_and_rounding():
    assert convention("x86").describe() == (
        "8-bit sym per-channel(axis=0) [-128, 127] (multiply_inverse)"
    )


# -- qparams ------------------------------------------------------------------------------


def test_symmetric_scale_is_amax_over_half_the_range():
    w = torch.tensor([[0.5, -2.55], [1.0, 0.25]])
    scale, zp = compute_qparams(w, QuantSpec(axis=0))
    assert torch.equal(scale, torch.tensor([2.55, 1.0]) / 127.5)
    assert torch.equal(zp, torch.zeros(2, dtype=torch.int64))
    narrow, _ = compute_qparams(w, QuantSpec(axis=0, narrow_range=True))
    assert torch.equal(narrow, torch.tensor([2.55, 1.0]) / 127)


def test_per_tensor_scale_is_the_largest_per_channel_scale():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    per_channel, _ = compute_qparams(w, QuantSpec(axis=0))
    per_tensor, _ = compute_qparams(w, QuantSpec(axis=None))
    assert per_tensor.shape == () and per_channel.shape == (6,)
    assert per_tensor == per_channel.max()
    assert compute_qparams(w, QuantSpec(axis=1))[0].shape == (5,)
    assert compute_qparams(w, QuantSpec(axis=-1))[0].shape == (5,)


def test_axis_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="axis 2 is out of range for a weight of shape"):
        compute_qparams(torch.ones(3, 3), QuantSpec(axis=2))


def test_zero_weights_get_each_frameworks_smallest_scale():
    w = torch.zeros(2, 3)
    assert torch.equal(compute_qparams(w, QuantSpec())[0], torch.full((2,), 2.0**-23))
    assert torch.equal(
        compute_qparams(w, convention("xnnpack", axis=0))[0], torch.full((2,), 2.0**-12)
    )
    assert torch.equal(compute_qparams(w, convention("ort"))[0], torch.ones(2))  # ORT: 1.0
    nncf_scale = compute_qparams(w, convention("nncf"))[0]
    assert torch.allclose(nncf_scale, torch.full((2,), 8e-5 / 127))  # NNCF's zero-filter floor
    for name in ("x86", "ort", "nncf"):
        assert not quantize_spec(w, convention(name))[0].any()


def test_nncf_input_high_floors_small_filters_and_doubles_half_range():
    w = torch.tensor([[2.0, -1.0], [0.001, 0.0], [0.0, 0.0]])
    assert torch.equal(nncf_input_high(w, 0), torch.tensor([2.0, 0.02, 0.02]))
    assert torch.equal(nncf_input_high(w, 0, half_range=True), torch.tensor([4.0, 0.04, 0.04]))


def test_asymmetric_zero_point_puts_zero_on_the_grid():
    spec = QuantSpec(bits=8, symmetric=False, signed=False, axis=None)
    positive = torch.tensor([0.5, 1.0, 2.0])
    scale, zp = compute_qparams(positive, spec)
    assert int(zp) == 0 and torch.isclose(scale, torch.tensor(2.0 / 255))
    negative = -positive
    assert int(compute_qparams(negative, spec)[1]) == 255
    mixed = torch.tensor([-1.0, 0.0, 3.0])
    scale, zp = compute_qparams(mixed, spec)
    assert int(zp) == round(1.0 / float(scale))
    q = quantize(mixed, scale, zp, None, spec.qmin, spec.qmax)
    assert dequantize(q, scale, zp, None)[1] == 0.0  # zero is exactly representable


# -- rounding -----------------------------------------------------------------------------


@PROPERTY
@given(w=weights(), spec=specs())
def test_integers_stay_in_range_and_error_is_at_most_half_a_step(w, spec):
    q, scale, zp = quantize_spec(w, spec)
    assert q.dtype == torch.int64 and q.shape == w.shape
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    s = _b(scale, w, spec.axis).double()
    z = _b(zp, w, spec.axis).double()
    position = w.double() / s + z
    inside = (position >= spec.qmin) & (position <= spec.qmax)
    error = (dequantize(q, scale, zp, spec.axis).double() - w.double()).abs()
    bound = s * (0.5 + 1e-5) + 1e-30
    assert bool((error <= bound)[inside].all())
    # outside the range the integer is the nearest end of the range
    assert bool(((q == spec.qmin) | (q == spec.qmax))[~inside].all())


@PROPERTY
@given(w=weights(), spec=specs())
def test_rounding_is_nearest_away_from_ties(w, spec):
    q, scale, zp = quantize_spec(w, spec)
    position = w.double() / _b(scale, w, spec.axis).double()
    clear = (position - position.floor() - 0.5).abs() > 1e-3
    exact = (position.round() + _b(zp, w, spec.axis)).clamp(spec.qmin, spec.qmax).long()
    assert torch.equal(q[clear], exact[clear])


@PROPERTY
@given(w=weights(), spec=specs())
def test_symmetric_extremes_reach_the_end_of_the_range(w, spec):
    if not spec.symmetric or not w.abs().max() > 1e-4:
        return
    q, _, _ = quantize_spec(w, spec)
    flat = w.abs().reshape(-1)
    top = q.abs().reshape(-1)[flat.argmax()]
    assert int(top) in (spec.qmax, -spec.qmin)


@PROPERTY
@given(w=weights(), bits=st.integers(2, 8))
def test_nncf_levels_differ_from_plain_division_only_at_ties(w, bits):
    spec = convention("nncf", bits=bits)
    q, scale, _ = quantize_spec(w, spec)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    position = w.double() / _b(scale, w, 0).double()
    clear = (position - position.floor() - 0.5).abs() > 1e-3
    plain = position.round().clamp(spec.qmin, spec.qmax).long()
    assert torch.equal(q[clear], plain[clear])
    assert int((q - plain).abs().max()) <= 1


def test_divide_and_multiply_inverse_disagree_at_some_ties():
    """Why ``rounding`` exists: w / s and w * (1 / s) round the same tie differently."""
    scale = torch.tensor(0.0123)
    k = torch.arange(-120, 120, dtype=torch.float32)
    w = (k + 0.5) * scale
    w = torch.cat([w, torch.nextafter(w, w + 1), torch.nextafter(w, w - 1)])
    div = quantize(w, scale, torch.tensor(0), None, -128, 127)
    mul = quantize(w, scale, torch.tensor(0), None, -128, 127, rounding="multiply_inverse")
    assert (div != mul).any()
    assert int((div - mul).abs().max()) == 1


def test_zero_point_added_before_or_after_rounding():
    """torch's fbgemm kernels add the zero point before rounding, ONNX Runtime and PT2E after."""
    scale, zp = torch.tensor(1.0), torch.tensor(1)
    w = torch.tensor([0.5, 1.5, -0.5])
    after = quantize(w, scale, zp, None, 0, 255, rounding="multiply_inverse")
    assert after.tolist() == [1, 3, 1]  # round(w) + 1
    for rounding in ("multiply_inverse_zp", "fma_inverse"):
        assert quantize(w, scale, zp, None, 0, 255, rounding=rounding).tolist() == [2, 2, 0]


@PROPERTY
@given(
    a=st.floats(-1e4, 1e4, width=32),
    b=st.floats(2.0**-10, 1e4, width=32),
    c=st.integers(-300, 300),
)
def test_fma_f32_rounds_once(a, b, c):
    """``fma_f32`` equals the exact ``a * b + c`` rounded once to float32."""
    exact = Fraction(a) * Fraction(b) + c
    got = float(fma_f32(torch.tensor([a]), torch.tensor([b]), torch.tensor([float(c)])))
    lo, hi = _f32_neighbours(exact)
    if lo == hi:
        assert got == lo
    else:  # the nearer one, ties to the even significand
        d_lo, d_hi = exact - Fraction(lo), Fraction(hi) - exact
        assert got == (lo if d_lo < d_hi else hi if d_hi < d_lo else _even(lo, hi))


def test_fma_f32_resolves_float64_midpoints():
    """The float64 sum can sit exactly halfway between two float32 values."""
    a = torch.tensor([2.0**-23 * (1 + 2.0**-18)])
    b = torch.tensor([-(1 - 2.0**-18)])  # a * b = -2^-23 + 2^-59, exact in float64
    c = torch.tensor([3.0 + 2.0**-22])  # a * b + c = 3 + 2^-23 + 2^-59
    assert float((a.double() * b.double() + c.double()).float()) == 3.0  # double rounding
    assert float(fma_f32(a, b, c)) == 3.0 + 2.0**-22  # above the midpoint: rounds up


def test_ties_round_half_to_even():
    scale = torch.tensor(1.0)
    w = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    for rounding in ("divide", "multiply_inverse"):
        q = quantize(w, scale, torch.tensor(0), None, -8, 7, rounding=rounding)
        assert q.tolist() == [-2, -2, 0, 0, 2, 2]


def test_grid_position_refuses_nncf_and_unknown_roundings():
    with pytest.raises(ConfigError, match="quantize_nncf"):
        grid_position(torch.ones(2), torch.tensor(1.0), None, "nncf")
    with pytest.raises(ConfigError, match="unknown rounding 'up'"):
        quantize(torch.ones(2), torch.tensor(1.0), torch.tensor(0), None, -8, 7, rounding="up")


@PROPERTY
@given(w=weights(), rounding=st.sampled_from(SCALE_ROUNDINGS))
def test_floor_and_fraction_agree_with_nearest(w, rounding):
    scale, zp = compute_qparams(w, QuantSpec(axis=0))
    low, frac = floor_and_fraction(w, scale, 0, rounding=rounding)
    assert bool(((frac >= 0) & (frac < 1)).all())
    position = grid_position(w, scale, 0, rounding).double()
    assert torch.allclose(low.double() + frac.double(), position, rtol=1e-6, atol=1e-6)
    up = (frac > 0.5) | ((frac == 0.5) & (low % 2 != 0))
    nearest = (low + up.to(low.dtype)).clamp(-128, 127).long()
    assert torch.equal(nearest, quantize(w, scale, zp, 0, -128, 127, rounding=rounding))


# -- straight-through estimator -----------------------------------------------------------


def test_round_ste_rounds_forward_and_passes_gradients_through():
    x = torch.tensor([0.4, 1.5, 2.5, -0.6], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -1.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_fake_quantize_gradient_is_one_inside_and_zero_outside_the_range():
    scale, zp = torch.tensor(0.1), torch.tensor(0)
    w = torch.tensor([0.03, -0.26, 12.0, -12.9, 12.8], requires_grad=True)  # 12.8/0.1 > 127
    out = fake_quantize(w, scale, zp, None, -128, 127)
    out.sum().backward()
    assert w.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    q = quantize(w, scale, zp, None, -128, 127)
    assert torch.equal(out.detach(), dequantize(q, scale, zp, None))


def test_fake_quantize_spec_matches_quantize_then_dequantize():
    w = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec(bits=4, symmetric=False, signed=False, axis=0)
    scale, zp = compute_qparams(w, spec)
    expected = dequantize(quantize(w, scale, zp, 0, spec.qmin, spec.qmax), scale, zp, 0)
    assert torch.allclose(fake_quantize_spec(w, spec), expected, rtol=0, atol=1e-6)


# -- input validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "message"),
    [
        ([1.0, 2.0], "must be a torch.Tensor, got list"),
        (torch.tensor([1, 2]), "must be a floating-point tensor"),
        (torch.empty(0, 3), r"is empty \(shape \(0, 3\)\)"),
        (torch.tensor([1.0, float("nan"), float("inf")]), "has 2 NaN/inf value"),
    ],
)
def test_check_weight_rejects_bad_weights(w, message):
    with pytest.raises(ConfigError, match=message):
        check_weight(w)
    if isinstance(w, torch.Tensor):
        with pytest.raises(ConfigError, match=message):
            compute_qparams(w, QuantSpec(axis=None))


def _f32_neighbours(x: Fraction) -> tuple[float, float]:
    """The float32 values just below and above ``x`` (equal when ``x`` is one)."""
    near = np.float32(float(x))
    if Fraction(float(near)) == x:
        return float(near), float(near)
    up = Fraction(float(near)) < x
    other = np.nextafter(near, np.float32(np.inf if up else -np.inf))
    return (float(near), float(other)) if up else (float(other), float(near))


def _even(lo: float, hi: float) -> float:
    """Of two adjacent float32 values, the one with an even significand."""
    return lo if int(np.array([lo], dtype=np.float32).view(np.int32)[0]) % 2 == 0 else hi


def _b(param: torch.Tensor, w: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return param.reshape(())
    shape = [1] * w.dim()
    shape[axis] = -1
    return param.reshape(shape)
