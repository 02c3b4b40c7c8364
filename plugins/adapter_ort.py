"""Adapter ``ort``: ONNX Runtime's post-training quantization with guarded weight rounding.

``guard(onnxruntime.quantization.quantize_static)`` (also ``quantize_dynamic`` and the generic
``quantize`` with a Static/DynamicQuantConfig) returns a function with the same signature and
behaviour. It runs ORT unchanged into a private temporary file, reads the scales and zero
points ORT wrote, replaces each Conv/Gemm/MatMul weight's integers (``<w>_quantized``) by the
defense's, and moves the file to ``model_output`` atomically. ORT exposes no rounding hook:
post-processing the written initializers is the only point where ORT's own qparams (including
its int32-bias rescaling) are final. See ``docs/adapters/onnxruntime.md``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcb_guard import hookimpl
from qcb_guard._compat import require
from qcb_guard.activation import TURNED_OFF, skipped
from qcb_guard.errors import ConfigError, ModelFileError, UnsupportedObjectError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    from qcb_guard_plugins._onnx_util import LayerCapture, LayerView

    from qcb_guard.config import GuardConfig
    from qcb_guard.guarding import GuardResult
    from qcb_guard.manager import PluginManager
    from qcb_guard.slots import SlotCalibration, WeightSlot

FRAMEWORK = "onnxruntime"
_ENTRY_MODULE = "onnxruntime.quantization.quantize"
ENTRIES = ("quantize_static", "quantize_dynamic", "quantize")
_MARK = "__qcb_guard_ort__"
#: Ops whose quantized constant is a weight (warned about when the adapter cannot guard it).
_WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Attention", "LSTM"}


# --------------------------------------------------------------------------------------
# The adapter object.
# --------------------------------------------------------------------------------------


class OrtAdapter:
    """Recognises ONNX Runtime objects and wraps its quantization entry points."""

    requires = "onnx"

    def matches(self, obj: Any) -> bool:
        """True for any object from the ``onnxruntime`` package (checked by module name only,
        so that onnxruntime is never imported here)."""
        module = getattr(obj, "__module__", None)
        if not isinstance(module, str):
            module = type(obj).__module__
        return module == "onnxruntime" or module.startswith("onnxruntime.")

    def wrap(self, obj: Any, config: GuardConfig, pm: PluginManager) -> Any:
        """The guarded counterpart of ``quantize_static``/``quantize_dynamic``/``quantize``."""
        require("onnx", "onnx")
        quantize_module = require(_ENTRY_MODULE, "onnx")
        if getattr(obj, _MARK, None) is not None:
            raise ConfigError(f"{obj.__qualname__} is already guarded; guard the original once")
        name = getattr(obj, "__qualname__", None)
        if name not in ENTRIES or getattr(quantize_module, name, None) is not obj:
            what = getattr(obj, "__qualname__", type(obj).__qualname__)
            raise UnsupportedObjectError(
                f"guard() supports onnxruntime.quantization.{', '.join(ENTRIES)}; got "
                f"{getattr(obj, '__module__', type(obj).__module__)}.{what}"
            )
        return _guard_entry(obj, name, config, pm)


_ADAPTER = OrtAdapter()


@hookimpl
def qcb_guard_register_adapters(register):
    register(
        "ort",
        _ADAPTER,
        description="onnxruntime.quantization.quantize_static / quantize_dynamic / quantize",
    )


def _guard_entry(fn: Any, entry: str, config: GuardConfig, pm: PluginManager) -> Any:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        returned, result = _run(fn, entry, dict(bound.arguments), config, pm)
        guarded.last_result = result  # type: ignore[attr-defined]
        return returned

    guarded.last_result = None  # type: ignore[attr-defined]  # GuardResult of the last call
    setattr(guarded, _MARK, config)
    return guarded


# --------------------------------------------------------------------------------------
# What the call asks ORT to do.
# --------------------------------------------------------------------------------------


@dataclass
class _Call:
    entry: str
    quant_format: str  # "QDQ", "QOperator" or "IntegerOps" (dynamic)
    per_channel: bool
    reduce_range: bool
    weight_type: Any
    activation_type: Any
    extra_options: dict
    external_data: bool
    reader: Any


def _describe(entry: str, a: dict[str, Any]) -> _Call:
    from onnxruntime.quantization import DynamicQuantConfig, QuantType, StaticQuantConfig

    if entry == "quantize":
        cfg = a["quant_config"]
        if isinstance(cfg, StaticQuantConfig):
            entry, src = "quantize_static", vars(cfg)
        elif isinstance(cfg, DynamicQuantConfig):
            entry, src = "quantize_dynamic", vars(cfg)
        else:
            raise ConfigError(
                f"guard(quantize) supports StaticQuantConfig and DynamicQuantConfig, not "
                f"{type(cfg).__name__} (weight-only block quantization has no per-weight "
                "scale/zero-point grid to guard)"
            )
    else:
        src = a
    static = entry == "quantize_static"
    fmt = src.get("quant_format") if static else None
    return _Call(
        entry=entry,
        quant_format=getattr(fmt, "name", str(fmt)) if static else "IntegerOps",
        per_channel=bool(src.get("per_channel", False)),
        reduce_range=bool(src.get("reduce_range", False)),
        weight_type=src.get("weight_type", QuantType.QInt8),
        activation_type=src.get("activation_type", QuantType.QUInt8),
        extra_options=dict(src.get("extra_options") or {}),
        external_data=bool(src.get("use_external_data_format", False)),
        reader=src.get("calibration_data_reader") if static else None,
    )


def _check_supported(call: _Call) -> None:
    """Refuse, before ORT runs, the options whose weights the adapter cannot guard."""
    opts = call.extra_options
    for what, qtype in (
        ("weight_type", call.weight_type),
        ("activation_type", call.activation_type),
    ):
        if "FLOAT8" in getattr(qtype, "name", str(qtype)).upper():
            raise ConfigError(f"{what}={qtype}: float 8 has no integer grid to guard")
    if opts.get("SmoothQuant"):
        raise ConfigError(
            "extra_options SmoothQuant=True rescales the weights before ORT quantizes them, so "
            "the float weights are no longer the model's; run SmoothQuant first, then guard"
        )
    if opts.get("BlockSize"):
        raise ConfigError("extra_options BlockSize (block-wise quantization) is not supported")
    if opts.get("EnableSubgraph"):
        raise ConfigError(
            "extra_options EnableSubgraph=True: weights inside subgraphs are not guarded"
        )


def _list_reader(feeds: list[dict]) -> Any:
    """A CalibrationDataReader over recorded feeds (also serves ORT's strided calibration)."""
    from onnxruntime.quantization import CalibrationDataReader

    class ListReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self._it, None)

        def __len__(self) -> int:
            return len(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(feeds[start_index:end_index])

        def rewind(self) -> None:
            self._it = iter(feeds)

    return ListReader()


def _with_probes(
    reader: Any, fp_model: Any, config: GuardConfig, pm: PluginManager
) -> tuple[list[dict], Any, dict[str, Any]]:
    """Drain the user's reader, run the activation defense on the float model (converted to
    torch), and return the user's feeds, a reader over feeds + probe feeds, and the report
    entry. The probes only reach ORT's calibrators, never the rounding defense."""
    import numpy as np
    import torch
    from qcb_guard_plugins import _onnx_util as ou

    from qcb_guard.activation import defense_failed, fill_batches, run_activation_defense
    from qcb_guard.onnx_torch import onnx_to_torch

    feeds = ou.feeds_from(reader, fp_model)
    names = {name for feed in feeds for name in feed}
    if len(names) != 1:
        why = f"the model has {len(names)} inputs; range probing needs one image input"
        return feeds, _list_reader(feeds), skipped(config, why)
    (name,) = names
    x = torch.from_numpy(np.concatenate([f[name] for f in feeds]).astype(np.float32))
    try:
        model = onnx_to_torch(fp_model)  # input gradients need torch (hookspec: converted)
    except Exception as exc:  # e.g. an op the converter lacks: this model cannot be probed
        return feeds, _list_reader(feeds), defense_failed(config, exc)
    probes, entry = run_activation_defense(model, x, config, pm)
    if probes is None or len(probes) == 0:
        return feeds, _list_reader(feeds), entry
    fixed = ou.fixed_batch(ou.graph_inputs(fp_model)[0])
    probes = fill_batches(probes, fixed)
    dtype = feeds[0][name].dtype
    extra = [{name: chunk.numpy().astype(dtype)} for chunk in probes.split(fixed or 64)]
    return feeds, _list_reader(feeds + extra), entry


def _tee(reader: Any) -> Any:
    """Wrap the user's CalibrationDataReader so every feed ORT consumes is recorded."""
    from onnxruntime.quantization import CalibrationDataReader

    class TeeReader(CalibrationDataReader):
        """Delegates to the user's reader and keeps a copy of each feed it hands out."""

        def __init__(self, inner: Any):
            self.inner = inner
            self.feeds: list[dict] = []

        def get_next(self) -> dict | None:
            import numpy as np

            feed = self.inner.get_next()
            if feed:
                self.feeds.append({k: np.array(v, copy=True) for k, v in feed.items()})
            return feed

        def __len__(self) -> int:
            return len(self.inner)

        def set_range(self, start_index: int, end_index: int) -> None:
            return self.inner.set_range(start_index=start_index, end_index=end_index)

        def __getattr__(self, name: str) -> Any:
            if name == "inner":
                raise AttributeError(name)
            return getattr(self.inner, name)

    return TeeReader(reader)


# --------------------------------------------------------------------------------------
# ORT's arithmetic, reproduced with ORT's own functions.
# --------------------------------------------------------------------------------------


def _ort_round(w: np.ndarray, qtype: int, scale: np.ndarray, zp: np.ndarray, axis: int | None):
    """ORT's nearest integers for ``w`` (``quant_utils.quantize_nparray``, per channel as ORT
    loops), as int64."""
    import numpy as np
    from onnxruntime.quantization.quant_utils import quantize_nparray

    if axis is None:
        q = quantize_nparray(qtype, w.ravel(), scale.reshape(()), zp.reshape(()))
        return np.asarray(q).astype(np.int64).reshape(w.shape)
    dims = list(w.shape)
    dims[axis] = 1
    parts = [
        np.asarray(
            quantize_nparray(qtype, w.take(i, axis).ravel(), scale.ravel()[i], zp.ravel()[i])
        ).reshape(dims)
        for i in range(w.shape[axis])
    ]
    return np.concatenate(parts, axis).astype(np.int64)


def _ort_range(
    w: np.ndarray,
    qtype: int,
    scale: np.ndarray,
    zp: np.ndarray,
    axis: int | None,
    *,
    call: _Call,
    overrides: list[dict],
) -> tuple[int, int, str | None]:
    """The integer range ORT computed this weight's qparams for.

    ORT's range depends on symmetry and ``reduce_range`` (symmetric int8 is [-127, 127],
    reduced int8 [-64, 64]), decided per weight by rules that differ between formats. Rather
    than re-implement the rules, recompute the qparams with ORT's own function for each
    candidate and keep the one that reproduces what ORT wrote, bit for bit.
    """
    import numpy as np
    from onnxruntime.quantization.quant_utils import (
        compute_data_quant_params,
        get_qmin_qmax_for_qType,
    )

    full = tuple(int(v) for v in get_qmin_qmax_for_qType(qtype))
    if overrides and "scale" in overrides[0]:
        return (*full, None)  # explicit scale: ORT clips to the type's range only
    channels = [None] if axis is None else list(range(w.shape[axis]))
    found = []
    for symmetric in (True, False):
        for reduce_range in (False, True):
            try:
                qmin, qmax = (
                    int(v) for v in get_qmin_qmax_for_qType(qtype, reduce_range, symmetric)
                )
            except ValueError:
                continue
            zps, scales = [], []
            for i in channels:
                data = w.ravel() if i is None else w.take(i, axis).ravel()
                ov = (
                    overrides[i]
                    if i is not None and len(overrides) == len(channels)
                    else (overrides[0] if overrides else {})
                )
                z, s = compute_data_quant_params(
                    data,
                    qtype,
                    symmetric,
                    reduce_range,
                    call.extra_options.get("MinimumRealRange"),
                    ov.get("rmin"),
                    ov.get("rmax"),
                )
                zps.append(np.asarray(z).astype(np.int64))
                scales.append(np.asarray(s, dtype=scale.dtype))
            if np.array_equal(np.ravel(scales), scale.ravel()) and np.array_equal(
                np.ravel(zps), zp.astype(np.int64).ravel()
            ):
                found.append((qmin, qmax))
    if found:  # several only for degenerate weights (e.g. all zeros): take the narrowest
        return max(f[0] for f in found), min(f[1] for f in found), None
    # ORT raised the scale to keep the int32 bias representable (symmetric weights only), or
    # an override changed it: keep the range ORT would use for such a weight.
    signed = full[0] < 0
    symmetric = signed and not zp.astype(np.int64).any()
    qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(qtype, call.reduce_range, symmetric))
    return qmin, qmax, "scale differs from ORT's min/max scale (int32-bias rescaling or override)"


