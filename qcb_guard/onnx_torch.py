"""A minimal ONNX → torch converter, so that input gradients can be taken through ONNX models.

Activation defenses (``range-probe``) need gradients of every activation with respect to the
model input; an ONNX model handed to ``guard()`` on ONNX Runtime has none. ``onnx2torch``
would do this, but ``pip install onnx2torch`` pulls torchvision and replaces torch 2.13.0
with another torch (checked with ``pip install --dry-run``: torch-2.14.1, torchvision-0.29.1,
CUDA wheels), so it cannot join this project's pinned environment.

This converter covers the float op set the project's exporters and common CNN exports emit
(Conv, Gemm/MatMul, BatchNormalization, the pools, Flatten/Reshape, Add/Sub/Mul/Div, Concat,
and the activations Relu, Clip, Sigmoid, Tanh, LeakyRelu, HardSwish, HardSigmoid, Gelu,
Elu, Softplus). Activations run through the ``torch.nn.functional`` calls that
:mod:`qcb_guard.algorithms.range_probe` recognises. Any other op, a quantized graph
(QuantizeLinear/DequantizeLinear) or a graph with several inputs raises
:class:`~qcb_guard.errors.ConfigError` naming it: such a model cannot be probed this way.
Every node becomes a child module named after the node, so reports name ONNX nodes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcb_guard._compat import require
from qcb_guard.errors import ConfigError

__all__ = ["SUPPORTED_OPS", "OnnxModule", "onnx_to_torch"]


def _attrs(node: Any) -> dict[str, Any]:
    helper = require("onnx.helper", "onnx")
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(pads: list[int] | None, dims: int) -> tuple[int, ...] | None:
    """ONNX [b1, b2, ..., e1, e2, ...] → symmetric torch padding, or None when asymmetric."""
    if not pads:
        return (0,) * dims
    begin, end = pads[:dims], pads[dims:]
    return tuple(begin) if list(begin) == list(end) else None


def _explicit_pad(x: Tensor, pads: list[int], value: float = 0.0) -> Tensor:
    dims = len(pads) // 2
    torch_pads: list[int] = []
    for i in reversed(range(dims)):
        torch_pads += [pads[i], pads[i + dims]]
    return F.pad(x, torch_pads, value=value)


def _conv(a: dict[str, Any]) -> Callable[..., Tensor]:
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ConfigError("Conv with auto_pad is not supported by the minimal converter")
    fns = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def run(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        dims = w.dim() - 2
        pads = _pads(a.get("pads"), dims)
        if pads is None:
            x, pads = _explicit_pad(x, a["pads"]), (0,) * dims
        return fns[dims](
            x,
            w,
            b,
            stride=tuple(a.get("strides", [1] * dims)),
            padding=pads,
            dilation=tuple(a.get("dilations", [1] * dims)),
            groups=a.get("group", 1),
        )

    return run


def _pool(kind: str, a: dict[str, Any]) -> Callable[..., Tensor]:
    kernel = tuple(a["kernel_shape"])
    dims = len(kernel)
    strides = tuple(a.get("strides", kernel))
    ceil = bool(a.get("ceil_mode", 0))
    pads = _pads(a.get("pads"), dims)
    if pads is None:
        raise ConfigError(f"{kind} with asymmetric padding is not supported by the converter")
    if kind == "MaxPool":
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
        dil = tuple(a.get("dilations", [1] * dims))
        return lambda x: fn(x, kernel, strides, pads, dil, ceil_mode=ceil)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
    include = bool(a.get("count_include_pad", 0))
    return lambda x: fn(x, kernel, strides, pads, ceil_mode=ceil, count_include_pad=include)


def _gemm(a: dict[str, Any]) -> Callable[..., Tensor]:
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    ta, tb = a.get("transA", 0), a.get("transB", 0)

    def run(x: Tensor, w: Tensor, c: Tensor | None = None) -> Tensor:
        x = x.t() if ta else x
        if tb and alpha == 1.0 and (c is None or beta == 1.0):
            return F.linear(x, w, c)  # the common case, seen as a linear layer
        y = alpha * (x @ (w.t() if tb else w))
        return y if c is None else y + beta * c

    return run


def _clip(x: Tensor, low: Tensor | None = None, high: Tensor | None = None) -> Tensor:
    lo = None if low is None else float(low)
    hi = None if high is None else float(high)
    if lo == 0.0 and hi is None:
        return F.relu(x)
    if lo == 0.0 and hi == 6.0:
        return F.relu6(x)
    if lo is not None and hi is not None:
        return F.hardtanh(x, lo, hi)
    return torch.clamp(x, lo, hi)


def _flatten(a: dict[str, Any]) -> Callable[..., Tensor]:
    axis = a.get("axis", 1)
    return lambda x: x.reshape(int(torch.tensor(x.shape[:axis]).prod()), -1)


def _reshape(x: Tensor, shape: Tensor) -> Tensor:
    dims = [int(v) for v in shape.tolist()]
    dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _batchnorm(a: dict[str, Any]) -> Callable[..., Tensor]:
    eps = a.get("epsilon", 1e-5)
    return lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, False, 0.0, eps)


def _gelu(a: dict[str, Any]) -> Callable[..., Tensor]:
    approx = a.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return lambda x: F.gelu(x, approximate=approx)


def _builder(op: str, a: dict[str, Any]) -> Callable[..., Tensor]:
    simple: dict[str, Callable[..., Tensor]] = {
        "Relu": F.relu,
        "Sigmoid": torch.sigmoid,
        "Tanh": torch.tanh,
        "Softplus": F.softplus,
        "HardSwish": F.hardswish,
        "Clip": _clip,
        "Add": torch.add,
        "Sub": torch.sub,
        "Mul": torch.mul,
        "Div": torch.div,
        "MatMul": torch.matmul,
        "Identity": lambda x: x,
        "Dropout": lambda x, *_: x,
        "Reshape": _reshape,
        "GlobalAveragePool": lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
        "GlobalMaxPool": lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    }
    if op in simple:
        return simple[op]
    if op == "Conv":
        return _conv(a)
    if op in ("MaxPool", "AveragePool"):
        return _pool(op, a)
    if op == "Gemm":
        return _gemm(a)
    if op == "Flatten":
        return _flatten(a)
    if op == "BatchNormalization":
        return _batchnorm(a)
    if op == "Gelu":
        return _gelu(a)
    if op == "LeakyRelu":
        return lambda x: F.leaky_relu(x, a.get("alpha", 0.01))
    if op == "Elu":
        return lambda x: F.elu(x, a.get("alpha", 1.0))
    if op == "HardSigmoid":
        alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
        if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5:
            return F.hardsigmoid
        return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)
    if op == "Concat":
        return lambda *xs: torch.cat(xs, dim=a["axis"])
    if op == "Softmax":
        return lambda x: torch.softmax(x, dim=a.get("axis", -1))
    if op == "Transpose":
        return lambda x: (
            x.permute(*a["perm"]) if "perm" in a else x.permute(*reversed(range(x.dim())))
        )
    raise ConfigError(f"ONNX op {op!r} is not supported by the minimal ONNX→torch converter")


#: Op types the converter handles (plus ``Constant``, folded into initializers).
SUPPORTED_OPS = (
    "Add AveragePool BatchNormalization Clip Concat Conv Div Dropout Elu Flatten Gelu Gemm "
    "GlobalAveragePool GlobalMaxPool HardSigmoid HardSwish Identity LeakyRelu MatMul MaxPool "
    "Mul Relu Reshape Sigmoid Softmax Softplus Sub Tanh Transpose Constant"
).split()


class _Node(nn.Module):
    def __init__(self, op: str, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.op = op
        self.fn = fn

    def forward(self, *inputs: Tensor | None) -> Tensor:
        while inputs and inputs[-1] is None:  # trailing optional inputs left out
            inputs = inputs[:-1]
        return self.fn(*inputs)

    def extra_repr(self) -> str:
        return self.op


class OnnxModule(nn.Module):
    """A float ONNX graph run with torch ops (differentiable w.r.t. its input).

    Initializers are buffers (frozen); ``input_name``/``output_name`` are the graph's.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        numpy_helper = require("onnx.numpy_helper", "onnx")
        graph = model.graph
        inits = {t.name for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in inits]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ConfigError(
                f"the ONNX graph has {len(inputs)} inputs and {len(graph.output)} outputs; "
                "only single-input, single-output models can be converted"
            )
        self.input_name, self.output_name = inputs[0], graph.output[0].name
        self._buffers_by_name: dict[str, str] = {}
        for k, t in enumerate(graph.initializer):
            self._add_const(k, t.name, numpy_helper.to_array(t))
        quantized = {n.op_type for n in graph.node} & {"QuantizeLinear", "DequantizeLinear"}
        if quantized:
            raise ConfigError(
                "the ONNX graph is already quantized (QuantizeLinear/DequantizeLinear): convert "
                "and probe the float model"
            )
        unsupported = sorted({n.op_type for n in graph.node} - set(SUPPORTED_OPS))
        if unsupported:
            raise ConfigError(
                f"ONNX op(s) {', '.join(unsupported)} are not supported by the minimal "
                f"ONNX→torch converter (supported: {', '.join(SUPPORTED_OPS)}): this model "
                "cannot be probed"
            )
        self.plan: list[tuple[str, list[str], list[str]]] = []
        self.nodes = nn.ModuleDict()
        used: set[str] = set()
        for k, node in enumerate(graph.node):
            a = _attrs(node)
            if node.op_type == "Constant":
                value = a.get("value")
                if value is None:
                    raise ConfigError("Constant nodes must carry a tensor 'value'")
                self._add_const(len(self._buffers_by_name) + k, node.output[0], _array(value))
                continue
            key = _module_name(node.name or f"{node.op_type}_{k}", used)
            self.nodes[key] = _Node(node.op_type, _builder(node.op_type, a))
            self.plan.append((key, list(node.input), list(node.output)))

    def _add_const(self, k: int, name: str, array: Any) -> None:
        buffer = f"const_{k}"
        self.register_buffer(buffer, torch.as_tensor(array.copy()), persistent=True)
        self._buffers_by_name[name] = buffer

    def forward(self, x: Tensor) -> Tensor:
        env: dict[str, Tensor | None] = {"": None, self.input_name: x}
        for name, buffer in self._buffers_by_name.items():
            env[name] = getattr(self, buffer)
        for key, ins, outs in self.plan:
            env[outs[0]] = self.nodes[key](*(env[i] for i in ins))
        return env[self.output_name]  # type: ignore[return-value]


def _array(tensor: Any) -> Any:
    return require("onnx.numpy_helper", "onnx").to_array(tensor)


def _module_name(name: str, used: set[str]) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_") or "node"
    base, n = key, 1
    while key in used:
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    return key


def onnx_to_torch(model: Any) -> OnnxModule:
    """Convert an ONNX ``ModelProto`` or ``.onnx`` path into an eval-mode torch module."""
    onnx = require("onnx", "onnx")
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    if not isinstance(model, onnx.ModelProto):
        raise ConfigError(f"expected an ONNX ModelProto or path, got {type(model).__name__}")
    return OnnxModule(model).eval()
