"""Adapter ``nncf``: Intel NNCF post-training quantization (``nncf.quantize``) with guarded
weight rounding.

``guard(nncf.quantize)`` returns a function with ``nncf.quantize``'s own signature and return
type. It runs NNCF exactly as called, so every scale, zero point and activation range is
NNCF's own, then replaces each Conv/Linear weight's integers in the returned artefact:

- torch backend (an ``nn.Module``): weights stay float and NNCF fake-quantizes them on every
  forward; the guard writes a float that NNCF's own quantizer maps to the chosen integer
  (checked by running that quantizer on the written weight);
- TorchFX backend (a ``torch.fx.GraphModule``): the int8 ``compressed_weight_updated_constant*``
  tensors are replaced;
- ONNX backend (an ``onnx.ModelProto``): the int8 ``q_output_<w>_1`` initializers feeding
  ``DequantizeLinear`` are replaced.

NNCF's fast bias correction was computed with nearest-rounded weights; for every layer whose
integers changed it is recomputed with the deployed ones (same formula, same data subset).
NNCF offers no rounding hook, so the returned artefact is the only point where NNCF's scales
are final.

The activation defense (``range-probe`` by default) runs before NNCF: the items NNCF would
read are read once (``transform_fn`` applied), the defense probes the float model (ONNX:
converted to torch), and NNCF calibrates on a dataset of those items followed by the probe
items, with ``subset_size`` raised to take all of them. See ``docs/adapters/nncf.md``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from qcb_guard import hookimpl
from qcb_guard._compat import require
from qcb_guard.activation import TURNED_OFF, skipped
from qcb_guard.errors import (
    ConfigError,
    DataError,
    DefenseError,
    ModelFileError,
    UnsupportedObjectError,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from qcb_guard.config import GuardConfig
    from qcb_guard.guarding import GuardResult
    from qcb_guard.manager import PluginManager
    from qcb_guard.slots import SlotCalibration, WeightSlot

_MARK = "__qcb_guard_nncf__"
#: NNCF's overflow fix quantizes the first convolutions with half the int8 range: their
#: integers must stay within +-64 so that u8 x s8 pairs cannot saturate int16 on AVX2/AVX-512.
_HALF_RANGE = 64


# --------------------------------------------------------------------------------------
# The adapter object.
# --------------------------------------------------------------------------------------


class NncfAdapter:
    """Recognises ``nncf.quantize`` and wraps it."""

    requires = "nncf"

    def matches(self, obj: Any) -> bool:
        """True for ``nncf.quantize`` (checked by module and qualified name only, so that nncf
        is never imported here)."""
        module = getattr(obj, "__module__", None)
        if not isinstance(module, str) or not callable(obj):
            return False
        return (module == "nncf" or module.startswith("nncf.")) and getattr(
            obj, "__qualname__", None
        ) == "quantize"

    def wrap(self, obj: Any, config: GuardConfig, pm: PluginManager) -> Callable[..., Any]:
        """The guarded counterpart of ``nncf.quantize``."""
        require("nncf", "nncf")
        entry = require("nncf.quantization.quantize_model", "nncf")
        if getattr(obj, _MARK, None) is not None:
            raise ConfigError("nncf.quantize is already guarded; guard the original once")
        if obj is not entry.quantize:  # the original, even where nncf.quantize was rebound
            raise UnsupportedObjectError(
                f"guard() supports nncf.quantize; got {obj.__module__}.{obj.__qualname__}"
            )
        signature = inspect.signature(obj)

        @functools.wraps(obj)
        def quantize(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            artefact, result = _run(obj, args, kwargs, dict(bound.arguments), config, pm)
            quantize.last_result = result  # type: ignore[attr-defined]
            return artefact

        quantize.last_result = None  # type: ignore[attr-defined]  # GuardResult of the last call
        setattr(quantize, _MARK, config)
        return quantize


_ADAPTER = NncfAdapter()


@hookimpl
def qcb_guard_register_adapters(register):
    register(
        "nncf",
        _ADAPTER,
        description="nncf.quantize (torch, TorchFX and ONNX backends)",
    )


# --------------------------------------------------------------------------------------
# The guarded run, shared by the three backends.
# --------------------------------------------------------------------------------------


def _run(
    quantize: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    arguments: dict[str, Any],
    config: GuardConfig,
    pm: PluginManager,
) -> tuple[Any, GuardResult]:
    from qcb_guard.guarding import finish, round_slots

    model = arguments["model"]
    flow_cls = _flow_class(model)
    advanced = arguments.get("advanced_parameters")
    bias_correction = not (advanced is not None and advanced.disable_bias_correction)
    if bias_correction and not arguments["fast_bias_correction"] and config.defense != "nearest":
        raise ConfigError(
            "guard(nncf.quantize) re-applies NNCF's fast bias correction with the deployed "
            "integers; NNCF's slow BiasCorrection (fast_bias_correction=False) cannot be "
            "re-applied: keep fast_bias_correction=True or disable bias correction "
            "(AdvancedQuantizationParameters(disable_bias_correction=True))"
        )
    if arguments.get("mode") is not None:
        raise ConfigError(
            f"guard(nncf.quantize): mode={arguments['mode']!r} (FP8) has no integer grid to guard"
        )
    if _smooth_quant(arguments):
        raise ConfigError(
            "guard(nncf.quantize): model_type=TRANSFORMER runs SmoothQuant, which rescales the "
            "weights before quantization, so the float weights are no longer the model's; "
            "disable it (AdvancedQuantizationParameters(smooth_quant_alphas="
            "AdvancedSmoothQuantParameters(convolution=-1, matmul=-1))) or guard the smoothed model"
        )
    entry = pm.defenses.get(config.defense)  # unknown defense: fail before quantizing
    needs_data = bool(entry.options.get("needs_calibration", False))

    data = _Data(arguments["calibration_dataset"], arguments["subset_size"], config)
    if config.activation_defense is None:
        activation = dict(TURNED_OFF)
        # NNCF exactly as the user called it: every scale and range below is NNCF's own.
        artefact = quantize(*args, **kwargs)
    else:
        call, activation = _with_probes(flow_cls, arguments, data, config, pm)
        # NNCF as called, on the items it would read (+ probe items): its own observers
        artefact = quantize(**call) if call is not None else quantize(*args, **kwargs)

    flow = flow_cls(model, artefact, data)
    slots = flow.build_slots()
    calibrator = None
    if needs_data:
        data.items(flow)  # no data at all is an error, not a per-layer fallback
        calibrator = _Calibrator(flow, data)
    result = round_slots(
        slots, config, pm=pm, calibrator=calibrator, framework=f"nncf-{flow.backend}"
    )
    corrected = flow.correct_biases() if bias_correction else []
    result.extra["nncf"] = {
        "backend": flow.backend,
        "changed_layers": sorted(flow.changed),
        "bias_recomputed": corrected,
        "half_range_layers": flow.half_range,
        "skipped": flow.skipped,
        "calibration": data.source,
    }
    result.notes.extend(flow.notes)
    result.extra["activation_defense"] = activation
    if "skipped" in activation:
        result.notes.append(f"activation defense skipped: {activation['skipped']}")
    if flow.skipped:
        warnings.warn(
            f"guard(nncf.quantize): {len(flow.skipped)} weight(s) NNCF quantized keep NNCF's "
            f"nearest integers (not Conv/Linear): {', '.join(flow.skipped)}",
            UserWarning,
            stacklevel=3,
        )
    finish(result, slots, artefact, config, pm)
    return artefact, result


def _smooth_quant(arguments: dict[str, Any]) -> bool:
    """Whether NNCF's pipeline starts with SmoothQuant (as ``create_ptq_pipeline`` decides)."""
    from nncf.parameters import ModelType
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    if arguments.get("model_type") != ModelType.TRANSFORMER:
        return False
    advanced = arguments.get("advanced_parameters") or AdvancedQuantizationParameters()
    alphas = advanced.smooth_quant_alphas
    alpha = advanced.smooth_quant_alpha
    if alpha is not None:
        return alpha >= 0
    return alphas.convolution >= 0 or alphas.matmul >= 0


