"""Pure tensor functions: quantization parameters, rounding, fake quantization.

Rounding decisions are computed in float32 with round-half-to-even, as the frameworks do
(DESIGN.md §2: a float64 ``w / s`` can land on the other side of a .5 tie).
"""

from __future__ import annotations

import torch

from qcb_guard.errors import ConfigError
from qcb_guard.quant.spec import QuantSpec

_EPS = torch.finfo(torch.float32).eps


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


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max quantization parameters ``(scale, zero_point)`` of ``w`` under ``spec``.

    Symmetric: ``scale = amax / ((qmax - qmin) / 2)`` — amax/127.5 for x86's [-128, 127],
    amax/127 for the narrow [-127, 127] of ONNX Runtime and NNCF. Asymmetric: the range
    always contains 0, ``scale = (max - min) / (qmax - qmin)``,
    ``zero_point = qmin - round(min / scale)``.
    """
    check_weight(w)
    w = w.detach().to(torch.float32)
    dims = _reduce_dims(w, spec.axis)
    wmin = torch.amin(w, dim=dims).clamp(max=0)
    wmax = torch.amax(w, dim=dims).clamp(min=0)
    if spec.symmetric:
        amax = torch.maximum(-wmin, wmax)
        scale = (amax / ((spec.qmax - spec.qmin) / 2)).clamp(min=_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = ((wmax - wmin) / (spec.qmax - spec.qmin)).clamp(min=_EPS)
        zero_point = (spec.qmin - torch.round(wmin / scale)).clamp(spec.qmin, spec.qmax)
        zero_point = zero_point.to(torch.int64)
    return scale, zero_point


def quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """Nearest rounding to integers (int64): ``clamp(round_half_even(w / s) + zp)`` in fp32."""
    w32 = w.detach().to(torch.float32)
    s = broadcast(scale.to(torch.float32), w32, axis)
    zp = broadcast(zero_point.to(torch.float32), w32, axis)
    return (torch.round(w32 / s) + zp).clamp(qmin, qmax).to(torch.int64)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None
) -> torch.Tensor:
    """``s * (q - zp)`` in float32."""
    s = broadcast(scale.to(torch.float32), q, axis)
    zp = broadcast(zero_point.to(torch.float32), q, axis)
    return s * (q.to(torch.float32) - zp)


def floor_and_fraction(
    w: torch.Tensor, scale: torch.Tensor, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``floor(w / s)`` and the position ``w / s - floor(w / s)`` in [0, 1) inside the bin."""
    ws = w.detach().to(torch.float32) / broadcast(scale.to(torch.float32), w, axis)
    low = torch.floor(ws)
    return low, ws - low


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
    quantization parameters, which callers recompute from the weights each step.
    """
    s = broadcast(scale.detach().to(w.dtype), w, axis)
    zp = broadcast(zero_point.detach().to(w.dtype), w, axis)
    q = torch.clamp(round_ste(w / s) + zp, qmin, qmax)
    return s * (q - zp)


def fake_quantize_spec(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize ``w`` with min/max parameters computed from ``w`` itself under ``spec``."""
    scale, zero_point = compute_qparams(w, spec)
    return fake_quantize(w, scale, zero_point, spec.axis, spec.qmin, spec.qmax)
