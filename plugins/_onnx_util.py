"""ONNX Runtime helpers for the ONNX adapters: calibration feeds from a user's reader or
tensors, and capturing each layer's inputs with ONNX Runtime. The pure graph helpers live in
:mod:`qcb_guard.onnx_graph` (the scanner uses them too) and are re-exported here.

This module imports onnx at import time; adapters import it lazily (inside ``wrap``) so that
qcb_guard itself imports without onnx.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx

from qcb_guard.errors import DataError
from qcb_guard.onnx_graph import (
    LAYER_OPS,
    LayerView,
    Transform,
    UnsupportedLayer,
    attributes,
    fixed_batch,
    graph_inputs,
    initializers,
    integers_of,
    layer_view,
    load_model,
    replace_floats,
    replace_integers,
    static_shapes,
    to_numpy,
)

__all__ = [
    "LAYER_OPS",
    "LayerCapture",
    "LayerView",
    "Transform",
    "UnsupportedLayer",
    "attributes",
    "feeds_from",
    "fixed_batch",
    "graph_inputs",
    "initializers",
    "integers_of",
    "layer_view",
    "load_model",
    "replace_floats",
    "replace_integers",
    "static_shapes",
    "to_numpy",
]


def feeds_from(calibration: Any, model: onnx.ModelProto, batch: int = 64) -> list[dict]:
    """Turn ``guard(calibration=...)`` into ONNX Runtime feeds.

    Accepts a list of feed dicts, one feed dict, a ``CalibrationDataReader`` (drained), or an
    array/tensor of samples ``[N, ...]`` for a single-input model (fed in chunks that respect a
    fixed batch dimension).
    """
    if calibration is None:
        return []
    if hasattr(calibration, "get_next"):
        feeds = []
        while feed := calibration.get_next():
            feeds.append({k: np.array(v, copy=True) for k, v in feed.items()})
        calibration = feeds
    if isinstance(calibration, dict):
        calibration = [calibration]
    if isinstance(calibration, (list, tuple)) and all(isinstance(f, dict) for f in calibration):
        if not calibration:
            raise DataError("calibration is an empty list of feeds")
        return [{k: np.asarray(v) for k, v in f.items()} for f in calibration]
    if hasattr(calibration, "detach"):  # torch.Tensor, without importing torch here
        calibration = calibration.detach().cpu().numpy()
    data = np.asarray(calibration)
    if data.ndim == 0 or data.shape[0] == 0:
        raise DataError(f"calibration data is empty (shape {list(data.shape)})")
    if not np.issubdtype(data.dtype, np.floating) or not np.isfinite(data).all():
        raise DataError("calibration data must be finite floating-point samples [N, ...]")
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise DataError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}): pass "
            "calibration as a list of feed dicts {input name: array}"
        )
    (inp,) = inputs
    elem = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    fixed = fixed_batch(inp)
    step = fixed or batch
    if fixed and data.shape[0] % fixed:
        raise DataError(f"{data.shape[0]} calibration samples do not split into batches of {fixed}")
    return [{inp.name: data[i : i + step].astype(elem)} for i in range(0, data.shape[0], step)]


class LayerCapture:
    """Runs a float model with ONNX Runtime and returns intermediate tensors.

    The weights named in ``weight_names`` become graph inputs of a private copy, so one
    session serves both the float model and the model with deployed weights substituted.
    Graph optimizations are off: the captured tensors follow the ONNX graph's own maths.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        weight_names: Iterable[str],
        tensor_names: Iterable[str],
        feeds: Sequence[dict],
    ):
        import onnxruntime as ort

        m = copy.deepcopy(model)
        inits = initializers(m)
        weight_names = list(dict.fromkeys(weight_names))
        self.weights = {n: to_numpy(inits[n]) for n in weight_names}
        kept = [t for t in m.graph.initializer if t.name not in self.weights]
        del m.graph.initializer[:]
        m.graph.initializer.extend(kept)
        listed = {i.name for i in m.graph.input}
        for n in weight_names:
            if n not in listed:
                t = inits[n]
                m.graph.input.append(onnx.helper.make_tensor_value_info(n, t.data_type, t.dims))
        self.graph_input_names = {i.name for i in m.graph.input}
        outputs = {o.name for o in m.graph.output}
        for name in dict.fromkeys(tensor_names):
            if name not in outputs and name not in self.graph_input_names:
                m.graph.output.append(onnx.ValueInfoProto(name=name))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            m.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.feeds = list(feeds)

    def capture(
        self,
        name: str,
        weights: dict[str, np.ndarray] | None = None,
        transform: Transform | None = None,
    ) -> np.ndarray:
        """Tensor ``name`` over every feed, with ``weights`` replacing the float weights they
        name; ``transform`` is applied per feed, then the results are joined on axis 0."""
        w = {**self.weights, **(weights or {})}
        chunks = []
        for feed in self.feeds:
            x = feed[name] if name in feed else self.session.run([name], {**feed, **w})[0]
            x = np.asarray(x)
            chunks.append(transform(x) if transform is not None else x)
        return np.concatenate(chunks, axis=0)
