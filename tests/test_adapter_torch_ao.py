"""torch.ao eager / FX / quantize_dynamic adapter, against the real torch.ao flows.

Every test runs the same flow twice on the same model and data, unguarded and guarded, and
reads the integers, scales and zero points back out of the converted modules.
"""

from __future__ import annotations

import copy
import inspect
import json
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
tq = pytest.importorskip("torch.ao.quantization")

from qcb_guard_plugins import adapter_torch_ao  # noqa: E402
from qcb_guard_plugins.adapter_torch_ao import TorchAoAdapter, TorchAoWarning  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx  # noqa: E402

import qcb_guard  # noqa: E402
from qcb_guard import hookimpl  # noqa: E402
from qcb_guard.errors import (  # noqa: E402
    ConfigError,
    DataError,
    DefenseError,
    UnsupportedObjectError,
)

from .conftest import BrokenProbe  # noqa: E402

pytestmark = [
    pytest.mark.torch_ao,
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*quantize_per_tensor:UserWarning"),
]

ROOT = Path(__file__).resolve().parents[1]


def guard(obj, **kwargs):
    """``qcb_guard.guard`` with the activation defense off unless a test asks for it: these
    tests check torch's own activation qparams bit for bit (the last section runs it)."""
    kwargs.setdefault("activation_defense", None)
    return qcb_guard.guard(obj, **kwargs)


LAYERS = ("conv1", "conv2", "fc1", "fc2")
FUSE = [["conv1", "bn1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"]]


class Net(nn.Module):
    """conv-bn-relu, grouped strided conv-relu, linear-relu, linear; 1x8x8 inputs."""

    def __init__(self, stubs: bool = True):
        super().__init__()
        self.stubs = stubs
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.bn1, self.relu1 = (
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
        )
        self.conv2, self.relu2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), nn.ReLU()
        self.fc1, self.relu3, self.fc2 = nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 10)

    def forward(self, x):
        if self.stubs:
            x = self.quant(x)
        x = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        x = self.fc2(self.relu3(self.fc1(torch.flatten(x, 1))))
        return self.dequant(x) if self.stubs else x


def make_net(stubs: bool = True) -> Net:
    torch.manual_seed(0)
    net = Net(stubs).eval()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def data():
    return torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=["x86", "qnnpack"])
def backend(request):
    """Quantized engine and matching default qconfig; restores the engine afterwards."""
    if request.param not in torch.backends.quantized.supported_engines:
        pytest.skip(f"engine {request.param} not built")
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = request.param
    yield request.param
    torch.backends.quantized.engine = old


class SlotRecorder:
    """Keeps the slots of every after-quantize call (the last one holds them all)."""

    def __init__(self):
        self.slots = []
        self.calls = 0

    @hookimpl
    def qcb_guard_after_quantize(self, slots, result, config):
        self.calls += 1
        self.slots = list(slots)


@pytest.fixture
def recorder(pm):
    rec = SlotRecorder()
    pm.register(rec)
    return rec


# ------------------------------------------------------------------------------------------
# flows, exactly as the torch tutorials write them
# ------------------------------------------------------------------------------------------


def eager_flow(model, qconfig, data):
    model.qconfig = qconfig
    fused = tq.fuse_modules(model, FUSE)
    prepared = tq.prepare(fused)
    prepared(data)
    return tq.convert(prepared)


def fx_flow(model, mapping, data):
    prepared = prepare_fx(model, mapping, (data[:1],))
    prepared(data)
    return convert_fx(prepared)


def qparams(qw):
    """(scheme, scales, zero points, axis) of a quantized weight, bit for bit."""
    if qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return (
            "channel",
            qw.q_per_channel_scales(),
            qw.q_per_channel_zero_points(),
            qw.q_per_channel_axis(),
        )
    return ("tensor", torch.tensor(qw.q_scale(), dtype=torch.float64), qw.q_zero_point(), None)


def same_qparams(a, b) -> bool:
    pa, pb = qparams(a), qparams(b)
    if pa[0] != pb[0] or pa[3] != pb[3]:
        return False
    return torch.equal(pa[1], pb[1]) and torch.equal(torch.as_tensor(pa[2]), torch.as_tensor(pb[2]))


def floor_of(pm, float_weight, qw):
    """The integers of conftest's ``floor`` defense for ``float_weight`` on ``qw``'s grid,
    computed directly (not through the adapter)."""
    _, scale, zp, axis = qparams(qw)
    slot = types.SimpleNamespace(
        weight=float_weight.detach(),
        scale=scale.to(torch.float32).reshape(-1),
        zero_point=torch.as_tensor(zp).reshape(-1),
        axis=axis,
        qmin=-128,
        qmax=127,
    )
    return pm.defenses.get("floor").obj(slot)


