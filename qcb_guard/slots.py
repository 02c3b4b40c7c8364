"""``WeightSlot``: the framework-neutral view of one quantized weight.

Every adapter turns its framework's objects into slots and writes the chosen integers back;
every algorithm (defense, scanner, attack evaluation) works on slots only, so the core never
imports a framework.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from qcb_guard.errors import ConfigError, DataError, DefenseError
from qcb_guard.quant.ops import check_weight, dequantize, quantize
from qcb_guard.quant.spec import ROUNDINGS

LAYER_KINDS = ("linear", "conv1d", "conv2d", "conv3d")


@dataclass
class WeightSlot:
    """One quantized weight: float values, the framework's grid, and how to run the layer.

    :param name: a stable name (the framework's parameter or initializer name).
    :param kind: ``"linear"`` or ``"conv1d"``/``"conv2d"``/``"conv3d"``.
    :param weight: the float32 weight the framework quantizes (after any BN folding it does).
    :param scale: the framework's scale, shape ``[]`` (per-tensor) or ``[C]`` (per-channel).
    :param zero_point: the framework's zero point, same shape as ``scale``.
    :param axis: channel axis of ``scale``, ``None`` for per-tensor.
    :param qmin: smallest integer the framework stores for this weight.
    :param qmax: largest integer the framework stores for this weight.
    :param bias: float bias of the layer, if any (used by ``layer``).
    :param attrs: layer attributes: ``stride``, ``padding``, ``dilation``, ``groups``.
    :param framework: which framework produced the slot (for reports).
    :param rounding: the framework's float32 arithmetic for ``w / s`` (one of
        ``qcb_guard.quant.ROUNDINGS`` except ``"nncf"``): ``"divide"`` (ONNX Runtime),
        ``"multiply_inverse"`` (torch, torchao) ...; it decides ties in :meth:`nearest`.
    :param nearest_fn: the framework's own nearest rounding, when ``rounding`` cannot express
        it (NNCF's fake-quantize arithmetic) or the adapter calls the framework itself.
    :param write: callback that deploys integers into the framework's artefact.
    """

    name: str
    kind: str
    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int | None
    qmin: int
    qmax: int
    bias: torch.Tensor | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    framework: str = "torch"
    rounding: str = "divide"
    nearest_fn: Callable[[WeightSlot], torch.Tensor] | None = field(default=None, repr=False)
    write: Callable[[torch.Tensor], None] | None = field(default=None, repr=False)
    integers: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ConfigError(
                f"slot {self.name!r}: kind must be one of {LAYER_KINDS}, got {self.kind!r}"
            )
        check_weight(self.weight, f"slot {self.name!r} weight")
        self.weight = self.weight.detach().to(torch.float32)
        self.scale = torch.as_tensor(self.scale, dtype=torch.float32).detach().reshape(-1).clone()
        self.zero_point = (
            torch.as_tensor(self.zero_point).detach().reshape(-1).to(torch.int64).clone()
        )
        if self.axis is not None:
            self.axis %= self.weight.dim()
            channels = self.weight.shape[self.axis]
            if self.scale.numel() != channels or self.zero_point.numel() != channels:
                raise ConfigError(
                    f"slot {self.name!r}: per-channel scale/zero_point need {channels} values "
                    f"(axis {self.axis} of {tuple(self.weight.shape)}), got "
                    f"{self.scale.numel()}/{self.zero_point.numel()}"
                )
        elif self.scale.numel() != 1 or self.zero_point.numel() != 1:
            raise ConfigError(f"slot {self.name!r}: per-tensor scale/zero_point must be scalars")
        if self.rounding not in ROUNDINGS or (self.rounding == "nncf" and self.nearest_fn is None):
            raise ConfigError(
                f"slot {self.name!r}: rounding must be one of {ROUNDINGS} ('nncf' only with a "
                f"nearest_fn), got {self.rounding!r}"
            )
        if not (self.scale > 0).all() or not torch.isfinite(self.scale).all():
            raise ConfigError(f"slot {self.name!r}: scales must be finite and positive")
        if not self.qmin < self.qmax:
            raise ConfigError(
                f"slot {self.name!r}: qmin {self.qmin} must be below qmax {self.qmax}"
            )
        if self.kind.startswith("conv") and self.weight.dim() != int(self.kind[4]) + 2:
            raise ConfigError(
                f"slot {self.name!r}: {self.kind} weight must be {int(self.kind[4]) + 2}-D"
            )
        if self.kind == "linear" and self.weight.dim() != 2:
            raise ConfigError(
                f"slot {self.name!r}: linear weight must be 2-D, got {self.weight.dim()}-D"
            )

    # -- the grid ------------------------------------------------------------------------
    def nearest(self) -> torch.Tensor:
        """The integers the framework itself would deploy (nearest rounding)."""
        if self.nearest_fn is not None:
            return self.nearest_fn(self).to(torch.int64)
        return quantize(
            self.weight,
            self.scale,
            self.zero_point,
            self.axis,
            self.qmin,
            self.qmax,
            rounding=self.rounding,
        )

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """The float weight the framework computes with for integers ``q``."""
        return dequantize(q, self.scale, self.zero_point, self.axis)

    def check_integers(self, q: Any, source: str) -> torch.Tensor:
        """Validate integers proposed for this slot; return them as int64."""
        if not isinstance(q, torch.Tensor):
            raise DefenseError(
                f"{source} returned {type(q).__name__} for slot {self.name!r}, not a tensor"
            )
        if tuple(q.shape) != tuple(self.weight.shape):
            raise DefenseError(
                f"{source} returned shape {tuple(q.shape)} for slot {self.name!r}, "
                f"expected {tuple(self.weight.shape)}"
            )
        if q.is_floating_point():
            if not torch.isfinite(q).all() or not torch.equal(q, torch.round(q)):
                raise DefenseError(f"{source} returned non-integer values for slot {self.name!r}")
        elif q.dtype == torch.bool or q.is_complex():
            raise DefenseError(f"{source} returned dtype {q.dtype} for slot {self.name!r}")
        q = q.detach().to(torch.int64)
        low, high = int(q.min()), int(q.max())
        if low < self.qmin or high > self.qmax:
            raise DefenseError(
                f"{source} returned integers in [{low}, {high}] for slot {self.name!r}, "
                f"outside the framework's range [{self.qmin}, {self.qmax}]"
            )
        return q

    # -- running the layer ----------------------------------------------------------------
    def layer(self, x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Run the layer in torch on input ``x`` with weight ``w`` (default: the float weight)."""
        w = self.weight if w is None else w
        a = self.attrs
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[self.kind]
        return conv(
            x,
            w,
            self.bias,
            stride=a.get("stride", 1),
            padding=a.get("padding", 0),
            dilation=a.get("dilation", 1),
            groups=a.get("groups", 1),
        )

    def deploy(self, q: torch.Tensor) -> None:
        """Record and write the chosen integers into the framework's artefact."""
        self.integers = q
        if self.write is not None:
            self.write(q)


@dataclass
class SlotCalibration:
    """Calibration data of one layer, in the layout ``slot.layer`` expects.

    :param inputs: the layer's inputs as the deployed (partly quantized) model produces them.
    :param fp_inputs: the layer's inputs in the float model; ``None`` means same as ``inputs``.
        Activation-preserving defenses target ``slot.layer(fp_inputs, slot.weight)``.
    """

    inputs: torch.Tensor
    fp_inputs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for what, t in (("inputs", self.inputs), ("fp_inputs", self.fp_inputs)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise DataError(f"calibration {what} must be a float tensor")
            if t.dim() == 0 or t.shape[0] == 0:
                raise DataError(f"calibration {what} is empty (shape {tuple(t.shape)})")
            if not torch.isfinite(t).all():
                raise DataError(f"calibration {what} contain NaN/inf values")
        if self.fp_inputs is not None and self.fp_inputs.shape != self.inputs.shape:
            raise DataError(
                f"calibration inputs {tuple(self.inputs.shape)} and fp_inputs "
                f"{tuple(self.fp_inputs.shape)} differ in shape"
            )

    @property
    def targets_inputs(self) -> torch.Tensor:
        return self.inputs if self.fp_inputs is None else self.fp_inputs
