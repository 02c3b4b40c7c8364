"""From what the user has (a torch module, an ONNX file, safetensors + architecture, an
attack output directory) to a model view, treating every file as hostile.

Nothing is unpickled: safetensors and weights-only zip checkpoints go through
:func:`qcb_guard.models.load_model` (raw pickles refused by their magic bytes); ONNX files are
size-checked, parsed without external data (which could point anywhere on disk), and every
initializer's declared shape is checked against its bytes before anything is allocated.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from qcb_guard._compat import require
from qcb_guard.errors import ConfigError, ModelFileError, UnsafeFileError

MAX_ONNX_BYTES = 2 * 1024**3  # protobuf's own limit for one message
MAX_ELEMENTS = 2**31  # per initializer
MAX_NODES = 200_000
MAX_INPUT_ELEMENTS = 2**24  # per sample: probes are allocated from the declared input shape
PICKLE_PROTO = 0x80
ZIP_MAGIC = b"PK\x03\x04"
MODEL_SUFFIXES = (".onnx", ".safetensors", ".pt", ".pth", ".bin")
# bytes per element of ONNX tensor data types (TensorProto.DataType), for the raw_data check
_ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
_ONNX_FIELDS = {
    1: "float_data", 2: "int32_data", 3: "int32_data", 4: "int32_data", 5: "int32_data",
    6: "int32_data", 7: "int64_data", 9: "int32_data", 10: "int32_data", 11: "double_data",
    12: "uint64_data", 13: "uint64_data", 16: "int32_data",
}  # fmt: skip


def check_input_shape(shape: Any, where: str) -> tuple[int, ...]:
    """A per-sample input shape of positive ints whose size is bounded."""
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: input shape {shape!r} is not a list of ints") from exc
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"{where}: input shape {shape} must be positive")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ModelFileError(
            f"{where}: declared input shape {shape} has {math.prod(shape)} elements per sample "
            f"(limit {MAX_INPUT_ELEMENTS}); refusing to allocate probes for it"
        )
    return shape


def load_calibration(calibration: Any) -> torch.Tensor | None:
    """Calibration inputs as a float tensor, from a tensor or a ``--data`` spec."""
    from qcb_guard.reference import check_calibration

    if calibration is None:
        return None
    if isinstance(calibration, str | os.PathLike):
        from qcb_guard.data import load_data

        calibration = load_data(calibration, split="train", limit=1024).x
    return check_calibration(calibration)


def _sniff(path: Path) -> None:
    """Refuse pickles whatever their suffix, before any parser sees the bytes."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head and head[0] == PICKLE_PROTO:
        raise UnsafeFileError(
            f"refusing {path}: it is a pickle, which can run arbitrary code when loaded; "
            "give an ONNX file, a .safetensors file or a zip-format torch checkpoint"
        )


def _check_onnx_tensor(t: Any, where: str) -> None:
    """Declared dims must be sane and match the stored bytes (no allocation from a lie)."""
    from onnx import TensorProto

    dims = list(t.dims)
    if any(d < 0 for d in dims):
        raise ModelFileError(f"{where}: initializer {t.name!r} has negative dims {dims}")
    numel = math.prod(dims) if dims else 1
    if numel > MAX_ELEMENTS:
        raise ModelFileError(
            f"{where}: initializer {t.name!r} declares shape {dims} ({numel} elements, limit "
            f"{MAX_ELEMENTS})"
        )
    if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
        raise ModelFileError(
            f"{where}: initializer {t.name!r} keeps its data in an external file; the scanner "
            "reads self-contained ONNX files only (external paths could point anywhere)"
        )
    itemsize = _ONNX_ITEMSIZE.get(t.data_type)
    if t.raw_data:
        if itemsize is not None and len(t.raw_data) != numel * itemsize:
            raise ModelFileError(
                f"{where}: initializer {t.name!r} declares shape {dims} ({numel * itemsize} "
                f"bytes) but stores {len(t.raw_data)} bytes (truncated or corrupt)"
            )
    else:
        field = _ONNX_FIELDS.get(t.data_type)
        if field is not None and len(getattr(t, field)) not in (numel, 0):
            raise ModelFileError(
                f"{where}: initializer {t.name!r} declares {numel} elements but stores "
                f"{len(getattr(t, field))}"
            )
        if field is not None and numel and not len(getattr(t, field)):
            raise ModelFileError(f"{where}: initializer {t.name!r} has no data")