def with_integers(quantized, integers):
    """A copy of an unguarded artefact with its weight integers replaced (torch's own API)."""
    ref = copy.deepcopy(quantized)
    for name, q in integers.items():
        layer = ref.get_submodule(name)
        kind, scale, zp, axis = qparams(layer.weight())
        q8 = q.to(torch.int8)
        if kind == "channel":
            qw = torch._make_per_channel_quantized_tensor(q8, scale, zp, axis)
        else:
            qw = torch._make_per_tensor_quantized_tensor(q8, float(scale), zp)
        layer.set_weight_bias(qw, layer.bias())
    return ref


def fused_float_weights(model):
    """The float weights torch quantizes: conv1 with bn1 folded in (eager and FX fold alike)."""
    fused = tq.fuse_modules(copy.deepcopy(model), FUSE)
    return {name: fused.get_submodule(name)[0].weight for name in ("conv1", "conv2", "fc1")} | {
        "fc2": fused.fc2.weight
    }


def layer_io(model, data):
    """Inputs and (pre-activation) outputs of every layer of the float model."""
    taps = {"conv1": ("conv1", "bn1"), "conv2": ("conv2", "conv2")}
    taps |= {"fc1": ("fc1", "fc1"), "fc2": ("fc2", "fc2")}
    seen, handles = {}, []
    for layer, (inp, out) in taps.items():
        handles.append(
            model.get_submodule(inp).register_forward_pre_hook(
                lambda m, a, layer=layer: seen.__setitem__((layer, "in"), a[0].detach())
            )
        )
        handles.append(
            model.get_submodule(out).register_forward_hook(
                lambda m, a, o, layer=layer: seen.__setitem__((layer, "out"), o.detach())
            )
        )
    with torch.no_grad():
        model(data)
    for h in handles:
        h.remove()
    return seen


def snapshot(model):
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict(keep_vars=True).items()}


def unchanged(model, snap) -> bool:
    now = model.state_dict(keep_vars=True)
    return now.keys() == snap.keys() and all(
        torch.equal(now[k], v) and now[k].data_ptr() == ptr for k, (v, ptr) in snap.items()
    )


# ------------------------------------------------------------------------------------------
# the adapter object
# ------------------------------------------------------------------------------------------


def test_matches_without_importing_torch():
    code = (
        "import sys, qcb_guard_plugins.adapter_torch_ao as a\n"
        "class F: pass\n"
        "F.__module__, F.__qualname__ = 'torch.ao.quantization.qconfig', 'QConfig'\n"
        "def quantize_dynamic(): pass\n"
        "quantize_dynamic.__module__ = 'torch.ao.quantization.quantize'\n"
        "ad = a.TorchAoAdapter()\n"
        "assert ad.matches(F()) and ad.matches(quantize_dynamic) and not ad.matches(len)\n"
        "assert 'torch' not in sys.modules, 'the plugin imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_matches_real_objects():
    adapter = TorchAoAdapter()
    assert adapter.requires == "torchao"
    assert adapter.matches(tq.get_default_qconfig("x86"))
    assert adapter.matches(tq.get_default_qconfig_mapping("qnnpack"))
    assert adapter.matches(tq.quantize_dynamic)
    assert adapter.matches(torch.quantization.quantize_dynamic)  # legacy alias
    for other in (tq.prepare, tq.convert, prepare_fx, nn.Linear(2, 2), object(), "QConfig"):
        assert not adapter.matches(other)


def test_returns_same_kinds(pm):
    qconfig = tq.get_default_qconfig("x86")
    guarded = guard(qconfig, defense="nearest", pm=pm)
    assert type(guarded) is type(qconfig) and guarded.activation is qconfig.activation
    assert "qcb_guard" in repr(guarded.weight)
    # The default (EFRAP) needs layer inputs: the activation observer records them too,
    # and so it does for the activation defense (the prepared model's inputs, and the moment
    # convert starts).
    assert "qcb_guard[efrap]" in repr(guard(qconfig, pm=pm).activation)
    probed = qcb_guard.guard(qconfig, defense="nearest", pm=pm)
    assert "qcb_guard[nearest]" in repr(probed.activation)
    mapping = tq.get_default_qconfig_mapping("x86")
    before = mapping.to_dict()
    guarded_mapping = guard(mapping, pm=pm)
    assert type(guarded_mapping) is type(mapping)
    assert mapping.to_dict() == before  # the caller's mapping is untouched
    assert guarded_mapping.to_dict().keys() == before.keys()
    fn = guard(tq.quantize_dynamic, pm=pm)
    assert inspect.signature(fn) == inspect.signature(tq.quantize_dynamic)
    assert fn.__name__ == "quantize_dynamic" and fn.__doc__ == tq.quantize_dynamic.__doc__


def test_bad_objects_give_clear_errors(pm):
    with pytest.raises(UnsupportedObjectError, match="does not recognise"):
        guard(object(), pm=pm)
    with pytest.raises(ConfigError, match="QAT qconfigs"):
        guard(tq.get_default_qat_qconfig("x86"), pm=pm)
    with pytest.raises(ConfigError, match="no integer weight observer"):
        guard(tq.float16_dynamic_qconfig, pm=pm)
    with pytest.raises(ConfigError, match="no integer weight observer"):
        guard(tq.QConfig(activation=tq.default_observer, weight=None), pm=pm)
    with pytest.raises(ConfigError, match="already guarded"):
        guard(guard(tq.get_default_qconfig("x86"), pm=pm), pm=pm)
    with pytest.raises(ConfigError, match="already guarded"):
        guard(guard(tq.quantize_dynamic, pm=pm), pm=pm)
    with pytest.raises(ConfigError, match="takes no options"):
        guard(tq.get_default_qconfig("x86"), defense="nearest", pm=pm, bogus=1)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) bogus"):  # before any work
        guard(tq.get_default_qconfig("x86"), pm=pm, bogus=1)


