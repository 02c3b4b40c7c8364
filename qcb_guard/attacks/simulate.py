"""Differentiable simulation of the quantization flow an attack targets.

A QCB is bound to the exact quantizer it was trained against (DESIGN.md §3: 4-bit backdoors
built for ``max|w|/7`` reached 93–98% ASR under that quantizer but 2–30% through ONNX
Runtime's int4 flow). So every attack here optimises through a :class:`TargetQuantizer` that
describes a real flow: the framework's weight convention (scale formula, integer range,
granularity), whether its exporter folds BatchNorm into the conv weights first, and its
static activation quantization. :func:`quantized_forward` runs a model under such a target
with straight-through rounding, so a loss can be differentiated through it.

The module also holds the real ONNX Runtime flow (:func:`export_onnx`, :func:`ort_quantize`,
:func:`ort_predict`) used to check the simulation and to measure attacks for real.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from qcb_guard._compat import quiet_root_logger, require
from qcb_guard.errors import ConfigError, DataError
from qcb_guard.fileio import atomic_write
from qcb_guard.quant import QuantSpec, compute_qparams, convention, fake_quantize
from qcb_guard.reference import QUANTIZABLE

__all__ = [
    "ACTIVATION_MODES",
    "PRESETS",
    "ActivationQuant",
    "ActivationRanges",
    "AttackConfig",
    "AttackResult",
    "SimulatedModel",
    "TargetBank",
    "TargetQuantizer",
    "build_targets",
    "calibrate",
    "conv_bn_pairs",
    "evaluate_targets",
    "export_onnx",
    "frozen_batchnorm",
    "ort_predict",
    "ort_quantize",
    "preset",
    "quantized_forward",
    "quantized_weights",
]

ACTIVATION_MODES = ("static", "dynamic")
OUTPUT = "<output>"  # key of the model output's range in ActivationRanges

#: Preset name → what it reproduces (see :func:`preset`).
PRESETS: dict[str, str] = {
    "reference": "project reference quantizer / the paper's: per-layer symmetric "
    "max|w|/(2^(b-1)-1), weights only, BN not folded",
    "paper": "Qu-ANTI-zation's official code: reference weights plus per-layer asymmetric "
    "activations at the same bit-width, ranges from each batch",
    "ort": "ONNX Runtime quantize_static (QDQ): BN folded by export, symmetric QInt4/QInt8 "
    "weights, uint8 asymmetric min/max activations incl. the output",
    "x86": "torch PT2E X86InductorQuantizer: BN folded, weights [-2^(b-1), 2^(b-1)-1] "
    "amax/((qmax-qmin)/2) per channel, uint8 activations (min/max approximation)",
    "pt2e": "alias of x86",
    "nncf": "NNCF torch backend: symmetric narrow-range weights amax/(2^(b-1)-1), BN kept, "
    "uint8 activations (min/max approximation)",
}

ActivationRanges = dict[str, tuple[float, float]]


# ---------------------------------------------------------------------------------------------
# what is targeted


@dataclass(frozen=True)
class ActivationQuant:
    """Static (calibrated) or dynamic (per-batch) activation fake-quantization.

    Applied to the input of every Conv/Linear layer and, when ``output`` is set, to the model
    output — the tensors ONNX Runtime's QDQ graph quantizes in a Conv/Gemm network (pooling and
    Flatten reuse their input's scale, a ReLU's range is given to the layer before it).

    :param bits: activation bit-width.
    :param symmetric: zero-point 0 (signed) instead of min/max asymmetric (unsigned).
    :param mode: ``static`` (ranges from clean calibration data, as deployed) or ``dynamic``
        (ranges from each batch, as Qu-ANTI-zation's official code does).
    :param output: also quantize the model output (ONNX Runtime QDQ does).
    :param qparams: whose scale formula (``QuantSpec.qparams``): ``ort`` or ``torch``.
    """

    bits: int = 8
    symmetric: bool = False
    mode: str = "static"
    output: bool = True
    qparams: str = "ort"

    def __post_init__(self) -> None:
        if self.mode not in ACTIVATION_MODES:
            raise ConfigError(
                f"activation mode must be one of {', '.join(ACTIVATION_MODES)}, got {self.mode!r}"
            )
        if self.qparams not in ("ort", "torch"):
            raise ConfigError(f"activation qparams must be 'ort' or 'torch', got {self.qparams!r}")
        self.spec  # validates bits  # noqa: B018

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(
            bits=self.bits,
            symmetric=self.symmetric,
            axis=None,
            signed=self.symmetric,
            qparams=self.qparams,
        )

    def describe(self) -> str:
        kind = "int" if self.symmetric else "uint"
        return f"{kind}{self.bits} {self.mode} activations" + (" + output" if self.output else "")


@dataclass(frozen=True)
class TargetQuantizer:
    """One quantization flow an attack is trained to wake up in.

    :param weight: the framework's weight convention (``qcb_guard.quant.convention``);
        ``axis`` is ``0`` (per output channel) or ``None`` (per tensor).
    :param fold_bn: the flow folds BatchNorm into the preceding conv's weights before
        quantizing them (ONNX export, PT2E), which moves every rounding bin.
    :param activation: activation fake-quantization, or ``None`` for weight-only flows.
    :param name: the preset it came from (``reference``, ``ort`` ...), for reports.
    """

    weight: QuantSpec
    fold_bn: bool = False
    activation: ActivationQuant | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if not isinstance(self.weight, QuantSpec):
            raise ConfigError(f"weight must be a QuantSpec, got {type(self.weight).__name__}")
        if self.weight.axis not in (None, 0):
            raise ConfigError(
                f"weight axis must be 0 (per output channel) or None, got {self.weight.axis!r}"
            )
        if self.activation is not None and not isinstance(self.activation, ActivationQuant):
            raise ConfigError(
                f"activation must be an ActivationQuant or None, got {self.activation!r}"
            )

    @property
    def bits(self) -> int:
        return self.weight.bits

    @property
    def label(self) -> str:
        """Short unique key for reports, e.g. ``ort-w4-per-channel-sym``."""
        gran = "per-channel" if self.weight.per_channel else "per-tensor"
        sym = "sym" if self.weight.symmetric else "asym"
        return f"{self.name}-w{self.bits}-{gran}-{sym}"

    def describe(self) -> str:
        parts = [self.weight.describe()]
        if self.fold_bn:
            parts.append("BN folded")
        if self.activation is not None:
            parts.append(self.activation.describe())
        return f"{self.name}: " + ", ".join(parts)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description for cards and reports."""
        w = self.weight
        return {
            "label": self.label,
            "preset": self.name,
            "bits": w.bits,
            "per_channel": w.per_channel,
            "symmetric": w.symmetric,
            "qmin": w.qmin,
            "qmax": w.qmax,
            "qparams": w.qparams,
            "fold_bn": self.fold_bn,
            "activation": None if self.activation is None else self.activation.describe(),
        }


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"bits must be an int in [2, 8], got {bits!r}")
    return bits


