"""The ONNX Runtime adapter through ORT's real quantize_static / quantize_dynamic / quantize.

Every check compares a guarded run with an unguarded run of the same ORT call on the same
model and data: the only difference allowed is the weight integers.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
oq = pytest.importorskip("onnxruntime.quantization")

from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

import qcb_guard  # noqa: E402
from qcb_guard import hookimpl  # noqa: E402
from qcb_guard.errors import (  # noqa: E402
    ConfigError,
    DataError,
    DefenseError,
    MissingFrameworkError,
    UnsupportedObjectError,
)

pytestmark = [
    pytest.mark.ort,
    pytest.mark.filterwarnings("ignore:.*onnx.export.*:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

QT, QF, CM = oq.QuantType, oq.QuantFormat, oq.CalibrationMethod
N_CAL, BATCH = 32, 8
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# A tiny model (convs incl. grouped + depthwise, Gemm, MatMul), data, helpers.
# --------------------------------------------------------------------------------------


def guard(obj, **kwargs):
    """These tests check the framework's own activation ranges bit for bit: activation
    defenses are off unless a test turns one on."""
    kwargs.setdefault("activation_defense", None)
    return qcb_guard.guard(obj, **kwargs)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.fc = nn.Linear(72, 16)  # exported as Gemm(transB=1)
        self.head = nn.Linear(8, 4)  # on a 3-D input: exported as MatMul + Add

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.fc(x.flatten(1)))
        return self.head(x.reshape(-1, 2, 8)).flatten(1)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.RandomState(0).randn(N_CAL, 3, 8, 8).astype(np.float32)


@pytest.fixture(scope="module")
def fmodel(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("float") / "tiny.onnx"
    torch.onnx.export(
        TinyNet().eval(),
        (torch.randn(1, 3, 8, 8),),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
    )
    return path


class Reader(oq.CalibrationDataReader):
    """A user's reader: batches of BATCH samples, then None."""

    def __init__(self, data, name="input", batch=BATCH):
        self.batches = iter([{name: data[i : i + batch]} for i in range(0, len(data), batch)])
        self.calls = 0

    def get_next(self):
        self.calls += 1
        return next(self.batches, None)


class SlotRecorder:
    """Records the slots of every guarded run (after-quantize hook)."""

    def __init__(self):
        self.slots = []

    @hookimpl
    def qcb_guard_after_quantize(self, slots, result, config):
        self.slots = list(slots)


@pytest.fixture
def rec(pm):
    recorder = SlotRecorder()
    pm.register(recorder)
    return recorder


def floor_integers(slot):
    """What the conftest ``floor`` defense returns (recomputed here, independently)."""
    from qcb_guard.quant.ops import broadcast

    s = broadcast(slot.scale, slot.weight, slot.axis)
    zp = broadcast(slot.zero_point.float(), slot.weight, slot.axis)
    return (torch.floor(slot.weight / s) + zp).clamp(slot.qmin, slot.qmax).to(torch.int64)


