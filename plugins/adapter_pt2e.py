"""Adapter ``pt2e``: ``guard(quantizer)`` for torchao's PT2E flow.

``torch.export`` → ``prepare_pt2e(m, guard(quantizer))`` → calibrate → ``convert_pt2e``.
The guarded quantizer delegates to the user's quantizer, then swaps the observer constructor
of every Conv/Linear weight ``QuantizationSpec`` so that ``prepare_pt2e`` wraps the very
observer it would have built in a :class:`GuardedWeightObserver` (done in ``annotate``, so a
guarded quantizer also works inside a ``ComposableQuantizer``). ``convert_pt2e`` calls an
observer's ``convert(model, node)``
when it has one (official hook): the first such call rounds every guarded weight with the
registered defense, gives each changed weight the on-grid float value of its chosen integers,
and the framework's own ``quantize_per_channel``/``quantize_per_tensor`` + constant folding then
produce exactly those integers (checked before deploying), with its own scales and zero points.
See ``docs/adapters/pt2e.md``.

Defenses that need data get each layer's float inputs from the user's own calibration
forward passes: a :class:`CalibrationRecorder` observes every graph input of the prepared
model (capped, removed again at convert) and a float copy of the annotated graph recomputes
one layer's inputs at a time. ``guard(..., calibration=x)`` is the fallback. Without a
data-hungry defense nothing is recorded and the prepared graph is the framework's own.

torchao is imported only when a guarded object is built (``wrap``) or one of the classes
below is first looked up (PEP 562 ``__getattr__``), so qcb_guard imports without it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qcb_guard import hookimpl
from qcb_guard._compat import require
from qcb_guard.activation import TURNED_OFF, skipped
from qcb_guard.errors import ConfigError, DataError, DefenseError, UnsupportedObjectError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch.fx import Graph, GraphModule, Node

    from qcb_guard.config import GuardConfig
    from qcb_guard.manager import PluginManager
    from qcb_guard.slots import SlotCalibration, WeightSlot

FRAMEWORK = "torchao-pt2e"
EXTRA = "torchao"
#: Calibration samples kept per graph input (the first ones the user feeds).
MAX_CALIBRATION_SAMPLES = 1024
_QUANTIZER_MODULE = "torchao.quantization.pt2e.quantizer.quantizer"
_FLOW_MODULE = "torchao.quantization.pt2e.quantize_pt2e"
_LAZY_CLASSES = ("GuardedQuantizer", "GuardedWeightObserver", "CalibrationRecorder")


# --------------------------------------------------------------------------------------
# Graph helpers (pure functions over torch.fx nodes).
# --------------------------------------------------------------------------------------


def _layer_kind(node: Node) -> str | None:
    """``linear``/``convNd`` for the aten ops PT2E quantizers annotate with a weight."""
    import torch

    if node.op != "call_function":
        return None
    aten = torch.ops.aten
    overload = getattr(node.target, "overloadpacket", None)
    if overload is aten.linear:
        return "linear"
    for dim in (1, 2, 3):
        if overload is getattr(aten, f"conv{dim}d"):
            return f"conv{dim}d"
    if overload is aten.convolution:
        args = _layer_args(node)
        if not args.get("transposed", False):
            weight = args["weight"]
            rank = len(weight.meta["val"].shape) if "val" in weight.meta else None
            return f"conv{rank - 2}d" if rank in (3, 4, 5) else None
    return None


def _layer_args(node: Node) -> dict[str, Any]:
    """The layer op's arguments by name, defaults filled in (``stride``, ``groups`` ...)."""
    from torch.fx.operator_schemas import normalize_function

    pair = normalize_function(
        node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True
    )
    if pair is None:  # pragma: no cover - only for ops without a schema
        raise UnsupportedObjectError(f"cannot read the arguments of node {node.name!r}")
    return dict(pair.kwargs)


def _get_attr(model: torch.nn.Module, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), model)