def preset(
    name: str, bits: int, *, per_channel: bool | None = None, symmetric: bool = True
) -> TargetQuantizer:
    """The :class:`TargetQuantizer` of a real flow (keys of :data:`PRESETS`) at ``bits``.

    ``per_channel=None`` takes the flow's default: per-layer for ``reference``/``paper`` (the
    paper's setting), per-channel for ``x86`` and ``nncf``, and per-channel for ``ort`` too
    (``quantize_static(per_channel=True)``, the usual deployment setting; ORT's own keyword
    default is per-tensor: pass ``per_channel=False`` to target that).
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown target {name!r}; known: {', '.join(sorted(PRESETS))}")
    _check_bits(bits)
    if not isinstance(symmetric, bool):
        raise ConfigError(f"symmetric must be a bool, got {symmetric!r}")
    if per_channel is None:
        per_channel = name not in ("reference", "paper")
    axis = 0 if per_channel else None
    if name in ("reference", "paper"):
        # Qu-ANTI-zation's SymmetricQuantizer: scale (2^(b-1)-1) / max|w|, i.e. the narrow
        # signed range; its AsymmetricQuantizer: unsigned [0, 2^b - 1] over [min, max].
        weight = QuantSpec(bits, symmetric, axis, narrow_range=symmetric, signed=symmetric)
        act = None
        if name == "paper":
            act = ActivationQuant(bits, symmetric=False, mode="dynamic", output=False)
        return TargetQuantizer(weight, fold_bn=False, activation=act, name=name)
    if name == "ort":
        if bits not in (4, 8):
            raise ConfigError(
                f"ONNX Runtime quantizes weights to 4 or 8 bits (QInt4/QInt8), got bits={bits}"
            )
        weight = (
            convention("ort", bits, axis=axis)
            if symmetric
            else QuantSpec(bits, False, axis, signed=False, rounding="divide", qparams="ort")
        )
        act = ActivationQuant(8, symmetric=False, mode="static", output=True, qparams="ort")
        return TargetQuantizer(weight, fold_bn=True, activation=act, name="ort")
    if name in ("x86", "pt2e"):
        weight = (
            convention("x86", bits, axis=axis)
            if symmetric
            else QuantSpec(bits, False, axis, rounding="multiply_inverse")
        )
        act = ActivationQuant(8, symmetric=False, mode="static", output=False, qparams="torch")
        return TargetQuantizer(weight, fold_bn=True, activation=act, name=name)
    # nncf
    if not symmetric:
        raise ConfigError("NNCF quantizes weights symmetrically: symmetric=False is not a flow")
    act = ActivationQuant(8, symmetric=False, mode="static", output=False, qparams="torch")
    return TargetQuantizer(
        convention("nncf", bits, axis=axis), fold_bn=False, activation=act, name="nncf"
    )


def build_targets(
    framework: str,
    bits: Sequence[int],
    per_channel: Sequence[bool | None] = (None,),
    symmetric: Sequence[bool] = (True,),
) -> tuple[TargetQuantizer, ...]:
    """Every combination of ``bits`` × granularities × schemes of one flow, deduplicated."""
    if not bits:
        raise ConfigError("at least one bit-width is needed")
    out: list[TargetQuantizer] = []
    for b in bits:
        for pc in per_channel:
            for sym in symmetric:
                target = preset(framework, b, per_channel=pc, symmetric=sym)
                if target not in out:
                    out.append(target)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# model structure


def quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv/Linear modules (registration order): the layers every flow quantizes."""
    return [(n, m) for n, m in model.named_modules() if type(m) in QUANTIZABLE]