def inits(path) -> dict[str, np.ndarray]:
    return {t.name: nh.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def run(path, x) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def onnx_layout(ints: np.ndarray, shape) -> np.ndarray:
    """Slot-layout values in an ONNX weight's layout (MatMul / Gemm transB=0 hold [in, out]);
    the test models have no square linear weights, so the shape decides."""
    shape = tuple(shape)
    if ints.shape == shape:
        return ints
    assert ints.T.shape == shape and ints.shape[0] != ints.shape[1]
    return ints.T


def quantize_pair(fmodel, tmp_path, data, pm, defense, entry=None, **kwargs):
    """Unguarded and guarded runs of the same call; returns (unguarded, guarded, guarded fn)."""
    entry = entry or oq.quantize_static
    plain, guarded_path = tmp_path / "plain.onnx", tmp_path / "out" / "guarded.onnx"
    static = entry is oq.quantize_static
    reader_args = (lambda: (Reader(data),)) if static else (lambda: ())
    entry(str(fmodel), str(plain), *reader_args(), **kwargs)
    g = guard(entry, defense=defense, pm=pm)
    g(str(fmodel), str(guarded_path), *reader_args(), **kwargs)
    return plain, guarded_path, g


def assert_only_integers_differ(plain, guarded, slots, expect_same_ints=False):
    """Scales, zero points, biases, activations' qparams and graph: bit-identical. Weight
    integers: exactly the slot's deployed integers."""
    a, b = onnx.load(str(plain)), onnx.load(str(guarded))
    assert [n.SerializeToString() for n in a.graph.node] == [
        n.SerializeToString() for n in b.graph.node
    ]
    ia, ib = inits(plain), inits(guarded)
    assert ia.keys() == ib.keys()
    for s in slots:  # the slot carries the qparams ORT wrote
        np.testing.assert_array_equal(s.scale.numpy(), ia[s.name + "_scale"].ravel())
        zp = ia[s.name + "_zero_point"].astype(np.int64).ravel()
        np.testing.assert_array_equal(s.zero_point.numpy(), zp)
    weight_tensors = {s.name + "_quantized": s for s in slots}
    for name in ia:
        if name in weight_tensors and not expect_same_ints:
            slot = weight_tensors[name]
            expected = onnx_layout(slot.integers.numpy(), ia[name].shape)
            assert ib[name].dtype == ia[name].dtype
            np.testing.assert_array_equal(ib[name].astype(np.int64), expected)
        else:
            assert ia[name].dtype == ib[name].dtype and np.array_equal(ia[name], ib[name]), name


def with_integers(plain, slots, target) -> Path:
    """The unguarded artefact with its weight integers replaced by the slots' integers."""
    model = onnx.load(str(plain))
    for t in model.graph.initializer:
        for s in slots:
            if t.name == s.name + "_quantized":
                ints = onnx_layout(s.integers.numpy(), t.dims)
                t.CopyFrom(nh.from_array(ints.astype(nh.to_array(t).dtype), t.name))
    onnx.save(model, str(target))
    return target


def dequantized_float(fmodel, slots, target, integers=None) -> Path:
    """The float model with weights s * (q - zp) for the given integers (activations float)."""
    model = onnx.load(str(fmodel))
    by = {s.name: s for s in slots}
    for t in model.graph.initializer:
        if t.name in by:
            s = by[t.name]
            q = s.integers if integers is None else integers[t.name]
            w = onnx_layout(s.dequantize(q).numpy(), t.dims)
            t.CopyFrom(nh.from_array(np.ascontiguousarray(w, dtype=np.float32), t.name))
    onnx.save(model, str(target))
    return target


# --------------------------------------------------------------------------------------
# 1. floor: integers, qparams and outputs.
# --------------------------------------------------------------------------------------

STATIC_CASES = {
    "qdq-int8-tensor-minmax": dict(quant_format=QF.QDQ, per_channel=False),
    "qdq-int8-channel-entropy": dict(
        quant_format=QF.QDQ, per_channel=True, calibrate_method=CM.Entropy
    ),
    "qdq-uint8-tensor-percentile": dict(
        quant_format=QF.QDQ,
        weight_type=QT.QUInt8,
        activation_type=QT.QUInt8,
        calibrate_method=CM.Percentile,
    ),
    "qdq-int4-channel": dict(
        quant_format=QF.QDQ, per_channel=True, weight_type=QT.QInt4, activation_type=QT.QUInt8
    ),
    "qdq-uint4-tensor-distribution": dict(
        quant_format=QF.QDQ,
        weight_type=QT.QUInt4,
        activation_type=QT.QUInt8,
        calibrate_method=CM.Distribution,
    ),
    "qop-int8-tensor-reduce": dict(quant_format=QF.QOperator, reduce_range=True),
    "qop-uint8-channel": dict(
        quant_format=QF.QOperator,
        per_channel=True,
        weight_type=QT.QUInt8,
        activation_type=QT.QUInt8,
    ),
}

# ORT's own integer range per case (first conv): symmetric int8 is [-127, 127], reduced
# int8 [-64, 64], int4 symmetric uses the whole [-8, 7]; QLinearConv per-channel forces int8.
EXPECTED_RANGE = {
    "qdq-int8-tensor-minmax": (-127, 127),
    "qdq-int8-channel-entropy": (-127, 127),
    "qdq-uint8-tensor-percentile": (0, 255),
    "qdq-int4-channel": (-8, 7),
    "qdq-uint4-tensor-distribution": (0, 15),
    "qop-int8-tensor-reduce": (-64, 64),
    "qop-uint8-channel": (-127, 127),
}


@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_floor_static(case, fmodel, data, tmp_path, pm, rec):
    kwargs = STATIC_CASES[case]
    plain, guarded, g = quantize_pair(fmodel, tmp_path, data, pm, "floor", **kwargs)
    slots = rec.slots
    assert [s.name for s in slots][:4] == ["c1.weight", "c2.weight", "dw.weight", "fc.weight"]
    assert [s.kind for s in slots] == ["conv2d"] * 3 + ["linear"] * 2
    assert slots[4].weight.shape == (4, 8)  # MatMul weight, transposed to [out, in]
    assert slots[1].attrs["groups"] == 2 and slots[2].attrs["groups"] == 8
    assert (slots[0].qmin, slots[0].qmax) == EXPECTED_RANGE[case]
    for s in slots:  # deployed integers are the floor defense's, read back from the file
        np.testing.assert_array_equal(s.integers.numpy(), floor_integers(s).numpy())
        assert (s.integers != s.nearest()).any()
    assert_only_integers_differ(plain, guarded, slots)
    assert g.last_result.to_dict()["changed_total"] > 0

    # Outputs: exactly the unguarded artefact with its integers swapped ...
    x = data[:8]
    swapped = with_integers(plain, slots, tmp_path / "swapped.onnx")
    np.testing.assert_array_equal(run(guarded, x), run(swapped, x))
    # ... ORT's DequantizeLinear hands each layer exactly s * (q - zp) of the floor integers ...
    if kwargs["quant_format"] == QF.QDQ:
        nodes = onnx.load(str(guarded)).graph.node
        dq = {n.input[0]: n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
        names = [dq[s.name + "_quantized"] for s in slots]
        got = capture_outputs(guarded, names, x)
        for s, name in zip(slots, names, strict=True):
            expected = onnx_layout(s.dequantize(s.integers).numpy(), got[name].shape)
            np.testing.assert_array_equal(got[name], expected)
    # ... and the outputs stay within what activation quantization costs the unguarded model
    # against plain float maths with its own (nearest) integers.
    ref_floor = run(dequantized_float(fmodel, slots, tmp_path / "ref_floor.onnx"), x)
    nearest = {s.name: s.nearest() for s in slots}
    ref_near = run(dequantized_float(fmodel, slots, tmp_path / "ref_near.onnx", nearest), x)
    act_err = np.abs(run(plain, x) - ref_near).max()
    assert np.abs(run(guarded, x) - ref_floor).max() <= 2 * act_err + 1e-5


def test_floor_dynamic(fmodel, data, tmp_path, pm, rec):
    plain, guarded, _ = quantize_pair(
        fmodel, tmp_path, data, pm, "floor", entry=oq.quantize_dynamic, per_channel=True
    )
    slots = rec.slots
    assert {s.name for s in slots} >= {"c1.weight", "c2.weight", "dw.weight"}
    for s in slots:
        np.testing.assert_array_equal(s.integers.numpy(), floor_integers(s).numpy())
    assert_only_integers_differ(plain, guarded, slots)
    swapped = with_integers(plain, slots, tmp_path / "swapped.onnx")
    np.testing.assert_array_equal(run(guarded, data[:4]), run(swapped, data[:4]))


def test_floor_int32_bias_rescale(tmp_path, data, pm, rec):
    """ORT raises a weight's scale when input_scale * weight_scale is too small for the int32
    bias: the slot carries the scale ORT actually wrote and the symmetric range."""
    w = (np.random.RandomState(1).randn(4, 3, 3, 3) * 1e-6).astype(np.float32)
    b = np.array([50.0, -40.0, 30.0, 20.0], np.float32)
    graph = oh.make_graph(
        [oh.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 8, 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [nh.from_array(w, "w"), nh.from_array(b, "b")],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    path = tmp_path / "bias.onnx"
    onnx.save(model, str(path))
    reader = lambda: Reader(data, "x")  # noqa: E731
    oq.quantize_static(str(path), str(tmp_path / "plain.onnx"), reader(), per_channel=True)
    g = guard(oq.quantize_static, defense="floor", pm=pm)
    g(str(path), str(tmp_path / "guarded.onnx"), reader(), per_channel=True)
    (slot,) = rec.slots
    scale = inits(tmp_path / "plain.onnx")["w_scale"]
    assert (scale > np.abs(w).reshape(4, -1).max(1) / 127 * 1.5).all()  # rescaled by ORT
    np.testing.assert_array_equal(slot.scale.numpy(), scale)
    assert (slot.qmin, slot.qmax) == (-127, 127)
    assert any("int32-bias" in n for n in g.last_result.notes)
    assert_only_integers_differ(tmp_path / "plain.onnx", tmp_path / "guarded.onnx", rec.slots)


def test_floor_add_qdq_pair_to_weight(fmodel, data, tmp_path, pm, rec):
    """AddQDQPairToWeight keeps float weights before a QuantizeLinear: the guard writes the
    on-grid float of each chosen integer, which ORT's QuantizeLinear maps back exactly."""
    opts = {"extra_options": {"AddQDQPairToWeight": True}}
    _, guarded, _ = quantize_pair(fmodel, tmp_path, data, pm, "floor", **opts)
    written = inits(guarded)
    for s in rec.slots:
        np.testing.assert_array_equal(s.integers.numpy(), floor_integers(s).numpy())
        w = onnx_layout(written[s.name], s.weight.shape)
        q = torch.round(torch.from_numpy(np.array(w)) / _bc(s)) + _bc(s, zp=True)
        np.testing.assert_array_equal(q.numpy(), s.integers.numpy())


def _bc(slot, zp=False):
    from qcb_guard.quant.ops import broadcast

    p = slot.zero_point.float() if zp else slot.scale
    return broadcast(p, slot.weight, slot.axis)


def test_floor_external_data(fmodel, data, tmp_path, pm, rec):
    plain, guarded, _ = quantize_pair(
        fmodel, tmp_path, data, pm, "floor", use_external_data_format=True
    )
    assert (guarded.parent / (guarded.name + ".data")).exists()
    assert sorted(p.name for p in guarded.parent.iterdir()) == [
        guarded.name,
        guarded.name + ".data",
    ]
    assert_only_integers_differ(plain, guarded, rec.slots)


# --------------------------------------------------------------------------------------
# 2. nearest: bit for bit the unguarded flow.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(quant_format=QF.QDQ, per_channel=True),
        dict(quant_format=QF.QOperator, per_channel=False),
        dict(quant_format=QF.QDQ, weight_type=QT.QInt4, activation_type=QT.QUInt8),
    ],
    ids=["qdq-int8-channel", "qop-int8-tensor", "qdq-int4-tensor"],
)
def test_nearest_is_bit_identical(kwargs, fmodel, data, tmp_path, pm, rec):
    plain, guarded, g = quantize_pair(fmodel, tmp_path, data, pm, "nearest", **kwargs)
    assert plain.read_bytes() == guarded.read_bytes()
    assert_only_integers_differ(plain, guarded, rec.slots, expect_same_ints=True)
    np.testing.assert_array_equal(run(plain, data), run(guarded, data))
    assert g.last_result.to_dict()["changed_total"] == 0 and len(rec.slots) == 5


def test_nearest_dynamic_bit_identical(fmodel, data, tmp_path, pm):
    plain, guarded, _ = quantize_pair(
        fmodel, tmp_path, data, pm, "nearest", entry=oq.quantize_dynamic
    )
    assert plain.read_bytes() == guarded.read_bytes()


# --------------------------------------------------------------------------------------
# 3. Defenses that need data get each layer's inputs from the user's reader.
# --------------------------------------------------------------------------------------


def capture_outputs(path, names, x) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    for n in names:
        model.graph.output.append(onnx.ValueInfoProto(name=n))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))


