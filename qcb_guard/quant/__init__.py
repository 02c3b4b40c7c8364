"""Quantization math shared by every algorithm: specs, qparams, rounding, fake quantization."""

from qcb_guard.quant.ops import (
    broadcast,
    check_weight,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_spec,
    floor_and_fraction,
    grid_position,
    nncf_input_high,
    quantize,
    quantize_nncf,
    quantize_spec,
    round_ste,
)
from qcb_guard.quant.spec import (
    CONVENTIONS,
    MAX_BITS,
    MIN_BITS,
    QPARAMS,
    ROUNDINGS,
    QuantSpec,
    convention,
)

__all__ = [
    "CONVENTIONS",
    "MAX_BITS",
    "MIN_BITS",
    "QPARAMS",
    "ROUNDINGS",
    "QuantSpec",
    "broadcast",
    "check_weight",
    "compute_qparams",
    "convention",
    "dequantize",
    "fake_quantize",
    "fake_quantize_spec",
    "floor_and_fraction",
    "grid_position",
    "nncf_input_high",
    "quantize",
    "quantize_nncf",
    "quantize_spec",
    "round_ste",
]
