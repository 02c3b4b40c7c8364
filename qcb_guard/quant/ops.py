"""Pure tensor functions: quantization parameters, rounding, fake quantization.

Rounding decisions are computed in float32 with round-half-to-even, in the arithmetic of the
framework that deploys the weight (``QuantSpec.rounding``): a float64 ``w / s``, or ``w / s``
where the framework computes ``w * (1 / s)``, lands on the other side of a .5 tie for a
fraction of the weights placed at ties (DESIGN.md §2). ``tests/test_quant_frameworks.py``
checks every formula here against the real frameworks' integers.
"""

from __future__ import annotations

import torch

from qcb_guard.errors import ConfigError
from qcb_guard.quant.spec import QuantSpec

_EPS = torch.finfo(torch.float32).eps
_TINY = torch.finfo(torch.float32).tiny
NNCF_EPS = 1e-16  # SymmetricQuantizer.eps: added to |scale| on every forward
NNCF_ZERO_FILTER_RATIO, NNCF_ZERO_FILTER_MIN = 0.01, 8e-5  # fix_zero_filters_symmetric


def check_weight(w: torch.Tensor, what: str = "weight") -> None:
    """Raise a clear error for non-float or non-finite weights."""
    if not isinstance(w, torch.Tensor):
        raise ConfigError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ConfigError(f"{what} must be a floating-point tensor, got {w.dtype}")
    if w.numel() == 0:
        raise ConfigError(f"{what} is empty (shape {tuple(w.shape)})")
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ConfigError(f"{what} has {bad} NaN/inf value(s) of {w.numel()}")


def _reduce_dims(w: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(w.dim()))
    if not -w.dim() <= axis < w.dim():
        raise ConfigError(f"axis {axis} is out of range for a weight of shape {tuple(w.shape)}")
    axis %= w.dim()
    return tuple(d for d in range(w.dim()) if d != axis)