# ------------------------------------------------------------------------------------------
# eager prepare / calibrate / convert
# ------------------------------------------------------------------------------------------


def test_eager_floor_deploys_floor_integers(pm, backend, data, tmp_path):
    model = make_net()
    snap = snapshot(model)
    plain = eager_flow(copy.deepcopy(model), tq.get_default_qconfig(backend), data)
    report = tmp_path / "report.json"
    qconfig = guard(tq.get_default_qconfig(backend), defense="floor", report=report, pm=pm)
    guarded = eager_flow(model, qconfig, data)

    assert unchanged(model, snap)
    weights = fused_float_weights(model)
    integers = {}
    for name in LAYERS:
        a, b = plain.get_submodule(name), guarded.get_submodule(name)
        assert same_qparams(a.weight(), b.weight()), name
        assert (a.scale, a.zero_point) == (b.scale, b.zero_point)  # activation qparams
        integers[name] = floor_of(pm, weights[name], a.weight())
        assert torch.equal(b.weight().int_repr().long(), integers[name]), name
        assert not torch.equal(a.weight().int_repr(), b.weight().int_repr())
        assert torch.equal(a.bias(), b.bias())
    assert guarded.quant.scale == plain.quant.scale
    out = guarded(data)
    assert torch.equal(out, with_integers(plain, integers)(data))
    assert not torch.equal(out, plain(data))

    rep = json.loads(report.read_text())
    assert rep["framework"] == "torch.ao" and rep["defense"] == "floor"
    assert [s["name"] for s in rep["slots"]] == [f"{n}.weight" for n in LAYERS]
    assert all(s["changed"] > 0 and s["fallback"] is None for s in rep["slots"])
    activation = rep["extra"].pop("activation_defense")
    assert rep["extra"] == {"flow": "eager", "engine": backend}
    assert activation == {"defense": None, "note": "turned off (activation_defense=None)"}


@pytest.mark.parametrize("engine", ["x86", "fbgemm", "qnnpack"])
def test_eager_nearest_is_bit_identical(pm, data, engine):
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"engine {engine} not built")
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        model = make_net()
        plain = eager_flow(copy.deepcopy(model), tq.get_default_qconfig(engine), data)
        guarded = eager_flow(
            model, guard(tq.get_default_qconfig(engine), defense="nearest", pm=pm), data
        )
        for name in LAYERS:
            a, b = plain.get_submodule(name), guarded.get_submodule(name)
            assert torch.equal(a.weight().int_repr(), b.weight().int_repr()), name
            assert same_qparams(a.weight(), b.weight())
            assert (a.scale, a.zero_point) == (b.scale, b.zero_point)
        assert torch.equal(plain(data), guarded(data))
    finally:
        torch.backends.quantized.engine = old


def test_eager_one_shot_quantize_and_inplace(pm, data):
    """``tq.quantize`` and ``prepare``/``convert`` with ``inplace=True`` deploy the same
    integers as the default flow."""
    model = make_net()
    expected = eager_flow(
        copy.deepcopy(model), guard(tq.get_default_qconfig("x86"), defense="floor", pm=pm), data
    )
    one_shot = tq.fuse_modules(copy.deepcopy(model), FUSE)
    one_shot.qconfig = guard(tq.get_default_qconfig("x86"), defense="floor", pm=pm)
    one_shot = tq.quantize(one_shot, lambda m, x: m(x), [data])
    in_place = tq.fuse_modules(copy.deepcopy(model), FUSE)
    in_place.qconfig = guard(tq.get_default_qconfig("x86"), defense="floor", pm=pm)
    tq.prepare(in_place, inplace=True)
    in_place(data)
    assert tq.convert(in_place, inplace=True) is in_place
    for name in LAYERS:
        ints = expected.get_submodule(name).weight().int_repr()
        assert torch.equal(one_shot.get_submodule(name).weight().int_repr(), ints)
        assert torch.equal(in_place.get_submodule(name).weight().int_repr(), ints)