def _flow_class(model: Any) -> type[_Flow]:
    """The backend NNCF itself picks for ``model`` (``nncf.common.utils.backend``)."""
    module = type(model).__module__
    if module.startswith("onnx"):
        onnx = require("onnx", "nncf")
        if isinstance(model, onnx.ModelProto):
            return _OnnxFlow
    if isinstance(model, torch.fx.GraphModule):
        return _FxFlow
    if isinstance(model, torch.nn.Module):
        return _TorchFlow
    raise UnsupportedObjectError(
        "guard(nncf.quantize) supports the torch (nn.Module), TorchFX (torch.fx.GraphModule "
        f"from torch.export) and ONNX (onnx.ModelProto) backends; got {module}."
        f"{type(model).__qualname__}"
    )


class _Data:
    """The calibration items NNCF used: the first ``subset_size`` items of the user's
    ``nncf.Dataset`` (as NNCF's statistics aggregator takes them), or ``calibration=`` of
    ``guard()`` when the dataset yields nothing on a second pass (a one-shot iterator).
    ``nncf_items`` are the items NNCF read when probe items were appended to them."""

    def __init__(self, dataset: Any, subset_size: int, config: GuardConfig):
        self._dataset = dataset
        self._subset_size = subset_size
        self._config = config
        self._items: list[Any] | None = None
        self.nncf_items: list[Any] | None = None
        self.source = "nncf.Dataset"

    @property
    def batch_size(self) -> int | None:
        """The data source's ``batch_size`` (NNCF turns on batch-wise statistics from it)."""
        return self._dataset.get_batch_size()

    def read(self) -> list[Any]:
        """The items NNCF's statistics aggregator reads (``transform_fn`` applied), read once."""
        if self._items is None:
            length = self._dataset.get_length()
            count = min(length, self._subset_size) if length else self._subset_size
            self._items = list(itertools.islice(self._dataset.get_inference_data(), count))
        return self._items

    def items(self, flow: _Flow) -> list[Any]:
        if not self.read():
            self._items = self._fallback(flow)
        return self._items  # type: ignore[return-value]

    def seen_by_nncf(self, flow: _Flow) -> list[Any]:
        """The items NNCF calibrated (and corrected biases) on: the user's, plus probes."""
        return self.nncf_items if self.nncf_items is not None else self.items(flow)

    def _fallback(self, flow: _Flow) -> list[Any]:
        from qcb_guard.reference import check_calibration

        data = check_calibration(self._config.calibration, "guard(calibration=...)")
        if data is None:
            raise DataError(
                "the nncf.Dataset yields no items on a second pass (a one-shot iterator?) and "
                "guard() got no calibration=: pass calibration=<tensor of model inputs [N, ...]> "
                "or build the nncf.Dataset over a re-iterable source (a list or a DataLoader)"
            )
        self.source = "guard(calibration=...)"
        return [flow.item_from_tensor(data[i : i + 1]) for i in range(len(data))]


class _Calibrator:
    """``calibrator(slot)`` for :func:`round_slots`: the layer's inputs in the float model and
    in the partly deployed artefact, over the calibration items."""

    def __init__(self, flow: _Flow, data: _Data):
        self._flow = flow
        self._data = data
        self._fp: dict[str, list[torch.Tensor]] | None = None

    def __call__(self, slot: WeightSlot) -> SlotCalibration:
        from qcb_guard.slots import SlotCalibration

        items = self._data.items(self._flow)
        if self._fp is None:
            self._fp = self._flow.float_inputs([s.name for s in self._flow.slots], items)
        fp = torch.cat([t.float() for t in self._fp[slot.name]])
        q = torch.cat([t.float() for t in self._flow.quantized_inputs(slot.name, items)])
        return SlotCalibration(inputs=q, fp_inputs=fp)


# --------------------------------------------------------------------------------------
# The activation defense: probe items appended to the items NNCF calibrates on.
# --------------------------------------------------------------------------------------


class _Items(list):
    """The calibration items handed to NNCF: a re-iterable list with a length that keeps the
    user's data source's ``batch_size`` (``nncf.quantize`` turns on batch-wise statistics
    from it)."""

    def __init__(self, items: list[Any], batch_size: int | None):
        super().__init__(items)
        if batch_size is not None:
            self.batch_size = batch_size


