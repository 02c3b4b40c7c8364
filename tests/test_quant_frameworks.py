"""The project's nearest rounding equals each real framework's integers exactly.

Each property draws weights whose channels span several magnitudes, and "tie" weights placed
at ``k + 0.5`` steps of the framework's own float32 scale (and at the ties of its own
arithmetic, e.g. ``(k + 0.5) / fl(1 / s)`` for torch), plus values one or two ulps either side:
the places where ``w / s`` vs ``w * (1 / s)``, float64 vs float32, or half-even vs half-away
give different integers. Frameworks are real (no mocks); each is skipped when not installed.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcb_guard.quant import (
    QuantSpec,
    compute_qparams,
    convention,
    nncf_input_high,
    quantize_nncf,
    quantize_spec,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor.*deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
]
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- weights and ties ---------------------------------------------------------------------


def nudge(x: torch.Tensor, ulps: int) -> torch.Tensor:
    """``x`` moved by ``ulps`` float32 ulps (down when negative)."""
    target = torch.full_like(x, math.inf if ulps > 0 else -math.inf)
    for _ in range(abs(ulps)):
        x = torch.nextafter(x, target)
    return x


def around(x: torch.Tensor, ulps: int = 1) -> torch.Tensor:
    """``x`` and its neighbours up to ``ulps`` ulps away, concatenated on the last dim."""
    return torch.cat([nudge(x, i) for i in range(-ulps, ulps + 1)], dim=-1)


@st.composite
def raw_weights(draw) -> torch.Tensor:
    """A (C, K) float32 weight whose channels span 1e-4 to 10 in magnitude."""
    channels, width = draw(st.integers(1, 6)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    exponent = st.sampled_from([-4, -2, -1, 0, 1])
    exponents = draw(st.lists(exponent, min_size=channels, max_size=channels))
    magnitude = np.power(10.0, np.array(exponents))[:, None]
    return torch.from_numpy((rng.uniform(-1, 1, (channels, width)) * magnitude).astype(np.float32))


def tie_block(
    amax: torch.Tensor, step: torch.Tensor, limit: int, seed: int, extra=None
) -> torch.Tensor:
    """Channels that keep their abs-max ``amax`` (column 0) and hold ties of ``step``.

    The ties ``fl((k + 0.5) * step)`` and ``fl((k + 0.5) / fl(1 / step))`` (ties of torch's
    multiply-by-inverse) with ``|k + 0.5| <= limit - 0.5``, each with its ±1-ulp neighbours,
    stay inside ``amax`` so the framework's scale does not move. ``extra(k)`` adds further
    framework-specific tie candidates (±2 ulps).
    """
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(-limit, limit, (amax.numel(), 8), generator=gen).float() + 0.5
    s = step.reshape(-1, 1).float()
    parts = [around(k * s), around(k / torch.reciprocal(s))]
    if extra is not None:
        parts.append(around(extra(k), 2))
    sign = torch.where(torch.rand(amax.numel(), 1, generator=gen) < 0.5, -1.0, 1.0)
    return torch.cat([sign * amax.reshape(-1, 1), *parts], dim=1)


def fit(ties: torch.Tensor, width: int) -> torch.Tensor:
    """``ties`` repeated along dim 1 and cut to ``width`` columns (column 0 keeps amax)."""
    return ties.repeat(1, -(-width // ties.shape[1]))[:, :width]


def asymmetric_ties(
    w: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, qmax: int, seed: int
) -> torch.Tensor:
    """Rows of ``w`` that keep their min and max (columns 0–1) and hold ties of ``step``:
    ``fl((m + 0.5) * step)`` (and the multiply-by-inverse ties) for levels ``m + zp`` inside
    ``[1, qmax - 2]`` of an unsigned grid, with ±1-ulp neighbours."""
    gen = torch.Generator().manual_seed(seed)
    zp = zero_point.reshape(-1, 1).float()
    m = torch.randint(1, qmax - 1, (w.shape[0], 8), generator=gen).float() - zp + 0.5
    s = step.reshape(-1, 1).float()
    ends = torch.stack([w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)], dim=1)
    return torch.cat([ends, around(m * s), around(m / torch.reciprocal(s))], dim=1)


def check(ours: torch.Tensor, theirs: torch.Tensor, w: torch.Tensor, what: str) -> None:
    """Exact equality, with the offending weights in the message."""
    ours, theirs = ours.to(torch.int64).reshape(w.shape), theirs.to(torch.int64).reshape(w.shape)
    bad = ours != theirs
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{w.numel()} integers differ, e.g. w={w[bad][:4].tolist()} "
        f"ours={ours[bad][:4].tolist()} theirs={theirs[bad][:4].tolist()}"
    )


# -- torch.ao (eager / FX weight observers) -------------------------------------------------


def _torch_quantize(w: torch.Tensor, observer_ctor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``convert`` deploys: the qconfig's weight observer, then ``_quantize_weight``
    (``torch.quantize_per_channel``/``_per_tensor`` clamped to the observer's range)."""
    from torch.ao.nn.quantized.modules.utils import _quantize_weight

    observer = observer_ctor()
    observer(w)
    scale, _ = observer.calculate_qparams()
    return _quantize_weight(w, observer).int_repr().to(torch.int64), scale