def _resolve_tensor(model: GraphModule, arg: Any) -> torch.Tensor | None:
    """The constant tensor behind a graph argument (through observers and q/dq pairs)."""
    import torch

    seen = 0
    while arg is not None and seen < 8:
        seen += 1
        if not hasattr(arg, "op"):
            return arg if isinstance(arg, torch.Tensor) else None
        if arg.op == "get_attr":
            return _get_attr(model, str(arg.target)).detach()
        if arg.op in ("call_module", "call_function") and arg.args:
            arg = arg.args[0]  # observer module or quantize/dequantize op: identity here
            continue
        return None
    return None


def _underlying_dtype(dtype: torch.dtype) -> torch.dtype:
    import torch

    return {torch.qint8: torch.int8, torch.quint8: torch.uint8, torch.qint32: torch.int32}.get(
        dtype, dtype
    )


def _is_per_channel(qscheme: Any) -> bool:
    import torch

    return qscheme in (
        torch.per_channel_affine,
        torch.per_channel_symmetric,
        torch.per_channel_affine_float_qparams,
    )


def _class_name(ctr: Any) -> str:
    """The observer class name behind a constructor (``with_args`` partials included)."""
    func = getattr(getattr(ctr, "p", None), "func", ctr)
    return getattr(func, "__name__", type(ctr).__name__)


