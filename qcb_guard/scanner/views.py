"""What the scanner sees of a model: its Conv/Linear weights (BN folded on request) and a way
to run it with substituted weights.

Two views share one small interface (``layers(fold_bn)``, ``forward(x, weights, fold_bn)``,
``input_shape``): :class:`TorchView` over a deep copy of a ``torch.nn.Module`` and
:class:`OnnxView` over an ONNX graph run by ONNX Runtime. The caller's model is never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qcb_guard.errors import ConfigError, DataError, ModelFileError
from qcb_guard.quant import QuantSpec, compute_qparams, quantize_spec
from qcb_guard.slots import WeightSlot

_KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}


@dataclass
class Layer:
    """One quantizable weight as a flow sees it (BN folded in when asked).

    ``factor`` is the per-output-channel BN factor folded into ``weight`` (``None`` when not
    folded): a substituted folded weight is divided by it again before the model runs.
    """

    name: str
    kind: str
    weight: Tensor
    bias: Tensor | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    factor: Tensor | None = None
    extremes: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        flat = self.weight.reshape(self.weight.shape[0], -1)
        self.extremes = torch.stack([flat.amin(1), flat.amax(1)], 1)


def _bn_factor(bn: nn.Module) -> Tensor:
    """``gamma / sqrt(var + eps)``, the factor an exporter multiplies into the conv weight."""
    k = torch.rsqrt(bn.running_var.detach().float() + bn.eps)
    if bn.weight is not None:
        k = bn.weight.detach().float() * k
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(k.abs() < tiny, torch.full_like(k, tiny), k)


class TorchView:
    """A deep copy of a torch module in eval mode; layers in execution order."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], name: str = "model"):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = copy.deepcopy(model).eval().float().cpu()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.name = name
        sample = torch.zeros(2, *self.input_shape)
        from qcb_guard.attacks.simulate import conv_bn_pairs
        from qcb_guard.reference import quantizable_modules

        try:
            self.modules = [
                (n, m) for n, m in quantizable_modules(self.model, sample) if type(m) in _KINDS
            ]
            self.pairs = conv_bn_pairs(self.model, sample)
        except RuntimeError as exc:
            raise DataError(
                f"{name} does not run on inputs of shape {self.input_shape}: {exc}"
            ) from exc
        if not self.modules:
            raise ConfigError(f"{name} has no Conv/Linear layer to scan")
        named = dict(self.model.named_modules())
        self.bns = {conv: named[bn] for conv, bn in self.pairs.items()}
        for n, m in self.modules:
            problem = _finite_problem(f"{n}.weight", m.weight)
            if problem:
                raise ModelFileError(f"{name}: {problem}")

    def layers(self, fold_bn: bool) -> list[Layer]:
        out = []
        for n, m in self.modules:
            w = m.weight.detach().float()
            b = None if m.bias is None else m.bias.detach().float()
            attrs = {}
            if isinstance(m, nn.modules.conv._ConvNd):
                attrs = {
                    "stride": m.stride,
                    "padding": m.padding,
                    "dilation": m.dilation,
                    "groups": m.groups,
                }
            factor = None
            bn = self.bns.get(n) if fold_bn else None
            if bn is not None:
                k = _bn_factor(bn)
                factor = k.reshape(-1, *([1] * (w.dim() - 1)))
                w = w * factor
                mean = bn.running_mean.detach().float()
                beta = torch.zeros_like(mean) if bn.bias is None else bn.bias.detach().float()
                b = ((torch.zeros_like(mean) if b is None else b) - mean) * k + beta
            out.append(Layer(f"{n}.weight", _KINDS[type(m)], w, b, attrs, factor))
        return out

    def forward(
        self, x: Tensor, weights: dict[str, Tensor] | None = None, fold_bn: bool = False
    ) -> Tensor:
        """Logits on ``x`` with ``weights`` (folded layout when ``fold_bn``) substituted."""
        from torch.func import functional_call

        params: dict[str, Tensor] = {}
        if weights:
            factors = {ly.name: ly.factor for ly in self.layers(fold_bn)} if fold_bn else {}
            for name, w in weights.items():
                k = factors.get(name)
                params[name] = w if k is None else w / k
        outs = []
        with torch.no_grad():
            for xb in x.split(512):
                outs.append(functional_call(self.model, params, (xb,), strict=False).float())
        return torch.cat(outs).reshape(len(x), -1)