def _torch_observers():
    from torch.ao.quantization import (
        default_per_channel_symmetric_qnnpack_qconfig,
        default_symmetric_qnnpack_qconfig,
        get_default_qconfig,
    )

    return {
        "x86": (get_default_qconfig("x86").weight, convention("x86")),
        "fbgemm": (get_default_qconfig("fbgemm").weight, convention("fbgemm")),
        "qnnpack": (get_default_qconfig("qnnpack").weight, convention("qnnpack")),
        "xnnpack": (default_symmetric_qnnpack_qconfig.weight, convention("xnnpack")),
        "xnnpack-per-channel": (
            default_per_channel_symmetric_qnnpack_qconfig.weight,
            convention("xnnpack", axis=0),
        ),
    }


TORCH_OBSERVERS = ["x86", "fbgemm", "qnnpack", "xnnpack", "xnnpack-per-channel"]


def _torch_case(name: str, bits: int):
    """(observer constructor, our spec) for a named qconfig, or x86-style at ``bits``."""
    if bits == 8:
        return _torch_observers()[name]
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    half = 2 ** (bits - 1)
    ctor = PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-half, quant_max=half - 1
    )
    return ctor, convention("x86", bits=bits)


@PROPERTY
@given(w=raw_weights(), name=st.sampled_from(TORCH_OBSERVERS))
def test_torch_ao_random_weights(w, name):
    ctor, spec = _torch_case(name, 8)
    theirs, their_scale = _torch_quantize(w, ctor)
    ours, scale, _ = quantize_spec(w, spec)
    assert torch.equal(scale.reshape(-1), their_scale.reshape(-1))
    check(ours, theirs, w, name)


@PROPERTY
@given(
    w=raw_weights(),
    name=st.sampled_from(TORCH_OBSERVERS),
    bits=st.sampled_from([8, 8, 2, 3, 4, 5, 6, 7]),
    seed=st.integers(0, 2**31),
)
def test_torch_ao_tie_weights(w, name, bits, seed):
    ctor, spec = _torch_case(name, bits)
    if spec.axis is None:
        w = w.reshape(1, -1)  # one channel: ties under the single per-tensor scale
    amax = w.abs().amax(dim=1)
    _, step = _torch_quantize(amax.reshape(-1, 1), ctor)  # the scale torch will pick
    w = tie_block(amax, step.expand(amax.numel()), max(1, spec.qmax - 1), seed)
    theirs, their_scale = _torch_quantize(w, ctor)
    assert torch.equal(their_scale.reshape(-1), step.reshape(-1)), "ties moved the scale"
    ours, scale, _ = quantize_spec(w, spec)
    assert torch.equal(scale.reshape(-1), their_scale.reshape(-1))
    check(ours, theirs, w, f"{name} {bits}-bit ties")


def test_torch_ao_ties_need_multiply_by_inverse():
    """Why x86 uses ``rounding="multiply_inverse"``: plain ``w / s`` misses torch's ties."""
    ctor, spec = _torch_case("x86", 8)
    amax = torch.linspace(0.01, 3.0, 16)
    _, step = _torch_quantize(amax.reshape(-1, 1), ctor)
    w = tie_block(amax, step, spec.qmax - 1, seed=0)
    theirs, _ = _torch_quantize(w, ctor)
    divided, _, _ = quantize_spec(w, replace(spec, rounding="divide"))
    assert (divided != theirs).any()
    check(quantize_spec(w, spec)[0], theirs, w, "x86 ties")