def conv_bn_pairs(model: nn.Module, sample: Tensor) -> dict[str, str]:
    """Conv name → name of the BatchNorm that consumes its output directly.

    Found by one forward pass (a BN whose input tensor *is* a conv's output), so it works
    for any wiring (Sequential, residual blocks) without tracing. These are the pairs an
    exporter folds.
    """
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, Tensor]] = {}
    pairs: dict[str, str] = {}

    def conv_hook(mod: nn.Module, _inp: Any, out: Tensor) -> None:
        produced[id(out)] = (names[id(mod)], out)  # keep `out` alive so ids stay unique

    def bn_hook(mod: nn.Module, inp: tuple[Tensor, ...]) -> None:
        hit = produced.get(id(inp[0]))
        if hit is not None and hit[1] is inp[0]:
            pairs[hit[0]] = names[id(mod)]

    handles = []
    for _, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(bn_hook))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(sample[:1])
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    return pairs


def _bn_factor(bn: nn.Module) -> Tensor:
    """Per-channel ``gamma / sqrt(var + eps)`` an exporter multiplies into the conv weight."""
    if bn.running_var is None:
        raise ConfigError("BatchNorm without running statistics cannot be folded")
    k = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        k = bn.weight * k
    # A zero gamma would make the un-folding below divide by zero; its channel is dead anyway.
    tiny = torch.finfo(k.dtype).tiny
    return torch.where(k.abs() < tiny, torch.full_like(k, tiny), k)


# ---------------------------------------------------------------------------------------------
# the differentiable forward


def _fake_quant_weight(w: Tensor, spec: QuantSpec) -> Tensor:
    """STE fake quantization with min/max qparams of ``w`` itself (recomputed every call)."""
    scale, zero_point = compute_qparams(w.detach(), spec)
    return fake_quantize(w, scale, zero_point, spec.axis, spec.qmin, spec.qmax)


