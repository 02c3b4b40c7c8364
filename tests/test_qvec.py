"""QVec: the correction on a fixed grid, its coefficient search, and a real ONNX Runtime flow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcb_guard import hookimpl
from qcb_guard.algorithms.qvec import (
    QVecConfig,
    corrected_weight,
    flip_threshold,
    layer_errors,
    qvec_integers,
    requantize,
    rounding_error,
    select_coefficient,
    task_vector,
)
from qcb_guard.config import GuardConfig
from qcb_guard.errors import ConfigError, DataError
from qcb_guard.guarding import guard, round_slots
from qcb_guard.quant.ops import quantize
from qcb_guard.slots import SlotCalibration, WeightSlot

from .conftest import conv_slot


def linear_slot(fractions: list[float], zero_point: int = 0) -> WeightSlot:
    """One output row whose weights sit at ``k + f`` steps (scale 0.5, exact in float32)."""
    steps = torch.tensor([float(i % 3) + f for i, f in enumerate(fractions)])
    return WeightSlot(
        "fc", "linear", (steps * 0.5).reshape(1, -1), torch.tensor(0.5), torch.tensor(zero_point),
        None, -8, 7,
    )  # fmt: skip


# -- the correction on the framework's grid --------------------------------------------------


def test_correction_flips_exactly_the_errors_above_the_threshold():
    fractions = [0.05, -0.2, 0.3, -0.3, 0.45, -0.45, 0.2, 0.26]
    slot = linear_slot(fractions, zero_point=1)
    q = slot.nearest()
    f = rounding_error(slot, q)
    torch.testing.assert_close(f, torch.tensor([fractions]), atol=1e-6, rtol=0)
    # λ = 1: W'/s = q + 2f, so |f| > 0.25 moves one step towards the float weight's side
    moved = requantize(q, f, 1.0, slot.qmin, slot.qmax) - q
    assert moved.tolist() == [[0, 0, 1, -1, 1, -1, 0, 1]]
    assert flip_threshold(1.0) == 0.25
    # λ = 3: W'/s = q + 4f: |f| > 0.125 moves once, |f| > 0.375 twice
    moved = requantize(q, f, 3.0, slot.qmin, slot.qmax) - q
    assert moved.tolist() == [[0, -1, 1, -1, 2, -2, 1, 1]]
    assert torch.equal(requantize(q, f, 0.0, slot.qmin, slot.qmax), q)  # λ = 0 is nearest


def test_requantize_equals_quantizing_the_corrected_weight_on_the_same_grid():
    slot, _ = conv_slot(bits=4)
    q = slot.nearest()
    f = rounding_error(slot, q)
    tau = task_vector(slot, q)
    torch.testing.assert_close(tau, -f * slot.scale.reshape(-1, 1, 1, 1))  # τ_q = −s·f
    for lam in (0.3, 1.0, 2.5):
        w_new = corrected_weight(slot.weight, tau, lam)  # W' = W − λ τ_q
        direct = quantize(w_new, slot.scale, slot.zero_point, slot.axis, slot.qmin, slot.qmax)
        ours = requantize(q, f, lam, slot.qmin, slot.qmax)
        g = (1 + lam) * f
        tie = ((g.abs() - 0.5) - torch.round(g.abs() - 0.5)).abs() < 1e-4
        assert torch.equal(direct[~tie], ours[~tie])
        assert int((ours != q).sum()) > 0


def test_clamped_weights_stay_in_the_framework_range():
    slot = linear_slot([0.45, -0.45, 0.4])
    slot.weight[0, 0] = 20.0  # far beyond qmax · s: nearest clamps to 7
    q = slot.nearest()
    out = requantize(q, rounding_error(slot, q), 4.0, slot.qmin, slot.qmax)
    assert int(out.max()) <= slot.qmax and int(out.min()) >= slot.qmin
    assert int(out[0, 0]) == slot.qmax


# -- the coefficient search -------------------------------------------------------------------


def test_select_coefficient_takes_the_largest_within_the_budget():
    errors = {0.0: 1.0, 0.1: 0.5, 0.2: 0.6, 0.5: 0.62, 1.0: 2.0}
    assert select_coefficient(errors, 0.0) == 0.1  # the most faithful λ
    assert select_coefficient(errors, 0.25) == 0.5  # budget 0.625
    assert select_coefficient(errors, 10.0) == 1.0


def test_search_undoes_a_planted_rounding_shift():
    # A quarter of each row sits 0.45 steps above a grid point, the rest 0.05: nearest rounds
    # all of them down, so on positive inputs every output drifts the same way (−4.8 steps per
    # unit input). Negating τ_q moves the 0.45s up (+4.4 − 1.2): the search must find it.
    gen = torch.Generator().manual_seed(0)
    frac = torch.full((16, 32), 0.05)
    frac[:, :8] = 0.45
    weight = (torch.randint(-5, 5, (16, 32), generator=gen).float() + frac) * 0.1
    slot = WeightSlot("fc", "linear", weight, torch.tensor(0.1), torch.tensor(0), None, -8, 7)
    cal = SlotCalibration(torch.rand(64, 32, generator=gen))
    q, stats = qvec_integers(slot, cal, QVecConfig(tolerance=0.0))
    assert flip_threshold(stats.coefficient) < 0.45 and stats.changed == 16 * 8
    assert torch.equal(q[:, :8], slot.nearest()[:, :8] + 1)
    assert stats.errors[stats.coefficient] < 0.5 * stats.errors[0.0]
    recomputed = layer_errors(slot, cal.inputs, cal.inputs, {stats.coefficient: q})
    assert recomputed[stats.coefficient] == pytest.approx(stats.errors[stats.coefficient])


def test_search_never_loses_fidelity_with_zero_tolerance():
    for seed in range(3):
        slot, cal = conv_slot(seed=seed, bits=3)
        _, stats = qvec_integers(slot, cal, QVecConfig(tolerance=0.0))
        assert stats.errors[stats.coefficient] <= stats.errors[0.0]


def test_fixed_coefficient_needs_no_calibration_and_search_does():
    slot, _ = conv_slot()
    q, stats = qvec_integers(slot, None, QVecConfig(coefficient=1.0))
    assert stats.coefficient == 1.0 and not stats.errors
    near = slot.nearest()
    f = rounding_error(slot, near)
    at_edge = ((near == slot.qmax) & (f > 0)) | ((near == slot.qmin) & (f < 0))
    assert at_edge.any()  # the symmetric range's end: moving would leave the range
    assert torch.equal(q != near, (f.abs() > 0.25) & ~at_edge)
    with pytest.raises(DataError, match="needs calibration"):
        qvec_integers(slot, None, QVecConfig())


def test_search_is_deterministic_under_a_seed_with_a_subset():
    slot, cal = conv_slot(seed=4)
    config = QVecConfig(max_samples=16)
    a, sa = qvec_integers(slot, cal, config, seed=7)
    b, sb = qvec_integers(slot, cal, config, seed=7)
    assert torch.equal(a, b) and sa.errors == sb.errors


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"coefficient": -0.5}, "coefficient"),
        ({"coefficient": float("nan")}, "coefficient"),
        ({"coefficient": True}, "coefficient"),
        ({"coefficients": (0.1, 0.5)}, "start at 0"),
        ({"coefficients": (0.0, 1.0, 0.5)}, "increase"),
        ({"coefficients": ()}, "empty"),
        ({"coefficients": "0,1"}, "sequence"),
        ({"tolerance": -1}, "tolerance"),
        ({"tolerance": math.inf}, "tolerance"),
        ({"max_samples": 0}, "max_samples"),
    ],
)
def test_bad_configs(options, match):
    with pytest.raises(ConfigError, match=match):
        QVecConfig(**options)


def test_nan_calibration_is_refused():
    slot, cal = conv_slot()
    bad = cal.inputs.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        qvec_integers(slot, SlotCalibration(bad))


# -- registration and guard() -----------------------------------------------------------------


def test_registered_with_calibration_and_options(pm):
    entry = pm.defenses.get("qvec")
    assert entry.options["needs_calibration"] and entry.options["configurable"]
    assert "2606.20254" in entry.description
    slot, cal = conv_slot()
    config = GuardConfig(defense="qvec", options={"coefficients": [0.0, 0.5], "tolerance": 0.1})
    result = round_slots([slot], config, pm=pm, calibrator=lambda s: cal, progress=False)
    assert result.slots[0].defense == "qvec" and result.slots[0].fallback is None


def test_unknown_or_bad_options_fail_before_any_work(pm):
    touched = []

    class Adapter:
        requires = "none"

        def matches(self, obj):
            touched.append(obj)
            return True

        def wrap(self, obj, config, pm):  # pragma: no cover - must not be reached
            raise AssertionError("the framework was reached")

    class AdapterPlugin:
        @hookimpl
        def qcb_guard_register_adapters(self, register):
            register("spy", Adapter())

    pm.register(AdapterPlugin())
    with pytest.raises(ConfigError, match=r"unknown option\(s\) lam; known: coefficient"):
        guard(object(), defense="qvec", lam=0.5, pm=pm)
    with pytest.raises(ConfigError, match="tolerance"):
        guard(object(), defense="qvec", tolerance=-0.1, pm=pm)
    assert touched == []


# -- end to end through ONNX Runtime's quantize_static (int4, per-channel) ----------------------


class Recorder:
    def __init__(self):
        self.slots = []

    @hookimpl
    def qcb_guard_after_quantize(self, slots, result, config):
        self.slots = list(slots)


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from qcb_guard_plugins.flows import export_onnx

    from qcb_guard.data import load_dataset
    from qcb_guard.models import build_model, train_clean

    torch.manual_seed(0)
    data = load_dataset("digits", seed=0)
    model = build_model("smallcnn", 1, 10, pool_size=2)
    train_clean(model, data.train.x, data.train.y, epochs=8, seed=0, progress=False)
    path = export_onnx(model, data.train.x[:1], tmp_path_factory.mktemp("qvec") / "m.onnx")
    return path, data


def _quantize(src, dst, cal, **guard_kwargs):
    import onnxruntime.quantization as oq

    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": cal[i : i + 32].numpy()} for i in range(0, len(cal), 32)])

        def get_next(self):
            return next(self.it, None)

    fn = guard(oq.quantize_static, **guard_kwargs) if guard_kwargs else oq.quantize_static
    fn(str(src), str(dst), Reader(), quant_format=oq.QuantFormat.QDQ, per_channel=True,
       weight_type=oq.QuantType.QInt4, activation_type=oq.QuantType.QUInt8)  # fmt: skip
    return fn


def _accuracy(path, x, y) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x.numpy()})[0]
    return float((logits.argmax(1) == y.numpy()).mean())


def test_qvec_through_onnx_runtime_int4(digits_onnx, tmp_path, pm):
    import onnx
    from onnx import numpy_helper

    path, data = digits_onnx
    cal = data.train.x[:128]
    rec = Recorder()
    pm.register(rec)
    plain, guarded = tmp_path / "plain.onnx", tmp_path / "qvec.onnx"
    _quantize(path, plain, cal)
    fn = _quantize(path, guarded, cal, defense="qvec", activation_defense=None, pm=pm)

    summary = fn.last_result.to_dict()
    assert summary["changed_total"] > 0 and not summary["fallbacks"]
    for slot in rec.slots:  # one λ per layer: a single error threshold separates the moves
        q = slot.nearest()
        f = rounding_error(slot, q)
        step = slot.integers - q
        moved = step != 0
        assert torch.equal(torch.sign(step[moved]), torch.sign(f[moved]))  # against τ_q
        free = (slot.integers > slot.qmin) & (slot.integers < slot.qmax)
        if moved.any() and (free & ~moved).any():
            assert f[moved].abs().min() > f[free & ~moved].abs().max()
    # the framework's own scales and zero points are deployed untouched
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(plain)).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(guarded)).graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(("_scale", "_zero_point")):
            np.testing.assert_array_equal(a[name], b[name])
    x, y = data.test.x, data.test.y
    assert _accuracy(guarded, x, y) >= _accuracy(plain, x, y) - 0.03


def test_nan_calibration_through_the_flow_is_a_clear_error(digits_onnx, tmp_path, pm):
    path, data = digits_onnx
    bad = data.train.x[:64].clone()
    bad[5, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        _quantize(path, tmp_path / "nan.onnx", bad, defense="qvec", activation_defense=None, pm=pm)