def _finite_problem(name: str, t: Any) -> str | None:
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        return f"weight {name!r} has dtype {t.dtype}, not floating point"
    if t.numel() == 0:
        return f"weight {name!r} is empty"
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        return f"weight {name!r} has {bad} NaN/inf value(s) of {t.numel()}"
    return None


class OnnxView:
    """An ONNX graph (already BN-folded by its exporter) run with ONNX Runtime on the CPU.

    Every Conv/Gemm/MatMul whose weight is a float initializer is a layer; substituted weights
    are written into a private copy of the graph.
    """

    def __init__(self, model: Any, name: str = "model.onnx"):
        from qcb_guard import onnx_graph as ou

        self.proto = model
        self.name = name
        inits = ou.initializers(model)
        shapes: dict[str, Any] = {}
        self.views = []
        for node in model.graph.node:
            if node.op_type not in ou.LAYER_OPS:
                continue
            try:
                view = ou.layer_view(node, inits, shapes)
            except ou.UnsupportedLayer:
                continue
            problem = _finite_problem(view.weight_name, torch.from_numpy(view.weight))
            if problem:
                raise ModelFileError(f"{name}: {problem}")
            self.views.append(view)
        if not self.views:
            raise ConfigError(f"{name} has no Conv/Gemm/MatMul layer with a float weight to scan")
        inputs = ou.graph_inputs(model)
        if len(inputs) != 1:
            raise ConfigError(f"{name}: the scanner runs single-input models, got {len(inputs)}")
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else None for d in dims][1:]
        self.input_shape = tuple(shape) if shape and all(shape) else None
        self._session = None

    def layers(self, fold_bn: bool) -> list[Layer]:
        return [
            Layer(
                v.weight_name,
                v.kind,
                torch.from_numpy(np.ascontiguousarray(v.weight)),
                None if v.bias is None else torch.from_numpy(v.bias),
                dict(v.attrs),
            )
            for v in self.views
        ]

    def _make_session(self, weights: dict[str, Tensor] | None) -> Any:
        import onnxruntime as ort

        from qcb_guard import onnx_graph as ou

        proto = self.proto
        if weights:
            proto = copy.deepcopy(self.proto)
            inits = ou.initializers(proto)
            for v in self.views:
                if v.weight_name in weights:
                    w = weights[v.weight_name].detach().cpu().numpy()
                    ou.replace_floats(inits[v.weight_name], v.to_onnx_layout(w))
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(
                proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelFileError(f"{self.name}: ONNX Runtime cannot run this graph: {exc}") from exc

    def forward(
        self, x: Tensor, weights: dict[str, Tensor] | None = None, fold_bn: bool = False
    ) -> Tensor:
        session = self._make_session(weights)
        xs = x.detach().cpu().float().numpy()
        outs = []
        for start in range(0, len(xs), 512):
            try:
                out = session.run(None, {self.input_name: xs[start : start + 512]})[0]
            except Exception as exc:
                raise ModelFileError(f"{self.name}: running the graph failed: {exc}") from exc
            outs.append(torch.from_numpy(np.asarray(out, dtype=np.float32)).reshape(len(out), -1))
        return torch.cat(outs)


ModelView = TorchView | OnnxView


def layer_slots(layers: list[Layer], spec: QuantSpec, framework: str) -> Iterator[WeightSlot]:
    """A :class:`WeightSlot` per layer with the min/max qparams ``spec`` computes on it.

    Every framework's weight qparams depend only on per-channel minima and maxima, so they
    are computed on :attr:`Layer.extremes` (exactly the same scales, without another pass
    over a large weight per grid).
    """
    for layer in layers:
        axis = None if spec.axis is None else 0
        s = spec if spec.axis == axis else QuantSpec(**{**spec.__dict__, "axis": axis})
        scale, zero_point = compute_qparams(layer.extremes, s)
        nearest_fn = None
        if s.rounding == "nncf":
            nearest_fn = lambda slot, s=s: quantize_spec(slot.weight, s)[0]  # noqa: E731
        yield WeightSlot(
            name=layer.name,
            kind=layer.kind,
            weight=layer.weight,
            scale=scale,
            zero_point=zero_point,
            axis=axis,
            qmin=s.qmin,
            qmax=s.qmax,
            bias=layer.bias,
            attrs=layer.attrs,
            framework=framework,
            rounding=s.rounding,
            nearest_fn=nearest_fn,
        )
