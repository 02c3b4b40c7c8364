"""The ``pt2e`` adapter through torchao's real PT2E flow (export → prepare → calibrate → convert).

Each guarded run is compared with the same unguarded flow on the same model and data: the
weight integers in the converted graph must be the defense's, every scale and zero point the
framework's own, bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qcb_guard
from qcb_guard import hookimpl
from qcb_guard.errors import (
    ConfigError,
    DataError,
    DefenseError,
    UnsupportedObjectError,
)

pytestmark = [
    pytest.mark.torchao,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import (  # noqa: E402
    convert_pt2e,
    prepare_pt2e,
    prepare_qat_pt2e,
)
from torchao.quantization.pt2e.quantizer import (  # noqa: E402
    ComposableQuantizer,
    QuantizationSpec,
    Quantizer,
)
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "pt2e_x86.py"
BATCH, N_CAL = 8, 32
DQ_OPS = (
    torch.ops.quantized_decomposed.dequantize_per_channel.default,
    torch.ops.quantized_decomposed.dequantize_per_tensor.default,
)
Q_ACT = torch.ops.quantized_decomposed.quantize_per_tensor.default


def guard(obj, **kwargs):
    """These tests check the framework's own activation ranges bit for bit: activation
    defenses are off unless a test turns one on."""
    kwargs.setdefault("activation_defense", None)
    return qcb_guard.guard(obj, **kwargs)


class Net(nn.Module):
    """Conv+BN (folded by prepare_pt2e), a strided grouped conv, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.max_pool2d(x, 2)
        x = torch.relu(self.c2(x))
        return self.fc(x.flatten(1))


def x86_default() -> Quantizer:
    return xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())


def x86_int4() -> Quantizer:
    """A custom 4-bit per-channel symmetric weight spec (int8 storage, range [-8, 7])."""
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-8,
        quant_max=7,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        observer_or_fake_quant_ctr=PerChannelMinMaxObserver,
    )
    config = dataclasses.replace(xiq.get_default_x86_inductor_quantization_config(), weight=weight)
    return xiq.X86InductorQuantizer().set_global(config)


def xnnpack_per_tensor() -> Quantizer:
    """XNNPACK-style symmetric int8 [-127, 127], per-tensor weights (torchao's test copy)."""
    xnn = pytest.importorskip("torchao.testing.pt2e._xnnpack_quantizer")
    return xnn.XNNPACKQuantizer().set_global(
        xnn.get_symmetric_quantization_config(is_per_channel=False)
    )