class _Constructor:
    """Stands in for a ``QuantizationSpec.observer_or_fake_quant_ctr``.

    ``prepare_pt2e`` builds observers as ``ctr.with_args(**spec_fields)()`` and passes
    ``ch_axis`` only when the class name contains ``PerChannel``, so this keeps the wrapped
    class's ``__name__`` and calls ``build(spec_fields)``. Shared, not copied, by deep copies
    (``asdict(spec)`` deep-copies it).
    """

    def __init__(self, build: Callable[[dict], Any], name: str, kwargs: dict | None = None):
        self.build = build
        self.__name__ = name
        self.kwargs = dict(kwargs or {})

    def with_args(self, **kwargs: Any) -> _Constructor:
        return _Constructor(self.build, self.__name__, {**self.kwargs, **kwargs})

    def __call__(self) -> Any:
        return self.build(self.kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Constructor:
        return self

    def __repr__(self) -> str:
        return f"qcb_guard({self.__name__})"


# --------------------------------------------------------------------------------------
# Per-prepare state shared by the observers of one prepared model.
# --------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Session:
    """What one ``prepare_pt2e`` call hands to ``convert_pt2e``: the guard configuration,
    the float graph (for layer inputs) and the notes gathered at prepare time.

    Shared, not copied, when the prepared model is deep-copied: it holds no per-model data
    (recorded inputs live in the recorder modules, integers in the weight observers)."""

    config: GuardConfig
    pm: PluginManager
    needs_data: bool
    max_samples: int
    quantizer: str
    fp_graph: Graph | None = None
    batch_sizes: list[int | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    probe: bool = False  # an activation defense runs before the first observer converts
    recording: bool = True
    activation: dict[str, Any] | None = None

    @property
    def records(self) -> bool:
        """Whether the graph inputs of the calibration forwards are recorded."""
        return self.needs_data or self.probe

    def __deepcopy__(self, memo: dict[int, Any]) -> _Session:
        return self


def _float_graph(model: GraphModule) -> tuple[Graph, dict[Node, Node]]:
    """A float copy of the annotated graph (before observers), meta stripped."""
    from torch.fx import Graph

    graph = Graph()
    env: dict[Node, Node] = {}
    out = graph.graph_copy(model.graph, env)
    graph.output(out)
    for node in graph.nodes:
        node.meta = {}
    return graph, env


def _truncated_module(model: GraphModule, fp_graph: Graph, input_name: str) -> torch.nn.Module:
    """A float GraphModule that returns one node of ``fp_graph`` (the layer's input)."""
    from torch.fx import Graph, GraphModule

    graph = Graph()
    env: dict[Node, Node] = {}
    graph.graph_copy(fp_graph, env)
    by_name = {old.name: new for old, new in env.items()}
    graph.output(by_name[input_name])
    for node in list(graph.nodes):  # export's shape guards: not part of the maths
        if node.op == "call_module" and str(node.target).startswith("_guards_fn"):
            graph.erase_node(node)
    graph.eliminate_dead_code()
    return GraphModule(model, graph)


def _float_module(model: GraphModule, fp_graph: Graph) -> torch.nn.Module:
    """The whole float graph as a module (for the activation defense's gradients)."""
    from torch.fx import Graph, GraphModule

    graph = Graph()
    graph.output(graph.graph_copy(fp_graph, {}))
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn"):
            graph.erase_node(node)
    graph.eliminate_dead_code()
    return GraphModule(model, graph)


def _probe_once(model: GraphModule, session: _Session) -> None:
    """Called by the first observer ``convert_pt2e`` converts (weight observers or input
    recorders, whichever comes first): the last moment every observer still observes."""
    if session.probe and session.activation is None:
        _probe_ranges(model, session)


def _probe_ranges(model: GraphModule, session: _Session) -> None:
    """Run the activation defense on the float graph and feed its inputs through the prepared
    model, so that every activation observer sees them before ``convert_pt2e`` reads it."""
    import torch

    from qcb_guard.activation import fill_batches, run_activation_defense

    batches = _recorded_batches(model, session) or _explicit_batches(session)
    if not batches or len(batches[0]) != 1:
        session.activation = skipped(
            session.config, "no single-input calibration forwards were recorded"
        )
        return
    x = torch.cat([b[0] for b in batches]).to(torch.float32)
    fp = _float_module(model, session.fp_graph)
    probes, session.activation = run_activation_defense(fp, x, session.config, session.pm)
    if probes is None or len(probes) == 0:
        return
    size = session.batch_sizes[0] if session.batch_sizes else None
    probes = fill_batches(probes, size)
    session.recording = False
    try:
        with torch.no_grad():
            for chunk in probes.split(size or 256):
                model(chunk.to(batches[0][0].dtype))
    finally:
        session.recording = True


def _layer_inputs(
    model: GraphModule,
    session: _Session,
    input_name: str,
    batches: list[tuple[Any, ...]],
    limit: int | None,
) -> torch.Tensor:
    import torch

    module = _truncated_module(model, session.fp_graph, input_name)
    chunks, total = [], 0
    with torch.no_grad():
        for batch in batches:
            try:
                out = module(*batch)
            except Exception as exc:
                raise DataError(
                    f"could not compute the inputs of layer input {input_name!r} from the "
                    f"calibration data ({type(exc).__name__}: {exc}); feed batches of the "
                    "exported batch size"
                ) from exc
            chunks.append(out.detach().to(torch.float32))
            total += out.shape[0]
            if limit is not None and total >= limit:
                break
    return torch.cat(chunks)[:limit]


def _recorded_batches(model: GraphModule, session: _Session) -> list[tuple[Any, ...]] | None:
    """The graph inputs of the user's calibration forwards, one tuple per forward."""
    recorder_cls = _classes()["CalibrationRecorder"]
    recorders = {}
    for module in model.modules():
        if isinstance(module, recorder_cls) and module.session is session:
            recorders[module.index] = module
    n_inputs = len(session.batch_sizes)
    if n_inputs == 0 or sorted(recorders) != list(range(n_inputs)):
        return None
    calls = min(len(r.batches) for r in recorders.values())
    if calls == 0:
        return None
    return [tuple(recorders[i].batches[c] for i in range(n_inputs)) for c in range(calls)]


def _explicit_batches(session: _Session) -> list[tuple[Any, ...]] | None:
    """``guard(..., calibration=x)`` split into batches of the exported batch size (a last
    partial batch is dropped when the batch dimension is static)."""
    data = session.config.calibration
    if data is None or len(session.batch_sizes) != 1:
        return None
    size = session.batch_sizes[0]
    if size is None:  # dynamic batch dimension: any chunk size runs
        return [(data[i : i + 256],) for i in range(0, len(data), 256)]
    if len(data) >= size:  # a static export may bake the batch size into the graph
        return [(data[i : i + size],) for i in range(0, len(data) - size + 1, size)]
    return [(data,)]


# --------------------------------------------------------------------------------------
# Rounding: one pass over every guarded weight of a model being converted.
# --------------------------------------------------------------------------------------


def _framework_quantize(observer: Any, weight: torch.Tensor, scale, zero_point) -> torch.Tensor:
    """The integers ``convert_pt2e`` folds for ``weight``: its own decomposed op, which
    computes ``round(w * (1 / s))`` in fp32, not the core's ``round(w / s)``."""
    import torch

    ops = torch.ops.quantized_decomposed
    dtype = _underlying_dtype(observer.dtype)
    w = weight.detach().to(torch.float32)
    if _is_per_channel(observer.qscheme):
        return ops.quantize_per_channel(
            w, scale, zero_point, int(observer.ch_axis), observer.quant_min,
            observer.quant_max, dtype,
        )  # fmt: skip
    return ops.quantize_per_tensor(
        w, float(scale), int(zero_point), observer.quant_min, observer.quant_max, dtype
    )


def _build_slot(model: GraphModule, node: Node, observer: Any, position: int) -> WeightSlot:
    """The slot of one guarded weight observer node (``get_attr`` → observer → layer)."""
    import torch

    from qcb_guard.slots import WeightSlot

    weight_node = node.args[0]
    layer = observer.layer_node(node)
    args = _layer_args(layer)
    kind = _layer_kind(layer)
    inner = observer.inner
    min_val = getattr(inner, "min_val", None)
    if isinstance(min_val, torch.Tensor) and (
        min_val.numel() == 0 or not torch.isfinite(min_val).all()
    ):
        # PT2E observes weights only in forward passes (convert's _run_weight_observers
        # finds no weight in a PT2E graph): unguarded, this layer would get scale 1.0.
        raise DataError(
            f"the weight observer of layer {layer.name!r} has observed nothing: run at least "
            "one forward pass of the prepared model before convert_pt2e"
        )
    scale, zero_point = inner.calculate_qparams()
    per_channel = _is_per_channel(inner.qscheme)
    weight = _get_attr(model, str(weight_node.target)).detach()
    bias = _resolve_tensor(model, args.get("bias"))
    attrs = {}
    if kind != "linear":
        attrs = {k: args[k] for k in ("stride", "padding", "dilation", "groups") if k in args}

    def nearest_fn(slot: WeightSlot) -> torch.Tensor:
        return _framework_quantize(inner, slot.weight, scale, zero_point).to(torch.int64)

    slot = WeightSlot(
        name=str(weight_node.target),
        kind=kind,
        weight=weight,
        scale=scale,
        zero_point=zero_point,
        axis=int(inner.ch_axis) if per_channel else None,
        qmin=int(inner.quant_min),
        qmax=int(inner.quant_max),
        bias=None if bias is None else bias.to(torch.float32),
        attrs=attrs,
        framework=FRAMEWORK,
        nearest_fn=nearest_fn,
    )
    slot.write = functools.partial(
        _write_integers, model, node, inner, slot, scale, zero_point, position
    )
    return slot


def _write_integers(
    model: GraphModule, node: Node, inner: Any, slot: WeightSlot, scale, zero_point,
    position: int, q: torch.Tensor,
) -> None:  # fmt: skip
    """Feed the weight observer the on-grid float value of ``q`` (a new root buffer).

    The framework then quantizes it with its own op and folds the result into the int8
    constant; ``round(s·(q−zp) · (1/s)) = q`` holds with a wide margin for |q| ≤ 2^15, and
    is checked here with the framework's op. Nearest integers change nothing, so
    ``defense="nearest"`` leaves the flow bit-identical. A fresh root attribute (not the
    layer's ``weight``) keeps tied weights and the user's float modules untouched, and
    constant folding deletes it again.
    """
    import torch

    q = q.to(torch.int64)
    if torch.equal(q, slot.nearest()):
        return
    device = _get_attr(model, str(node.args[0].target)).device
    grid = slot.dequantize(q).to(device=device, dtype=torch.float32)
    check = _framework_quantize(inner, grid, scale, zero_point).to(torch.int64)
    if not torch.equal(check, q):
        raise DefenseError(
            f"slot {slot.name!r}: the framework's quantize op does not reproduce the chosen "
            f"integers from their on-grid values ({int((check != q).sum())} differ)"
        )
    name = f"_qcb_guard_weight_{position}"
    while hasattr(model, name):
        name += "_"
    model.register_buffer(name, grid)
    with model.graph.inserting_before(node):
        new_input = model.graph.get_attr(name)
    node.replace_input_with(node.args[0], new_input)


def _round_model(model: GraphModule, session: _Session) -> None:
    """Choose and deploy the integers of every guarded weight of ``model`` (once)."""
    from qcb_guard.guarding import finish, round_slots
    from qcb_guard.slots import SlotCalibration

    classes = _classes()
    guarded = []
    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        module = _get_attr(model, str(node.target))
        if isinstance(module, classes["GuardedWeightObserver"]) and module.session is session:
            guarded.append((node, module))
    order = {n: i for i, n in enumerate(model.graph.nodes)}
    guarded.sort(key=lambda item: order[item[1].layer_node(item[0])])
    slots, inputs = [], {}
    for position, (node, module) in enumerate(guarded):
        slot = _build_slot(model, node, module, position)
        slots.append(slot)
        inputs[slot.name] = module.input_name

    calibrator, source = None, None
    if session.needs_data and session.fp_graph is not None:
        batches = _recorded_batches(model, session)
        source, limit = "recorded from the calibration forwards", session.max_samples
        if batches is None:
            batches = _explicit_batches(session)
            source, limit = "guard(calibration=...)", None
        if batches:

            def calibrator(slot: WeightSlot) -> SlotCalibration | None:
                name = inputs.get(slot.name)
                if name is None:
                    return None
                x = _layer_inputs(model, session, name, batches, limit)
                return SlotCalibration(inputs=x, fp_inputs=x)

    result = round_slots(
        slots, session.config, pm=session.pm, calibrator=calibrator, framework=FRAMEWORK
    )
    result.notes.extend(session.notes)
    result.extra["quantizer"] = session.quantizer
    result.extra["calibration"] = source if calibrator is not None else None
    result.extra["activation_defense"] = session.activation if session.probe else TURNED_OFF
    for _, module in guarded:
        module.deployed = True
    for module in model.modules():  # free the recorded inputs
        if isinstance(module, classes["CalibrationRecorder"]) and module.session is session:
            module.batches.clear()
    finish(result, slots, model, session.config, session.pm)


# --------------------------------------------------------------------------------------
# The framework-facing classes, built on first use (they subclass torchao's).
# --------------------------------------------------------------------------------------


def _delegate(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.quantizer, name)(*args, **kwargs)

    method.__name__ = name
    return method


@functools.cache
def _classes() -> dict[str, type]:
    require("torchao.quantization.pt2e", EXTRA)
    from torchao.quantization.pt2e import convert as pt2e_convert
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
    from torchao.quantization.pt2e.observer import AffineQuantizedObserverBase, ObserverBase
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        QuantizationSpec,
        Quantizer,
    )
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    class GuardedWeightObserver(ObserverBase):
        """Wraps the quantizer's weight observer; its ``convert`` deploys the defense.

        Observation and quantization parameters are the wrapped observer's, untouched.
        """

        def __init__(self, inner: Any, session: _Session, layer: str, input_name: str | None):
            super().__init__(dtype=inner.dtype, is_dynamic=getattr(inner, "is_dynamic", False))
            self.inner = inner
            self.session = session
            self.layer = layer  # name of the Conv/Linear node (prepare-time graph)
            self.input_name = input_name  # its input in the float graph copy
            self.deployed = False

        def __getattr__(self, name: str) -> Any:
            # qscheme, ch_axis, quant_min, ... : the wrapped observer's, for any reader.
            try:
                return super().__getattr__(name)
            except AttributeError:
                inner = super().__getattr__("inner")
                return getattr(inner, name)

        def forward(self, x):
            return self.inner(x)

        def calculate_qparams(self, **kwargs):
            return self.inner.calculate_qparams(**kwargs)

        def layer_node(self, node: Node) -> Node:
            for user in node.users:
                if _layer_kind(user) is not None:
                    return user
            raise UnsupportedObjectError(
                f"weight observer {node.name!r} feeds no Conv/Linear node"
            )  # pragma: no cover

        def convert(self, model: GraphModule, node: Node) -> None:
            """Called by ``convert_pt2e`` in place of its own q/dq insertion (official hook):
            round every guarded weight (first call), then insert the framework's q/dq nodes
            exactly as it would have for the wrapped observer."""
            if not self.deployed:
                _probe_once(model, self.session)
                _round_model(model, self.session)
            attrs = model.meta["_observed_graph_module_attrs"]
            pt2e_convert._replace_observer_with_quantize_dequantize_node_decomposed(
                model,
                node,
                {str(node.target): self.inner},
                attrs.node_name_to_scope,
                attrs.node_name_to_qconfig,
                None,
            )

    class CalibrationRecorder(ObserverBase):
        """Records one graph input of the user's calibration forwards (capped); removes
        itself at convert, so the converted graph is the framework's own."""

        def __init__(self, session: _Session, index: int, added_annotation: bool):
            import torch

            super().__init__(dtype=torch.float32)
            self.session = session
            self.index = index
            self.added_annotation = added_annotation  # else: we set its output_qspec
            self.batches: list[Any] = []
            self.samples = 0

        def forward(self, x):
            if self.session.recording and self.samples < self.session.max_samples:
                self.batches.append(x.detach().clone())
                self.samples += x.shape[0] if x.dim() else 1
            return x

        def calculate_qparams(self, **kwargs):  # pragma: no cover - never quantizes
            raise RuntimeError("CalibrationRecorder does not quantize")

        def convert(self, model: GraphModule, node: Node) -> None:
            _probe_once(model, self.session)
            source = node.args[0]
            node.replace_all_uses_with(source)
            model.graph.erase_node(node)
            if self.added_annotation:
                source.meta.pop(Q_ANNOTATION_KEY, None)
            elif Q_ANNOTATION_KEY in source.meta:
                source.meta[Q_ANNOTATION_KEY].output_qspec = None

    def make_weight_observer(
        ctr: Any, session: _Session, layer: str, input_name: str | None, kwargs: dict
    ) -> Any:
        inner = ctr.with_args(**kwargs)()  # exactly what prepare_pt2e would have built
        if isinstance(inner, FakeQuantizeBase):
            raise UnsupportedObjectError(
                "guard() supports post-training quantization (prepare_pt2e), not QAT "
                f"fake-quantize modules ({type(inner).__name__} on {layer!r})"
            )
        if isinstance(inner, AffineQuantizedObserverBase) or not isinstance(inner, ObserverBase):
            raise UnsupportedObjectError(
                f"weight observer {type(inner).__name__} of {layer!r} is not supported (only "
                "per-tensor / per-channel integer observers such as MinMaxObserver and "
                "PerChannelMinMaxObserver)"
            )
        return GuardedWeightObserver(inner, session, layer, input_name)

    def guard_annotations(self: Any, model: GraphModule) -> None:
        """Swap the observer constructor of every Conv/Linear weight spec (and annotate
        the graph inputs with recorders when the defense needs data)."""
        session = _Session(
            config=self.qcb_config,
            pm=self.qcb_pm,
            needs_data=self.qcb_needs_data,
            max_samples=int(self.max_calibration_samples),
            quantizer=f"{type(self.quantizer).__module__}.{type(self.quantizer).__qualname__}",
            probe=self.qcb_config.activation_defense is not None,
        )
        env: dict[Node, Node] = {}
        if session.records:
            session.fp_graph, env = _float_graph(model)
        guarded: set[Node] = set()
        for node in model.graph.nodes:
            annotation = node.meta.get(Q_ANNOTATION_KEY)
            if annotation is None or _layer_kind(node) is None:
                continue
            args = _layer_args(node)
            weight = args.get("weight")
            spec = annotation.input_qspec_map.get(weight)
            if spec is None:
                continue
            if not isinstance(spec, QuantizationSpec):
                session.notes.append(
                    f"layer {node.name!r}: weight spec {type(spec).__name__} is not supported; "
                    "left at the framework's nearest rounding"
                )
                continue
            ctr = spec.observer_or_fake_quant_ctr
            if isinstance(ctr, _Constructor):
                guarded.add(weight)
                continue  # already guarded (annotate called twice)
            dtype = _underlying_dtype(spec.dtype)
            if dtype.is_floating_point or spec.is_dynamic:
                session.notes.append(
                    f"layer {node.name!r}: {dtype} weight is not integer-quantized; left as is"
                )
                continue
            if weight.op != "get_attr":
                session.notes.append(
                    f"layer {node.name!r}: weight is computed in the graph ({weight.name}); "
                    "left at the framework's nearest rounding"
                )
                continue
            x = args.get("input")
            input_name = env[x].name if x in env else None
            build = functools.partial(make_weight_observer, ctr, session, node.name, input_name)
            annotation.input_qspec_map[weight] = dataclasses.replace(
                spec, observer_or_fake_quant_ctr=_Constructor(build, _class_name(ctr))
            )
            guarded.add(weight)
        for node in model.graph.nodes:  # other quantized constants (embeddings ...)
            annotation = node.meta.get(Q_ANNOTATION_KEY)
            for source, spec in annotation.input_qspec_map.items() if annotation else ():
                if source.op == "get_attr" and spec is not None and source not in guarded:
                    session.notes.append(
                        f"node {node.name!r} quantizes constant {source.target!r}, which is not "
                        "a Conv/Linear weight: left at the framework's nearest rounding"
                    )
        if session.records:
            add_recorders(model, session)

    def make_recorder(session: _Session, index: int, added: bool, kwargs: dict) -> Any:
        return CalibrationRecorder(session, index, added)

    def add_recorders(model: GraphModule, session: _Session) -> None:
        import torch

        placeholders = [n for n in model.graph.nodes if n.op == "placeholder"]
        for index, node in enumerate(placeholders):
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                session.notes.append(f"graph input {node.name!r} is not a tensor: not recorded")
                session.batch_sizes.append(None)
                continue
            size = val.shape[0] if val.dim() else None
            session.batch_sizes.append(size if isinstance(size, int) else None)
            annotation = node.meta.get(Q_ANNOTATION_KEY)
            if annotation is not None and annotation.output_qspec is not None:
                session.notes.append(
                    f"graph input {node.name!r} is already observed by the quantizer: not recorded"
                )
                continue
            build = functools.partial(make_recorder, session, index, annotation is None)
            spec = QuantizationSpec(
                dtype=torch.float32,  # no quantizer spec shares it (implicit sharing by dtype)
                observer_or_fake_quant_ctr=_Constructor(build, "CalibrationRecorder"),
            )
            if annotation is None:
                node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
                    output_qspec=spec, _annotated=True
                )
            else:
                annotation.output_qspec = spec

    class GuardedQuantizer(Quantizer):
        """The user's PT2E ``Quantizer``, guarded: same annotation, same observers and
        quantization parameters; weight integers from the registered defense.

        Every other attribute is the wrapped quantizer's (``set_global`` ... return this
        guarded quantizer when the wrapped one would return itself).
        """

        def __init__(self, quantizer: Any, config: GuardConfig, pm: PluginManager):
            super().__init__()
            self.quantizer = quantizer
            self.qcb_config = config
            self.qcb_pm = pm
            entry = pm.defenses.get(config.defense)
            self.qcb_needs_data = bool(entry.options.get("needs_calibration", False))
            self.max_calibration_samples = MAX_CALIBRATION_SAMPLES

        def transform_for_annotation(self, model):
            return self.quantizer.transform_for_annotation(model)

        def annotate(self, model):
            out = self.quantizer.annotate(model)
            guard_annotations(self, model)
            return out

        def validate(self, model) -> None:
            return self.quantizer.validate(model)

        def prepare_obs_or_fq_callback(self, model, edge_or_node_to_obs_or_fq) -> None:
            self.quantizer.prepare_obs_or_fq_callback(model, edge_or_node_to_obs_or_fq)

        def __getattr__(self, name: str) -> Any:
            if name == "quantizer" or name.startswith("__"):
                raise AttributeError(name)
            value = getattr(self.quantizer, name)
            if not callable(value):
                return value

            @functools.wraps(value)
            def call(*args: Any, **kwargs: Any) -> Any:
                out = value(*args, **kwargs)
                return self if out is self.quantizer else out

            return call

        def __deepcopy__(self, memo: dict[int, Any]) -> Any:
            clone = type(self)(copy.deepcopy(self.quantizer, memo), self.qcb_config, self.qcb_pm)
            clone.max_calibration_samples = self.max_calibration_samples
            return clone

        def __repr__(self) -> str:
            return f"GuardedQuantizer({self.quantizer!r}, defense={self.qcb_config.defense!r})"

    for name, member in vars(Quantizer).items():  # future Quantizer hooks: the wrapped one's
        if callable(member) and not name.startswith("_") and name not in vars(GuardedQuantizer):
            setattr(GuardedQuantizer, name, _delegate(name))

    classes = {
        "GuardedQuantizer": GuardedQuantizer,
        "GuardedWeightObserver": GuardedWeightObserver,
        "CalibrationRecorder": CalibrationRecorder,
    }
    for name, cls in classes.items():  # importable under this module (pickle, isinstance)
        cls.__module__ = __name__
        cls.__qualname__ = name
    return classes


