"""The evaluation harness over real flows (ONNX Runtime, PT2E) and the reference quantizer."""

from __future__ import annotations

import pytest
import torch

from qcb_guard.config import DEFAULT_ACTIVATION_DEFENSE, DEFAULT_DEFENSE
from qcb_guard.data import load_dataset, square
from qcb_guard.errors import ConfigError, DataError, PluginError
from qcb_guard.evaluate import (
    GUARD_DEFAULT,
    evaluate,
    format_table,
    metrics,
    module_predictor,
    split_defense,
)
from qcb_guard.models import build_model, train_clean

FLOWS = ["reference", "ort-static", "pt2e-x86", "torch-ao-fx"]


@pytest.fixture(scope="module")
def trained():
    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = build_model("smallcnn", 1, 10, pool_size=2)
    train_clean(model, data.train.x, data.train.y, epochs=6, seed=0, progress=False)
    return model, data


def test_asr_counts_only_non_target_images(trained):
    model, data = trained

    def always_target(x):
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()

    trig = square((1, 8, 8), size=2, target=0)
    cda, asr = metrics(always_target, data.test.x, data.test.y, trig)
    assert asr == 1.0 and cda == pytest.approx(float((data.test.y == 0).float().mean()))
    cda_model, _ = metrics(module_predictor(model), data.test.x, data.test.y)
    assert cda_model > 0.85


@pytest.mark.ort
@pytest.mark.torchao
def test_flows_measure_unguarded_nearest_and_defended_runs(trained, pm):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torchao")
    model, data = trained
    trig = square((1, 8, 8), size=2, target=3)
    report = evaluate(
        model, data.test.x[:200], data.test.y[:200], trig,
        calibration=data.train.x[:64], bits=(8, 4), flows=FLOWS,
        defenses=(None, "nearest", "floor"), pm=pm, progress=False,
    )  # fmt: skip
    assert len(report.rows) == 1 + 4 * 2 * 3
    assert all(r.error is None for r in report.rows), [r.error for r in report.rows]
    fp = report.row("float32", None)
    for flow in FLOWS:
        for bits in (8, 4):
            plain, nearest = report.row(flow, bits), report.row(flow, bits, "nearest")
            assert (plain.cda, plain.asr) == (nearest.cda, nearest.asr), (flow, bits)
        assert abs(report.row(flow, 8).cda - fp.cda) < 0.03
        # floor rounding is a (deliberately) bad defense at 4 bits: it must show up
        assert report.row(flow, 4, "floor").cda < report.row(flow, 4).cda
    assert len(format_table(report)) == len(report.rows)


def test_errors_become_rows_and_bad_requests_fail_fast(trained, pm):
    model, data = trained
    x, y = data.test.x[:50], data.test.y[:50]
    with pytest.raises(ConfigError, match="unknown flow"):
        evaluate(model, x, y, calibration=x, flows=["tflite"], pm=pm)
    with pytest.raises(ConfigError, match=r"bits must be in \[2, 8\]"):
        evaluate(model, x, y, calibration=x, bits=(9,), pm=pm)
    with pytest.raises(DataError, match="calibration"):
        evaluate(model, x, y, calibration=x[:0], pm=pm)
    if "ort-static" in pm.flows:
        report = evaluate(
            model, x, y, calibration=x, bits=(3,), flows=["ort-static"], pm=pm, progress=False
        )
        assert "supports" in report.rows[1].error and report.rows[1].cda is None


@pytest.mark.nncf
def test_nncf_flow_guarded_nearest_equals_unguarded(trained, pm):
    pytest.importorskip("nncf")
    model, data = trained
    report = evaluate(
        model, data.test.x[:200], data.test.y[:200], square((1, 8, 8), size=2, target=3),
        calibration=data.train.x[:64], bits=(8, 4), flows=["nncf-torch"],
        defenses=(None, "nearest"), pm=pm, progress=False,
    )  # fmt: skip
    plain, nearest = report.row("nncf-torch", 8), report.row("nncf-torch", 8, "nearest")
    assert plain.error is None and (plain.cda, plain.asr) == (nearest.cda, nearest.asr)
    assert abs(plain.cda - report.row("float32", None).cda) < 0.03
    assert "supports (8,) bits" in report.row("nncf-torch", 4).error


def test_defense_options_do_not_reach_the_unguarded_rows(trained, pm):
    model, data = trained
    x, y = data.test.x[:50], data.test.y[:50]
    report = evaluate(
        model, x, y, calibration=data.train.x[:32], bits=(4,), flows=["reference"],
        defenses=(None, "efrap"), options={"iters": 20, "min_iters": 0}, pm=pm, progress=False,
    )  # fmt: skip
    assert [r.error for r in report.rows] == [None, None, None]


def test_defense_entries_name_exactly_what_guard_runs(pm):
    assert split_defense("efrap", pm) == ("efrap", None)  # activation ranges untouched
    assert split_defense("efrap+range-probe", pm) == ("efrap", "range-probe")
    assert split_defense("range-probe", pm) == ("nearest", "range-probe")
    assert split_defense(GUARD_DEFAULT, pm) == (DEFAULT_DEFENSE, DEFAULT_ACTIVATION_DEFENSE)
    with pytest.raises(PluginError, match="unknown defense 'bogus'"):
        split_defense("bogus", pm)
    with pytest.raises(PluginError, match="unknown activation defense 'bogus'"):
        split_defense("efrap+bogus", pm)


@pytest.mark.ort
def test_activation_defense_rows_run_through_the_static_flow(trained, pm):
    pytest.importorskip("onnxruntime")
    model, data = trained
    x, y = data.test.x[:100], data.test.y[:100]
    report = evaluate(
        model, x, y, calibration=data.train.x[:32], bits=(8,), flows=["ort-static"],
        defenses=(None, "nearest", "range-probe"), pm=pm, progress=False,
        options={},
    )  # fmt: skip
    plain, nearest = report.row("ort-static", 8), report.row("ort-static", 8, "nearest")
    probed = report.row("ort-static", 8, "range-probe")
    assert probed.error is None and probed.cda > 0.8
    assert (plain.cda, plain.asr) == (nearest.cda, nearest.asr)  # "nearest" alone: bit-identical
