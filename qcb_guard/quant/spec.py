"""``QuantSpec``: a validated description of one integer quantization grid."""

from __future__ import annotations

from dataclasses import dataclass

from qcb_guard.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    :param bits: bit-width, 2–8.
    :param symmetric: zero-point fixed at 0 (signed) instead of fitted to min/max.
    :param axis: channel axis for per-channel quantization, ``None`` for per-tensor.
    :param narrow_range: drop the most negative level (``[-127, 127]`` at 8 bits), as ONNX
        Runtime, NNCF and XNNPACK do for symmetric weights; x86/fbgemm uses the full range.
    :param signed: signed integers (``int8``-like) or unsigned (``uint8``-like).
    """

    bits: int = 8
    symmetric: bool = True
    axis: int | None = 0
    narrow_range: bool = False
    signed: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        if self.axis is not None and (
            isinstance(self.axis, bool) or not isinstance(self.axis, int)
        ):
            raise ConfigError(f"axis must be an int or None, got {self.axis!r}")
        if self.symmetric and not self.signed:
            raise ConfigError("symmetric quantization needs signed integers (signed=True)")

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
        return f"{self.bits}-bit {kind} {gran} [{self.qmin}, {self.qmax}]"


# Each framework's default weight convention (DESIGN.md §2).
X86 = QuantSpec(bits=8, symmetric=True, axis=0, narrow_range=False)
ONNXRUNTIME = QuantSpec(bits=8, symmetric=True, axis=0, narrow_range=True)
NNCF = QuantSpec(bits=8, symmetric=True, axis=0, narrow_range=True)
CONVENTIONS: dict[str, QuantSpec] = {"x86": X86, "ort": ONNXRUNTIME, "nncf": NNCF}


def convention(name: str, bits: int = 8, axis: int | None = 0) -> QuantSpec:
    """The weight spec of framework ``name`` (``x86``, ``ort``, ``nncf``) at ``bits``."""
    try:
        base = CONVENTIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown framework convention {name!r}; known: {', '.join(sorted(CONVENTIONS))}"
        ) from None
    return QuantSpec(bits=bits, symmetric=base.symmetric, axis=axis, narrow_range=base.narrow_range)