def test_torch_ao_eager_convert_deploys_the_same_integers():
    """A real eager prepare/convert with the x86 qconfig, on tie-laden Conv and Linear weights."""
    from torch.ao.quantization import convert, get_default_qconfig, prepare

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.ao.quantization.QuantStub(),
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 5),
        torch.ao.quantization.DeQuantStub(),
    ).eval()
    spec = convention("x86")
    for i, layer in ((1, model[1]), (3, model[3])):
        flat = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        amax = flat.abs().amax(dim=1)
        scale, _ = compute_qparams(amax.reshape(-1, 1), spec)
        ties = fit(tie_block(amax, scale, spec.qmax - 1, seed=i), flat.shape[1])
        layer.weight.data = ties.reshape(layer.weight.shape).contiguous()
    model.qconfig = get_default_qconfig("x86")
    prepared = prepare(model)
    prepared(torch.randn(2, 3, 6, 6))
    quantized = convert(prepared)
    for i in (1, 3):
        w = model[i].weight.detach()
        deployed = quantized[i].weight()
        ours, scale, _ = quantize_spec(w, spec)
        assert torch.equal(scale, deployed.q_per_channel_scales().float())
        check(ours, deployed.int_repr(), w, f"eager convert layer {i}")


@PROPERTY
@given(w=raw_weights(), per_channel=st.booleans(), ties=st.booleans(), seed=st.integers(0, 2**31))
def test_torch_ao_asymmetric_quint8(w, per_channel, ties, seed):
    """Affine quint8 observers + ``torch.quantize_per_channel``/``_per_tensor`` (the
    activations' scheme; ``_quantize_weight`` only handles qint8 weights)."""
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    if per_channel:
        ctor = PerChannelMinMaxObserver.with_args(qscheme=torch.per_channel_affine)
    else:
        ctor = MinMaxObserver.with_args(qscheme=torch.per_tensor_affine)
        w = w.reshape(1, -1)
    # fbgemm adds the zero point before rounding: in float32 per channel, fused per tensor
    rounding = "multiply_inverse_zp" if per_channel else "fma_inverse"
    spec = QuantSpec(8, False, 0 if per_channel else None, signed=False, rounding=rounding)
    if ties:
        observer = ctor()
        observer(w)
        step, zp = observer.calculate_qparams()
        w = asymmetric_ties(w, step.expand(w.shape[0]), zp.expand(w.shape[0]), 255, seed)
    observer = ctor()
    observer(w)
    their_scale, their_zp = observer.calculate_qparams()
    if per_channel:
        q = torch.quantize_per_channel(w, their_scale, their_zp, 0, torch.quint8)
    else:
        q = torch.quantize_per_tensor(w, float(their_scale), int(their_zp), torch.quint8)
    ours, scale, zero_point = quantize_spec(w, spec)
    assert torch.equal(scale.reshape(-1), their_scale.reshape(-1))
    assert torch.equal(zero_point.reshape(-1), their_zp.reshape(-1).long())
    check(ours, q.int_repr(), w, "torch quint8 affine")


# -- ONNX Runtime ---------------------------------------------------------------------------


def _ort_quantize(w: torch.Tensor, bits: int, per_channel: bool):
    """``quantize_static``'s QDQ weight path: ``compute_data_quant_params`` per channel (or
    per tensor), then ``quantize_onnx_initializer`` (``quantize_nparray``)."""
    from onnx import TensorProto, numpy_helper
    from onnxruntime.quantization import quant_utils

    qtype = {8: TensorProto.INT8, 4: TensorProto.INT4}[bits]
    data = w.numpy()
    proto = numpy_helper.from_array(data, "W")
    if per_channel:
        params = [
            quant_utils.compute_data_quant_params(data.take(i, 0).ravel(), qtype, True)
            for i in range(data.shape[0])
        ]
        zero_point = np.asarray([p[0] for p in params])
        scale = np.asarray([p[1] for p in params])
        q = quant_utils.quantize_onnx_initializer(proto, qtype, zero_point, scale, axis=0)
    else:
        zero_point, scale = quant_utils.compute_data_quant_params(data.ravel(), qtype, True)
        q = quant_utils.quantize_onnx_initializer(proto, qtype, zero_point, scale, axis=None)
    ints = torch.from_numpy(numpy_helper.to_array(q).astype(np.int64))
    return ints, torch.from_numpy(np.asarray(scale, dtype=np.float32))


