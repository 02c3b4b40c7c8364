"""Built-in real quantization flows for the evaluation harness and benchmarks.

Each flow runs a framework's own post-training quantization on a copy of a torch model the
way its tutorial does (unguarded), or with the framework object passed through
``qcb_guard.guard`` (guarded), and returns a predictor. Frameworks are imported inside the
flows only; a missing one gives ``MissingFrameworkError`` naming the extra.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcb_guard import hookimpl
from qcb_guard._compat import quiet_root_logger, require
from qcb_guard.errors import ConfigError

CALIBRATION_BATCH = 32


def _batches(calibration: torch.Tensor, size: int = CALIBRATION_BATCH) -> Iterator[torch.Tensor]:
    for start in range(0, len(calibration), size):
        yield calibration[start : start + size]


def _guarded(obj: Any, request: Any) -> Any:
    if request.defense is None:
        return obj
    from qcb_guard.guarding import guard

    return guard(obj, **request.guard_kwargs())


def _workdir(request: Any) -> Path:
    base = request.workdir
    if base is not None:
        Path(base).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="qcb_flow_", dir=base))


def export_onnx(model: nn.Module, sample: torch.Tensor, path: Path) -> Path:
    """Export with the legacy exporter (no onnxscript needed), dynamic batch, input ``input``."""
    require("onnx", "onnx")
    torch.onnx.export(
        copy.deepcopy(model).eval(),
        (sample[:1],),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def ort_static(
    model: nn.Module, calibration: torch.Tensor, request: Any
) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX Runtime ``quantize_static``: QDQ, int8 or int4 weights (per-channel by default),
    uint8 activations, MinMax calibration."""
    ort = require("onnxruntime", "onnx")
    q = require("onnxruntime.quantization", "onnx")
    work = _workdir(request)
    fp_path = export_onnx(model, calibration, work / "model.onnx")

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self._it, None)
            return None if batch is None else {"input": batch.numpy()}

        def rewind(self) -> None:
            self._it = _batches(calibration)

    weight_type = {8: q.QuantType.QInt8, 4: q.QuantType.QInt4}.get(request.bits)
    if weight_type is None:
        raise ConfigError(
            f"ONNX Runtime quantize_static has no {request.bits}-bit weight type (8 or 4)"
        )
    out = work / "model.int.onnx"
    with quiet_root_logger():
        _guarded(q.quantize_static, request)(
            str(fp_path),
            str(out),
            Reader(),
            quant_format=q.QuantFormat.QDQ,
            per_channel=request.per_channel,
            weight_type=weight_type,
            activation_type=q.QuantType.QUInt8,
        )
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda batch: torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])


def pt2e_x86(
    model: nn.Module, calibration: torch.Tensor, request: Any
) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchao PT2E with ``X86InductorQuantizer`` (default static config; 4-bit weights via a
    ``QuantizationSpec`` with range [-8, 7])."""
    require("torchao", "torchao")
    from torchao.quantization.pt2e.observer import MinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    config = xiq.get_default_x86_inductor_quantization_config()  # per-channel weights
    weight = config.weight
    if not request.per_channel:
        observer = MinMaxObserver.with_args(eps=2**-12)
        weight = replace(
            weight,
            qscheme=torch.per_tensor_symmetric,
            ch_axis=None,
            observer_or_fake_quant_ctr=observer,
        )
    if request.bits != 8:
        low = -(2 ** (request.bits - 1))
        weight = replace(weight, quant_min=low, quant_max=-low - 1)
    config = replace(config, weight=weight)
    quantizer = xiq.X86InductorQuantizer().set_global(config)
    batch = torch.export.Dim("batch", min=1, max=65536)
    sample = calibration[:CALIBRATION_BATCH]
    exported = torch.export.export(
        copy.deepcopy(model).eval(), (sample,), dynamic_shapes=({0: batch},)
    ).module()
    prepared = prepare_pt2e(exported, _guarded(quantizer, request))
    with torch.no_grad():
        for chunk in _batches(calibration):
            prepared(chunk)
    converted = convert_pt2e(prepared)
    return lambda x: converted(x)


def torch_ao_fx(
    model: nn.Module, calibration: torch.Tensor, request: Any
) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.ao FX graph mode (``prepare_fx``/``convert_fx``) with the x86 qconfig mapping;
    other bit-widths or per-tensor weights swap only the global qconfig's weight observer."""
    ao = require("torch.ao.quantization", "torchao")
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    mapping = ao.get_default_qconfig_mapping("x86")
    if request.bits != 8 or not request.per_channel:
        low = -(2 ** (request.bits - 1))
        if request.per_channel:
            weight = ao.PerChannelMinMaxObserver.with_args(
                dtype=torch.qint8,
                qscheme=torch.per_channel_symmetric,
                quant_min=low,
                quant_max=-low - 1,
            )
        else:
            weight = ao.MinMaxObserver.with_args(
                dtype=torch.qint8,
                qscheme=torch.per_tensor_symmetric,
                quant_min=low,
                quant_max=-low - 1,
            )
        mapping.set_global(ao.QConfig(activation=mapping.global_qconfig.activation, weight=weight))
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    try:
        prepared = prepare_fx(
            copy.deepcopy(model).eval(), _guarded(mapping, request), (calibration[:1],)
        )
        with torch.no_grad():
            for chunk in _batches(calibration):
                prepared(chunk)
        converted = convert_fx(prepared)
    finally:
        torch.backends.quantized.engine = engine

    def predict(x: torch.Tensor) -> torch.Tensor:
        before = torch.backends.quantized.engine
        torch.backends.quantized.engine = "x86"
        try:
            return converted(x)
        finally:
            torch.backends.quantized.engine = before

    return predict


def nncf_torch(
    model: nn.Module, calibration: torch.Tensor, request: Any
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Intel NNCF ``nncf.quantize`` on the torch backend (its defaults: 8-bit symmetric
    per-channel weights, overflow fix on the first layer, fast bias correction)."""
    nncf = require("nncf", "nncf")
    if request.bits != 8 or not request.per_channel:
        raise ConfigError("NNCF's nncf.quantize deploys 8-bit per-channel weights only")
    dataset = nncf.Dataset(list(_batches(calibration)))
    quantized = _guarded(nncf.quantize, request)(
        copy.deepcopy(model).eval(), dataset, subset_size=len(calibration)
    )
    quantized.eval()
    return lambda x: quantized(x)


@hookimpl
def qcb_guard_register_flows(register):
    register(
        "ort-static",
        ort_static,
        bits=(8, 4),
        requires="onnx",
        description="ONNX Runtime quantize_static QDQ",
    )
    register(
        "nncf-torch",
        nncf_torch,
        bits=(8,),
        requires="nncf",
        description="Intel NNCF, torch backend",
    )
    register("torch-ao-fx", torch_ao_fx, bits=(8, 6, 5, 4, 3, 2), description="torch.ao FX, x86")
    register(
        "pt2e-x86",
        pt2e_x86,
        bits=(8, 6, 5, 4, 3, 2),
        requires="torchao",
        description="torchao PT2E X86InductorQuantizer",
    )
