"""ONNX graph helpers shared by the ONNX adapters and the scanner: loading without side
effects, integer and float initializers, static shapes, and a torch-layout view of each
Conv/Gemm/MatMul layer. Pure ``onnx`` (the format, no runtime).

This module imports onnx at import time; callers import it lazily so that qcb_guard itself
imports without onnx.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

#: ONNX op types whose weight input (input 1) becomes a slot.
LAYER_OPS = ("Conv", "Gemm", "MatMul")

Transform = Callable[[np.ndarray], np.ndarray]


def load_model(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """A private copy of a model given as a path or a ``ModelProto`` (external data loaded)."""
    if isinstance(model, onnx.ModelProto):
        return copy.deepcopy(model)
    return onnx.load(str(model))


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def to_numpy(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)


def integers_of(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of an integer initializer (int4/uint4 unpacked) as int64."""
    return numpy_helper.to_array(tensor).astype(np.int64)


def replace_integers(tensor: onnx.TensorProto, values: np.ndarray) -> bool:
    """Overwrite an integer initializer in place, keeping its name, dtype and dims.

    Returns False (and leaves the tensor untouched, byte for byte) when the values are equal.
    """
    current = numpy_helper.to_array(tensor)
    values = np.asarray(values).reshape(current.shape)
    if np.array_equal(current.astype(np.int64), values.astype(np.int64)):
        return False
    new = numpy_helper.from_array(values.astype(current.dtype), tensor.name)
    if new.data_type != tensor.data_type:  # pragma: no cover - guards an onnx behaviour change
        raise TypeError(f"re-encoding {tensor.name!r} changed its data type")
    tensor.CopyFrom(new)
    return True


def replace_floats(tensor: onnx.TensorProto, values: np.ndarray) -> bool:
    """Overwrite a floating-point initializer in place (same dtype and dims)."""
    current = numpy_helper.to_array(tensor)
    values = np.asarray(values, dtype=current.dtype).reshape(current.shape)
    if np.array_equal(current, values):
        return False
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return True


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name → shape (``None`` for unknown dims) from ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a convenience here, never a requirement
        inferred = model
    shapes: dict[str, list[int | None]] = {}
    graph = inferred.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
            ]
    return shapes


@dataclass
class LayerView:
    """How a Conv/Gemm/MatMul node maps onto a :class:`~qcb_guard.slots.WeightSlot`.

    ``weight`` is in the slot's layout (``[out, in]`` for linear layers); ``transposed`` says
    that the ONNX initializer holds its transpose. ``transform`` turns the node's captured
    input tensor into the input ``slot.layer`` expects (asymmetric padding applied, Gemm's
    ``transA``/``alpha`` folded in), so that ``slot.layer(transform(x))`` is the node's output.
    """

    node: str
    op_type: str
    input_name: str
    weight_name: str
    kind: str
    weight: np.ndarray  # slot layout, float
    transposed: bool
    bias: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    transforms: list[Transform] = field(default_factory=list)

    def transform(self, x: np.ndarray) -> np.ndarray:
        for fn in self.transforms:
            x = fn(x)
        return x

    def to_onnx_layout(self, values: np.ndarray) -> np.ndarray:
        return values.T if self.transposed else values


class UnsupportedLayer(Exception):
    """A layer the adapter cannot express as a slot; its integers stay ORT's."""


def _constant(name: str, inits: dict[str, onnx.TensorProto], what: str) -> np.ndarray:
    if name not in inits:
        raise UnsupportedLayer(f"its {what} {name!r} is not an initializer")
    return to_numpy(inits[name]).astype(np.float32)