@pytest.mark.ort
@PROPERTY
@given(w=raw_weights(), bits=st.sampled_from([8, 4]), per_channel=st.booleans())
def test_onnxruntime_random_weights(w, bits, per_channel):
    pytest.importorskip("onnxruntime")
    theirs, their_scale = _ort_quantize(w, bits, per_channel)
    ours, scale, _ = quantize_spec(w, convention("ort", bits, axis=0 if per_channel else None))
    assert torch.equal(scale.reshape(-1), their_scale.reshape(-1))
    check(ours, theirs, w, f"ORT int{bits}")


@pytest.mark.ort
@PROPERTY
@given(
    w=raw_weights(),
    bits=st.sampled_from([8, 4]),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_onnxruntime_tie_weights(w, bits, per_channel, seed):
    pytest.importorskip("onnxruntime")
    spec = convention("ort", bits, axis=0 if per_channel else None)
    if not per_channel:
        w = w.reshape(1, -1)
    amax = w.abs().amax(dim=1)
    _, step = _ort_quantize(amax.reshape(-1, 1), bits, per_channel=True)
    w = tie_block(amax, step, spec.qmax - 1, seed)
    theirs, their_scale = _ort_quantize(w, bits, per_channel)
    assert torch.equal(their_scale.reshape(-1), step.reshape(-1)), "ties moved the scale"
    ours, scale, _ = quantize_spec(w, spec)
    assert torch.equal(scale.reshape(-1), their_scale.reshape(-1))
    check(ours, theirs, w, f"ORT int{bits} ties")


@pytest.mark.ort
@PROPERTY
@given(w=raw_weights(), ties=st.booleans(), seed=st.integers(0, 2**31))
def test_onnxruntime_asymmetric_uint8(w, ties, seed):
    """QUInt8 weights (asymmetric, per tensor: QDQ makes per-channel weights symmetric)."""
    from onnx import TensorProto, numpy_helper
    from onnxruntime.quantization import quant_utils

    def ort(w: torch.Tensor):
        data = w.numpy().ravel()
        zp, scale = quant_utils.compute_data_quant_params(data, TensorProto.UINT8, False)
        proto = numpy_helper.from_array(w.numpy(), "W")
        q = quant_utils.quantize_onnx_initializer(proto, TensorProto.UINT8, zp, scale, axis=None)
        return torch.from_numpy(numpy_helper.to_array(q).astype(np.int64)), scale, zp

    w = w.reshape(1, -1)
    if ties:
        _, step, zp = ort(w)
        step, zp = torch.tensor(float(step)), torch.tensor(int(zp))
        w = asymmetric_ties(w, step.reshape(1), zp.reshape(1), 255, seed)
    theirs, their_scale, their_zp = ort(w)
    spec = QuantSpec(8, False, None, signed=False, rounding="divide", qparams="ort")
    ours, scale, zero_point = quantize_spec(w, spec)
    assert float(scale) == float(their_scale) and int(zero_point) == int(their_zp)
    check(ours, theirs, w, "ORT uint8 asymmetric")


def _tiny_onnx_model(conv_w: np.ndarray, gemm_w: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["c"]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "B"], ["y"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, gemm_w.shape[0]])],
        [numpy_helper.from_array(conv_w, "W"), numpy_helper.from_array(gemm_w, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.ort
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_channel", [True, False])
def test_onnxruntime_quantize_static_deploys_the_same_integers(tmp_path, bits, per_channel):
    """One real ``quantize_static`` (QDQ) run per type and granularity on tie weights."""
    onnx = pytest.importorskip("onnx")
    ort_quant = pytest.importorskip("onnxruntime.quantization")
    from onnx import numpy_helper

    spec = convention("ort", bits, axis=0 if per_channel else None)
    gen = torch.Generator().manual_seed(bits + per_channel)
    weights = {}
    for name, shape in (("W", (4, 3, 3, 3)), ("B", (5, 64))):
        rows = shape[0] if per_channel else 1
        w = torch.randn(rows, math.prod(shape) // rows, generator=gen) * 0.3
        amax = w.abs().amax(dim=1)
        _, step = _ort_quantize(amax.reshape(-1, 1), bits, per_channel=True)
        w = fit(tie_block(amax, step, spec.qmax - 1, seed=bits), math.prod(shape) // rows)
        weights[name] = w.reshape(shape).contiguous()
    src, dst = tmp_path / "model.onnx", tmp_path / "model.q.onnx"
    onnx.save(_tiny_onnx_model(weights["W"].numpy(), weights["B"].numpy()), src)

    class Reader(ort_quant.CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)}] * 2)

        def get_next(self):
            return next(self.batches, None)

    ort_quant.quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=ort_quant.QuantFormat.QDQ,
        per_channel=per_channel,
        weight_type={8: ort_quant.QuantType.QInt8, 4: ort_quant.QuantType.QInt4}[bits],
        activation_type=ort_quant.QuantType.QUInt8,
    )
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(dst).graph.initializer}
    for name, w in weights.items():
        ours, scale, _ = quantize_spec(w, spec)
        assert torch.equal(scale.reshape(-1), torch.from_numpy(inits[f"{name}_scale"]).reshape(-1))
        theirs = torch.from_numpy(inits[f"{name}_quantized"].astype(np.int64))
        check(ours, theirs, w, f"quantize_static int{bits} {name}")