QUANTIZERS = {"x86": x86_default, "x86-int4": x86_int4, "xnnpack-per-tensor": xnnpack_per_tensor}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randn(N_CAL, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def prepare(model, quantizer, data, *, calibrate=True):
    exported = torch.export.export(model, (data[:BATCH],)).module()
    prepared = prepare_pt2e(exported, quantizer)
    if calibrate:
        for start in range(0, len(data), BATCH):  # the user's own calibration loop
            prepared(data[start : start + BATCH])
    return prepared


def run_flow(model, quantizer, data, **convert_kwargs):
    return convert_pt2e(prepare(model, quantizer, data), **convert_kwargs)


@pytest.fixture(scope="module")
def unguarded(model, data):
    """The unguarded flow's converted model, per quantizer (computed once)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = run_flow(model, QUANTIZERS[name](), data)
        return cache[name]

    return get


def weight_layers(converted) -> list[dict]:
    """Per Conv/Linear node in graph order: the int8 constant and its dequantize args."""
    layers = []
    for node in converted.graph.nodes:
        if node.op != "call_function" or node.target not in (
            torch.ops.aten.conv2d.default,
            torch.ops.aten.linear.default,
        ):
            continue
        dq = node.args[1]
        assert dq.target in DQ_OPS, f"{node.name}: weight is not dequantized from a constant"
        const = dq.args[0]
        assert const.op == "get_attr"

        def value(arg):
            return getattr(converted, arg.target) if hasattr(arg, "op") else arg

        layers.append(
            {
                "name": node.name,
                "q": getattr(converted, const.target),
                "params": [value(a) for a in dq.args[1:]],
            }
        )
    return layers


def activation_qparams(converted) -> list[tuple]:
    return [tuple(n.args[1:]) for n in converted.graph.nodes if n.target == Q_ACT]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def with_integers(converted, integers: list[torch.Tensor]):
    """A copy of an unguarded converted model whose weight constants are ``integers``."""
    clone = copy.deepcopy(converted)
    for layer, q in zip(weight_layers(clone), integers, strict=True):
        layer["q"].copy_(q)
    return clone


class SlotCapture:
    """Records the slots of every guarded run (after-quantize hook)."""

    def __init__(self) -> None:
        self.slots = []
        self.artefacts = []

    @hookimpl
    def qcb_guard_after_quantize(self, slots, result, config):
        self.slots = list(slots)
        self.artefacts.append(result)


@pytest.fixture
def capture(pm):
    plugin = SlotCapture()
    pm.register(plugin)
    yield plugin
    pm.unregister(plugin)


# --------------------------------------------------------------------------------------
# 1. floor: the defense's integers are deployed; the framework's qparams are untouched.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_floor_integers_deployed_with_framework_qparams(name, model, data, unguarded, pm, capture):
    reference = unguarded(name)
    guarded = run_flow(model, guard(QUANTIZERS[name](), defense="floor", pm=pm), data)
    ref_layers, got_layers = weight_layers(reference), weight_layers(guarded)
    floor = pm.defenses.get("floor").obj
    assert [s.name for s in capture.slots] == ["c1.weight", "c2.weight", "fc.weight"]
    assert len(ref_layers) == len(got_layers) == len(capture.slots) == 3
    for slot, ref, got in zip(capture.slots, ref_layers, got_layers, strict=True):
        # the slot is the framework's own view: its nearest integers are the unguarded ones
        assert torch.equal(slot.nearest(), ref["q"].to(torch.int64))
        expected = floor(slot, None)
        assert torch.equal(got["q"].to(torch.int64), expected), slot.name
        assert got["q"].dtype == ref["q"].dtype
        assert not torch.equal(got["q"], ref["q"])  # floor really differs from nearest
        assert int(expected.min()) >= slot.qmin and int(expected.max()) <= slot.qmax
        assert all(same(a, b) for a, b in zip(ref["params"], got["params"], strict=True))
        scale = torch.as_tensor(ref["params"][0], dtype=torch.float32).reshape(-1)
        assert torch.equal(slot.scale, scale)
    assert activation_qparams(guarded) == activation_qparams(reference)
    # outputs: the unguarded artefact with the floor integers swapped in, bit for bit
    expected_model = with_integers(reference, [g["q"] for g in got_layers])
    x = data[:BATCH]
    assert torch.equal(guarded(x), expected_model(x))
    assert not torch.equal(guarded(x), reference(x))


def test_int4_range_and_manual_layer_maths(model, data, pm, capture):
    """4-bit spec: integers stay in [-8, 7]; the first conv recomputed by hand (plain torch:
    activation quantize/dequantize with the graph's qparams, weights s·(q−zp)) matches."""
    guarded = run_flow(model, guard(x86_int4(), defense="floor", pm=pm), data)
    layers = weight_layers(guarded)
    assert all(-8 <= int(lay["q"].min()) and int(lay["q"].max()) <= 7 for lay in layers)
    slot, x = capture.slots[0], data[:BATCH]
    scale, zp = activation_qparams(guarded)[0][:2]
    xq = (torch.clamp(torch.round(x * (1.0 / scale)) + zp, 0, 255) - zp) * scale
    manual = torch.relu(slot.layer(xq, slot.dequantize(layers[0]["q"].to(torch.int64))))
    torch.testing.assert_close(_first_relu(guarded, x), manual, rtol=0, atol=1e-5)


def _first_relu(module, x):
    """Run ``module`` (a converted graph) and return its first ReLU output."""
    values = {}
    interp = torch.fx.Interpreter(module)
    original = interp.run_node

    def run_node(n):
        result = original(n)
        if n.target == torch.ops.aten.relu.default and "relu" not in values:
            values["relu"] = result
        return result

    interp.run_node = run_node
    interp.run(x)
    return values["relu"]


# --------------------------------------------------------------------------------------
# 2. nearest: bit-identical to the unguarded flow.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x86", "xnnpack-per-tensor"])
def test_nearest_is_bit_identical(name, model, data, unguarded, pm):
    reference = unguarded(name)
    guarded = run_flow(model, guard(QUANTIZERS[name](), defense="nearest", pm=pm), data)
    assert guarded.code == reference.code
    ref_state = dict(reference.named_buffers()) | dict(reference.named_parameters())
    got_state = dict(guarded.named_buffers()) | dict(guarded.named_parameters())
    assert ref_state.keys() == got_state.keys()
    assert all(same(ref_state[k], got_state[k]) for k in ref_state)
    assert activation_qparams(guarded) == activation_qparams(reference)
    assert torch.equal(guarded(data[:BATCH]), reference(data[:BATCH]))
    assert not any(type(m).__module__.startswith("qcb_guard") for m in guarded.modules())


# --------------------------------------------------------------------------------------
# 3. data-driven defenses: the user's own calibration, guard(calibration=...) as fallback.
# --------------------------------------------------------------------------------------


def float_layer_outputs(model, data) -> dict[str, torch.Tensor]:
    """Outputs of conv1+BN (what the folded conv computes), conv2 and fc in the float model."""
    outputs, handles = {}, []
    for name, module in (("c1.weight", model.bn), ("c2.weight", model.c2), ("fc.weight", model.fc)):
        handles.append(
            module.register_forward_hook(lambda m, i, o, name=name: outputs.setdefault(name, o))
        )
    try:
        with torch.no_grad():
            model(data)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def test_data_defense_gets_the_flows_calibration(model, data, pm, floor_plugin, capture, tmp_path):
    report = tmp_path / "r.json"
    quantizer = guard(x86_default(), defense="floor-data", pm=pm, report=report)
    guarded = run_flow(model, quantizer, data)
    seen = floor_plugin.seen
    assert list(seen) == ["c1.weight", "c2.weight", "fc.weight"]
    shapes = {
        "c1.weight": (N_CAL, 3, 16, 16),
        "c2.weight": (N_CAL, 8, 8, 8),
        "fc.weight": (N_CAL, 128),
    }
    expected = float_layer_outputs(model, data)
    for slot in capture.slots:
        cal = seen[slot.name]
        assert tuple(cal.fp_inputs.shape) == shapes[slot.name]
        assert torch.equal(cal.inputs, cal.fp_inputs)  # float-model inputs (documented)
        # slot.layer(fp_inputs) is the float model's layer (BN folded into c1 by prepare)
        torch.testing.assert_close(
            slot.layer(cal.fp_inputs), expected[slot.name], rtol=1e-4, atol=1e-5
        )
    assert torch.equal(seen["c1.weight"].inputs, data)
    # the recorders leave no trace: the same artefact as the data-free floor defense
    floor_run = run_flow(model, guard(x86_default(), defense="floor", pm=pm), data)
    assert guarded.code == floor_run.code

    def annotated(gm):
        return [n.name for n in gm.graph.nodes if "quantization_annotation" in n.meta]

    assert annotated(guarded) == annotated(floor_run)  # the inputs' recorder specs are gone
    a, b = dict(guarded.named_buffers()), dict(floor_run.named_buffers())
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    assert json.loads(report.read_text())["extra"]["calibration"].startswith("recorded")


def test_recording_is_capped(model, data, pm, floor_plugin):
    quantizer = guard(x86_default(), defense="floor-data", pm=pm)
    quantizer.max_calibration_samples = 12  # keeps whole batches: 2 x 8, cut to 12
    run_flow(model, quantizer, data)
    assert {c.inputs.shape[0] for c in floor_plugin.seen.values()} == {12}


def test_explicit_calibration_is_the_fallback(model, data, pm, floor_plugin, tmp_path):
    report = tmp_path / "r.json"
    quantizer = guard(
        x86_default(), defense="floor-data", pm=pm, calibration=data[:20], report=report
    )
    quantizer.max_calibration_samples = 0  # record nothing from the flow
    run_flow(model, quantizer, data)
    # whole batches of the exported (static) batch size: 2 x 8, the last 4 dropped
    assert {c.inputs.shape[0] for c in floor_plugin.seen.values()} == {16}
    assert torch.equal(floor_plugin.seen["c1.weight"].inputs, data[:16])
    assert json.loads(report.read_text())["extra"]["calibration"] == "guard(calibration=...)"


def test_data_defense_without_any_data_fails_clearly(model, data, pm):
    quantizer = guard(x86_default(), defense="floor-data", pm=pm)
    quantizer.max_calibration_samples = 0
    with pytest.raises(DefenseError, match="calibration="):
        run_flow(model, quantizer, data)


# --------------------------------------------------------------------------------------
# 4. the caller's objects, the report, the guarded quantizer's behaviour, errors.
# --------------------------------------------------------------------------------------


def test_callers_model_and_quantizer_unchanged_and_report(model, data, unguarded, pm, tmp_path):
    before = copy.deepcopy(model.state_dict())
    quantizer = x86_default()
    report = tmp_path / "out" / "pt2e.json"
    run_flow(model, guard(quantizer, defense="floor", pm=pm, report=report), data)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the same quantizer object still gives the unguarded result
    again = run_flow(model, quantizer, data)
    assert torch.equal(again(data[:BATCH]), unguarded("x86")(data[:BATCH]))
    content = json.loads(report.read_text())
    assert content["framework"] == "torchao-pt2e" and content["defense"] == "floor"
    assert [s["name"] for s in content["slots"]] == ["c1.weight", "c2.weight", "fc.weight"]
    assert content["changed_total"] > 0
    assert content["extra"]["quantizer"].endswith("X86InductorQuantizer")
    assert not list(report.parent.glob(".*.tmp"))  # atomic write left nothing behind


def test_guarded_quantizer_behaves_like_a_quantizer(model, data, pm):
    guarded = guard(xiq.X86InductorQuantizer(), defense="floor", pm=pm)
    assert isinstance(guarded, Quantizer)
    # the wrapped quantizer's own API, chained calls keep the guard
    same_obj = guarded.set_global(xiq.get_default_x86_inductor_quantization_config())
    assert same_obj is guarded
    assert guarded.get_global_quantization_config() is not None
    assert "defense='floor'" in repr(guarded)
    # deep copies of the quantizer and of the prepared model convert alike
    prepared = prepare(model, copy.deepcopy(guarded), data)
    twin = copy.deepcopy(prepared)
    a, b = convert_pt2e(prepared), convert_pt2e(twin)
    assert torch.equal(a(data[:BATCH]), b(data[:BATCH]))
    # fold_quantize=False keeps float-on-grid weights + quantize ops: same integers at run time
    unfolded = run_flow(model, guarded, data, fold_quantize=False)
    assert torch.equal(unfolded(data[:BATCH]), a(data[:BATCH]))


def test_composable_quantizer_outer_or_inner_guard(model, data, pm):
    """Guarding the ComposableQuantizer or one of its parts deploys the same integers (the
    swap happens in annotate(), which ComposableQuantizer forwards to its parts)."""
    plain = run_flow(model, guard(x86_default(), defense="floor", pm=pm), data)
    outer = run_flow(
        model, guard(ComposableQuantizer([x86_default()]), defense="floor", pm=pm), data
    )
    inner = run_flow(
        model, ComposableQuantizer([guard(x86_default(), defense="floor", pm=pm)]), data
    )
    expected = [layer["q"] for layer in weight_layers(plain)]
    for converted in (outer, inner):
        got = [layer["q"] for layer in weight_layers(converted)]
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_bad_objects_fail_clearly(model, data, pm):
    with pytest.raises(UnsupportedObjectError, match="does not recognise"):
        guard(object(), pm=pm)
    with pytest.raises(UnsupportedObjectError, match="prepare_pt2e"):
        guard(prepare_pt2e, pm=pm)
    with pytest.raises(ConfigError, match="already guarded"):
        guard(guard(x86_default(), pm=pm), pm=pm)
    with pytest.raises(DataError, match="calibration"):
        guard(x86_default(), pm=pm, calibration=[1, 2, 3])
    qat = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config(is_qat=True)
    )
    exported = torch.export.export(Net().train(), (data[:BATCH],)).module()
    with pytest.raises(UnsupportedObjectError, match="QAT"):
        prepare_qat_pt2e(exported, guard(qat, pm=pm))
    # PT2E observes weights only in forward passes: converting without one is an error
    with pytest.raises(DataError, match="observed nothing"):
        convert_pt2e(prepare(model, guard(x86_default(), pm=pm), data, calibrate=False))


def _python(code: str, cwd: Path | None = None, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_plugin_import_does_not_need_torchao():
    code = (
        "import sys\n"
        "import qcb_guard_plugins.adapter_pt2e as a\n"
        "assert 'torchao' not in sys.modules, 'imported torchao'\n"
        "assert not a.ADAPTER.matches(object())\n"
        "assert 'torchao' not in sys.modules, 'matches() imported torchao'\n"
        "sys.modules['torchao'] = None  # as if it were not installed\n"
        "from qcb_guard.config import GuardConfig\n"
        "from qcb_guard.errors import MissingFrameworkError\n"
        "try:\n"
        "    a.ADAPTER.wrap(object(), GuardConfig(), None)\n"
        "except MissingFrameworkError as exc:\n"
        "    assert 'qcb-guard[torchao]' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no MissingFrameworkError')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------------------
# torch.compile (Inductor, freezing) keeps the injected integers.
# --------------------------------------------------------------------------------------


def test_integers_survive_torch_compile(model, data, unguarded, pm):
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    guarded = run_flow(model, guard(x86_default(), defense="floor", pm=pm), data)
    x = data[:BATCH]
    eager, nearest = guarded(x), unguarded("x86")(x)
    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(guarded)(x)
    # Inductor packed the int8 constants into oneDNN int8 conv/linear kernels
    assert counters["inductor"]["qconv_weight_prepack_matcher_count"] == 2
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] == 1
    gap = (eager - nearest).abs().max()
    assert gap > 1e-3  # floor and nearest integers give visibly different outputs
    assert (compiled - eager).abs().max() < gap / 100  # compiled = guarded integers


# --------------------------------------------------------------------------------------
# 5. the docs example: the tutorial plus exactly one line.
# --------------------------------------------------------------------------------------


def _example_sources() -> tuple[str, str]:
    """The example and the tutorial it came from (the example minus its guard line)."""
    lines = EXAMPLE.read_text().splitlines(keepends=True)
    guard_lines = [i for i, line in enumerate(lines) if "qcb_guard" in line and "import" in line]
    assert len(guard_lines) == 1, "the example must differ from the tutorial by one line"
    tutorial = lines[: guard_lines[0]] + lines[guard_lines[0] + 1 :]
    assert not any("guard(" in line for line in tutorial)
    return "".join(lines), "".join(tutorial)


def _run_script(path: Path, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "TORCHINDUCTOR_FREEZING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_docs_example_runs(tmp_path):
    _example_sources()
    _run_script(EXAMPLE, tmp_path)
    report = json.loads((tmp_path / "qcb_report.json").read_text())
    assert report["framework"] == "torchao-pt2e" and report["defense"] == "efrap"
    assert [s["name"] for s in report["slots"]] == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert report["extra"]["calibration"] == "recorded from the calibration forwards"
    assert not report["fallbacks"] and report["changed_total"] > 0