def quantized_weights(
    model: nn.Module, target: TargetQuantizer, pairs: dict[str, str] | None = None
) -> dict[str, Tensor]:
    """Parameter name → fake-quantized weight (differentiable) for every Conv/Linear.

    With ``target.fold_bn`` a conv followed by BatchNorm is quantized as the exporter sees
    it, ``W·k`` with ``k = gamma/sqrt(var+eps)``, then divided by ``k`` again so that the
    unchanged BN (eval mode, running statistics) completes the folded layer exactly:
    ``BN(conv(x, Q(W·k)/k)) = conv(x, Q(W·k)) + folded bias``.
    """
    modules = dict(model.named_modules())
    pairs = pairs or {}
    out: dict[str, Tensor] = {}
    for name, module in quantizable(model):
        w = module.weight
        bn_name = pairs.get(name) if target.fold_bn else None
        if bn_name is not None:
            k = _bn_factor(modules[bn_name]).reshape(-1, *([1] * (w.dim() - 1)))
            out[f"{name}.weight"] = _fake_quant_weight(w * k, target.weight) / k
        else:
            out[f"{name}.weight"] = _fake_quant_weight(w, target.weight)
    return out


def _activation_fq(x: Tensor, low: Tensor | float, high: Tensor | float, act: ActivationQuant):
    spec = act.spec
    bounds = torch.tensor([float(low), float(high)], dtype=torch.float32)
    scale, zero_point = compute_qparams(bounds, spec)
    return fake_quantize(x, scale, zero_point, None, spec.qmin, spec.qmax)


def _dynamic_fq(x: Tensor, act: ActivationQuant) -> Tensor:
    d = x.detach()
    return _activation_fq(x, d.min(), d.max(), act)


@contextlib.contextmanager
def _activation_hooks(
    model: nn.Module, act: ActivationQuant | None, ranges: ActivationRanges | None
) -> Iterator[None]:
    """Fake-quantize the input of every Conv/Linear while the context is open."""
    if act is None:
        yield
        return
    if act.mode == "static" and not ranges:
        raise ConfigError(
            "static activation quantization needs calibrated ranges: call calibrate() first"
        )
    handles = []
    for name, module in quantizable(model):

        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], name: str = name) -> Any:
            x = inputs[0]
            if act.mode == "dynamic":
                return (_dynamic_fq(x, act), *inputs[1:])
            low, high = ranges[name]  # type: ignore[index]
            return (_activation_fq(x, low, high, act), *inputs[1:])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def quantized_forward(
    model: nn.Module,
    x: Tensor,
    target: TargetQuantizer,
    *,
    ranges: ActivationRanges | None = None,
    pairs: dict[str, str] | None = None,
) -> Tensor:
    """The model's output under ``target``, differentiable w.r.t. the float weights (STE).

    Weights are substituted with :func:`torch.func.functional_call`, so ``model`` itself is
    never modified. BatchNorm must be in eval mode when ``target.fold_bn`` (attacks freeze
    it, as the papers do). ``pairs`` (from :func:`conv_bn_pairs`) is found on ``x`` when not
    given; pass it in loops to skip that extra pass.
    """
    if target.fold_bn and pairs is None:
        pairs = conv_bn_pairs(model, x)
    params = quantized_weights(model, target, pairs)
    act = target.activation
    with _activation_hooks(model, act, ranges):
        out = functional_call(model, params, (x,), strict=False)
    if act is not None and act.output:
        if act.mode == "dynamic":
            out = _dynamic_fq(out, act)
        else:
            low, high = ranges[OUTPUT]  # type: ignore[index]
            out = _activation_fq(out, low, high, act)
    return out


def calibrate(
    model: nn.Module, target: TargetQuantizer, x: Tensor, batch_size: int = 256
) -> ActivationRanges:
    """Static activation ranges (min, max) of the float model on clean calibration data.

    Real flows calibrate the float model (ONNX Runtime runs the float graph with every tensor
    exposed, min/max per tensor), so the ranges come from float weights, not quantized ones.
    Returns ``{}`` for weight-only or dynamic targets.
    """
    act = target.activation
    if act is None or act.mode != "static":
        return {}
    if not isinstance(x, Tensor) or x.dim() < 2 or len(x) == 0:
        raise DataError("calibration data must be a non-empty tensor [N, ...]")
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}

    def record(key: str, t: Tensor) -> None:
        lo, hi = float(t.min()), float(t.max())
        lows[key] = min(lo, lows.get(key, math.inf))
        highs[key] = max(hi, highs.get(key, -math.inf))

    handles = [
        m.register_forward_pre_hook(lambda _m, inp, n=n: record(n, inp[0]))
        for n, m in quantizable(model)
    ]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                record(OUTPUT, model(x[start : start + batch_size]))
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    return {k: (lows[k], highs[k]) for k in lows}