def test_eager_float_model_reference(pm, data):
    """The guarded int8 model computes what the float model computes with the floor integers
    dequantized, up to activation quantization (measured: about one output step)."""
    model = make_net()
    guarded = eager_flow(
        copy.deepcopy(model), guard(tq.get_default_qconfig("x86"), defense="floor", pm=pm), data
    )
    sim = tq.fuse_modules(copy.deepcopy(model), FUSE)
    with torch.no_grad():
        for name in LAYERS:
            layer = sim.get_submodule(name)
            layer = layer if isinstance(layer, nn.Linear) else layer[0]
            layer.weight.copy_(guarded.get_submodule(name).weight().dequantize())
    step = guarded.fc2.scale
    assert (sim(data) - guarded(data)).abs().max() <= 1.5 * step


def test_eager_inputs_for_data_defense(pm, floor_plugin, recorder, data):
    model = make_net()
    plain = eager_flow(copy.deepcopy(model), tq.get_default_qconfig("x86"), data)
    guarded = eager_flow(
        copy.deepcopy(model),
        guard(tq.get_default_qconfig("x86"), defense="floor-data", pm=pm),
        data,
    )
    io = layer_io(model, data)
    slots = {s.name: s for s in recorder.slots}
    assert sorted(floor_plugin.seen) == sorted(slots) == sorted(f"{n}.weight" for n in LAYERS)
    for name in LAYERS:
        cal, slot = floor_plugin.seen[f"{name}.weight"], slots[f"{name}.weight"]
        assert cal.fp_inputs.shape == io[(name, "in")].shape
        assert torch.allclose(cal.fp_inputs, io[(name, "in")], atol=1e-5)
        assert torch.allclose(slot.layer(cal.fp_inputs), io[(name, "out")], atol=1e-4)
        a, b = plain.get_submodule(name).weight(), guarded.get_submodule(name).weight()
        assert same_qparams(a, b)
        assert torch.equal(b.int_repr().long(), slot.integers)
    assert torch.equal(floor_plugin.seen["conv1.weight"].fp_inputs, data)
    assert recorder.calls == len(LAYERS)  # streamed: one after-quantize call per layer


def test_eager_sample_limit_and_missing_calibration(pm, floor_plugin, data, tmp_path, monkeypatch):
    model = make_net()
    monkeypatch.setattr(adapter_torch_ao, "MAX_CALIBRATION_SAMPLES", 8)
    qconfig = guard(tq.get_default_qconfig("x86"), defense="floor-data", pm=pm)
    eager_flow(model, qconfig, data)
    assert {cal.inputs.shape[0] for cal in floor_plugin.seen.values()} == {8}

    # no calibration pass (torch itself only warns and uses default activation qparams):
    # a defense that needs data must not silently deploy nearest rounding, so convert stops
    # with an error that says what to do
    floor_plugin.seen.clear()
    model.qconfig = guard(tq.get_default_qconfig("x86"), defense="floor-data", pm=pm)
    prepared = tq.prepare(tq.fuse_modules(model, FUSE))
    with (
        pytest.warns(UserWarning, match="must run observer"),
        pytest.raises(DataError, match="no calibration inputs were recorded for layer 'conv1'"),
    ):
        tq.convert(prepared)
    assert not floor_plugin.seen


# ------------------------------------------------------------------------------------------
# FX prepare_fx / calibrate / convert_fx
# ------------------------------------------------------------------------------------------


def test_fx_floor_and_nearest(pm, backend, data, tmp_path):
    model = make_net(stubs=False)
    snap = snapshot(model)
    plain = fx_flow(copy.deepcopy(model), tq.get_default_qconfig_mapping(backend), data)
    near = fx_flow(
        model, guard(tq.get_default_qconfig_mapping(backend), defense="nearest", pm=pm), data
    )
    assert unchanged(model, snap)
    assert torch.equal(plain(data), near(data))
    report = tmp_path / "fx.json"
    mapping = guard(tq.get_default_qconfig_mapping(backend), defense="floor", pm=pm, report=report)
    guarded = fx_flow(model, mapping, data)
    assert unchanged(model, snap)  # FX shares the caller's parameters: storage given back

    weights = fused_float_weights(model)
    integers = {}
    for name in LAYERS:
        a, b, n = plain.get_submodule(name), guarded.get_submodule(name), near.get_submodule(name)
        assert torch.equal(a.weight().int_repr(), n.weight().int_repr())
        assert same_qparams(a.weight(), n.weight()) and same_qparams(a.weight(), b.weight())
        assert (a.scale, a.zero_point) == (b.scale, b.zero_point) == (n.scale, n.zero_point)
        integers[name] = floor_of(pm, weights[name], a.weight())
        assert torch.equal(b.weight().int_repr().long(), integers[name]), name
    assert torch.equal(guarded(data), with_integers(plain, integers)(data))
    rep = json.loads(report.read_text())
    assert [s["name"] for s in rep["slots"]] == [f"{n}.weight" for n in LAYERS]
    assert rep["extra"]["flow"] == "fx"