def broadcast(param: torch.Tensor, w: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape a per-channel (or scalar) parameter so it broadcasts against ``w``."""
    param = torch.as_tensor(param)
    if axis is None or param.numel() == 1:
        return param.reshape(()) if param.numel() == 1 else param
    shape = [1] * w.dim()
    shape[axis % w.dim()] = -1
    return param.reshape(shape)


def _min_max(w: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (or per-tensor) min and max of float32 ``w``, widened to contain 0."""
    dims = _reduce_dims(w, axis)
    wmin = torch.amin(w, dim=dims).clamp(max=0)
    wmax = torch.amax(w, dim=dims).clamp(min=0)
    return wmin, wmax


def nncf_input_high(w: torch.Tensor, axis: int | None, half_range: bool = False) -> torch.Tensor:
    """NNCF's symmetric weight range ``input_high`` (``calculate_quantizer_parameters``).

    The abs-max of each channel, raised to ``max(0.01 * max over channels, 8e-5)`` so that
    near-zero filters keep a usable step, doubled on the layers NNCF's overflow fix makes
    half-range (7-bit effective levels; by default the first Conv/Linear on CPU targets).
    The quantizer stores ``input_high - 1e-16`` and its forward adds ``1e-16`` back.
    """
    check_weight(w)
    w = w.detach().to(torch.float32)
    amax = torch.amax(w.abs(), dim=_reduce_dims(w, axis))
    floor = torch.maximum(
        torch.amax(amax) * NNCF_ZERO_FILTER_RATIO, torch.tensor(NNCF_ZERO_FILTER_MIN)
    )
    high = torch.maximum(floor, amax)
    return high * 2.0 if half_range else high


def _nncf_range(scale: torch.Tensor) -> torch.Tensor:
    """The ``S = |scale| + eps`` NNCF's forward works with, from a quantizer's stored scale."""
    return scale.to(torch.float32).abs() + NNCF_EPS


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max quantization parameters ``(scale, zero_point)`` of ``w`` under ``spec``.

    ``qparams="torch"`` (torch.ao observers, float32): symmetric
    ``scale = max(amax / ((qmax - qmin) / 2), eps)`` — amax/127.5 for x86's [-128, 127],
    amax/127 for a narrow [-127, 127]; asymmetric ``scale = max((max - min) / (qmax - qmin),
    eps)``, ``zero_point = clamp(qmin - round(min / scale))``, the range always holding 0.
    ``qparams="ort"`` (``compute_scale_zp``): the same ratios with the range in float64, rounded
    once to float32; a scale below float32's smallest normal becomes 1.0 (zero point 0).
    ``qparams="nncf"``: ``scale = S / qmax`` with ``S`` = :func:`nncf_input_high` (as stored
    and re-added by the quantizer), equal to the ``2S / (levels - 1)`` NNCF exports
    (``get_scale_zp_from_input_low_input_high``); its integers need :func:`quantize_nncf`.
    """
    check_weight(w)
    w = w.detach().to(torch.float32)
    if spec.qparams == "nncf":
        stored = nncf_input_high(w, spec.axis) - NNCF_EPS
        scale = _nncf_range(stored) / spec.qmax
        return scale, torch.zeros_like(scale, dtype=torch.int64)
    wmin, wmax = _min_max(w, spec.axis)
    if spec.qparams == "ort":
        return _ort_qparams(wmin, wmax, spec)
    if spec.symmetric:
        amax = torch.maximum(-wmin, wmax)
        scale = torch.clamp(amax / ((spec.qmax - spec.qmin) / 2), min=spec.eps)
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = torch.clamp((wmax - wmin) / (spec.qmax - spec.qmin), min=spec.eps)
        zero_point = (spec.qmin - torch.round(wmin / scale)).clamp(spec.qmin, spec.qmax)
        zero_point = zero_point.to(torch.int64)
    return scale, zero_point


def _ort_qparams(
    wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX Runtime ``quant_utils.compute_scale_zp`` for float32 data, literally."""
    if spec.symmetric:
        amax = torch.maximum(wmin.abs(), wmax.abs())
        wmin, wmax = -amax, amax
    scale64 = (wmax.double() - wmin.double()) / float(spec.qmax - spec.qmin)
    tiny = scale64 < _TINY
    if spec.symmetric:
        # round((qmin + qmax) / 2), half to even: 0 for [-127, 127] and for int4's [-8, 7]
        zp = torch.full_like(scale64, round((spec.qmin + spec.qmax) / 2))
    else:
        zp = torch.round(spec.qmin - wmin.double() / torch.where(tiny, 1.0, scale64))
    scale = torch.where(tiny, 1.0, scale64.to(torch.float32))
    zero_point = torch.where(tiny, 0, zp).to(torch.int64)
    return scale.to(torch.float32), zero_point


def grid_position(
    w: torch.Tensor, scale: torch.Tensor, axis: int | None, rounding: str = "divide"
) -> torch.Tensor:
    """``w / s`` in float32, computed the way the deploying framework computes it.

    ``divide``: ``w / s`` (ONNX Runtime). The ``multiply_inverse`` family: ``w * fl(1 / s)``
    (torch's kernels, PT2E); it rounds twice, so it disagrees with ``divide`` near .5 ties.
    The zero point is not included (see :func:`quantize` for where each framework adds it).
    """
    w32 = w.detach().to(torch.float32)
    s = broadcast(scale.to(torch.float32), w32, axis)
    if rounding == "divide":
        return w32 / s
    if rounding in _INVERSE:
        return w32 * torch.reciprocal(s)
    if rounding == "nncf":
        raise ConfigError(
            "rounding 'nncf' needs NNCF's input_high, not a scale: use quantize_nncf() "
            "or quantize_spec()"
        )
    raise ConfigError(f"unknown rounding {rounding!r}")


_INVERSE = ("multiply_inverse", "multiply_inverse_zp", "fma_inverse")


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` rounded once to float32 (a fused multiply-add), for float32 inputs.

    The product is exact in float64; the sum's float64 rounding error ``e`` (TwoSum) decides
    the cases where the float64 sum sits exactly halfway between two float32 values.
    """
    p = a.double() * b.double()
    c64 = c.double().expand_as(p)
    s = p + c64
    bb = s - p
    e = (p - (s - bb)) + (c64 - bb)
    r = s.float()
    up, down = torch.nextafter(r, r + torch.inf), torch.nextafter(r, r - torch.inf)
    r = torch.where((s == (r.double() + up.double()) / 2) & (e > 0), up, r)
    return torch.where((s == (r.double() + down.double()) / 2) & (e < 0), down, r)


def quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    qmin: int,
    qmax: int,
    *,
    rounding: str = "divide",
) -> torch.Tensor:
    """Nearest integers (int64): ``clamp(round_half_even(w / s) + zp, qmin, qmax)``.

    ``w / s`` is :func:`grid_position` in the framework's float32 arithmetic ``rounding``;
    ``multiply_inverse_zp`` and ``fma_inverse`` add the zero point before rounding, as
    torch's fbgemm kernels do (``spec.ROUNDINGS``).
    """
    ws = grid_position(w, scale, axis, rounding)
    zp = broadcast(zero_point.to(torch.float32), ws, axis)
    if rounding == "multiply_inverse_zp":
        q = torch.round(ws + zp)
    elif rounding == "fma_inverse":
        inv = torch.reciprocal(broadcast(scale.to(torch.float32), ws, axis))
        q = torch.round(fma_f32(w.detach().to(torch.float32), inv, zp))
    else:
        q = torch.round(ws) + zp
    return q.clamp(qmin, qmax).to(torch.int64)


def quantize_nncf(
    w: torch.Tensor,
    scale: torch.Tensor,
    axis: int | None,
    level_low: int,
    level_high: int,
    *,
    compiled: bool = True,
) -> torch.Tensor:
    """The integer level NNCF's ``SymmetricQuantizer`` forward picks for ``w`` (int64).

    ``scale`` is the quantizer's stored ``scale`` parameter (``input_high - 1e-16``). NNCF
    computes ``S = |scale| + 1e-16``, ``lo = S * (level_low / level_high)``, ``r = S - lo``,
    ``s = (levels - 1) / r``, ``zp = round(-lo * s)`` and
    ``round((clamp(w, lo, lo + r) - lo) * s - zp)``, every step in float32; the fake-quantized
    weight is that level divided by ``s``. ``compiled`` picks its C++ CPU extension, which
    divides ``(levels - 1) / r``; NNCF's pure-torch fallback (used when no compiler is
    available) multiplies ``r.reciprocal() * (levels - 1)`` and can differ by one at ties.
    """
    w32 = w.detach().to(torch.float32)
    big_s = broadcast(_nncf_range(scale), w32, axis)
    levels = level_high - level_low + 1
    low = big_s * (level_low / level_high)
    rng = big_s - low
    if compiled:
        s = torch.full_like(rng, float(levels - 1)).div_(rng)
    else:
        s = rng.reciprocal() * (levels - 1)
    x = torch.maximum(torch.minimum(w32, low + rng), low)
    zp = torch.round(-low * s)
    return torch.round((x - low) * s - zp).to(torch.int64)


def quantize_spec(
    w: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(integers, scale, zero_point)`` that the framework of ``spec`` deploys for ``w``."""
    scale, zero_point = compute_qparams(w, spec)
    if spec.rounding == "nncf":
        stored = nncf_input_high(w, spec.axis) - NNCF_EPS
        q = quantize_nncf(w, stored, spec.axis, spec.qmin, spec.qmax)
    else:
        q = quantize(w, scale, zero_point, spec.axis, spec.qmin, spec.qmax, rounding=spec.rounding)
    return q, scale, zero_point


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None
) -> torch.Tensor:
    """``s * (q - zp)`` in float32."""
    s = broadcast(scale.to(torch.float32), q, axis)
    zp = broadcast(zero_point.to(torch.float32), q, axis)
    return s * (q.to(torch.float32) - zp)


def floor_and_fraction(
    w: torch.Tensor, scale: torch.Tensor, axis: int | None, *, rounding: str = "divide"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``floor(w / s)`` and the position ``w / s - floor(w / s)`` in [0, 1) inside the bin.

    ``w / s`` is :func:`grid_position`, so a fraction of exactly 0.5 is a tie in the
    framework's own arithmetic (nearest rounds it to the even integer). Exact for every
    rounding when ``zp = 0``; with a zero point, ``multiply_inverse_zp``/``fma_inverse`` round
    ``w / s + zp``, whose ties :func:`quantize` resolves. A tiny negative
    ``w / s`` would give ``-1 + 1.0`` in float32; it is returned as ``0 + 0.0`` instead, the
    integer nearest rounding picks.
    """
    ws = grid_position(w, scale, axis, rounding)
    low = torch.floor(ws)
    frac = ws - low
    carry = frac >= 1
    return torch.where(carry, low + 1, low), torch.where(carry, 0.0, frac)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """Differentiable quantize→dequantize with a straight-through estimator.

    Gradients flow to ``w`` inside the clamp range (zero outside, as in QAT) and not to the
    quantization parameters, which callers recompute from the weights each step. This is a
    training tool: exact deployed integers come from :func:`quantize`/:func:`quantize_spec`.
    """
    s = broadcast(scale.detach().to(w.dtype), w, axis)
    zp = broadcast(zero_point.detach().to(w.dtype), w, axis)
    q = torch.clamp(round_ste(w / s) + zp, qmin, qmax)
    return s * (q - zp)


def fake_quantize_spec(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize ``w`` with min/max parameters computed from ``w`` itself under ``spec``."""
    scale, zero_point = compute_qparams(w, spec)
    return fake_quantize(w, scale, zero_point, spec.axis, spec.qmin, spec.qmax)