# --------------------------------------------------------------------------------------
# From the written model to slots.
# --------------------------------------------------------------------------------------


@dataclass
class _Located:
    tensor: Any  # onnx.TensorProto holding the integers (or the float weight)
    stored_as_float: bool  # AddQDQPairToWeight: float weight -> QuantizeLinear at run time
    scale: np.ndarray
    zero_point: np.ndarray
    qtype: int
    axis: int | None  # per-channel axis in the ONNX weight layout


def _rule_axis(view: LayerView, rank: int) -> int:
    """ORT's per-channel axis for QOperator/dynamic nodes, which do not record it."""
    if view.op_type == "Conv":
        return 0
    if view.op_type == "Gemm":
        return 1 if view.transposed else 0
    return rank - 1  # MatMul: per output column


def _locate(view: LayerView, inits: dict[str, Any], consumers: dict[str, list]) -> _Located | None:
    import numpy as np
    from onnx import TensorProto
    from qcb_guard_plugins import _onnx_util as ou

    w = view.weight_name
    rank = view.weight.ndim
    qname = w + "_quantized"
    if qname in inits:
        tensor, as_float = inits[qname], False
        nodes = [n for n in consumers.get(qname, []) if n.op_type == "DequantizeLinear"]
    elif w in inits:  # AddQDQPairToWeight keeps the float weight before a QuantizeLinear
        nodes = [n for n in consumers.get(w, []) if n.op_type == "QuantizeLinear"]
        if not nodes:
            return None  # ORT left this weight in float
        tensor, as_float = inits[w], True
    else:
        return None
    if nodes:
        node = nodes[0]
        scale_name = node.input[1]
        zp_name = node.input[2] if len(node.input) > 2 else ""
        axis = int(ou.attributes(node).get("axis", 1))
    else:  # QOperator / dynamic: ORT's naming, the axis is implied by the op
        scale_name, zp_name, axis = w + "_scale", w + "_zero_point", _rule_axis(view, rank)
    if scale_name not in inits or (zp_name and zp_name not in inits):
        raise ModelFileError(f"cannot find the scale/zero point ORT wrote for weight {w!r}")
    scale = ou.to_numpy(inits[scale_name])
    zp = ou.to_numpy(inits[zp_name]) if zp_name else np.zeros(scale.shape, np.uint8)
    if not as_float:
        qtype = tensor.data_type
    else:  # QuantizeLinear's output type is its zero point's (uint8 when absent)
        qtype = inits[zp_name].data_type if zp_name else TensorProto.UINT8
    if scale.size == 1:
        axis = None
    else:
        axis %= rank
        if view.to_onnx_layout(view.weight).shape[axis] != scale.size:
            raise ModelFileError(
                f"weight {w!r}: {scale.size} scales do not match axis {axis} of its shape"
            )
    return _Located(tensor, as_float, scale, zp, qtype, axis)