def __getattr__(name: str) -> type:
    if name in _LAZY_CLASSES:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------
# The adapter.
# --------------------------------------------------------------------------------------


class PT2EAdapter:
    """torchao PT2E ``Quantizer`` (``prepare_pt2e``/``convert_pt2e``, X86Inductor, XNNPACK,
    custom quantizers)."""

    requires = EXTRA

    def matches(self, obj: Any) -> bool:
        if callable(obj) and getattr(obj, "__module__", None) == _FLOW_MODULE:
            return True  # prepare_pt2e / convert_pt2e: answered with a hint in wrap()
        return any(
            c.__module__ == _QUANTIZER_MODULE and c.__qualname__ == "Quantizer"
            for c in type(obj).__mro__
        )

    def wrap(self, obj: Any, config: GuardConfig, pm: PluginManager) -> Any:
        classes = _classes()
        if getattr(obj, "__module__", None) == _FLOW_MODULE and not hasattr(obj, "annotate"):
            raise UnsupportedObjectError(
                f"guard() takes the Quantizer you pass to prepare_pt2e, not "
                f"{getattr(obj, '__name__', obj)!r}: prepare_pt2e(m, guard(quantizer))"
            )
        if isinstance(obj, classes["GuardedQuantizer"]):
            raise ConfigError("this quantizer is already guarded; guard the original once")
        from qcb_guard.reference import check_calibration

        config.calibration = check_calibration(config.calibration, "guard(calibration=...)")
        return classes["GuardedQuantizer"](obj, config, pm)


ADAPTER = PT2EAdapter()


@hookimpl
def qcb_guard_register_adapters(register):
    register("pt2e", ADAPTER, description=PT2EAdapter.__doc__.splitlines()[0])
