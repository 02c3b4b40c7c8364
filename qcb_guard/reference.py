"""The project's reference quantizer: weight-only quantization of a plain ``torch.nn.Module``.

It is the framework-free flow used by the demo, the attacks (to check a QCB against the
convention it targets) and the algorithm tests. Real deployments go through the framework
adapters in ``plugins/``; this module only knows torch.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from qcb_guard.config import GuardConfig
from qcb_guard.errors import ConfigError, DataError
from qcb_guard.guarding import GuardResult, round_slots
from qcb_guard.manager import PluginManager, get_plugin_manager
from qcb_guard.quant.ops import compute_qparams
from qcb_guard.quant.spec import QuantSpec
from qcb_guard.slots import SlotCalibration, WeightSlot

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_KIND = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}


class _Stop(Exception):
    """Raised from a hook to cut a forward pass short once a layer's input is captured."""


def quantizable_modules(
    model: nn.Module, sample: torch.Tensor | None = None
) -> list[tuple[str, nn.Module]]:
    """Conv/Linear modules in execution order (by a forward pass on ``sample`` when given,
    registration order otherwise)."""
    modules = [(n, m) for n, m in model.named_modules() if type(m) in _KIND]
    if sample is None:
        return modules
    order: list[str] = []
    names = {id(m): n for n, m in modules}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, _inp: order.append(names[id(mod)]) if names[id(mod)] not in order else None
        )
        for _, m in modules
    ]
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            model(sample[:1])
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    by_name = dict(modules)
    return [(n, by_name[n]) for n in order] + [(n, m) for n, m in modules if n not in order]


def module_slot(
    name: str, module: nn.Module, spec: QuantSpec, framework: str = "reference"
) -> WeightSlot:
    """A :class:`WeightSlot` for one Conv/Linear module with min/max qparams under ``spec``."""
    weight = module.weight.detach()
    axis = None if spec.axis is None else 0  # output channels, as every framework does
    scale, zero_point = compute_qparams(weight, dataclasses.replace(spec, axis=axis))
    attrs = {}
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.padding_mode != "zeros":
            raise ConfigError(
                f"layer {name!r}: padding_mode={module.padding_mode!r} is not supported "
                "(only 'zeros')"
            )
        attrs = {
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "groups": module.groups,
        }
    return WeightSlot(
        name=f"{name}.weight",
        kind=_KIND[type(module)],
        weight=weight,
        scale=scale,
        zero_point=zero_point,
        axis=axis,
        qmin=spec.qmin,
        qmax=spec.qmax,
        bias=None if module.bias is None else module.bias.detach().float(),
        attrs=attrs,
        framework=framework,
        rounding=spec.rounding,
    )


@dataclass
class TorchLayerInputs:
    """Calibrator over torch modules: each layer's inputs in the float model and in the
    partly quantized copy (its earlier layers already deployed)."""

    fp_model: nn.Module
    q_model: nn.Module
    fp_modules: dict[str, nn.Module]
    q_modules: dict[str, nn.Module]
    data: torch.Tensor
    batch_size: int = 256

    def _capture(self, model: nn.Module, module: nn.Module) -> torch.Tensor:
        chunks: list[torch.Tensor] = []

        def hook(_mod, inputs):
            chunks.append(inputs[0].detach())
            raise _Stop

        handle = module.register_forward_pre_hook(hook)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(self.data), self.batch_size):
                    try:
                        model(self.data[start : start + self.batch_size])
                    except _Stop:
                        pass
        finally:
            handle.remove()
            model.train(was_training)
        return torch.cat(chunks)

    def __call__(self, slot: WeightSlot) -> SlotCalibration:
        name = slot.name.removesuffix(".weight")
        return SlotCalibration(
            inputs=self._capture(self.q_model, self.q_modules[name]),
            fp_inputs=self._capture(self.fp_model, self.fp_modules[name]),
        )


def check_calibration(
    data: torch.Tensor | None, what: str = "calibration data"
) -> torch.Tensor | None:
    """Validate user calibration inputs (a float tensor ``[N, ...]`` with N ≥ 1, finite)."""
    if data is None:
        return None
    if not isinstance(data, torch.Tensor):
        raise DataError(
            f"{what} must be a torch.Tensor of inputs [N, ...], got {type(data).__name__}"
        )
    if data.dim() == 0 or data.shape[0] == 0:
        raise DataError(f"{what} is empty (shape {tuple(data.shape)})")
    if not data.is_floating_point():
        raise DataError(f"{what} must be floating point, got {data.dtype}")
    if not torch.isfinite(data).all():
        raise DataError(f"{what} contains NaN/inf values")
    return data.detach().to(torch.float32)


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    *,
    defense: str = "nearest",
    calibration: torch.Tensor | None = None,
    skip: Iterable[str] = (),
    seed: int = 0,
    pm: PluginManager | None = None,
    progress: bool | None = False,
    **options,
) -> tuple[nn.Module, GuardResult]:
    """Weight-only quantize a copy of ``model`` (the caller's model is not modified).

    Returns the copy, whose Conv/Linear weights hold the dequantized integers chosen by
    ``defense``, and the :class:`GuardResult`. Modules named in ``skip`` stay float.
    """
    pm = pm or get_plugin_manager()
    calibration = check_calibration(calibration)
    fp_model = copy.deepcopy(model).eval()
    q_model = copy.deepcopy(model).eval()
    skip = set(skip)
    sample = calibration if calibration is not None else None
    q_modules = {n: m for n, m in quantizable_modules(q_model, sample) if n not in skip}
    fp_modules = dict(quantizable_modules(fp_model))
    slots = []
    for name, module in q_modules.items():
        slot = module_slot(name, module, spec)

        def write(q: torch.Tensor, module=module, slot=slot) -> None:
            with torch.no_grad():
                module.weight.copy_(slot.dequantize(q).to(module.weight.dtype))

        slot.write = write
        slots.append(slot)
    calibrator = None
    if calibration is not None:
        calibrator = TorchLayerInputs(fp_model, q_model, fp_modules, q_modules, calibration)
    config = GuardConfig(defense=defense, calibration=calibration, seed=seed, options=options)
    result = round_slots(
        slots, config, pm=pm, calibrator=calibrator, framework="reference", progress=progress
    )
    result.extra["spec"] = spec.describe()
    return q_model, result