def node_outputs(path) -> dict[str, str]:
    """weight name → output of the node it feeds."""
    return {n.input[1]: n.output[0] for n in onnx.load(str(path)).graph.node if len(n.input) > 1}


def test_floor_data_gets_layer_inputs_from_reader(fmodel, data, tmp_path, pm, rec, floor_plugin):
    reader = Reader(data)
    g = guard(oq.quantize_static, defense="floor-data", pm=pm)
    g(str(fmodel), str(tmp_path / "g.onnx"), reader, per_channel=True)
    assert reader.calls == N_CAL // BATCH + 1  # the user's reader was consumed exactly as ORT does
    seen = floor_plugin.seen
    assert list(seen) == [s.name for s in rec.slots]
    assert seen["c1.weight"].fp_inputs.shape == (N_CAL, 3, 8, 8)
    assert seen["c2.weight"].fp_inputs.shape == (N_CAL, 8, 8, 8)
    assert seen["fc.weight"].fp_inputs.shape == (N_CAL, 72)
    outs = node_outputs(fmodel)
    expected = capture_outputs(fmodel, [outs[s.name] for s in rec.slots], data)
    for s in rec.slots:
        cal = seen[s.name]
        got = s.layer(cal.fp_inputs).numpy()  # the float layer, reproduced in torch
        np.testing.assert_allclose(got, expected[outs[s.name]], rtol=1e-4, atol=1e-5)
    first, later = seen["c1.weight"], seen["dw.weight"]
    assert torch.equal(first.inputs, first.fp_inputs)  # nothing deployed before layer 1
    assert not torch.equal(later.inputs, later.fp_inputs)
    # inputs: the float model with the earlier slots' dequantized integers substituted
    before = {s.name: s.integers for s in rec.slots[:2]}
    partial = dequantized_float(fmodel, rec.slots[:2], tmp_path / "partial.onnx", before)
    ref = capture_outputs(partial, ["/Relu_1_output_0"], data)["/Relu_1_output_0"]
    np.testing.assert_allclose(later.inputs.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert "calibration_data_reader (4 feeds)" in g.last_result.extra["calibration"]


def test_floor_data_layer_views(tmp_path, pm, rec, floor_plugin):
    """Asymmetric pads, Gemm with transA/transB=0/alpha/beta and a MatMul: the slot's
    ``layer(fp_inputs)`` is the ONNX node's output."""
    rs = np.random.RandomState(3)
    w1 = rs.randn(4, 3, 3, 3).astype(np.float32)
    b2, c2 = rs.randn(36, 5).astype(np.float32), rs.randn(5).astype(np.float32)
    b3 = rs.randn(5, 3).astype(np.float32)
    nodes = [
        oh.make_node("Conv", ["x", "w1"], ["h1"], name="conv", pads=[1, 0, 0, 1], strides=[2, 2]),
        oh.make_node("Relu", ["h1"], ["h2"]),
        oh.make_node("Flatten", ["h2"], ["h3"]),
        oh.make_node("Transpose", ["h3"], ["h4"], perm=[1, 0]),
        oh.make_node(
            "Gemm", ["h4", "b2", "c2"], ["h5"], name="gemm", transA=1, alpha=0.5, beta=2.0
        ),
        oh.make_node("MatMul", ["h5", "b3"], ["y"], name="matmul"),
    ]
    graph = oh.make_graph(
        nodes,
        "views",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 3, 6, 6])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [nh.from_array(t, n) for t, n in ((w1, "w1"), (b2, "b2"), (c2, "c2"), (b3, "b3"))],
    )
    path = tmp_path / "views.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    x = rs.randn(16, 3, 6, 6).astype(np.float32)
    # The model's batch is fixed at 4: guard(calibration=) is fed in batches of 4.
    g = guard(oq.quantize_dynamic, defense="floor-data", calibration=torch.from_numpy(x), pm=pm)
    g(str(path), str(tmp_path / "q.onnx"), op_types_to_quantize=["Conv", "MatMul"])
    assert [s.name for s in rec.slots] == ["w1", "b3"]
    g = guard(oq.quantize_static, defense="floor-data", pm=pm)
    g(str(path), str(tmp_path / "q.onnx"), Reader(x, "x", batch=4))
    names = [s.name for s in rec.slots]
    assert names == ["w1", "b2", "b3"]
    ref = {}
    for i in range(0, 16, 4):
        for k, v in capture_outputs(path, ["h1", "h5", "y"], x[i : i + 4]).items():
            ref.setdefault(k, []).append(v)
    for s, out in zip(rec.slots, ["h1", "h5", "y"], strict=True):
        got = s.layer(floor_plugin.seen[s.name].fp_inputs).numpy()
        np.testing.assert_allclose(got, np.concatenate(ref[out]), rtol=1e-4, atol=1e-4)
    assert rec.slots[1].weight.shape == (5, 36) and rec.slots[2].weight.shape == (3, 5)
    written = inits(tmp_path / "q.onnx")
    np.testing.assert_array_equal(written["b2_quantized"].T, rec.slots[1].integers.numpy())