def test_fx_inputs_for_data_defense(pm, floor_plugin, recorder, data):
    model = make_net(stubs=False)
    plain = fx_flow(copy.deepcopy(model), tq.get_default_qconfig_mapping("x86"), data)
    mapping = guard(tq.get_default_qconfig_mapping("x86"), defense="floor-data", pm=pm)
    guarded = fx_flow(model, mapping, data)
    io = layer_io(model, data)
    slots = {s.name: s for s in recorder.slots}
    assert sorted(floor_plugin.seen) == sorted(f"{n}.weight" for n in LAYERS)
    for name in LAYERS:
        cal, slot = floor_plugin.seen[f"{name}.weight"], slots[f"{name}.weight"]
        assert cal.fp_inputs.shape == io[(name, "in")].shape
        assert torch.allclose(cal.fp_inputs, io[(name, "in")], atol=1e-5)
        assert torch.allclose(slot.layer(cal.fp_inputs), io[(name, "out")], atol=1e-4)
        assert same_qparams(
            plain.get_submodule(name).weight(), guarded.get_submodule(name).weight()
        )
        assert torch.equal(guarded.get_submodule(name).weight().int_repr().long(), slot.integers)


def test_fx_functional_weight_warns_and_keeps_nearest(pm, data):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.w = nn.Parameter(torch.randn(4, 72) * 0.1)

        def forward(self, x):
            return nn.functional.linear(torch.flatten(self.conv(x), 1), self.w)

    torch.manual_seed(0)
    model = Functional().eval()
    plain = fx_flow(copy.deepcopy(model), tq.get_default_qconfig_mapping("x86"), data)
    with pytest.warns(TorchAoWarning, match="functional"):
        guarded = fx_flow(
            model, guard(tq.get_default_qconfig_mapping("x86"), defense="floor", pm=pm), data
        )
    assert not torch.equal(plain.conv.weight().int_repr(), guarded.conv.weight().int_repr())
    kept = guarded._packed_weight_0.unpack()[0]  # the functional weight: nearest, as unguarded
    assert torch.equal(kept.int_repr(), plain._packed_weight_0.unpack()[0].int_repr())


@pytest.mark.parametrize(
    ("low", "high", "per_channel"), [(-127, 127, True), (-8, 7, True), (-8, 7, False)]
)
@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_narrow_weight_ranges(pm, data, low, high, per_channel, flow):
    """Observer ranges narrower than int8 ([-127, 127]; 4-bit values in int8). Eager clamps to
    the observer's range, FX does not (a [-8, 7] observer gives 8): nearest stays torch's own
    bit for bit, and the floor defense stays inside the observer's range."""
    obs = tq.PerChannelMinMaxObserver if per_channel else tq.MinMaxObserver
    scheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
    weight = obs.with_args(dtype=torch.qint8, qscheme=scheme, quant_min=low, quant_max=high)
    qconfig = tq.QConfig(
        activation=tq.HistogramObserver.with_args(reduce_range=True), weight=weight
    )
    if flow == "eager":
        model, run = make_net(), lambda q: eager_flow(copy.deepcopy(model), q, data)
        wrap = lambda q: q  # noqa: E731
    else:
        model, run = make_net(stubs=False), lambda m: fx_flow(copy.deepcopy(model), m, data)
        wrap = lambda q: tq.QConfigMapping().set_global(q)  # noqa: E731
    plain = run(wrap(qconfig))
    near = run(guard(wrap(qconfig), defense="nearest", pm=pm))
    floor = run(guard(wrap(qconfig), defense="floor", pm=pm))
    overflow = False
    for name in LAYERS:
        a, n, f = (m.get_submodule(name).weight() for m in (plain, near, floor))
        assert torch.equal(a.int_repr(), n.int_repr()) and same_qparams(a, n), name
        assert same_qparams(a, f)
        assert low <= int(f.int_repr().min()) and int(f.int_repr().max()) <= high
        overflow = overflow or int(a.int_repr().max()) > high
    assert overflow == (flow == "fx" and high == 7)  # torch's FX lowering does not clamp


# ------------------------------------------------------------------------------------------
# quantize_dynamic
# ------------------------------------------------------------------------------------------


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


