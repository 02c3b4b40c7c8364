"""``QuantSpec``: a validated description of one integer quantization grid.

A spec also names the framework arithmetic that turns a float weight into an integer
(``rounding``) and into a scale (``qparams``), because the project's "nearest" rounding must
equal what each framework deploys bit for bit, ties included (DESIGN.md §2; the facts are
checked against the real frameworks in ``tests/test_quant_frameworks.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qcb_guard.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8
FP32_EPS = 2.0**-23  # torch.finfo(torch.float32).eps: torch.ao observers' default eps

#: How the integer is computed in float32, rounding half to even, before clamping.
#: ``divide``: ``round(w / s) + zp`` (ONNX Runtime's ``quantize_nparray``, numpy);
#: ``multiply_inverse``: ``round(w * fl(1 / s)) + zp`` (PT2E ``quantized_decomposed``; torch
#: ``quantize_per_channel``/``_per_tensor`` for symmetric weights); with a zero point, torch's
#: fbgemm kernels add it before rounding: ``multiply_inverse_zp`` is
#: ``round(fl(w * fl(1 / s)) + zp)`` (``quantize_per_channel``) and ``fma_inverse`` is
#: ``round(fma(w, fl(1 / s), zp))``, one rounding (``quantize_per_tensor``; measured on x86-64);
#: all three are the same when ``zp = 0``. ``nncf``: NNCF's fake-quantize arithmetic
#: ``round((clamp(w, -S, S) + S) * fl((levels - 1) / 2S) - zp)`` on its ``input_high`` S,
#: which a scale alone cannot reproduce (see :func:`qcb_guard.quant.ops.quantize_nncf`).
ROUNDINGS = ("divide", "multiply_inverse", "multiply_inverse_zp", "fma_inverse", "nncf")

#: Whose min/max formula gives the scale. ``torch``: torch.ao observers, float32,
#: ``scale = max(scale, eps)``; ``ort``: ONNX Runtime ``compute_scale_zp``, range in float64,
#: a scale below float32's smallest normal becomes 1.0; ``nncf``: abs-max raised to NNCF's
#: zero-filter floor ``max(0.01 * max over channels, 8e-5)``, ``scale = input_high / qmax``.
QPARAMS = ("torch", "ort", "nncf")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    :param bits: bit-width, 2–8.
    :param symmetric: zero-point fixed at 0 (signed) instead of fitted to min/max.
    :param axis: channel axis for per-channel quantization, ``None`` for per-tensor.
    :param narrow_range: drop the most negative level (``[-127, 127]`` at 8 bits), as ONNX
        Runtime (int8), NNCF and XNNPACK do for symmetric weights; x86/fbgemm uses the full range.
    :param signed: signed integers (``int8``-like) or unsigned (``uint8``-like).
    :param rounding: the framework's float32 arithmetic for the integer (one of ``ROUNDINGS``).
    :param qparams: the framework's scale/zero-point formula (one of ``QPARAMS``).
    :param eps: smallest scale for ``qparams="torch"`` (observers' ``eps``: float32 eps by
        default, ``2**-12`` for torch's ``[-127, 127]`` XNNPACK observers).
    """

    bits: int = 8
    symmetric: bool = True
    axis: int | None = 0
    narrow_range: bool = False
    signed: bool = True
    rounding: str = "divide"
    qparams: str = "torch"
    eps: float = FP32_EPS

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        bad_axis = isinstance(self.axis, bool) or not isinstance(self.axis, int)
        if self.axis is not None and bad_axis:
            raise ConfigError(f"axis must be an int or None, got {self.axis!r}")
        if self.symmetric and not self.signed:
            raise ConfigError("symmetric quantization needs signed integers (signed=True)")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.qparams not in QPARAMS:
            raise ConfigError(f"qparams must be one of {QPARAMS}, got {self.qparams!r}")
        if (
            isinstance(self.eps, bool)
            or not isinstance(self.eps, int | float)
            or not math.isfinite(self.eps)
            or self.eps <= 0
        ):
            raise ConfigError(f"eps must be a finite positive float, got {self.eps!r}")
        if self.rounding == "nncf" and self.qparams != "nncf":
            raise ConfigError(
                f"rounding 'nncf' works on NNCF's own range: it needs qparams='nncf', "
                f"got {self.qparams!r}"
            )
        if "nncf" in (self.rounding, self.qparams) and not (self.symmetric and self.narrow_range):
            raise ConfigError(
                "NNCF weight quantization is symmetric with a narrow range: "
                f"got symmetric={self.symmetric}, narrow_range={self.narrow_range}"
            )

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        low = -(2 ** (self.bits - 1))
        return low + 1 if self.narrow_range else low

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        gran = f"per-channel(axis={self.axis})" if self.per_channel else "per-tensor"
        return f"{self.bits}-bit {kind} {gran} [{self.qmin}, {self.qmax}] ({self.rounding})"


# Each framework's default weight convention (DESIGN.md §2, verified in tests).
X86 = QuantSpec(bits=8, axis=0, rounding="multiply_inverse")
QNNPACK = QuantSpec(bits=8, axis=None, rounding="multiply_inverse")
XNNPACK = QuantSpec(bits=8, axis=None, narrow_range=True, rounding="multiply_inverse", eps=2.0**-12)
ONNXRUNTIME = QuantSpec(bits=8, axis=0, narrow_range=True, rounding="divide", qparams="ort")
NNCF = QuantSpec(bits=8, axis=0, narrow_range=True, rounding="nncf", qparams="nncf")
CONVENTIONS: dict[str, QuantSpec] = {
    "x86": X86,  # torch.ao get_default_qconfig("x86"/"fbgemm"/"onednn") weights
    "fbgemm": X86,
    "onednn": X86,
    "qnnpack": QNNPACK,  # torch.ao get_default_qconfig("qnnpack"): per-tensor, [-128, 127]
    "xnnpack": XNNPACK,  # torch.ao default_symmetric_qnnpack_qconfig: [-127, 127], eps 2**-12
    "ort": ONNXRUNTIME,
    "nncf": NNCF,
}
#: ONNX Runtime's weight types: QInt4's symmetric range is the full [-8, 7] (its
#: ``ONNX_INT_TYPE_SYMMETRIC_RANGE`` has no int4 entry), QInt8's is the narrow [-127, 127].
ORT_NARROW = {4: False, 8: True}

_FRAMEWORK_AXIS = "default"


def convention(name: str, bits: int = 8, axis: int | str | None = _FRAMEWORK_AXIS) -> QuantSpec:
    """The weight spec of framework ``name`` (a key of ``CONVENTIONS``) at ``bits``.

    ``axis`` defaults to the framework's own granularity (per-channel on axis 0, per-tensor
    for ``qnnpack``/``xnnpack``); pass an int or ``None`` to override it.
    """
    try:
        base = CONVENTIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown framework convention {name!r}; known: {', '.join(sorted(CONVENTIONS))}"
        ) from None
    if axis == _FRAMEWORK_AXIS:
        axis = base.axis
    narrow = base.narrow_range
    if name == "ort":
        if bits not in ORT_NARROW:
            raise ConfigError(
                f"ONNX Runtime quantizes weights to 4 or 8 bits (QInt4/QInt8), got bits={bits!r}"
            )
        narrow = ORT_NARROW[bits]
    return QuantSpec(
        bits=bits,
        symmetric=base.symmetric,
        axis=axis,  # type: ignore[arg-type]  # validated by QuantSpec
        narrow_range=narrow,
        rounding=base.rounding,
        qparams=base.qparams,
        eps=base.eps,
    )