def _build_slots(
    fp_model: Any, q_model: Any, call: _Call
) -> tuple[list[tuple[WeightSlot, LayerView, _Located]], list[str], list[str], list[bool]]:
    """Slots for every Conv/Gemm/MatMul weight ORT quantized, in graph (topological) order,
    notes, the quantized weights left as ORT wrote them, and the "model changed" flag."""
    import numpy as np
    import torch
    from qcb_guard_plugins import _onnx_util as ou

    from qcb_guard.slots import WeightSlot

    fp_inits, q_inits = ou.initializers(fp_model), ou.initializers(q_model)
    shapes = ou.static_shapes(fp_model)
    consumers: dict[str, list] = {}
    for node in q_model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    overrides_all = call.extra_options.get("TensorQuantOverrides") or {}
    dirty = [False]
    items: list[tuple[WeightSlot, LayerView, _Located]] = []
    notes: list[str] = []
    unreached: list[str] = []  # weights the defense does not reach (warned about)
    seen: set[str] = set()
    for node in fp_model.graph.node:
        if node.op_type not in ou.LAYER_OPS or len(node.input) < 2:
            continue
        w = node.input[1]
        if w not in fp_inits or w in seen:
            continue
        try:
            view = ou.layer_view(node, fp_inits, shapes)
        except ou.UnsupportedLayer as exc:
            if w + "_quantized" in q_inits:
                seen.add(w)
                unreached.append(
                    f"weight {w!r} ({node.op_type} {node.name!r}) kept ORT's nearest integers: "
                    f"{exc}"
                )
            continue
        loc = _locate(view, q_inits, consumers)
        if loc is None:
            continue
        seen.add(w)
        w_onnx = ou.to_numpy(fp_inits[w])
        nearest = _ort_round(w_onnx, loc.qtype, loc.scale, loc.zero_point, loc.axis)
        if not loc.stored_as_float and not np.array_equal(nearest, ou.integers_of(loc.tensor)):
            raise ModelFileError(
                f"the integers ORT wrote for {w!r} are not its rounding of the float weight: the "
                "model was transformed before quantization; guard the transformed model instead"
            )
        qmin, qmax, why = _ort_range(
            w_onnx, loc.qtype, loc.scale, loc.zero_point, loc.axis,
            call=call, overrides=list(overrides_all.get(w, [])),
        )  # fmt: skip
        if why:
            notes.append(f"weight {w!r}: {why}; integers kept in [{qmin}, {qmax}]")
        axis = loc.axis
        if axis is not None and view.transposed:
            axis = 1 - axis
        slot = WeightSlot(
            name=w,
            kind=view.kind,
            weight=torch.from_numpy(np.ascontiguousarray(view.weight)),
            scale=torch.from_numpy(loc.scale.astype(np.float32).ravel()),
            zero_point=torch.from_numpy(loc.zero_point.astype(np.int64).ravel()),
            axis=axis,
            qmin=qmin,
            qmax=qmax,
            bias=None if view.bias is None else torch.from_numpy(view.bias),
            attrs=view.attrs,
            framework=FRAMEWORK,
            nearest_fn=_constant_integers(np.ascontiguousarray(view.to_onnx_layout(nearest))),
        )
        slot.write = _writer(slot, view, loc, nearest, dirty)
        items.append((slot, view, loc))
    users: dict[str, set[str]] = {}
    for node in fp_model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    for name, t in q_inits.items():
        base = name.removesuffix("_quantized")
        if base != name and base in fp_inits and base not in seen and t.data_type != 6:  # INT32
            ops = sorted(users.get(base, ()))
            note = f"constant {base!r} ({', '.join(ops)}) kept ORT's nearest integers"
            (unreached if set(ops) & _WEIGHT_OPS else notes).append(note)
    return items, notes, unreached, dirty


