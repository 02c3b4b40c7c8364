"""Activation defenses in guarded static flows: ``guard()`` runs ``range-probe`` by default,
appends its probes to the data the framework's own observers calibrate on, and reports it;
``activation_defense=None`` leaves the framework's ranges bit for bit."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from qcb_guard import guard, hookimpl
from qcb_guard.activation import ActivationDefenseResult
from qcb_guard.errors import PluginError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def data():
    return torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))


class Broken:
    """An activation defense that cannot handle the model (e.g. not differentiable)."""

    @hookimpl
    def qcb_guard_register_activation_defenses(self, register):
        def broken(model, calibration, *, seed=0):
            raise RuntimeError("model is not differentiable")

        def wrong_shape(model, calibration, *, seed=0):
            return ActivationDefenseResult(inputs=torch.zeros(2, 3))

        register("broken", broken)
        register("wrong-shape", wrong_shape)


@pytest.fixture
def apm(pm):
    pm.register(Broken(), name="broken-activation")
    return pm


# -- ONNX Runtime -----------------------------------------------------------------------------
def _ort_run(model, data, tmp_path, **kwargs):
    oq = pytest.importorskip("onnxruntime.quantization")
    from qcb_guard_plugins.flows import export_onnx

    fp = export_onnx(model, data, tmp_path / "fp.onnx")

    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": data[i : i + 8].numpy()} for i in range(0, len(data), 8)])

        def get_next(self):
            return next(self.it, None)

    out = tmp_path / f"q{len(list(tmp_path.iterdir()))}.onnx"
    report = tmp_path / "report.json"
    fn = guard(oq.quantize_static, defense="nearest", report=report, **kwargs)
    fn(str(fp), str(out), Reader(), quant_format=oq.QuantFormat.QDQ)
    return out, json.loads(report.read_text())


def _activation_scales(path) -> dict[str, float]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {
        n.input[0]: float(inits[n.input[1]])
        for n in model.graph.node
        if n.op_type == "QuantizeLinear"
        and inits.get(n.input[1]) is not None
        and inits[n.input[1]].size == 1
    }


@pytest.mark.ort
def test_ort_range_probe_widens_ranges_and_is_reported(model, data, tmp_path, pm):
    plain_path, plain = _ort_run(model, data, tmp_path, activation_defense=None, pm=pm)
    probed_path, probed = _ort_run(model, data, tmp_path, pm=pm)  # the default
    entry = probed["extra"]["activation_defense"]
    assert entry["defense"] == "range-probe" and entry["probes"] > 0
    assert plain["extra"]["activation_defense"]["defense"] is None
    before, after = _activation_scales(plain_path), _activation_scales(probed_path)
    assert before.keys() == after.keys()
    assert all(after[k] >= before[k] * (1 - 1e-6) for k in before)  # ranges only grow
    assert any(after[k] > before[k] * 1.01 for k in before)  # and some really do


@pytest.mark.ort
def test_ort_failing_activation_defense_warns_and_reports(model, data, tmp_path, apm):
    with pytest.warns(UserWarning, match="activation defense 'broken' failed"):
        _, report = _ort_run(model, data, tmp_path, activation_defense="broken", pm=apm)
    assert "not differentiable" in report["extra"]["activation_defense"]["failed"]


def test_failing_activation_defense_raises_when_asked(model, data, apm):
    from qcb_guard.activation import run_activation_defense
    from qcb_guard.config import GuardConfig

    config = GuardConfig(activation_defense="broken", on_defense_error="raise")
    with pytest.raises(RuntimeError, match="not differentiable"):
        run_activation_defense(model, data, config, apm)


def test_bad_activation_defense_output_is_refused(model, data, apm):
    from qcb_guard.activation import run_activation_defense
    from qcb_guard.config import GuardConfig

    with pytest.warns(UserWarning, match="returned inputs of shape"):
        probes, entry = run_activation_defense(
            model, data, GuardConfig(activation_defense="wrong-shape"), apm
        )
    assert probes is None and "calibration data has shape" in entry["failed"]


def test_unknown_activation_defense_fails_before_any_work(pm):
    oq = pytest.importorskip("onnxruntime.quantization")
    with pytest.raises(PluginError, match="unknown activation defense 'nope'"):
        guard(oq.quantize_static, activation_defense="nope", pm=pm)


@pytest.mark.ort
def test_ort_dynamic_flow_skips_with_a_note(model, data, tmp_path, pm):
    oq = pytest.importorskip("onnxruntime.quantization")
    from qcb_guard_plugins.flows import export_onnx

    fp = export_onnx(model, data, tmp_path / "fp.onnx")
    report = tmp_path / "dyn.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard(oq.quantize_dynamic, defense="nearest", report=report, pm=pm)(
            str(fp), str(tmp_path / "dyn.onnx")
        )
    entry = json.loads(report.read_text())["extra"]["activation_defense"]
    assert entry["defense"] == "range-probe" and "dynamic flow" in entry["skipped"]


# -- torchao PT2E -----------------------------------------------------------------------------
def _pt2e_run(model, data, quantizer):
    from torch.export import export
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(export(model, (data[:8],)).module(), quantizer)
    for i in range(0, len(data), 8):
        prepared(data[i : i + 8])
    converted = convert_pt2e(prepared)
    return [
        float(n.args[1])
        for n in converted.graph.nodes
        if n.op == "call_function" and "quantize_per_tensor" in str(n.target)
    ]


@pytest.mark.torchao
def test_pt2e_range_probe_widens_ranges(model, data, tmp_path, pm):
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    def quantizer():
        q = xiq.X86InductorQuantizer()
        return q.set_global(xiq.get_default_x86_inductor_quantization_config())

    report = tmp_path / "pt2e.json"
    plain = _pt2e_run(model, data, quantizer())
    off = _pt2e_run(
        model, data, guard(quantizer(), defense="nearest", activation_defense=None, pm=pm)
    )
    probed = _pt2e_run(model, data, guard(quantizer(), defense="nearest", report=report, pm=pm))
    assert off == plain  # turned off: the framework's own ranges, bit for bit
    assert len(probed) == len(plain)
    assert all(b >= a * (1 - 1e-6) for a, b in zip(plain, probed, strict=True))
    assert any(b > a * 1.01 for a, b in zip(plain, probed, strict=True))
    entry = json.loads(report.read_text())["extra"]["activation_defense"]
    assert entry["defense"] == "range-probe" and entry["probes"] > 0
    assert np.isfinite(entry["seconds"])


def test_fill_batches_pads_with_repeats_to_a_fixed_batch():
    from qcb_guard.activation import fill_batches

    x = torch.arange(10.0).reshape(5, 2)
    padded = fill_batches(x, 4)
    assert padded.shape == (8, 2) and torch.equal(padded[:5], x)
    assert torch.equal(padded[5:], x[-1:].expand(3, 2))  # repeats: no range moves
    assert fill_batches(x, None) is x and fill_batches(x, 5) is x