# -- NNCF (torch backend) -------------------------------------------------------------------


def _nncf_truth(w: torch.Tensor, stored_scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The level NNCF's own ``symmetric_quantize`` (its C++ CPU extension) picks for ``w``."""
    from nncf.torch.quantization.quantize_functions import symmetric_quantize

    high = 2 ** (bits - 1) - 1
    scale = stored_scale.reshape(-1, *([1] * (w.dim() - 1)))
    out = symmetric_quantize(w, 2 * high + 1, -high, high, scale, 1e-16)
    step = (scale.double().abs() + 1e-16) / high  # exact enough to read the level back
    level = out.double() / step
    assert (level - level.round()).abs().max() < 1e-3
    return level.round().to(torch.int64)


def _nncf_params(w: torch.Tensor, bits: int, half_range: bool) -> torch.Tensor:
    """``input_high`` from NNCF's own ``calculate_quantizer_parameters`` (per channel, axis 0)."""
    from nncf.common.quantization.structs import QuantizationScheme, QuantizerConfig, QuantizerGroup
    from nncf.common.tensor_statistics.statistics import MinMaxTensorStatistic
    from nncf.quantization.fake_quantize import calculate_quantizer_parameters
    from nncf.tensor import Tensor

    reduce = tuple(range(1, w.dim()))
    stats = MinMaxTensorStatistic(
        min_values=Tensor(w.amin(dim=reduce, keepdim=True)),
        max_values=Tensor(w.abs().amax(dim=reduce, keepdim=True)),
    )
    config = QuantizerConfig(
        num_bits=bits, mode=QuantizationScheme.SYMMETRIC, per_channel=True, narrow_range=True
    )
    params = calculate_quantizer_parameters(stats, config, QuantizerGroup.WEIGHTS, half_range)
    return params.input_high.data.reshape(-1)


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            [torch.nn.Conv2d(3, 6, 3), torch.nn.Conv2d(6, 5, 3), torch.nn.Linear(5 * 2 * 2, 4)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.layers[0](x))
        x = torch.relu(self.layers[1](x))
        return self.layers[2](x.flatten(1))


@pytest.fixture(scope="module")
def nncf_model():
    """One real ``nncf.quantize`` of a tiny Conv→Conv→Linear model holding tie weights.

    Returns ``({layer: (weight, quantizer)}, compiled)``. The first conv is the half-range
    layer of NNCF's default overflow fix. NNCF compiles its CPU extension on first use
    (~25 s); ``compiled`` is False where it fell back to its pure-torch functions.
    """
    nncf = pytest.importorskip("nncf")
    from nncf.torch.function_hook import get_hook_storage
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.quantization.extensions import QuantizedFunctionsCPU
    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

    torch.manual_seed(0)
    model = _TinyNet().eval()  # not nn.Sequential: NNCF adds a hook-storage child module
    for i, half in ((0, True), (1, False), (2, False)):
        layer = model.layers[i]
        flat = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        flat[1] *= 1e-3  # a near-zero filter, raised to NNCF's 1 % floor
        amax = flat.abs().amax(dim=1)
        high = nncf_input_high(flat, 0, half_range=half)
        ties = tie_block(amax, high / 127, 63 if half else 126, seed=i, extra=_nncf_tie(high, 127))
        ties = fit(ties, flat.shape[1])
        layer.weight.data = ties.reshape(layer.weight.shape).contiguous()
    data = nncf.Dataset([torch.randn(1, 3, 6, 6) for _ in range(2)])
    quantized = nncf.quantize(model, data, subset_size=2)
    quantizers = {}
    for hook_name, module in get_hook_storage(quantized).named_hooks():
        hook_type, op_name, port = decode_hook_name(hook_name)
        if hook_type == "pre_hooks" and port == 1:
            quantizers[{"/conv2d/0": 0, "/conv2d/1": 1, "/linear/0": 2}[op_name]] = module
    layers = {i: (model.layers[i].weight.detach().clone(), quantizers[i]) for i in (0, 1, 2)}
    compiled = QuantizedFunctionsCPU._loaded_namespace is not ReferenceQuantizedFunctions
    return layers, compiled


def _nncf_tie(high: torch.Tensor, level_high: int):
    """Ties of NNCF's own arithmetic: ``fl(fl((k + zp + 0.5) / s) - S)``, s = 2lh / 2S."""
    big_s = high.reshape(-1, 1)
    s = torch.full_like(big_s, 2.0 * level_high) / (2 * big_s)
    return lambda k: (k + level_high) / s - big_s


@pytest.mark.nncf
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_nncf_quantize_deploys_the_same_integers(nncf_model, layer):
    layers, compiled = nncf_model
    w, quantizer = layers[layer]
    half = layer == 0  # NNCF's default overflow fix: the first layer is half-range
    assert (quantizer.level_low, quantizer.level_high, quantizer.levels) == (-127, 127, 255)
    high = nncf_input_high(w, 0, half_range=half)
    assert torch.equal(quantizer.scale.detach().reshape(-1), high - 1e-16)
    with torch.no_grad():
        out = quantizer(w)
    step = (quantizer.scale.detach().double().abs() + 1e-16) / 127
    theirs = (out.double() / step).round().to(torch.int64)
    low, high_level = quantizer.level_low, quantizer.level_high
    ours = quantize_nncf(w, quantizer.scale.detach(), 0, low, high_level, compiled=compiled)
    check(ours, theirs, w, f"nncf.quantize layer {layer}")
    if half:
        assert int(theirs.abs().max()) <= 64  # 7-bit effective levels
    elif compiled:
        spec_ints, scale, _ = quantize_spec(w, convention("nncf"))
        check(spec_ints, theirs, w, f"nncf convention layer {layer}")
        assert torch.equal(scale, (quantizer.scale.detach().reshape(-1) + 1e-16) / 127)


@pytest.mark.nncf
@PROPERTY
@given(
    w=raw_weights(),
    bits=st.sampled_from([8, 8, 4, 2, 3, 5, 6, 7]),
    half_range=st.booleans(),
    seed=st.integers(0, 2**31),
    ties=st.booleans(),
)
def test_nncf_symmetric_quantize(nncf_model, w, bits, half_range, seed, ties):
    """NNCF's own range and fake-quantize functions, on random and tie weights."""
    compiled = nncf_model[1]  # the fixture loads NNCF and its compiled extension once
    high_level = 2 ** (bits - 1) - 1
    theirs_high = _nncf_params(w, bits, half_range)
    assert torch.equal(nncf_input_high(w, 0, half_range), theirs_high)
    if ties:
        limit = max(1, (high_level + 1) // 2 - 1) if half_range else max(1, high_level - 1)
        extra = _nncf_tie(theirs_high, high_level)
        w = tie_block(w.abs().amax(dim=1), theirs_high / high_level, limit, seed, extra)
        theirs_high = _nncf_params(w, bits, half_range)
    stored = theirs_high - 1e-16
    theirs = _nncf_truth(w, stored, bits)
    ours = quantize_nncf(w, stored, 0, -high_level, high_level, compiled=compiled)
    check(ours, theirs, w, f"nncf {bits}-bit")
    if compiled and not half_range:
        check(quantize_spec(w, convention("nncf", bits))[0], theirs, w, "nncf convention")


@pytest.mark.nncf
@PROPERTY
@given(w=raw_weights(), seed=st.integers(0, 2**31))
def test_nncf_pure_torch_fallback(nncf_model, w, seed):
    """``compiled=False`` follows NNCF's pure-torch fallback (eager ``ReferenceQuantize``)."""
    del nncf_model
    from nncf.torch.quantization.reference import torch_executor

    high = nncf_input_high(w, 0)
    w = tie_block(w.abs().amax(dim=1), high / 127, 126, seed, _nncf_tie(high, 127))
    stored = (nncf_input_high(w, 0) - 1e-16).reshape(-1, 1)
    big_s = stored.abs() + 1e-16
    low = big_s * (-127 / 127)
    out = torch_executor.forward(w.clone(), low, big_s - low, 255)
    theirs = (out.double() / (big_s.double() / 127)).round().to(torch.int64)
    check(quantize_nncf(w, stored, 0, -127, 127, compiled=False), theirs, w, "nncf fallback")
