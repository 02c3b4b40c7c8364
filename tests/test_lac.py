"""LAC (layer-wise activation correction + poisoned distribution approximation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qcb_guard.algorithms.lac import (
    LACConfig,
    approximate_poisoned,
    lac_config,
    lac_integers,
    pda_targets,
    population_stats,
    sample_stats,
    stats_distance,
)
from qcb_guard.algorithms.reconstruction import ReconstructionConfig, output_error
from qcb_guard.config import GuardConfig
from qcb_guard.errors import ConfigError, DataError
from qcb_guard.guarding import round_slots
from qcb_guard.quant import QuantSpec, compute_qparams
from qcb_guard.slots import SlotCalibration, WeightSlot

from .conftest import conv_slot

FAST = ReconstructionConfig(iters=300, check_every=50, min_iters=100)


def layer_error(slot: WeightSlot, cal: SlotCalibration, q: torch.Tensor) -> float:
    with torch.no_grad():
        target = slot.layer(cal.targets_inputs)
        return float(output_error(slot.layer(cal.inputs, slot.dequantize(q)), target))


# -- the pure functions ---------------------------------------------------------------------


def test_sample_and_population_stats_are_per_channel():
    out = torch.randn(5, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 7
    m, s = sample_stats(out)
    assert m.shape == s.shape == (5, 3)
    torch.testing.assert_close(m[2, 1], out[2, 1].mean())
    torch.testing.assert_close(s[2, 1], torch.sqrt(out[2, 1].var() + 1e-6))
    mean, std = population_stats(out)
    torch.testing.assert_close(mean, out.transpose(0, 1).reshape(3, -1).mean(1))
    torch.testing.assert_close(std, torch.sqrt(out.transpose(0, 1).reshape(3, -1).var(1) + 1e-6))
    assert float(stats_distance(out, *sample_stats(out[:1]))) > 0
    same = out[:1].expand(4, -1, -1, -1)
    assert float(stats_distance(same, *(t[0] for t in sample_stats(same)))) < 1e-9


def test_pda_moves_the_statistics_towards_the_targets_inside_the_ball():
    slot, cal = conv_slot()
    mean, std = population_stats(slot.layer(cal.inputs) + 0.5)  # a shifted target
    config = LACConfig(pda_eps=0.02, pda_step_size=0.02, pda_steps=30)
    w = slot.dequantize(slot.nearest())
    x, before, after = approximate_poisoned(slot, cal.inputs, w, mean, std, config)
    assert after < before
    assert float((x - cal.inputs).abs().max()) <= 0.02 + 1e-6
    with torch.no_grad():
        assert float(stats_distance(slot.layer(x, w), mean, std)) == pytest.approx(after)


def test_pda_targets_follow_the_configured_source():
    slot, cal = conv_slot()
    source, (mean, std) = pda_targets(slot, cal.inputs, LACConfig())
    assert source == "calibration"
    torch.testing.assert_close(mean, population_stats(slot.layer(cal.inputs))[0])
    assert pda_targets(slot, cal.inputs, LACConfig(pda_stats="attrs")) is None
    assert pda_targets(slot, cal.inputs, LACConfig(pda=False)) is None
    stored, _ = conv_slot(output_mean=torch.full((8,), 0.3), output_std=torch.ones(8))
    source, (mean, std) = pda_targets(stored, cal.inputs, LACConfig(pda_stats="attrs"))
    assert torch.equal(std, torch.ones(8))
    assert source == "attrs" and torch.equal(mean, torch.full((8,), 0.3))
    assert pda_targets(stored, cal.inputs, LACConfig(pda_stats="calibration"))[0] == "calibration"


def test_bad_stored_statistics_are_a_clear_error():
    slot, cal = conv_slot(output_mean=torch.zeros(3), output_std=torch.ones(3))
    with pytest.raises(DataError, match="need 8 values"):
        pda_targets(slot, cal.inputs, LACConfig())
    slot, cal = conv_slot(output_mean=torch.zeros(8), output_std=torch.zeros(8))
    with pytest.raises(DataError, match="std > 0"):
        pda_targets(slot, cal.inputs, LACConfig())


# -- one layer --------------------------------------------------------------------------------


def test_lac_corrects_a_drifted_layer_better_than_nearest():
    """The deployed model's inputs drift from the float model's (earlier layers quantized):
    LAC re-learns the integers so that the output matches the float layer's again."""
    slot, fp = conv_slot(seed=2, bits=3)
    cal = SlotCalibration(fp.inputs * 0.8, fp_inputs=fp.inputs)
    q, stats = lac_integers(slot, cal, LACConfig(schedule=FAST))
    slot.check_integers(q, "lac")
    assert stats.steps == FAST.iters  # cosine annealing is never cut short
    assert stats.pda_source == "calibration" and stats.pda_distance[1] <= stats.pda_distance[0]
    assert stats.changed == int((q != slot.nearest()).sum()) > 0
    assert layer_error(slot, cal, q) < 0.5 * layer_error(slot, cal, slot.nearest())


def test_lac_can_move_an_integer_by_more_than_one_step():
    """Unlike floor/ceil defenses, LAC's offset is free: a channel whose float inputs are
    shifted against the deployed ones needs larger moves."""
    slot, cal = conv_slot(seed=4, bits=4)
    shifted = SlotCalibration(cal.inputs * 0.6, fp_inputs=cal.inputs)
    q, _ = lac_integers(slot, shifted, LACConfig(pda=False, schedule=FAST), seed=1)
    assert int((q - slot.nearest()).abs().max()) >= 2
    assert layer_error(slot, shifted, q) < layer_error(slot, shifted, slot.nearest())


