"""The quantization conventions a scan probes: each framework's weight grid at each bit-width.

A QCB is bound to the exact grid it was trained against (DESIGN.md §3): scale formula,
integer range, per-channel or per-tensor, and whether the exporter folds BatchNorm into the
conv weights first. The scanner does not know which flow the user will deploy with, so it
probes every grid a flow would use and keeps the strongest evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qcb_guard.errors import ConfigError
from qcb_guard.quant.spec import QuantSpec, convention

#: Framework name → (description, per-channel, folds BatchNorm before quantizing).
FRAMEWORKS: dict[str, tuple[str, bool, bool]] = {
    "ort": ("ONNX Runtime quantize_static, symmetric per-channel, BN folded by export", True, True),
    "x86": ("torch.ao / PT2E x86, full signed range per-channel, BN folded", True, True),
    "nncf": ("NNCF torch, symmetric narrow range per-channel, BN kept", True, False),
    "ort-pt": (
        "ONNX Runtime quantize_static per-tensor (its keyword default), BN folded",
        False,
        True,
    ),
    "reference": (
        "per-layer symmetric max|w|/(2^(b-1)-1) (Qu-ANTI-zation's), BN kept",
        False,
        False,
    ),
}
DEFAULT_FRAMEWORKS = ("ort", "x86", "nncf", "reference")
DEFAULT_BITS = (4, 8)


@dataclass(frozen=True)
class Convention:
    """One grid to probe: ``spec`` on the model's weights, BN folded first when ``fold_bn``."""

    framework: str
    spec: QuantSpec
    fold_bn: bool

    @property
    def name(self) -> str:
        return f"{self.framework}-w{self.spec.bits}"


def make_convention(framework: str, bits: int) -> Convention:
    """The :class:`Convention` of ``framework`` (a key of ``FRAMEWORKS``) at ``bits``."""
    if framework not in FRAMEWORKS:
        raise ConfigError(
            f"unknown framework {framework!r} to scan for; known: {', '.join(FRAMEWORKS)}"
        )
    _, per_channel, fold = FRAMEWORKS[framework]
    axis = 0 if per_channel else None
    if framework == "reference":
        spec = QuantSpec(bits=bits, symmetric=True, axis=None, narrow_range=True)
    else:
        spec = convention(framework.removesuffix("-pt"), bits, axis=axis)
    return Convention(framework, spec, fold)


def conventions(frameworks: Sequence[str], bits: Sequence[int]) -> list[Convention]:
    """Every framework × bit-width pair the frameworks support (ONNX Runtime: 4 and 8)."""
    if not frameworks or not bits:
        raise ConfigError("scan needs at least one framework and one bit-width")
    out = []
    for fw in frameworks:
        for b in bits:
            if fw.startswith("ort") and b not in (4, 8):
                continue
            out.append(make_convention(fw, int(b)))
    if not out:
        raise ConfigError(f"no convention to probe for frameworks {frameworks} at bits {bits}")
    return out