def _with_probes(
    flow_cls: type[_Flow],
    arguments: dict[str, Any],
    data: _Data,
    config: GuardConfig,
    pm: PluginManager,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``nncf.quantize``'s arguments with the probe items appended, and the report entry.

    The items NNCF would read are read once (the user's ``transform_fn`` applied), the
    activation defense probes the float model from them, and NNCF gets a dataset of those
    items (as read: no ``transform_fn``) followed by the probe items in the items' own form
    and batch size, with ``subset_size`` raised by the number of probe items so that NNCF
    reads all of them. Returns ``None`` arguments when nothing was read (NNCF then runs on
    the user's dataset and reports the empty dataset itself).
    """
    import nncf

    from qcb_guard.activation import defense_failed, fill_batches, run_activation_defense

    items = data.read()
    if not items:
        return None, skipped(config, "the calibration dataset yields no items")
    call = dict(arguments)  # the items as read: a one-shot iterator cannot be read twice
    call["calibration_dataset"] = nncf.Dataset(_Items(items, data.batch_size))
    form = _ItemForm.of(items)
    if isinstance(form, str):
        return call, skipped(config, form)
    try:
        model = flow_cls.probe_model(arguments["model"])
    except Exception as exc:  # e.g. an ONNX op the ONNX→torch converter lacks
        return call, defense_failed(config, exc)
    probes, entry = run_activation_defense(model, form.stack(items), config, pm)
    if probes is None or len(probes) == 0:
        return call, entry
    extra = [form.item(chunk) for chunk in fill_batches(probes, form.batch).split(form.batch)]
    data.nncf_items = items + extra
    call["calibration_dataset"] = nncf.Dataset(_Items(data.nncf_items, data.batch_size))
    call["subset_size"] = len(data.nncf_items)
    call["advanced_parameters"], estimator = _min_max_activations(
        arguments.get("advanced_parameters")
    )
    entry.update(
        probe_items=len(extra),
        subset_size=len(data.nncf_items),
        range_estimator=estimator,
    )
    return call, entry


@dataclass
class _ItemForm:
    """How the calibration items hold the model input: the item itself, its only element
    (tuple/list) or its only value (dict), a torch tensor or a numpy array ``[B, ...]``."""

    key: Any  # the dict key (dict items)
    container: type | None  # None: the item itself is the input
    batch: int
    dtype: Any
    device: Any  # None for numpy arrays

    @classmethod
    def of(cls, items: list[Any]) -> _ItemForm | str:
        """The form of ``items``, or why they cannot be probed."""
        first = items[0]
        if isinstance(first, dict) and len(first) == 1:
            key, container = next(iter(first)), dict
        elif isinstance(first, (tuple, list)) and len(first) == 1:
            key, container = None, type(first)
        else:
            key, container = None, None
        values = [cls._value(item, key, container) for item in items]
        x = values[0]
        shapes = {(tuple(v.shape[1:]), str(v.dtype)) if _is_array(v) else None for v in values}
        if None in shapes or len(shapes) != 1 or x.ndim < 2 or not _is_float(x):
            return (
                "range probing needs calibration items that are one float tensor [B, ...] (or a "
                "one-element tuple / one-entry dict of it) of one shape; got "
                f"{type(first).__name__} items"
            )
        device = x.device if isinstance(x, torch.Tensor) else None
        return cls(key, container, int(x.shape[0]), x.dtype, device)

    @staticmethod
    def _value(item: Any, key: Any, container: type | None) -> Any:
        if container is None:
            return item
        if type(item) is not container or len(item) != 1:
            return None
        return item.get(key) if container is dict else item[0]

    def stack(self, items: list[Any]) -> torch.Tensor:
        """Every item's input, joined on the batch axis, as float32 torch."""
        values = [self._value(item, self.key, self.container) for item in items]
        return torch.cat([torch.as_tensor(v).to(torch.float32) for v in values])

    def item(self, chunk: torch.Tensor) -> Any:
        """An item of this form holding ``chunk``."""
        if self.device is None:
            value: Any = chunk.numpy().astype(self.dtype)
        else:
            value = chunk.to(device=self.device, dtype=self.dtype)
        if self.container is None:
            return value
        if self.container is dict:
            return {self.key: value}
        return self.container([value])


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or type(value).__module__ == "numpy"


def _is_float(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    return getattr(getattr(value, "dtype", None), "kind", "") == "f"


def _min_max_activations(advanced: Any) -> tuple[Any, str]:
    """Advanced parameters whose activation ranges use NNCF's min/max aggregation wherever
    the user left NNCF's default: NNCF averages per-item minima/maxima (``MEAN_MINMAX``) for
    per-tensor activations, and an average moves by only ``K / (N + K)`` of the way towards
    what ``K`` probe items reach. A choice the user made is kept (and reported)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import AggregatorType

    params = copy.deepcopy(advanced) if advanced is not None else AdvancedQuantizationParameters()
    estimator = params.activations_range_estimator_params
    if estimator.min.aggregator_type is None and estimator.max.aggregator_type is None:
        estimator.min.aggregator_type = AggregatorType.MIN
        estimator.max.aggregator_type = AggregatorType.MAX
        return params, "min/max aggregation (NNCF's default averages per-item min/max)"
    chosen = f"{estimator.min.aggregator_type}/{estimator.max.aggregator_type}"
    return params, f"the caller's ({chosen}; an averaging aggregator dilutes the probes)"


# --------------------------------------------------------------------------------------
# What every backend provides.
# --------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """Backend bookkeeping of one slot."""

    slot: WeightSlot
    nearest: torch.Tensor  # the integers NNCF deployed
    step: Callable[[torch.Tensor], torch.Tensor]  # integers -> float weight the artefact uses
    extra: dict[str, Any] = field(default_factory=dict)


class _Flow:
    """One NNCF backend: build slots from the artefact, write integers, recompute biases."""

    backend = ""

    def __init__(self, model: Any, artefact: Any, data: _Data):
        self.model = model
        self.artefact = artefact
        self.data = data
        self.layers: dict[str, _Layer] = {}
        self.changed: dict[str, torch.Tensor] = {}  # slot name -> deployed integers
        self.half_range: list[str] = []
        self.skipped: list[str] = []
        self.notes: list[str] = []

    @property
    def slots(self) -> list[WeightSlot]:
        return [layer.slot for layer in self.layers.values()]

    # -- to implement -------------------------------------------------------------------
    @staticmethod
    def probe_model(model: Any) -> torch.nn.Module:
        """The float torch module the activation defense probes (never modified)."""
        raise NotImplementedError

    def build_slots(self) -> list[WeightSlot]:
        raise NotImplementedError

    def float_inputs(self, names: list[str], items: list[Any]) -> dict[str, list[torch.Tensor]]:
        """Each named layer's input tensors in the float model, one per item."""
        raise NotImplementedError

    def quantized_inputs(self, name: str, items: list[Any]) -> list[torch.Tensor]:
        """The named layer's input tensors in the (partly deployed) artefact, one per item."""
        raise NotImplementedError

    def item_from_tensor(self, x: torch.Tensor) -> Any:
        return x

    def bias_state(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(deployed bias, float bias, output factor)`` of the bias NNCF's fast bias
        correction updates for this layer, or ``None`` when it has none."""
        raise NotImplementedError

    def set_bias(self, name: str, value: torch.Tensor) -> None:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------
    def add_layer(
        self,
        name: str,
        kind: str,
        weight: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        axis: int | None,
        qmin: int,
        qmax: int,
        bias: torch.Tensor | None,
        attrs: dict[str, Any],
        nearest_fn: Callable[[WeightSlot], torch.Tensor] | None,
        deployed: torch.Tensor,
        write: Callable[[torch.Tensor, torch.Tensor], None],
        step: Callable[[torch.Tensor], torch.Tensor],
        **extra: Any,
    ) -> None:
        """Register one slot after checking that NNCF's own rounding of ``weight`` gives the
        integers found in the artefact (so the float weight, scale and rounding rule are the
        ones NNCF used)."""
        from qcb_guard.slots import WeightSlot

        deployed = deployed.to(torch.int64)
        if (
            qmin == -127
            and qmax == 127
            and zero_point.abs().max() == 0
            and deployed.abs().max() <= _HALF_RANGE
        ):
            qmin, qmax = -_HALF_RANGE, _HALF_RANGE
            self.half_range.append(name)
        slot = WeightSlot(
            name=name,
            kind=kind,
            weight=weight,
            scale=scale,
            zero_point=zero_point,
            axis=axis,
            qmin=qmin,
            qmax=qmax,
            bias=bias,
            attrs=attrs,
            framework=f"nncf-{self.backend}",
            nearest_fn=nearest_fn,
        )
        nearest = slot.nearest()
        if not torch.equal(nearest, deployed):
            bad = int((nearest != deployed).sum())
            raise ModelFileError(
                f"nncf {self.backend}: {bad} of {deployed.numel()} integers of {name!r} differ "
                "from NNCF's rounding of the float weight; the artefact does not come from this "
                "model (or this NNCF version rounds differently)"
            )

        def deploy(q: torch.Tensor, name: str = name) -> None:
            if torch.equal(q, self.layers[name].nearest):
                self.changed.pop(name, None)
                return  # NNCF's own integers: leave the artefact untouched
            write(q, self.layers[name].nearest)
            self.changed[name] = q

        slot.write = deploy
        self.layers[name] = _Layer(slot, nearest, step, dict(extra))

    def correct_biases(self) -> list[str]:
        """Re-apply NNCF's fast bias correction to the layers whose integers changed.

        NNCF sets ``b <- b + mean_c(y_fp) - mean_c(layer_q(x_bar))`` where ``x_bar`` is the
        per-channel mean of the layer's float inputs over the calibration subset, broadcast to
        one item's input shape, and ``layer_q`` runs the layer with its quantized weight on it
        (no input quantizer). With other integers only the last term changes, by
        ``mean_c(layer(x_bar, W_new) - layer(x_bar, W_nearest))``: that is subtracted from the
        bias NNCF deployed. Layers NNCF did not correct (threshold, no bias) are left alone.
        """
        todo = []
        for name in self.changed:
            state = self.bias_state(name)
            if state is None:
                continue
            deployed, float_bias, _factor = state
            if torch.equal(deployed, float_bias):
                continue  # NNCF skipped this layer (or bias correction was off)
            todo.append(name)
        if not todo:
            return []
        items = self.data.seen_by_nncf(self)  # NNCF's blob: the mean over what it read
        means = self._input_means(todo, items)
        for name in todo:
            layer = self.layers[name]
            slot = layer.slot
            mean, shape = means[name]
            channel_axis = 1 if slot.kind.startswith("conv") else len(shape) - 1
            view = [1] * len(shape)
            view[channel_axis] = -1
            blob = mean.reshape(view).expand(shape).contiguous()
            with torch.no_grad():
                w_new = layer.step(self.changed[name])
                w_old = layer.step(layer.nearest)
                diff = slot.layer(blob, w_new) - slot.layer(blob, w_old)
            out_axis = 1 if slot.kind.startswith("conv") else diff.dim() - 1
            dims = [d for d in range(diff.dim()) if d != out_axis]
            deployed, _float_bias, factor = self.bias_state(name)  # type: ignore[misc]
            shift = diff.mean(dim=dims) * factor
            self.set_bias(name, deployed - shift.to(deployed.dtype).reshape(deployed.shape))
        return todo

    def _input_means(
        self, names: list[str], items: list[Any]
    ) -> dict[str, tuple[torch.Tensor, list[int]]]:
        """Per-channel mean of each layer's float input (mean over items of the per-item
        channel means, as NNCF's mean statistic collector) and one item's input shape."""
        inputs = self.float_inputs(names, items)
        out = {}
        for name in names:
            tensors = inputs[name]
            kind = self.layers[name].slot.kind
            means = []
            for t in tensors:
                axis = 1 if kind.startswith("conv") else t.dim() - 1
                dims = [d for d in range(t.dim()) if d != axis]
                means.append(t.float().mean(dim=dims))
            out[name] = (torch.stack(means).mean(dim=0), list(tensors[0].shape))
        return out


def _call(model: Callable[..., Any], item: Any) -> Any:
    """Call a torch model on one dataset item as NNCF's ``PTEngine`` does."""
    with torch.no_grad():
        if isinstance(item, dict):
            return model(**item)
        if isinstance(item, tuple):
            return model(*item)
        return model(item)


#: Plain-tensor items are run this many at a time (NNCF itself runs one item per forward).
_BATCH = 32


def _per_item(
    forward: Callable[[Any], dict[str, torch.Tensor]], items: list[Any], names: list[str]
) -> dict[str, list[torch.Tensor]]:
    """Each named layer's input for each item. ``forward(item)`` runs the model once and
    returns what it recorded. Items that are tensors of one shape are stacked along the batch
    axis (one forward per ``_BATCH`` items) and the records split back per item, unless a
    record does not keep the batch axis; other items run one by one."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    shapes = {
        (tuple(i.shape[1:]), i.dtype) if isinstance(i, torch.Tensor) and i.dim() else None
        for i in items
    }
    if len(shapes) == 1 and None not in shapes:
        for start in range(0, len(items), _BATCH):
            chunk = items[start : start + _BATCH]
            sizes = [len(i) for i in chunk]
            try:
                got = forward(torch.cat(chunk))
            except Exception:  # e.g. a graph exported for a static batch size
                got = {}
            if any(n not in got or len(got[n]) != sum(sizes) for n in names):
                out = {name: [] for name in names}
                break
            for name in names:
                out[name].extend(torch.split(got[name], sizes))
        else:
            return out
    for item in items:
        got = forward(item)
        missing = [n for n in names if n not in got]
        if missing:
            raise ModelFileError(f"nncf: layers {missing} do not run on the calibration items")
        for name in names:
            out[name].append(got[name])
    return out


def _conv_attrs(call: dict[str, Any]) -> dict[str, Any]:
    """``WeightSlot.attrs`` of a convolution from its call arguments."""
    keys = ("stride", "padding", "dilation")
    return {**{k: call[k] for k in keys}, "groups": int(call["groups"])}


# --------------------------------------------------------------------------------------
# torch backend: fake-quantized float weights.
# --------------------------------------------------------------------------------------

_TORCH_OPS = ("conv1d", "conv2d", "conv3d", "linear")  # NNCF node types (traced functions)


class _Capture(torch.nn.Module):
    """An NNCF pre-function hook that records the tensor it sees and returns it unchanged."""

    def __init__(self, sink: list[torch.Tensor]):
        super().__init__()
        self.sink = sink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sink.append(x.detach().clone())
        return x


class _TorchFlow(_Flow):
    """``nncf.quantize(nn.Module)``: NNCF returns a copy of the module whose Conv/Linear weights
    stay float and pass through a ``SymmetricQuantizer``/``AsymmetricQuantizer`` pre-hook on
    every forward. The quantizer computes, in float32,
    ``q = round((clamp(w, lo, lo + r) - lo) * s - zp)`` with ``s = (levels - 1) / r``,
    ``zp = round(-lo * s)``, and outputs ``q / s``. The guard writes ``q / s`` for the chosen
    ``q`` and checks with the quantizer itself that it maps back to ``q``."""

    backend = "torch"

    @staticmethod
    def probe_model(model: Any) -> torch.nn.Module:
        return model  # the caller's float module (activation defenses copy, never modify)

    def build_slots(self) -> list[WeightSlot]:
        from nncf.torch.function_hook import get_hook_storage
        from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph
        from nncf.torch.quantization.layers import BaseQuantizer

        items = self.data.items(self)
        self.graph = build_nncf_graph(self.artefact, items[0])
        storage = get_hook_storage(self.artefact)
        for node in self.graph.topological_sort():
            if node.node_type not in _TORCH_OPS:
                continue
            quantizer = _find_quantizer(storage, node, self.graph, BaseQuantizer)
            if quantizer is not None:
                self._add(node, node.node_type, quantizer)
        self._note_unguarded()
        return self.slots

    def _note_unguarded(self) -> None:
        """Name every other weight NNCF fake-quantizes (a quantizer fed by a constant)."""
        from nncf.torch.graph import operator_metatypes as om
        from nncf.torch.model_graph_manager import find_const_node_in_constant_subgraph

        handled = {layer.extra["op"] for layer in self.layers.values()}
        for qnode in self.graph.get_all_nodes():
            if qnode.node_type not in om.QUANTIZE_NODE_TYPES:
                continue
            edges = self.graph.get_input_edges(qnode)
            source = [e.from_node for e in edges if e.input_port_id == 0]
            if not source or find_const_node_in_constant_subgraph(source[0], self.graph) is None:
                continue  # an activation quantizer
            for user in self.graph.get_next_nodes(qnode):
                if user.node_name not in handled:
                    self._unguarded(user.node_name)

    def _unguarded(self, where: str) -> None:
        self.skipped.append(where)
        self.notes.append(
            f"{where}: a weight NNCF quantized that the guard cannot rewrite (only Conv1d/2d/3d "
            "and Linear weights are); NNCF's nearest integers kept"
        )

    def _add(self, node: Any, kind: str, quantizer: Any) -> None:
        from nncf.torch.model_graph_manager import (
            get_const_node,
            get_module_by_name,
            split_const_name,
        )

        const = get_const_node(node, 1, self.graph)
        module_name, attr = split_const_name(const.layer_attributes.name)
        parameter = getattr(get_module_by_name(module_name, self.artefact), attr)
        weight = parameter.detach().clone()
        expected = {"linear": 2, "conv1d": 3, "conv2d": 4, "conv3d": 5}[kind]
        if weight.dim() != expected or not isinstance(parameter, torch.Tensor):
            return
        grid = _TorchGrid(quantizer, weight)
        attrs = {}
        if kind.startswith("conv"):
            attrs = _conv_attrs(_bind(node.layer_attributes, _CONV_NAMES, _CONV_DEFAULTS))
        float_bias = self._float_const(node, 2)

        def write(q: torch.Tensor, nearest: torch.Tensor) -> None:
            with torch.no_grad():
                new = torch.where(q == nearest, parameter.detach(), grid.value(q))
                if not torch.equal(grid.integers(new), q):
                    raise DefenseError(
                        f"nncf torch: NNCF's quantizer does not map the written weight of "
                        f"{node.node_name!r} back to the chosen integers"
                    )
                parameter.data.copy_(new.to(parameter.dtype))

        name = const.layer_attributes.name
        if name in self.layers:  # one weight used by two ops: name each use by its op
            name = node.node_name
        self.add_layer(
            name=name,
            kind=kind,
            weight=weight,
            scale=grid.step,
            zero_point=grid.zero_point,
            axis=grid.axis,
            qmin=grid.qmin,
            qmax=grid.qmax,
            bias=float_bias,
            attrs=attrs,
            nearest_fn=lambda slot, grid=grid: grid.integers(slot.weight),
            deployed=grid.integers(weight),
            write=write,
            step=grid.value,
            node=node,
            op=node.node_name,
        )

    def _float_const(self, node: Any, port: int) -> torch.Tensor | None:
        """A constant input of ``node`` as it is in the caller's float model."""
        from nncf.torch.model_graph_manager import get_const_data, get_const_node

        try:
            const = get_const_node(node, port, self.graph)
        except Exception:  # NNCF raises when the port is not fed by a constant
            return None
        if const is None:
            return None
        return get_const_data(const, self.model).float().clone()

    def _fp_wrapped(self) -> torch.nn.Module:
        from nncf.torch.function_hook import wrap_model

        if not hasattr(self, "_fp_model"):
            self._fp_model = wrap_model(copy.deepcopy(self.model).eval())
        return self._fp_model

    def _capture(
        self, model: torch.nn.Module, names: list[str], items: list[Any]
    ) -> dict[str, list[torch.Tensor]]:
        from nncf.torch.function_hook import register_pre_function_hook

        sinks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        handles = [
            register_pre_function_hook(model, name, 0, _Capture(sinks[name])) for name in names
        ]

        def forward(item: Any) -> dict[str, torch.Tensor]:
            for sink in sinks.values():
                sink.clear()
            _call(model, item)
            return {name: sink[0] for name, sink in sinks.items() if sink}  # first call

        was_training = model.training
        model.eval()
        try:
            return _per_item(forward, items, names)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)

    def float_inputs(self, names: list[str], items: list[Any]) -> dict[str, list[torch.Tensor]]:
        ops = [self.layers[n].extra["op"] for n in names]
        got = self._capture(self._fp_wrapped(), ops, items)
        return {n: got[op] for n, op in zip(names, ops, strict=True)}

    def quantized_inputs(self, name: str, items: list[Any]) -> list[torch.Tensor]:
        op = self.layers[name].extra["op"]
        return self._capture(self.artefact, [op], items)[op]

    def bias_state(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        from nncf.torch.model_graph_manager import (
            get_const_data_on_port,
            get_fused_bias_value,
            get_potential_fused_node,
        )

        node = self.layers[name].extra["node"]
        deployed = get_fused_bias_value(node, self.graph, self.artefact)
        if deployed is None:
            return None
        float_bias = get_fused_bias_value(node, self.graph, self.model)
        factor = torch.ones(())
        fused = get_potential_fused_node(node.node_name, self.graph)
        if fused is not None:  # conv -> batch_norm: NNCF corrects the BN bias
            call = _bind(fused.layer_attributes, _BN_NAMES, {})
            weight = get_const_data_on_port(self.artefact, self.graph, fused, 1)
            var = get_const_data_on_port(self.artefact, self.graph, fused, 4)
            factor = torch.rsqrt(var.float() + float(call["eps"]))
            if weight is not None:
                factor = factor * weight.float()
        return deployed.detach().clone(), float_bias.detach().clone(), factor

    def set_bias(self, name: str, value: torch.Tensor) -> None:
        from nncf.torch.model_graph_manager import update_fused_bias

        with torch.no_grad():
            update_fused_bias(self.layers[name].extra["op"], value, self.graph, self.artefact)


_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_BN_NAMES = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
    "cudnn_enabled",
)


def _bind(attributes: Any, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """The arguments NNCF traced for one op (``PT2OpLayerAttributes``) by parameter name."""
    call = dict(defaults)
    call.update(zip(names, attributes.op_args, strict=False))
    call.update(attributes.op_kwargs)
    return call


def _find_quantizer(storage: Any, node: Any, graph: Any, base: type) -> Any:
    """The NNCF quantizer of ``node``'s weight: a pre-hook on its weight port, or a post-hook
    on the weight constant."""
    from nncf.torch.model_graph_manager import get_const_node

    candidates = [(storage.pre_hooks, storage._generate_key(node.node_name, 1))]
    try:
        const = get_const_node(node, 1, graph)
    except Exception:  # the weight is not a constant: not a weight NNCF quantized
        return None
    if const is None:
        return None
    candidates.append((storage.post_hooks, storage._generate_key(const.node_name, 0)))
    for hooks, key in candidates:
        if key in hooks:
            found = [h for h in hooks[key].values() if isinstance(h, base)]
            if len(found) == 1:
                return found[0]
    return None


class _TorchGrid:
    """NNCF's fake-quantization grid of one quantizer, with NNCF's module as the oracle."""

    def __init__(self, quantizer: Any, weight: torch.Tensor):
        from nncf.torch.quantization.layers import AsymmetricQuantizer, SymmetricQuantizer
        from nncf.torch.quantization.quantize_functions import TuneRange

        self.quantizer = quantizer
        levels = int(quantizer.levels)
        with torch.no_grad():
            if isinstance(quantizer, SymmetricQuantizer):
                scale = quantizer.scale.detach().abs() + quantizer.eps
                low = scale * (quantizer.level_low / quantizer.level_high)
                span = scale - low
            elif isinstance(quantizer, AsymmetricQuantizer):
                span_safe = quantizer.input_range.detach().abs() + quantizer.eps
                low, span = TuneRange.apply(quantizer.input_low.detach(), span_safe, levels)
            else:  # pragma: no cover - NNCF has no other weight quantizers for PTQ
                raise UnsupportedObjectError(f"unsupported NNCF quantizer {type(quantizer)}")
            self.inv_step = (levels - 1) / span  # NNCF's ``s``
            zp = torch.round(-low * self.inv_step)
        shape = tuple(self.inv_step.shape)
        channels = [d for d, n in enumerate(shape) if n > 1]
        if len(channels) > 1 or len(shape) not in (1, weight.dim()):
            raise UnsupportedObjectError(f"unsupported NNCF quantizer scale shape {shape}")
        self.axis = channels[0] if channels else None
        step = (span / (levels - 1)).reshape(-1)
        if isinstance(quantizer, SymmetricQuantizer):
            # integers are NNCF's ``q`` itself: [level_low, level_high], zero point 0
            self.offset = torch.zeros_like(zp)
            self.qmin, self.qmax = int(quantizer.level_low), int(quantizer.level_high)
        else:
            # NNCF's ``q`` is shifted by zp: store u = q + zp in [0, levels - 1]
            self.offset = zp
            self.qmin, self.qmax = 0, levels - 1
        self.step = step if self.axis is not None else step[:1]
        zero = self.offset.reshape(-1)
        self.zero_point = zero if self.axis is not None else zero[:1]

    def integers(self, w: torch.Tensor) -> torch.Tensor:
        """The integers NNCF's quantizer deploys for float weight ``w`` (NNCF computes them)."""
        with torch.no_grad():
            fake = self.quantizer(w.detach().float())
            return (torch.round(fake * self.inv_step) + self.offset).to(torch.int64)

    def value(self, q: torch.Tensor) -> torch.Tensor:
        """The float NNCF's quantizer outputs for integers ``q`` (its own ``q / s``)."""
        return (q.to(torch.float32) - self.offset) / self.inv_step


# --------------------------------------------------------------------------------------
# TorchFX backend: int8 constants feeding a multiply/subtract decompression.
# --------------------------------------------------------------------------------------


class _FxFlow(_Flow):
    """``nncf.quantize(torch.fx.GraphModule)``: NNCF fuses Conv+BN, inserts
    quantize/dequantize ops, then compresses each weight to an int8 constant
    (``compressed_weight_updated_constantN``) decompressed as ``w_int8 * scale - zero_point``.
    NNCF rounds with ``quantized_decomposed.quantize_per_channel`` (``round(w * (1 / s))``);
    the guard replaces the int8 constant."""

    backend = "torchfx"

    @staticmethod
    def probe_model(model: Any) -> torch.nn.Module:
        # the exported graph without torch.export's input-shape guard (probes come in batches)
        graph = torch.fx.Graph()
        graph.set_codegen(model.graph._codegen)
        graph.output(graph.graph_copy(model.graph, {}))
        _drop_export_guards(graph)
        return torch.fx.GraphModule(model, graph)

    def build_slots(self) -> list[WeightSlot]:
        from nncf.experimental.torch.fx.transformations import apply_quantization_transformations

        # The float weights NNCF quantized: NNCF's own Conv+BN fusion on a copy of the input.
        self.float_model = copy.deepcopy(self.model)
        apply_quantization_transformations(self.float_model)
        float_nodes = {n.name: n for n in self.float_model.graph.nodes}
        targets = _fx_targets()
        for node in self.artefact.graph.nodes:
            kind = targets.get(node.target) if node.op == "call_function" else None
            if kind is None:
                continue
            pattern = _fx_weight_pattern(node.args[1])
            if pattern is None:
                if _fx_is_quantized(node.args[1]):
                    self.skipped.append(node.name)
                    self.notes.append(
                        f"{node.name}: weight quantized in a form the guard does not rewrite "
                        "(compress_weights=False?); NNCF's nearest integers kept"
                    )
                continue
            fnode = float_nodes.get(node.name)
            if fnode is None or fnode.target != node.target:
                raise ModelFileError(
                    f"nncf torchfx: layer {node.name!r} of the quantized graph has no "
                    "counterpart in the float graph"
                )
            self._add(node, fnode, kind, pattern)
        handled = {layer.extra["node"] for layer in self.layers.values()}
        for node in self.artefact.graph.nodes:  # other weights NNCF compressed
            if _fx_weight_pattern(node) is not None:
                for user in node.users:
                    if user not in handled and user.name not in self.skipped:
                        self.skipped.append(user.name)
                        self.notes.append(
                            f"{user.name}: a weight NNCF quantized that the guard cannot "
                            "rewrite (only Conv1d/2d/3d and Linear weights are); NNCF's nearest "
                            "integers kept"
                        )
        return self.slots

    def _add(self, node: Any, fnode: Any, kind: str, pattern: dict[str, Any]) -> None:
        qd = torch.ops.quantized_decomposed
        weight = _fx_value(self.float_model, fnode.args[1]).detach().float().clone()
        int_name = pattern["int"].target
        stored = getattr(self.artefact, int_name)
        scale = _fx_value(self.artefact, pattern["scale"])
        zero = _fx_value(self.artefact, pattern["zero_point"])
        scale_t = torch.as_tensor(scale, dtype=torch.float32)
        zero_t = torch.as_tensor(zero).to(torch.int64)
        if zero_t.abs().max() != 0:
            raise UnsupportedObjectError(
                f"nncf torchfx: {node.name!r} has non-zero weight zero points; NNCF's "
                "w * scale - zero_point decompression is only exact for symmetric weights"
            )
        channels = [d for d, n in enumerate(scale_t.shape) if n > 1]
        axis = channels[0] if channels else None
        flat_scale = scale_t.reshape(-1)
        flat_zero = zero_t.reshape(-1)
        if axis is None:
            flat_scale, flat_zero = flat_scale[:1], flat_zero[:1]

        def nearest_fn(slot: WeightSlot) -> torch.Tensor:
            # NNCF's compress_post_quantize_transformation, verbatim
            if axis is None:
                out = qd.quantize_per_tensor.default(
                    slot.weight, float(flat_scale), int(flat_zero), -128, 127, torch.int8
                )
            else:
                out = qd.quantize_per_channel.default(
                    slot.weight, flat_scale, flat_zero.to(torch.int8), axis, -128, 127, torch.int8
                )
            return out.to(torch.int64)

        attrs = {}
        if kind.startswith("conv"):
            call = dict(_CONV_DEFAULTS)
            call.update(zip(_CONV_NAMES, node.args, strict=False))
            call.update(node.kwargs)
            attrs = _conv_attrs(call)
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        fbias_arg = fnode.args[2] if len(fnode.args) > 2 else fnode.kwargs.get("bias")
        float_bias = None if fbias_arg is None else _fx_value(self.float_model, fbias_arg)

        def write(q: torch.Tensor, nearest: torch.Tensor) -> None:
            new = q.to(torch.int8).reshape(stored.shape)
            _fx_set(self.artefact, int_name, new)
            if not torch.equal(getattr(self.artefact, int_name).to(torch.int64), q):
                raise DefenseError(f"nncf torchfx: failed to write {int_name!r}")

        def step(q: torch.Tensor) -> torch.Tensor:  # the artefact's own decompression
            return q.to(torch.int8).to(torch.float32) * scale_t - zero_t.to(torch.int8)

        self.add_layer(
            name=node.name,
            kind=kind,
            weight=weight,
            scale=flat_scale,
            zero_point=flat_zero,
            axis=axis,
            # NNCF's symmetric int8 weights: 255 levels (narrow range); int8 storage otherwise
            qmin=-127 if int(stored.min()) > -128 else -128,
            qmax=127,
            bias=None if float_bias is None else torch.as_tensor(float_bias).float().clone(),
            attrs=attrs,
            nearest_fn=nearest_fn,
            deployed=stored.to(torch.int64),
            write=write,
            step=step,
            node=node,
            fnode=fnode,
            bias_arg=bias_arg,
        )

    def float_inputs(self, names: list[str], items: list[Any]) -> dict[str, list[torch.Tensor]]:
        return _fx_capture(self.float_model, names, items)

    def quantized_inputs(self, name: str, items: list[Any]) -> list[torch.Tensor]:
        return _fx_capture(self.artefact, [name], items)[name]

    def bias_state(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        layer = self.layers[name]
        arg = layer.extra["bias_arg"]
        if arg is None or getattr(arg, "op", None) != "get_attr":
            return None
        deployed = torch.as_tensor(_fx_value(self.artefact, arg)).detach().float().clone()
        return deployed, layer.slot.bias, torch.ones(())

    def set_bias(self, name: str, value: torch.Tensor) -> None:
        arg = self.layers[name].extra["bias_arg"]
        old = _fx_value(self.artefact, arg)
        _fx_set(self.artefact, arg.target, value.to(old.dtype).reshape(old.shape))


def _fx_targets() -> dict[Any, str]:
    aten = torch.ops.aten
    return {
        aten.conv1d.default: "conv1d",
        aten.conv2d.default: "conv2d",
        aten.conv3d.default: "conv3d",
        aten.linear.default: "linear",
    }


def _fx_weight_pattern(arg: Any) -> dict[str, Any] | None:
    """``sub(mul(int8 constant, scale), zero_point)``, NNCF's compressed weight."""
    aten = torch.ops.aten
    if getattr(arg, "op", None) != "call_function" or arg.target != aten.sub.Tensor:
        return None
    mul, zero_point = arg.args[0], arg.args[1]
    if getattr(mul, "op", None) != "call_function" or mul.target != aten.mul.Tensor:
        return None
    const, scale = mul.args[0], mul.args[1]
    if getattr(const, "op", None) != "get_attr":
        return None
    return {"int": const, "scale": scale, "zero_point": zero_point}


def _fx_is_quantized(arg: Any) -> bool:
    target = getattr(arg, "target", None)
    return getattr(target, "namespace", None) == "quantized_decomposed"


def _fx_value(gm: torch.fx.GraphModule, arg: Any) -> Any:
    if getattr(arg, "op", None) == "get_attr":
        value: Any = gm
        for part in arg.target.split("."):
            value = getattr(value, part)
        return value
    return arg


def _fx_set(gm: torch.fx.GraphModule, target: str, value: torch.Tensor) -> None:
    *path, attr = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part)
    if attr in owner._buffers:
        owner._buffers[attr] = value
    elif attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        setattr(owner, attr, value)


def _drop_export_guards(graph: torch.fx.Graph) -> None:
    """Remove ``torch.export``'s input-shape guard (``_guards_fn``) from a graph copy."""
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)


def _fx_capture(
    gm: torch.fx.GraphModule, names: list[str], items: list[Any]
) -> dict[str, list[torch.Tensor]]:
    """Each named node's first input per item, from a copy of ``gm``'s graph that returns
    those inputs (dead code removed; ``torch.export``'s input-shape guard dropped so that
    items can be stacked; its flat-input convention kept through ``process_inputs``)."""
    graph = torch.fx.Graph()
    remap: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.graph_copy(gm.graph, remap)
    by_name = {node.name: node for node in gm.graph.nodes}
    graph.output(tuple(remap[by_name[name]].args[0] for name in names))
    _drop_export_guards(graph)
    graph.eliminate_dead_code()
    probe = torch.fx.GraphModule(gm, graph)
    codegen = gm.graph._codegen

    def forward(item: Any) -> dict[str, torch.Tensor]:
        if isinstance(item, dict):
            flat = codegen.process_inputs(**item)
        elif isinstance(item, tuple):
            flat = codegen.process_inputs(*item)
        else:
            flat = codegen.process_inputs(item)
        with torch.no_grad():
            got = probe(*flat)
        return {name: t.detach().clone() for name, t in zip(names, got, strict=True)}

    return _per_item(forward, items, names)


# --------------------------------------------------------------------------------------
# ONNX backend: int8 initializers feeding DequantizeLinear.
# --------------------------------------------------------------------------------------


class _OnnxFlow(_Flow):
    """``nncf.quantize(onnx.ModelProto)``: NNCF inserts QuantizeLinear/DequantizeLinear and then
    folds each weight's QuantizeLinear into an int8 initializer ``q_output_<w>_1`` (rounded by
    ONNX's reference ``QuantizeLinear``: ``rint(w / s) + zp`` in float32). The guard replaces
    that initializer; scales and zero points are left as NNCF wrote them."""

    backend = "onnx"

    @staticmethod
    def probe_model(model: Any) -> torch.nn.Module:
        from qcb_guard.onnx_torch import onnx_to_torch

        return onnx_to_torch(model)  # input gradients need torch (hookspec: converted)

    def build_slots(self) -> list[WeightSlot]:
        from onnx import numpy_helper

        self._np = numpy_helper
        graph = self.artefact.graph
        self.inits = {t.name: t for t in graph.initializer}
        producers = {out: n for n in graph.node for out in n.output}
        float_inits = {t.name: t for t in self.model.graph.initializer}
        float_nodes = {n.output[0]: n for n in self.model.graph.node if n.output}
        for node in graph.node:
            kind = self._kind(node)
            if kind is None:
                continue
            dq = producers.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue  # weight not quantized (ignored scope)
            stored = self.inits.get(dq.input[0])
            if stored is None:
                self.skipped.append(node.name)
                self.notes.append(
                    f"{node.name}: weight quantized in a form the guard does not rewrite "
                    "(compress_weights=False?); NNCF's nearest integers kept"
                )
                continue
            fnode = float_nodes.get(node.output[0])
            if fnode is None or fnode.op_type != node.op_type or fnode.input[1] not in float_inits:
                raise ModelFileError(
                    f"nncf onnx: layer {node.name!r} has no float weight in the input model"
                )
            self._add(node, fnode, kind, dq, stored, float_inits)
        handled = {layer.extra["node"].name for layer in self.layers.values()}
        weights = {
            n.output[0]
            for n in graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in self.inits
        }
        for node in graph.node:  # other weights NNCF quantized
            if node.name not in handled and node.name not in self.skipped:
                if any(i in weights for i in node.input):
                    self.skipped.append(node.name)
                    self.notes.append(
                        f"{node.name}: a weight NNCF quantized that the guard cannot rewrite "
                        "(only Conv and Gemm(transB=1) weights are); NNCF's nearest integers kept"
                    )
        return self.slots

    @staticmethod
    def _kind(node: Any) -> str | None:
        from onnx import helper

        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            return "conv"  # rank decided from the weight
        if node.op_type == "Gemm" and attrs.get("transB", 0) == 1 and not attrs.get("transA", 0):
            if attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0:
                return "linear"
        return None

    def _add(
        self, node: Any, fnode: Any, kind: str, dq: Any, stored: Any, float_inits: dict
    ) -> None:
        from onnx import helper

        np_ = self._np
        weight = torch.from_numpy(np_.to_array(float_inits[fnode.input[1]]).copy()).float()
        ints = np_.to_array(stored)
        scale = torch.from_numpy(np_.to_array(self.inits[dq.input[1]]).copy()).float()
        zero_init = self.inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if zero_init is None:  # DequantizeLinear's default zero point
            zero_t = torch.zeros(scale.numel(), dtype=torch.int64)
        else:
            zero_t = torch.from_numpy(np_.to_array(zero_init).astype("int64").reshape(-1).copy())
        info = torch.iinfo(torch.int8 if ints.dtype.kind == "i" else torch.uint8)
        attrs_dq = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        axis = None
        if scale.numel() > 1 or scale.dim() == 1:
            axis = int(attrs_dq.get("axis", 1)) % weight.dim()
        scale = scale.reshape(-1)
        if kind == "conv":
            if weight.dim() not in (3, 4, 5):
                self.skipped.append(node.name)
                return
            kind = f"conv{weight.dim() - 2}d"
            attrs = self._conv_attrs(node, weight)
            if attrs is None:
                self.skipped.append(node.name)
                self.notes.append(f"{node.name}: asymmetric/auto padding not supported; kept")
                return
        else:
            attrs = {}
        qmin, qmax = info.min, info.max
        if ints.dtype.kind == "i" and zero_t.abs().max() == 0 and ints.min() > info.min:
            qmin = -127  # NNCF's symmetric int8 weights: 255 levels (narrow range)
        bias = None
        if len(fnode.input) > 2 and fnode.input[2] in float_inits:
            bias = torch.from_numpy(np_.to_array(float_inits[fnode.input[2]]).copy()).float()
        int_name = dq.input[0]
        dtype = ints.dtype

        def write(q: torch.Tensor, nearest: torch.Tensor) -> None:
            array = q.numpy().astype(dtype).reshape(ints.shape)
            self.inits[int_name].CopyFrom(np_.from_array(array, int_name))
            if not (np_.to_array(self.inits[int_name]).astype("int64") == q.numpy()).all():
                raise DefenseError(f"nncf onnx: failed to write {int_name!r}")

        def step(q: torch.Tensor) -> torch.Tensor:  # DequantizeLinear: (q - zp) * s
            from qcb_guard.quant.ops import broadcast

            s = broadcast(scale, q, axis)
            zp = broadcast(zero_t.float(), q, axis)
            return (q.to(torch.float32) - zp) * s

        name = fnode.input[1]
        if name in self.layers:  # one initializer used by two layers: name each use
            name = f"{name}@{node.name}"
        self.add_layer(
            name=name,
            kind=kind,
            weight=weight,
            scale=scale,
            zero_point=zero_t,
            axis=axis,
            qmin=qmin,
            qmax=qmax,
            bias=bias,
            attrs=attrs,
            nearest_fn=None,  # ONNX's rint(w / s) + zp in float32 is the core's rounding
            deployed=torch.from_numpy(ints.astype("int64")),
            write=write,
            step=step,
            node=node,
            fnode=fnode,
            initializer=int_name,
        )

    @staticmethod
    def _conv_attrs(node: Any, weight: torch.Tensor) -> dict[str, Any] | None:
        from onnx import helper

        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rank = weight.dim() - 2
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            return None
        pads = list(attrs.get("pads", [0] * (2 * rank)))
        if pads[:rank] != pads[rank:]:
            return None
        return {
            "stride": tuple(attrs.get("strides", [1] * rank)),
            "padding": tuple(pads[:rank]),
            "dilation": tuple(attrs.get("dilations", [1] * rank)),
            "groups": int(attrs.get("group", 1)),
        }

    def item_from_tensor(self, x: torch.Tensor) -> Any:
        inits = {t.name for t in self.model.graph.initializer}
        inputs = [i.name for i in self.model.graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise DataError(
                f"guard(calibration=...) feeds one input; the ONNX model has {len(inputs)}"
            )
        return {inputs[0]: x.numpy()}

    def _run(self, model: Any, names: list[str], items: list[Any]) -> list[list[Any]]:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        extended = copy.deepcopy(model)
        outputs = {o.name for o in extended.graph.output}
        graph_inputs = {i.name for i in extended.graph.input}
        for name in names:
            if name not in outputs and name not in graph_inputs:
                extended.graph.output.append(
                    helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                )
        session = ort.InferenceSession(
            extended.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        fetch = [n for n in names if n not in graph_inputs]
        results = []
        for item in items:
            got = dict(zip(fetch, session.run(fetch, item), strict=True)) if fetch else {}
            results.append([got[n] if n in got else item[n] for n in names])
        return results

    def float_inputs(self, names: list[str], items: list[Any]) -> dict[str, list[torch.Tensor]]:
        tensors = [self.layers[n].extra["fnode"].input[0] for n in names]
        runs = self._run(self.model, tensors, items)
        return {n: [torch.from_numpy(r[i].copy()) for r in runs] for i, n in enumerate(names)}

    def quantized_inputs(self, name: str, items: list[Any]) -> list[torch.Tensor]:
        tensor = self.layers[name].extra["node"].input[0]
        return [torch.from_numpy(r[0].copy()) for r in self._run(self.artefact, [tensor], items)]

    def bias_state(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        layer = self.layers[name]
        node = layer.extra["node"]
        if len(node.input) < 3 or node.input[2] not in self.inits or layer.slot.bias is None:
            return None
        deployed = torch.from_numpy(self._np.to_array(self.inits[node.input[2]]).copy())
        return deployed.float(), layer.slot.bias, torch.ones(())

    def set_bias(self, name: str, value: torch.Tensor) -> None:
        node = self.layers[name].extra["node"]
        init = self.inits[node.input[2]]
        old = self._np.to_array(init)
        new = value.detach().numpy().astype(old.dtype).reshape(old.shape)
        init.CopyFrom(self._np.from_array(new, init.name))