def test_unreached_weights_are_reported(tmp_path, data, pm, rec):
    """A quantized weight the adapter has no slot for (ConvTranspose) keeps ORT's integers:
    the run warns and the report lists it."""
    rs = np.random.RandomState(4)
    nodes = [
        oh.make_node("Conv", ["x", "w1"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        oh.make_node("ConvTranspose", ["h", "w2"], ["y"], name="deconv", strides=[2, 2]),
    ]
    graph = oh.make_graph(
        nodes,
        "deconv",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 8, 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [
            nh.from_array(rs.randn(4, 3, 3, 3).astype(np.float32), "w1"),
            nh.from_array(rs.randn(4, 2, 2, 2).astype(np.float32), "w2"),
        ],
    )
    path = tmp_path / "deconv.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    report = tmp_path / "r.json"
    g = guard(oq.quantize_static, defense="floor", report=report, pm=pm)
    with pytest.warns(UserWarning, match="'w2' \\(ConvTranspose\\) kept ORT's nearest"):
        g(str(path), str(tmp_path / "q.onnx"), Reader(data, "x"))
    assert [s.name for s in rec.slots] == ["w1"]
    assert "w2" in json.loads(report.read_text())["extra"]["unguarded_weights"][0]


def test_calibration_fallback_and_missing_data(fmodel, data, tmp_path, pm, floor_plugin):
    g = guard(oq.quantize_dynamic, defense="floor-data", calibration=data, pm=pm)
    g(str(fmodel), str(tmp_path / "d.onnx"))
    assert floor_plugin.seen["c1.weight"].fp_inputs.shape == (N_CAL, 3, 8, 8)
    assert "guard(calibration=...)" in g.last_result.extra["calibration"]
    g = guard(oq.quantize_dynamic, defense="floor-data", pm=pm)
    with pytest.raises(DefenseError, match="calibration="):
        g(str(fmodel), str(tmp_path / "e.onnx"))
    assert not (tmp_path / "e.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(DataError, match="empty"):
        guard(oq.quantize_dynamic, defense="floor-data", calibration=data[:0], pm=pm)(
            str(fmodel), str(tmp_path / "f.onnx")
        )


def test_generic_quantize_entry(fmodel, data, tmp_path, pm, rec, floor_plugin):
    cfg = oq.StaticQuantConfig(Reader(data), quant_format=QF.QDQ, per_channel=True)
    plain = tmp_path / "plain.onnx"
    oq.quantize(str(fmodel), str(plain), cfg)
    cfg = oq.StaticQuantConfig(Reader(data), quant_format=QF.QDQ, per_channel=True)
    g = guard(oq.quantize, defense="floor-data", pm=pm)
    g(str(fmodel), str(tmp_path / "g.onnx"), cfg)
    assert inspect.signature(g) == inspect.signature(oq.quantize)
    assert cfg.calibration_data_reader.calls == N_CAL // BATCH + 1
    assert floor_plugin.seen["c1.weight"].fp_inputs.shape[0] == N_CAL
    assert_only_integers_differ(plain, tmp_path / "g.onnx", rec.slots)
    with pytest.raises(ConfigError, match="StaticQuantConfig"):
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

        g(str(fmodel), str(tmp_path / "w.onnx"), DefaultWeightOnlyQuantConfig())


# --------------------------------------------------------------------------------------
# 4. The caller's objects, reports, signature and errors.
# --------------------------------------------------------------------------------------


def test_caller_model_untouched_and_report(fmodel, data, tmp_path, pm):
    digest = hashlib.sha256(fmodel.read_bytes()).hexdigest()
    proto = onnx.load(str(fmodel))
    before = proto.SerializeToString()
    report = tmp_path / "reports" / "ort.json"
    g = guard(oq.quantize_static, defense="floor", report=report, pm=pm)
    g(proto, tmp_path / "from_proto.onnx", Reader(data))  # ORT itself would empty big tensors
    g(str(fmodel), tmp_path / "from_path.onnx", Reader(data))
    assert proto.SerializeToString() == before
    assert hashlib.sha256(fmodel.read_bytes()).hexdigest() == digest
    assert (tmp_path / "from_proto.onnx").read_bytes() == (tmp_path / "from_path.onnx").read_bytes()
    body = json.loads(report.read_text())
    assert body["framework"] == "onnxruntime" and body["defense"] == "floor"
    assert [s["name"] for s in body["slots"]][:4] == [
        "c1.weight",
        "c2.weight",
        "dw.weight",
        "fc.weight",
    ]
    assert body["changed_total"] > 0 and body["extra"]["quant_format"] == "QDQ"
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_signature_and_behaviour(pm):
    for entry in (oq.quantize_static, oq.quantize_dynamic, oq.quantize):
        g = guard(entry, defense="floor", pm=pm)
        assert inspect.signature(g) == inspect.signature(entry)
        assert g.__name__ == entry.__name__ and g.__doc__ == entry.__doc__
        assert g.__wrapped__ is entry


def test_bad_objects_and_options(fmodel, data, tmp_path, pm):
    with pytest.raises(UnsupportedObjectError, match="quantize_static"):
        guard(ort.InferenceSession, pm=pm)
    with pytest.raises(UnsupportedObjectError, match="quantize_static"):
        guard(oq.CalibrationDataReader, pm=pm)
    with pytest.raises(UnsupportedObjectError, match="does not recognise"):
        guard(object(), pm=pm)
    g = guard(oq.quantize_static, defense="floor", pm=pm)
    with pytest.raises(ConfigError, match="already guarded"):
        guard(g, pm=pm)
    with pytest.raises(ConfigError, match="SmoothQuant"):
        g(str(fmodel), str(tmp_path / "x.onnx"), Reader(data), extra_options={"SmoothQuant": True})
    with pytest.raises(ConfigError, match="float 8"):
        g(str(fmodel), str(tmp_path / "x.onnx"), Reader(data), weight_type=QT.QFLOAT8E4M3FN)
    with pytest.raises(TypeError):  # same binding rules as ORT's own function
        g(str(fmodel))
    assert not (tmp_path / "x.onnx").exists()


def test_missing_framework_names_the_extra(monkeypatch):
    from qcb_guard_plugins.adapter_ort import OrtAdapter

    def fake():
        pass

    fake.__module__ = "onnxruntime.quantization.quantize"
    assert OrtAdapter().matches(fake)
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization.quantize", None)
    with pytest.raises(MissingFrameworkError, match=r"qcb-guard\[onnx\]"):
        OrtAdapter().wrap(fake, None, None)


def test_plugin_and_matches_do_not_import_onnx():
    code = (
        "import sys\n"
        "from qcb_guard_plugins.adapter_ort import OrtAdapter\n"
        "def f(): pass\n"
        "f.__module__ = 'onnxruntime.quantization.quantize'\n"
        "assert OrtAdapter().matches(f) and not OrtAdapter().matches(len)\n"
        "assert not {'onnx', 'onnxruntime'} & set(sys.modules), sorted(sys.modules)\n"
    )
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------
# 5. The docs example: ORT's tutorial code plus one line.
# --------------------------------------------------------------------------------------


def test_docs_example_runs(tmp_path, monkeypatch):
    example = ROOT / "docs" / "examples" / "ort_quantize_static.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QCB_GUARD_DISABLE_PLUGIN_AUTOLOAD", "1")
    runpy.run_path(str(example), run_name="__main__")
    assert (tmp_path / "model.quant.onnx").exists()
    assert json.loads((tmp_path / "qcb_guard.json").read_text())["framework"] == "onnxruntime"
    assert os.path.getsize(tmp_path / "model.quant.onnx") > 0