def _constant_integers(ints: np.ndarray):
    """``nearest_fn``: the integers ORT wrote (verified to be ORT's rounding of the weight)."""
    import torch

    return lambda _slot: torch.from_numpy(ints.copy())


def _writer(slot: WeightSlot, view: LayerView, loc: _Located, nearest: np.ndarray, dirty: list):
    """The slot's ``write``: integers back into the written model, in ONNX layout."""
    import numpy as np
    from qcb_guard_plugins import _onnx_util as ou

    def write(q: Any) -> None:
        ints = np.ascontiguousarray(view.to_onnx_layout(q.detach().cpu().numpy().astype(np.int64)))
        if loc.stored_as_float:
            if np.array_equal(ints, nearest):
                return  # keep ORT's float weight byte for byte
            on_grid = view.to_onnx_layout(slot.dequantize(q).numpy())
            changed = ou.replace_floats(loc.tensor, on_grid)
        else:
            changed = ou.replace_integers(loc.tensor, ints)
        dirty[0] = dirty[0] or changed

    return write


class _LayerInputs:
    """Calibrator: each layer's inputs over the recorded feeds, in the float model
    (``fp_inputs``) and with the earlier slots' deployed weights substituted (``inputs``)."""

    def __init__(self, fp_model: Any, items: list, feeds: list[dict]):
        from qcb_guard_plugins._onnx_util import LayerCapture

        self.items = items
        self.by_name = {slot.name: view for slot, view, _ in items}
        self._make = lambda: LayerCapture(
            fp_model,
            [view.weight_name for _, view, _ in items],
            [view.input_name for _, view, _ in items],
            feeds,
        )
        self._capture: LayerCapture | None = None

    @property
    def capture(self) -> LayerCapture:
        if self._capture is None:  # built on first use: defenses without data never pay
            self._capture = self._make()
        return self._capture

    def __call__(self, slot: WeightSlot) -> SlotCalibration:
        import numpy as np
        import torch

        from qcb_guard.slots import SlotCalibration

        view = self.by_name[slot.name]
        fp = self.capture.capture(view.input_name, transform=view.transform)
        deployed = {
            v.weight_name: view_to_onnx(s, v, self.capture.weights[v.weight_name].dtype)
            for s, v, _ in self.items
            if s.integers is not None and s is not slot
        }
        q = self.capture.capture(view.input_name, deployed, view.transform) if deployed else fp
        return SlotCalibration(
            inputs=torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)),
            fp_inputs=torch.from_numpy(np.ascontiguousarray(fp, dtype=np.float32)),
        )