def load_onnx(path: str | os.PathLike[str]) -> Any:
    """Parse and validate an ONNX file without following external data."""
    onnx = require("onnx", "onnx")
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{path}: empty file")
    if size > MAX_ONNX_BYTES:
        raise ModelFileError(f"{path}: {size} bytes is over the {MAX_ONNX_BYTES}-byte limit")
    _sniff(path)
    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelFileError(
            f"{path}: not a valid ONNX file (truncated or corrupt): {exc}"
        ) from exc
    return check_onnx(model, str(path))


def check_onnx(model: Any, where: str) -> Any:
    """Bounds and structure checks of a parsed ``ModelProto``; returns it."""
    onnx = require("onnx", "onnx")
    if not model.HasField("graph") or not len(model.graph.node):
        raise ModelFileError(f"{where}: the ONNX model has no graph nodes")
    if len(model.graph.node) > MAX_NODES:
        raise ModelFileError(f"{where}: {len(model.graph.node)} nodes (limit {MAX_NODES})")
    for t in model.graph.initializer:
        _check_onnx_tensor(t, where)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                _check_onnx_tensor(attr.t, where)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelFileError(f"{where}: invalid ONNX model: {str(exc).splitlines()[0]}") from exc
    return model


def _card(directory: Path) -> dict[str, Any]:
    card = directory / "card.json"
    if not card.is_file():
        return {}
    try:
        data = json.loads(card.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{card}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def load_view(
    model: Any,
    *,
    arch: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    calibration: torch.Tensor | None = None,
) -> tuple[Any, dict[str, Any]]:
    """``(view, info)`` for anything :func:`qcb_guard.scanner.scan` accepts.

    The input shape comes from, in order: ``input_shape``, the calibration data, an attack
    directory's ``card.json``, the ONNX graph's input.
    """
    from torch import nn

    from qcb_guard.scanner.views import OnnxView, TorchView

    shape = input_shape or (tuple(calibration.shape[1:]) if calibration is not None else None)
    if isinstance(model, nn.Module):
        if shape is None:
            raise ConfigError("scanning a torch module needs calibration data or input_shape")
        name = type(model).__name__
        return TorchView(model, check_input_shape(shape, name), name), {
            "source": "torch",
            "name": name,
        }
    if type(model).__name__ == "ModelProto":
        import copy

        proto = check_onnx(copy.deepcopy(model), "ModelProto")
        view = OnnxView(proto, "ModelProto")
        return _onnx_shape(view, shape), {"source": "onnx", "name": "ModelProto"}
    if not isinstance(model, str | os.PathLike):
        raise ConfigError(
            f"scan() takes a torch module, an ONNX ModelProto or a path, got {type(model).__name__}"
        )
    path = Path(model)
    info: dict[str, Any] = {"path": str(path)}
    if path.is_dir():
        card = _card(path)
        shape = shape or card.get("image_shape") or card.get("info", {}).get("image_shape")
        info["card"] = {k: card[k] for k in ("attack", "arch", "data", "benign") if k in card}
        candidates = [path / "model.safetensors", path / "model.onnx"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ModelFileError(f"{path}: no model.safetensors or model.onnx inside")
        path = found
        info["path"] = str(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    _sniff(path)
    if path.suffix.lower() == ".onnx":
        view = OnnxView(load_onnx(path), path.name)
        return _onnx_shape(view, shape), {**info, "source": "onnx", "name": path.name}
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise ModelFileError(
            f"{path}: unsupported model file type {path.suffix!r} "
            f"(known: {', '.join(MODEL_SUFFIXES)})"
        )
    from qcb_guard.models import load_model

    module = load_model(path, arch=arch)
    if shape is None:
        raise ConfigError(
            f"{path}: the input shape is unknown; pass calibration data or --input-shape C,H,W"
        )
    view = TorchView(module, check_input_shape(shape, path.name), path.name)
    arch_name = getattr(module, "qcb_arch", arch)
    return view, {**info, "source": "torch", "name": path.name, "arch": arch_name}


def _onnx_shape(view: Any, shape: tuple[int, ...] | None) -> Any:
    declared = view.input_shape
    if shape is not None:
        view.input_shape = check_input_shape(shape, view.name)
    elif declared is not None:
        view.input_shape = check_input_shape(declared, view.name)
    return view


__all__ = ["check_input_shape", "check_onnx", "load_calibration", "load_onnx", "load_view"]