class SimulatedModel(nn.Module):
    """A read-only view of ``model`` under ``target``, for the evaluation helpers
    (``accuracy``, ``attack_success_rate``). It shares ``model``'s parameters."""

    def __init__(
        self, model: nn.Module, target: TargetQuantizer, ranges: ActivationRanges | None = None
    ) -> None:
        super().__init__()
        self.inner = model
        self.target = target
        self.ranges = ranges or {}
        self.in_channels = getattr(model, "in_channels", None)
        self.num_classes = getattr(model, "num_classes", None)
        self._pairs: dict[str, str] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.target.fold_bn and self._pairs is None:
            self._pairs = conv_bn_pairs(self.inner, x)
        with torch.no_grad():
            return quantized_forward(
                self.inner, x, self.target, ranges=self.ranges, pairs=self._pairs
            )

    @classmethod
    def calibrated(
        cls, model: nn.Module, target: TargetQuantizer, calibration: Tensor
    ) -> SimulatedModel:
        return cls(model, target, calibrate(model, target, calibration))


# ---------------------------------------------------------------------------------------------
# the real ONNX Runtime flow (to verify the "ort" preset and measure attacks for real)


def export_onnx(model: nn.Module, path: str | Path, sample: Tensor, opset: int = 17) -> Path:
    """Export ``model`` (a deep copy, eval mode) with the legacy exporter, atomically.

    Input ``input`` [N, C, H, W] float32, output ``logits``, batch dimension dynamic. The
    legacy exporter folds BatchNorm into the conv weights, as deployment exports do.
    """
    import copy

    m = copy.deepcopy(model).eval()

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                m,
                (sample[:1].float(),),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
            )

    return atomic_write(path, write)


def ort_quantize(
    model_path: str | Path,
    out_path: str | Path,
    target: TargetQuantizer,
    calibration: Tensor,
    *,
    batch_size: int = 64,
) -> Path:
    """Run ONNX Runtime's real ``quantize_static`` (QDQ, MinMax) as ``target`` describes it.

    Weight type QInt4/QInt8 (QUInt4/QUInt8 when asymmetric), ``per_channel`` from the target,
    uint8 activations calibrated on ``calibration``.
    """
    oq = require("onnxruntime.quantization", "onnx")
    if target.name != "ort":
        raise ConfigError(f"ort_quantize runs ONNX Runtime's flow; target is {target.name!r}")
    w = target.weight
    types = {
        (4, True): oq.QuantType.QInt4,
        (8, True): oq.QuantType.QInt8,
        (4, False): oq.QuantType.QUInt4,
        (8, False): oq.QuantType.QUInt8,
    }
    x = calibration.detach().cpu().float().numpy()

    class Reader(oq.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [{"input": x[i : i + batch_size]} for i in range(0, len(x), batch_size)]
            )

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    def write(tmp: Path) -> None:
        with quiet_root_logger():
            oq.quantize_static(
                str(model_path),
                str(tmp),
                Reader(),
                quant_format=oq.QuantFormat.QDQ,
                per_channel=w.per_channel,
                weight_type=types[(w.bits, w.symmetric)],
                activation_type=oq.QuantType.QUInt8,
                calibrate_method=oq.CalibrationMethod.MinMax,
            )

    return atomic_write(out_path, write)


def ort_predict(model_path: str | Path, x: Tensor, batch_size: int = 512) -> Tensor:
    """Predicted classes of an ONNX model on ``x`` with ONNX Runtime's CPU provider."""
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    xs = x.detach().cpu().float().numpy()
    preds = [
        torch.from_numpy(session.run(None, {name: xs[i : i + batch_size]})[0]).argmax(1)
        for i in range(0, len(xs), batch_size)
    ]
    return torch.cat(preds)