@pytest.mark.parametrize("spec", [None, {nn.Linear}, "dict"])
def test_dynamic_nearest_and_floor(pm, spec, tmp_path):
    model = mlp()
    snap = snapshot(model)
    if spec == "dict":
        spec = {"0": tq.per_channel_dynamic_qconfig, "2": tq.default_dynamic_qconfig}
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(2))
    plain = tq.quantize_dynamic(model, spec, dtype=torch.qint8)
    near = guard(tq.quantize_dynamic, defense="nearest", pm=pm)(model, spec, dtype=torch.qint8)
    report = tmp_path / "dyn.json"
    floor = guard(tq.quantize_dynamic, defense="floor", report=report, pm=pm)(model, spec)
    assert unchanged(model, snap)
    assert torch.equal(plain(x), near(x))
    for i in ("0", "2"):
        a, n, f = (m.get_submodule(i).weight() for m in (plain, near, floor))
        assert torch.equal(a.int_repr(), n.int_repr()) and same_qparams(a, n)
        assert same_qparams(a, f)
        assert torch.equal(f.int_repr().long(), floor_of(pm, model.get_submodule(i).weight, a))
    rep = json.loads(report.read_text())
    assert [s["name"] for s in rep["slots"]] == ["0.weight", "2.weight"]
    assert rep["extra"]["flow"] == "dynamic"


def test_dynamic_data_defense_uses_calibration_argument(pm, floor_plugin, recorder):
    model = mlp()
    with pytest.raises(DefenseError, match="pass calibration="):
        guard(tq.quantize_dynamic, defense="floor-data", pm=pm)(model)
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(3))
    guard(tq.quantize_dynamic, defense="floor-data", calibration=x, pm=pm)(model)
    assert recorder.calls == 1  # one run: after-quantize once, with both slots
    slots = {s.name: s for s in recorder.slots}
    with torch.no_grad():
        hidden = model[1](model[0](x))
    for name, inputs in (("0.weight", x), ("2.weight", hidden)):
        cal = floor_plugin.seen[name]
        assert torch.equal(cal.fp_inputs, inputs)
        assert torch.allclose(
            slots[name].layer(cal.fp_inputs), model.get_submodule(name[0])(inputs)
        )


def test_dynamic_float16_passes_through(pm):
    with pytest.warns(TorchAoWarning, match="nothing to guard"):
        q = guard(tq.quantize_dynamic, pm=pm)(mlp(), dtype=torch.float16)
    assert type(q[0]).__name__ == "Linear" and "dynamic" in type(q[0]).__module__


# ------------------------------------------------------------------------------------------
# rounding arithmetic at fp32 ties
# ------------------------------------------------------------------------------------------


def test_ties_follow_torch_arithmetic(pm):
    """Weights on and next to the .5 boundaries: the guarded nearest is torch's bit for bit,
    although torch's rounding (w * (1/s)) differs from fp32 round(w / s) there, and floor
    integers are deployed exactly."""
    from qcb_guard.quant.ops import quantize

    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(tq.QuantStub(), nn.Linear(256, 16), tq.DeQuantStub()).eval()
    amax = torch.rand(16, generator=gen) * 0.1 + 0.01
    scale = amax / 127.5  # x86 symmetric per-channel: the observer computes the same value
    k = torch.randint(-127, 127, (16, 256), generator=gen).float()
    w = (k + 0.5) * scale[:, None]
    nudge = torch.randint(-1, 2, w.shape, generator=gen)
    w = torch.where(nudge > 0, torch.nextafter(w, w + 1), w)
    w = torch.where(nudge < 0, torch.nextafter(w, w - 1), w)
    w[:, 0] = amax
    with torch.no_grad():
        model[1].weight.copy_(w)
    x = torch.randn(8, 256, generator=gen)

    def run(qconfig):
        m = copy.deepcopy(model)
        m.qconfig = qconfig
        prepared = tq.prepare(m)
        prepared(x)
        return tq.convert(prepared)[1].weight()

    plain = run(tq.get_default_qconfig("x86"))
    near = run(guard(tq.get_default_qconfig("x86"), defense="nearest", pm=pm))
    floor = run(guard(tq.get_default_qconfig("x86"), defense="floor", pm=pm))
    assert torch.equal(plain.int_repr(), near.int_repr()) and same_qparams(plain, near)
    s = plain.q_per_channel_scales().float()
    core = quantize(w, s, torch.zeros(16, dtype=torch.int64), 0, -128, 127)
    assert (core != plain.int_repr().long()).sum() > 0  # the adapter's nearest_fn matters
    assert torch.equal(floor.int_repr().long(), floor_of(pm, w, plain))