def view_to_onnx(slot: WeightSlot, view: LayerView, dtype: Any) -> np.ndarray:
    """The deployed slot's dequantized weight in the ONNX layout and dtype."""
    import numpy as np

    return np.ascontiguousarray(view.to_onnx_layout(slot.dequantize(slot.integers).numpy())).astype(
        dtype
    )


# --------------------------------------------------------------------------------------
# One guarded call.
# --------------------------------------------------------------------------------------


def _run(
    fn: Any, entry: str, arguments: dict[str, Any], config: GuardConfig, pm: PluginManager
) -> tuple[Any, GuardResult]:
    import onnx
    from qcb_guard_plugins import _onnx_util as ou

    from qcb_guard.guarding import finish, round_slots

    call = _describe(entry, arguments)
    _check_supported(call)
    model_input = arguments["model_input"]
    model_output = Path(os.fspath(arguments["model_output"]))
    fp_model = ou.load_model(model_input)  # read before ORT runs; never the caller's object

    args = dict(arguments)
    if isinstance(model_input, onnx.ModelProto):
        # ORT saves a ModelProto input with save_as_external_data=True, which moves the
        # caller's large initializers out of their proto: hand ORT a copy instead.
        args["model_input"] = copy.deepcopy(model_input)
    reader, drained = call.reader, None
    if reader is None:
        activation = skipped(config, "dynamic flow: no static activation ranges to protect")
    elif config.activation_defense is None:
        activation = TURNED_OFF
    else:
        drained, reader, activation = _with_probes(reader, fp_model, config, pm)
    tee = _tee(reader) if reader is not None else None
    if tee is not None:
        if entry == "quantize":
            cfg = copy.copy(arguments["quant_config"])
            cfg.calibration_data_reader = tee
            args["quant_config"] = cfg
        else:
            args["calibration_data_reader"] = tee

    model_output.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".qcb_guard-", dir=model_output.parent))
    try:
        tmp_out = workdir / model_output.name
        args["model_output"] = str(tmp_out)
        returned = fn(**args)
        q_model = onnx.load(str(tmp_out))
        items, notes, unreached, dirty = _build_slots(fp_model, q_model, call)
        # The rounding defense learns from the user's data, never from the probes.
        feeds = drained if drained is not None else (tee.feeds if tee is not None else [])
        source = f"calibration_data_reader ({len(feeds)} feeds)" if feeds else None
        if not feeds and config.calibration is not None:
            feeds = ou.feeds_from(config.calibration, fp_model)
            source = f"guard(calibration=...) ({len(feeds)} feeds)"
        calibrator = _LayerInputs(fp_model, items, feeds) if (feeds and items) else None
        slots = [slot for slot, _, _ in items]
        result = round_slots(slots, config, pm=pm, calibrator=calibrator, framework=FRAMEWORK)
        result.notes.extend(notes + unreached)
        result.extra["unguarded_weights"] = unreached
        result.extra["activation_defense"] = activation
        for note in unreached:
            warnings.warn(f"qcb_guard: {note}", stacklevel=3)
        result.extra.update(
            entry=f"onnxruntime.quantization.{entry}",
            quant_format=call.quant_format,
            per_channel=call.per_channel,
            weight_type=getattr(call.weight_type, "name", str(call.weight_type)),
            calibration=source,
            model_output=str(model_output),
        )
        _publish(q_model, tmp_out, model_output, changed=dirty[0], external=call.external_data)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    finish(result, slots, model_output, config, pm)
    return returned, result


def _publish(q_model: Any, tmp_out: Path, model_output: Path, *, changed: bool, external: bool):
    """Move the written model into place: one atomic rename (external data: the data file
    first, then the model that points to it)."""
    import onnx

    from qcb_guard.fileio import atomic_write

    data_name = model_output.name + ".data"
    if external:
        if changed:
            (tmp_out.parent / data_name).unlink(missing_ok=True)
            onnx.save_model(
                q_model,
                str(tmp_out),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                convert_attribute=True,
            )
        if (tmp_out.parent / data_name).exists():
            os.replace(tmp_out.parent / data_name, model_output.parent / data_name)
        os.replace(tmp_out, model_output)
    elif changed:
        atomic_write(model_output, lambda tmp: onnx.save_model(q_model, str(tmp)))
    else:  # nothing changed: ORT's own bytes (same directory, so the rename is atomic)
        os.replace(tmp_out, model_output)