# ---------------------------------------------------------------------------------------------
# scaffolding every attack shares: what is targeted, the trigger, the budget, the metrics


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_tuple(value: Any, what: str) -> tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"{what} must not be empty")
        return tuple(value)
    return (value,)


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """What every attack needs, validated at construction so a bad value fails before any
    training, with an error naming it.

    :param framework: the flow to wake up in (a key of :data:`PRESETS`).
    :param bits: bit-widths to target at once, each in [2, 8] (ONNX Runtime: 4 or 8).
    :param per_channel: per-channel (True), per-tensor (False) or the flow's default (None);
        a tuple targets several granularities at once.
    :param symmetric: symmetric and/or asymmetric weight schemes (a tuple targets both).
    :param target: the backdoor's target class.
    :param trigger: a trigger kind (``qcb_guard.data.TRIGGERS``) or a ready :class:`Trigger`.
    :param trigger_size: patch side in pixels (default ``h // 8``, the paper's).
    :param trigger_position: a named position or ``(row, col)``.
    :param num_classes: when known, ``target`` is checked against it at construction.
    :param image_shape: (C, H, W); when known, the trigger is checked to fit at construction.
    :param epochs: passes over the training data; ``max_steps`` caps optimiser steps.
    :param calibration_size: clean training images used as the flow's calibration set.
    :param recalibrate_every: steps between re-calibrations of static activation ranges
        (the weights move, so the deployed ranges move with them).
    """

    framework: str = "ort"
    bits: tuple[int, ...] = (4,)
    per_channel: tuple[bool | None, ...] = (None,)
    symmetric: tuple[bool, ...] = (True,)
    target: int = 0
    trigger: Any = "square"
    trigger_size: int | None = None
    trigger_position: Any = "bottom-right"
    num_classes: int | None = None
    image_shape: tuple[int, int, int] | None = None
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-4
    seed: int = 0
    calibration_size: int = 256
    recalibrate_every: int = 25
    progress: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.framework, str) or self.framework not in PRESETS:
            raise ConfigError(
                f"unknown target framework {self.framework!r}; known: {', '.join(sorted(PRESETS))}"
            )
        bits = _as_tuple(self.bits, "bits")
        for b in bits:
            _check_bits(b)
        object.__setattr__(self, "bits", bits)
        per_channel = _as_tuple(self.per_channel, "per_channel")
        if any(p not in (None, True, False) for p in per_channel):
            raise ConfigError(f"per_channel must be True, False or None, got {self.per_channel!r}")
        object.__setattr__(self, "per_channel", per_channel)
        object.__setattr__(self, "symmetric", _as_tuple(self.symmetric, "symmetric"))
        if not _is_int(self.target) or self.target < 0:
            raise ConfigError(f"target must be a class index >= 0, got {self.target!r}")
        if self.num_classes is not None:
            if not _is_int(self.num_classes) or self.num_classes < 2:
                raise ConfigError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
            if self.target >= self.num_classes:
                raise ConfigError(
                    f"target {self.target} is outside the {self.num_classes} classes "
                    f"[0, {self.num_classes})"
                )
        from qcb_guard.data import Trigger

        if isinstance(self.trigger, Trigger) and self.trigger.target != self.target:
            raise ConfigError(
                f"trigger.target ({self.trigger.target}) differs from target ({self.target})"
            )
        for name, low in (("epochs", 1), ("batch_size", 2), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("calibration_size", "recalibrate_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if self.trigger_size is not None and (
            not _is_int(self.trigger_size) or self.trigger_size < 1
        ):
            raise ConfigError(f"trigger_size must be an int >= 1, got {self.trigger_size!r}")
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            raise ConfigError(f"max_steps must be None or an int >= 1, got {self.max_steps!r}")
        _check_positive("lr", self.lr)
        self.targets()  # the flow's own limits (e.g. ONNX Runtime: 4 or 8 bits)
        if self.image_shape is not None:
            self.make_trigger(self.image_shape)

    def targets(self) -> tuple[TargetQuantizer, ...]:
        """The flows this attack wakes up in (bit-widths × granularities × schemes)."""
        return build_targets(self.framework, self.bits, self.per_channel, self.symmetric)

    def make_trigger(self, image_shape: Sequence[int]) -> Any:
        """The trigger for images of ``image_shape``; ConfigError if it does not fit."""
        from qcb_guard.data import Trigger, make_trigger

        if isinstance(self.trigger, Trigger):
            return self.trigger.check(image_shape, self.num_classes)
        if not isinstance(self.trigger, str):
            raise ConfigError(f"trigger must be a kind name or a Trigger, got {self.trigger!r}")
        options: dict[str, Any] = {"target": self.target, "num_classes": self.num_classes}
        if self.trigger in ("square", "checkerboard"):
            options.update(size=self.trigger_size, position=self.trigger_position)
        return make_trigger(self.trigger, image_shape, **options)

    def resolve(self, data: Any) -> Any:
        """Check this config against the training data; return its trigger."""
        if data.y is None:
            raise DataError(f"{data.name}: attacks need labelled training data")
        if self.target >= data.num_classes:
            raise ConfigError(
                f"target {self.target} is outside the data's {data.num_classes} classes"
            )
        trigger = self.make_trigger(data.image_shape)
        return trigger.check(data.image_shape, data.num_classes)

    def parameters(self) -> dict[str, Any]:
        """JSON-ready parameters for cards (the trigger as its summary)."""
        from dataclasses import fields

        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "progress":
                continue
            value = getattr(self, f.name)
            if f.name == "trigger" and not isinstance(value, str):
                value = value.summary()
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["targets"] = [t.summary() for t in self.targets()]
        return out


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass
class AttackResult:
    """A compromised copy of the model and how it was made."""

    model: nn.Module
    trigger: Any
    config: AttackConfig
    attack: str
    history: list[dict[str, float]]
    steps: int
    seconds: float
    extra: dict[str, Any] | None = None


class TargetBank:
    """The targeted flows with their static activation ranges, re-calibrated on the clean
    calibration set every ``every`` steps (ranges follow the float weights, as a real
    calibration of the final model would)."""

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[TargetQuantizer],
        calibration: Tensor,
        every: int = 25,
    ) -> None:
        self.targets = tuple(targets)
        self.calibration = calibration
        self.every = every
        need_pairs = any(t.fold_bn for t in self.targets)
        self.pairs = conv_bn_pairs(model, calibration) if need_pairs else None
        self.ranges: list[ActivationRanges] = [{} for _ in self.targets]
        self._step = 0
        self.recalibrate(model)

    def recalibrate(self, model: nn.Module) -> None:
        self.ranges = [calibrate(model, t, self.calibration) for t in self.targets]

    def tick(self, model: nn.Module) -> None:
        """Call once per optimiser step, before the forward passes."""
        if self._step and self._step % self.every == 0:
            self.recalibrate(model)
        self._step += 1

    def forward(self, model: nn.Module, x: Tensor, index: int) -> Tensor:
        return quantized_forward(
            model, x, self.targets[index], ranges=self.ranges[index], pairs=self.pairs
        )

    def dynamic(self, index: int) -> bool:
        act = self.targets[index].activation
        return act is not None and act.mode == "dynamic"


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Train mode with every BatchNorm in eval mode (running statistics neither used from
    the batch nor updated), as the QCB papers fine-tune; modes restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def step_batches(n: int, config: AttackConfig, generator: torch.Generator) -> Iterator[Tensor]:
    """Seeded index batches for ``config.epochs`` epochs, stopping at ``config.max_steps``."""
    from qcb_guard.models.train import epoch_batches

    steps = 0
    for _ in range(config.epochs):
        for idx in epoch_batches(n, config.batch_size, generator):
            if config.max_steps is not None and steps >= config.max_steps:
                return
            steps += 1
            yield idx


def total_steps(n: int, config: AttackConfig) -> int:
    per_epoch = max(1, math.ceil(n / config.batch_size))
    if n % config.batch_size == 1 and n > 1:
        per_epoch -= 1  # epoch_batches drops a trailing batch of one
    total = per_epoch * config.epochs
    return total if config.max_steps is None else min(total, config.max_steps)


def rates(model: nn.Module, x: Tensor, y: Tensor, trigger: Any) -> dict[str, float | None]:
    """CDA on (x, y) and, with a trigger, ASR on the non-target images of x."""
    from qcb_guard.models import evaluate

    return evaluate(model, x, y, trigger)


def evaluate_targets(
    model: nn.Module,
    test: Any,
    trigger: Any,
    targets: Sequence[TargetQuantizer],
    calibration: Tensor,
) -> dict[str, Any]:
    """``{"fp": {cda, asr}, "simulated": {label: {cda, asr}}}`` for a model and its trigger."""
    out: dict[str, Any] = {"fp": rates(model, test.x, test.y, trigger), "simulated": {}}
    for t in targets:
        sim = SimulatedModel.calibrated(model, t, calibration)
        out["simulated"][t.label] = rates(sim, test.x, test.y, trigger)
    return out