def test_lac_is_deterministic_under_a_seed():
    slot, cal = conv_slot()
    a, _ = lac_integers(slot, cal, LACConfig(schedule=FAST), seed=3)
    b, _ = lac_integers(slot, cal, LACConfig(schedule=FAST), seed=3)
    assert torch.equal(a, b)


def test_linear_layers_get_no_pda_and_step_offsets_work():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 20, generator=gen) * 0.3
    spec = QuantSpec(bits=4)
    scale, zp = compute_qparams(weight, spec)
    slot = WeightSlot("fc", "linear", weight, scale, zp, 0, spec.qmin, spec.qmax)
    x = torch.randn(64, 20, generator=gen)
    cal = SlotCalibration(x * 0.8, fp_inputs=x)
    config = LACConfig(offset_unit="step", schedule=FAST)
    q, stats = lac_integers(slot, cal, config)
    assert stats.pda_source is None and stats.pda_distance is None
    assert layer_error(slot, cal, q) < layer_error(slot, cal, slot.nearest())


# -- configuration and bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"offset_unit": "bits"}, "offset_unit"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"pda_stats": "bn"}, "pda_stats"),
        ({"pda": "yes"}, "pda must be"),
        ({"pda_steps": 0}, "pda_steps"),
        ({"pda_eps": float("nan")}, "pda_eps"),
        ({"pda_step_size": -1.0}, "pda_step_size"),
        ({"iters": 0}, "iters"),
        ({"iterations": 5}, r"unknown option\(s\) iterations; known: .*pda_eps"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        lac_config(options)


def test_options_split_between_lac_and_the_schedule():
    config = lac_config({"pda": False, "iters": 50, "lr": 1e-2})
    assert not config.pda and config.schedule.iters == 50 and config.schedule.lr == 1e-2
    official = LACConfig.official()
    assert official.schedule.iters == 10_000 and official.lr_schedule == "constant"
    assert official.pda_stats == "attrs" and official.pda_steps == 500


def test_nan_calibration_is_a_clear_error():
    slot, cal = conv_slot()
    bad = cal.inputs.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        SlotCalibration(bad)
    cal.inputs[3, 0, 0, 0] = float("nan")  # corrupted after the calibration was built
    with pytest.raises(DataError, match="NaN"):
        lac_integers(slot, cal, LACConfig(schedule=FAST))


def test_too_little_calibration_is_a_clear_error():
    slot, cal = conv_slot()
    with pytest.raises(DataError, match="needs at least 8"):
        lac_integers(slot, SlotCalibration(cal.inputs[:3]), LACConfig(schedule=FAST))


def test_guard_options_reach_lac_and_unknown_ones_are_refused(pm):
    slot, cal = conv_slot()
    config = GuardConfig(defense="lac", options={"iters": 50, "pda_steps": 5})
    result = round_slots([slot], config, pm=pm, calibrator=lambda s: cal, progress=False)
    assert result.slots[0].defense == "lac" and result.slots[0].fallback is None
    with pytest.raises(ConfigError, match=r"unknown option\(s\) flip_weight"):
        bad = GuardConfig(defense="lac", options={"flip_weight": 5}, on_defense_error="raise")
        round_slots([slot], bad, pm=pm, calibrator=lambda s: cal, progress=False)


# -- end to end through ONNX Runtime's real quantize_static -----------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.ort
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_guard_lac_through_onnx_runtime(pm, tmp_path):
    """Unknown options fail before ORT runs; a guarded run deploys LAC's integers with ORT's
    own scales and brings the int4 model closer to the float model than nearest rounding."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    oq = pytest.importorskip("onnxruntime.quantization")
    from onnx import numpy_helper as nh

    import qcb_guard

    torch.manual_seed(0)
    model = Net().eval()
    fp_path = tmp_path / "net.onnx"
    torch.onnx.export(
        model, (torch.randn(1, 1, 4, 4),), str(fp_path), dynamo=False,
        input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "n"}},
    )  # fmt: skip
    data = np.random.RandomState(0).rand(64, 1, 4, 4).astype(np.float32)

    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": data[i : i + 16]} for i in range(0, 64, 16)])

        def get_next(self):
            return next(self.batches, None)

    kwargs = {"quant_format": oq.QuantFormat.QDQ, "weight_type": oq.QuantType.QInt4}
    with pytest.raises(ConfigError, match=r"unknown option\(s\) iterations"):
        qcb_guard.guard(
            oq.quantize_static, defense="lac", activation_defense=None, iterations=3, pm=pm
        )
    plain, guarded = tmp_path / "plain.onnx", tmp_path / "lac.onnx"
    oq.quantize_static(str(fp_path), str(plain), Reader(), **kwargs)
    g = qcb_guard.guard(
        oq.quantize_static, defense="lac", activation_defense=None, pm=pm,
        iters=300, pda_steps=10,
    )  # fmt: skip
    g(str(fp_path), str(guarded), Reader(), **kwargs)
    summary = g.last_result.to_dict()
    assert not summary["fallbacks"] and summary["changed_total"] > 0
    assert {s["defense"] for s in summary["slots"]} == {"lac"}

    def initializers(path):
        return {t.name: nh.to_array(t) for t in onnx.load(str(path)).graph.initializer}

    a, b = initializers(plain), initializers(guarded)
    assert a.keys() == b.keys()
    for name in a:  # scales, zero points and biases untouched: only integers differ
        if not name.endswith("_quantized"):
            np.testing.assert_array_equal(a[name], b[name])

    def run(path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": data})[0]

    with torch.no_grad():
        reference = model(torch.from_numpy(data)).numpy()
    err_plain = float(((run(plain) - reference) ** 2).mean())
    err_lac = float(((run(guarded) - reference) ** 2).mean())
    assert err_lac < err_plain