# ------------------------------------------------------------------------------------------
# docs examples: the tutorials with one line added
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["torch_ao_eager.py", "torch_ao_fx.py"])
def test_docs_example(name, tmp_path, monkeypatch):
    path = ROOT / "docs" / "examples" / name
    lines = path.read_text().splitlines(keepends=True)
    guard_lines = [i for i, line in enumerate(lines) if "qcb_guard" in line]
    assert len(guard_lines) == 1, "the example must differ from the tutorial by one line"
    tutorial = tmp_path / "tutorial.py"
    tutorial.write_text("".join(lines[: guard_lines[0]] + lines[guard_lines[0] + 1 :]))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    guarded = runpy.run_path(str(path), run_name="__main__")
    torch.manual_seed(0)
    original = runpy.run_path(str(tutorial), run_name="__main__")
    # guard()'s default (EFRAP) chooses other integers: close to the tutorial's, not equal.
    gap = (guarded["res"] - original["res"]).abs().max()
    assert gap < 0.05 * original["res"].abs().max()
    report = json.loads(next(tmp_path.glob("torch_ao_*.json")).read_text())
    assert report["defense"] == "efrap"
    assert (gap > 0) == (report["changed_total"] > 0)  # other integers, other outputs
    for slot in report["slots"]:  # the eager tutorial calibrates on 4 images: too few, said so
        assert slot["fallback"] is None or "needs at least 8" in slot["fallback"]


# ------------------------------------------------------------------------------------------
# the activation defense: probes through the prepared model when convert starts
# ------------------------------------------------------------------------------------------

#: Planted unit 0 of ``Planted.fc1``: silent on clean images, ``REACH`` at pixel value 1.
REACH = 8.0
#: min/max activation ranges, so that "covers" is exact (x86's HistogramObserver trades a
#: lone outlier for resolution: see test_x86_histogram_ranges_grow_towards_the_probes).
MINMAX = tq.QConfig(
    activation=tq.MinMaxObserver.with_args(dtype=torch.quint8),
    weight=tq.default_per_channel_weight_observer,
)


class Planted(nn.Module):
    """A static-activation QCB in miniature: hidden unit 0 reads only the last pixel (weight
    16, bias -8), so it is silent on the clean images (pixels in [0, 0.5]) and reaches
    ``REACH`` = 8 at pixel value 1, where no other unit comes near (|w| <= 1/8 over 64
    pixels). A range calibrated on clean data clips it; the probed range must cover 8."""

    def __init__(self, stubs: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.stubs = stubs
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.fc1, self.relu, self.fc2 = nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight[0] = 0.0
            self.fc1.weight[0, 63] = 2 * REACH
            self.fc1.bias[0] = -REACH

    def forward(self, x):
        x = self.quant(x) if self.stubs else x
        x = self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))
        return self.dequant(x) if self.stubs else x


@pytest.fixture(scope="module")
def clean():
    """Clean calibration images: pixels in [0, 0.5], so unit 0 never fires."""
    return torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.5


def planted_flow(flow, qconfig, data, *, calibrate=True, prepared_hook=None):
    """The tutorial flows on the planted model, calibrated in batches of 8."""
    if flow == "eager":
        model = Planted().eval()
        model.qconfig = qconfig
        prepared = tq.prepare(tq.fuse_modules(model, [["fc1", "relu"]]))
    else:
        mapping = qconfig if isinstance(qconfig, tq.QConfigMapping) else None
        mapping = mapping or tq.QConfigMapping().set_global(qconfig)
        prepared = prepare_fx(Planted(stubs=False).eval(), mapping, (data[:1],))
    with torch.no_grad():
        for chunk in data.split(8) if calibrate else ():
            prepared(chunk)
    if prepared_hook is not None:
        prepared_hook(prepared)
    return tq.convert(prepared) if flow == "eager" else convert_fx(prepared)


def hidden_high(converted) -> float:
    """Upper end of the calibrated range of the hidden ReLU output (quint8, zero point)."""
    layer = converted.fc1  # LinearReLU: its output qparams are the hidden tensor's
    return float(layer.scale) * (255 - int(layer.zero_point))


