"""Fake quantization of weights *and* activations at one bit-width, with straight-through
rounding, for the robustness study (Defensive Quantization's setting: Lin, Gan, Han 2019).

:mod:`qcb_guard.attacks.simulate` already fake-quantizes weights and layer inputs, but it
quantizes every layer input at the same bit-width, the model's input image included. At 2–4
bits that rounds the *image* to 4–16 grey levels, a known input-squeezing defense that would
wash out the very effect under study (DQ keeps the input at full precision). Here the image
keeps ``input_bits`` (8 by default: what an int8 camera pipeline delivers) while every
hidden activation gets ``act_bits``. Weights reuse :func:`simulate.quantized_weights`, static
activation ranges reuse :func:`simulate.calibrate`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from qcb_guard.attacks.simulate import (
    ActivationQuant,
    ActivationRanges,
    TargetQuantizer,
    calibrate,
    quantizable,
    quantized_weights,
)
from qcb_guard.errors import ConfigError
from qcb_guard.quant import QuantSpec, compute_qparams, fake_quantize

__all__ = ["FakeQuantModel", "QuantConfig", "fq_forward"]


def _check_bits(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ConfigError(f"{name} must be an int in [2, 8], got {value!r}")


@dataclass(frozen=True)
class QuantConfig:
    """How a model is fake-quantized at one bit-width.

    :param bits: weight bit-width (symmetric, narrow range: the project's reference
        quantizer, ``max|w| / (2^(b-1) - 1)``; ternary at 2 bits).
    :param act_bits: hidden-activation bit-width (unsigned min/max over static ranges
        calibrated on clean data, as deployed); ``None`` means ``bits``.
    :param input_bits: bit-width of the model's input image, ``None`` to keep it float.
    :param per_channel: per-output-channel weight scales (the frameworks' default).
    """

    bits: int
    act_bits: int | None = None
    input_bits: int | None = 8
    per_channel: bool = True

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        _check_bits("act_bits", self.act_bits, optional=True)
        _check_bits("input_bits", self.input_bits, optional=True)
        if not isinstance(self.per_channel, bool):
            raise ConfigError(f"per_channel must be a bool, got {self.per_channel!r}")

    @property
    def activation_bits(self) -> int:
        return self.bits if self.act_bits is None else self.act_bits

    @property
    def target(self) -> TargetQuantizer:
        """The weight convention and the activation grid, as a simulate target."""
        weight = QuantSpec(
            self.bits, True, 0 if self.per_channel else None, narrow_range=True, signed=True
        )
        act = ActivationQuant(
            self.activation_bits, symmetric=False, mode="static", output=False, qparams="torch"
        )
        return TargetQuantizer(weight, fold_bn=False, activation=act, name="reference")

    def label(self) -> str:
        return f"w{self.bits}a{self.activation_bits}"


def _act_fq(x: Tensor, low: float, high: float, bits: int) -> Tensor:
    spec = QuantSpec(bits, symmetric=False, axis=None, signed=False)
    scale, zero_point = compute_qparams(torch.tensor([low, high], dtype=torch.float32), spec)
    return fake_quantize(x, scale, zero_point, None, spec.qmin, spec.qmax)


@contextlib.contextmanager
def _activation_hooks(
    model: nn.Module, config: QuantConfig, ranges: ActivationRanges
) -> Iterator[None]:
    """Fake-quantize every Conv/Linear input; the first layer's (the image) at input_bits."""
    layers = quantizable(model)
    missing = [n for n, _ in layers if n not in ranges]
    if missing:
        raise ConfigError(f"no calibrated activation range for {', '.join(missing)}")
    handles = []
    for i, (name, module) in enumerate(layers):
        bits = config.input_bits if i == 0 else config.activation_bits
        if bits is None:
            continue
        low, high = ranges[name]

        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], lo=low, hi=high, b=bits) -> Any:
            return (_act_fq(inputs[0], lo, hi, b), *inputs[1:])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fq_forward(model: nn.Module, x: Tensor, config: QuantConfig, ranges: ActivationRanges):
    """The model's logits under ``config``, differentiable w.r.t. ``x`` and the float weights
    (straight-through rounding); ``model`` itself is never modified."""
    params = quantized_weights(model, config.target)
    with _activation_hooks(model, config, ranges):
        return functional_call(model, params, (x,), strict=False)


def calibrate_ranges(model: nn.Module, config: QuantConfig, x: Tensor) -> ActivationRanges:
    """Static (min, max) of every Conv/Linear input of the float model on clean data."""
    return calibrate(model, config.target, x)


class FakeQuantModel(nn.Module):
    """``model`` seen through ``config`` with fixed calibrated ranges: an ``nn.Module`` that
    attacks can differentiate (STE) and metrics can evaluate. Shares ``model``'s weights."""

    def __init__(self, model: nn.Module, config: QuantConfig, ranges: ActivationRanges):
        super().__init__()
        self.inner = model
        self.config = config
        self.ranges = dict(ranges)
        self.in_channels = getattr(model, "in_channels", None)
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x: Tensor) -> Tensor:
        return fq_forward(self.inner, x, self.config, self.ranges)

    @classmethod
    def calibrated(cls, model: nn.Module, config: QuantConfig, x: Tensor) -> FakeQuantModel:
        return cls(model, config, calibrate_ranges(model, config, x))