def _conv_view(
    node: onnx.NodeProto,
    w: np.ndarray,
    inits: dict[str, onnx.TensorProto],
    shapes: dict[str, list[int | None]],
) -> LayerView:
    nd = w.ndim - 2
    if nd not in (1, 2, 3):
        raise UnsupportedLayer(f"a {nd}-D convolution has no torch slot kind")
    a = attributes(node)
    strides = list(a.get("strides", [1] * nd))
    dilations = list(a.get("dilations", [1] * nd))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad == "VALID":
        pads = [0] * (2 * nd)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        spatial = (shapes.get(node.input[0]) or [None] * (nd + 2))[2:]
        if len(spatial) != nd or any(s is None for s in spatial):
            raise UnsupportedLayer(f"auto_pad={auto_pad} needs static input shapes")
        begin, end = [], []
        kernel = w.shape[2:]
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        pads = begin + end
    else:
        pads = list(a.get("pads", [0] * (2 * nd)))
    begin, end = pads[:nd], pads[nd:]
    view = LayerView(
        node=node.name,
        op_type=node.op_type,
        input_name=node.input[0],
        weight_name=node.input[1],
        kind=f"conv{nd}d",
        weight=w.astype(np.float32),
        transposed=False,
        bias=_constant(node.input[2], inits, "bias")
        if len(node.input) > 2 and node.input[2]
        else None,
        attrs={
            "stride": tuple(strides),
            "dilation": tuple(dilations),
            "groups": int(a.get("group", 1)),
            "padding": tuple(begin) if begin == end else (0,) * nd,
        },
    )
    if begin != end:  # torch pads symmetrically: pad the captured input instead
        widths = [(0, 0), (0, 0), *zip(begin, end, strict=True)]
        view.transforms.append(lambda x, widths=widths: np.pad(x, widths))
    return view


def _gemm_view(
    node: onnx.NodeProto, w: np.ndarray, inits: dict[str, onnx.TensorProto]
) -> LayerView:
    a = attributes(node)
    trans_b = bool(a.get("transB", 0))
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    weight = w if trans_b else w.T
    bias = None
    if len(node.input) > 2 and node.input[2]:
        c = beta * _constant(node.input[2], inits, "C input")
        out = weight.shape[0]
        if c.size == 1:
            bias = np.full(out, c.reshape(()), dtype=np.float32)
        elif c.shape in ((out,), (1, out)):
            bias = c.reshape(out)
        else:
            raise UnsupportedLayer(f"its C input of shape {list(c.shape)} is not a bias")
    view = LayerView(
        node=node.name,
        op_type="Gemm",
        input_name=node.input[0],
        weight_name=node.input[1],
        kind="linear",
        weight=weight.astype(np.float32),
        transposed=not trans_b,
        bias=bias.astype(np.float32) if bias is not None else None,
    )
    if a.get("transA", 0):
        view.transforms.append(lambda x: np.ascontiguousarray(x.T))
    if alpha != 1.0:  # alpha * (x @ W.T) == (alpha * x) @ W.T
        view.transforms.append(lambda x, alpha=alpha: (x * np.float32(alpha)).astype(x.dtype))
    return view


def layer_view(
    node: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    shapes: dict[str, list[int | None]],
) -> LayerView:
    """The slot view of one Conv/Gemm/MatMul node whose weight is an initializer.

    Raises :class:`UnsupportedLayer` with the reason when the node has no slot form.
    """
    if len(node.input) < 2 or node.input[1] not in inits:
        raise UnsupportedLayer("its weight is not an initializer")
    w = to_numpy(inits[node.input[1]])
    if not np.issubdtype(w.dtype, np.floating):
        raise UnsupportedLayer(f"its weight has dtype {w.dtype}")
    if node.op_type == "Conv":
        return _conv_view(node, w, inits, shapes)
    if w.ndim != 2:
        raise UnsupportedLayer(f"its weight is {w.ndim}-D")
    if node.op_type == "Gemm":
        return _gemm_view(node, w, inits)
    if node.op_type == "MatMul":  # y = x @ B, B is [in, out]
        return LayerView(
            node=node.name,
            op_type="MatMul",
            input_name=node.input[0],
            weight_name=node.input[1],
            kind="linear",
            weight=w.T.astype(np.float32),
            transposed=True,
        )
    raise UnsupportedLayer(f"op {node.op_type} has no slot kind")


# --------------------------------------------------------------------------------------
# Calibration feeds and layer-input capture.
# --------------------------------------------------------------------------------------


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real graph inputs (initializers listed as inputs, as old exporters do, excluded)."""
    names = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in names]


def fixed_batch(inp: onnx.ValueInfoProto) -> int:
    """The batch size baked into a graph input's first dimension, 0 when it is dynamic."""
    dims = inp.type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else 0