@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_range_probe_covers_the_clipped_unit(pm, clean, flow, tmp_path):
    """Clean calibration clips unit 0; with the default activation defense torch's own
    observer range covers what unit 0 reaches, the report says what ran, and the prepared
    model the caller calibrated keeps its observers' clean state (eager convert works on a
    copy); turned off, the artefact is the unguarded one."""
    plain = planted_flow(flow, MINMAX, clean)
    off = planted_flow(flow, guard(MINMAX, defense="nearest", pm=pm), clean)
    report = tmp_path / "probed.json"
    guarded = qcb_guard.guard(MINMAX, defense="nearest", report=report, pm=pm)
    kept = []

    def keep(prepared):  # the caller's prepared model and its hidden observer's clean max
        kept.append((prepared, prepared.fc1.activation_post_process.max_val.clone()))

    probed = planted_flow(flow, guarded, clean, prepared_hook=keep if flow == "eager" else None)
    assert hidden_high(plain) < REACH / 2  # the planted unit is clipped
    assert (off.fc1.scale, off.fc1.zero_point) == (plain.fc1.scale, plain.fc1.zero_point)
    assert torch.equal(off(clean), plain(clean))
    assert REACH * 0.99 <= hidden_high(probed) <= REACH * 1.01  # torch's range covers it
    assert probed.fc2.scale >= plain.fc2.scale  # ranges only grow
    rep = json.loads(report.read_text())
    entry = rep["extra"]["activation_defense"]
    assert entry["defense"] == "range-probe" and entry["probes"] == 16  # one per hidden unit
    assert entry["calibration"] == 32 and entry["source"] == "calibration forwards (32 inputs)"
    assert rep["extra"]["flow"] == flow and entry["seconds"] >= 0
    for prepared, clean_max in kept:  # eager convert probed its own copy, not the caller's
        assert torch.equal(prepared.fc1.activation_post_process.max_val, clean_max)
        assert float(clean_max) < REACH / 2


def test_x86_histogram_ranges_grow_towards_the_probes(pm, clean):
    """x86's default qconfig observes activations with a HistogramObserver, whose
    error-minimising search may clip rare outliers: the probes widen the range, but a lone
    probe per unit is not guaranteed to be covered (the known gap, docs)."""
    plain = planted_flow("fx", tq.get_default_qconfig_mapping("x86"), clean)
    mapping = qcb_guard.guard(tq.get_default_qconfig_mapping("x86"), defense="nearest", pm=pm)
    probed = planted_flow("fx", mapping, clean)
    assert hidden_high(probed) > 1.2 * hidden_high(plain)


@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_rounding_defense_learns_from_the_users_data_only(pm, floor_plugin, clean, flow):
    """Probes only reach the activation observers: the rounding defense sees the recorded
    calibration inputs alone and deploys the same integers with and without them."""
    seen, ints = {}, {}
    for activation in (None, "range-probe"):
        floor_plugin.seen.clear()
        qconfig = qcb_guard.guard(
            MINMAX, defense="floor-data", activation_defense=activation, pm=pm
        )
        converted = planted_flow(flow, qconfig, clean)
        seen[activation] = dict(floor_plugin.seen)
        ints[activation] = [converted.get_submodule(n).weight().int_repr() for n in ("fc1", "fc2")]
    assert seen[None].keys() == seen["range-probe"].keys() == {"fc1.weight", "fc2.weight"}
    for name, cal in seen[None].items():
        assert len(cal.fp_inputs) == 32
        assert torch.equal(seen["range-probe"][name].fp_inputs, cal.fp_inputs), name
    assert all(torch.equal(a, b) for a, b in zip(ints[None], ints["range-probe"], strict=True))


def test_dynamic_flow_skips_with_the_reason(pm, tmp_path):
    report = tmp_path / "dynamic.json"
    qcb_guard.guard(tq.quantize_dynamic, defense="nearest", report=report, pm=pm)(mlp())
    entry = json.loads(report.read_text())["extra"]["activation_defense"]
    assert entry["defense"] == "range-probe" and "dynamic flow" in entry["skipped"]


def test_failing_activation_defense_warns_and_keeps_torchs_ranges(pm, clean, tmp_path):
    """Never silent: a warning, ``failed`` in the report, torch's clean ranges."""
    pm.register(BrokenProbe())
    plain = planted_flow("eager", MINMAX, clean)
    report = tmp_path / "broken.json"
    qconfig = qcb_guard.guard(
        MINMAX, defense="nearest", activation_defense="broken", report=report, pm=pm
    )
    with pytest.warns(UserWarning, match="activation defense 'broken' failed"):
        converted = planted_flow("eager", qconfig, clean)
    assert hidden_high(converted) == hidden_high(plain)
    entry = json.loads(report.read_text())["extra"]["activation_defense"]
    assert "not differentiable" in entry["failed"] and entry["probes"] == 0


def test_inputs_not_recorded_from_the_prepared_model_are_not_guessed(pm, clean, tmp_path):
    """Probes must be inputs of the model being converted: calibration through a wrapper
    (whose input is not the prepared model's) is not used, and the report says why."""
    report = tmp_path / "wrapped.json"
    qconfig = qcb_guard.guard(MINMAX, defense="nearest", report=report, pm=pm)

    def through_wrapper(prepared):
        wrapper = nn.Sequential(nn.Identity(), prepared)
        with torch.no_grad():
            wrapper(clean)

    planted_flow("eager", qconfig, clean, calibrate=False, prepared_hook=through_wrapper)
    entry = json.loads(report.read_text())["extra"]["activation_defense"]
    assert "no calibration forward through the prepared model" in entry["skipped"]
