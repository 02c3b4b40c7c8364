"""EFRAP and AdaRound on single layers and through the reference quantizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcb_guard.algorithms.adaround import AdaRoundConfig, adaround_integers, beta_at
from qcb_guard.algorithms.efrap import EFRAPConfig, efrap_integers, truncation_error
from qcb_guard.algorithms.reconstruction import ReconstructionConfig, grid, output_error
from qcb_guard.config import GuardConfig
from qcb_guard.errors import ConfigError, DataError
from qcb_guard.guarding import round_slots
from qcb_guard.quant import QuantSpec
from qcb_guard.reference import quantize_model
from qcb_guard.slots import SlotCalibration, WeightSlot

from .conftest import conv_slot

FAST = ReconstructionConfig(iters=300, check_every=50, min_iters=100)


def layer_error(slot: WeightSlot, cal: SlotCalibration, q: torch.Tensor) -> float:
    with torch.no_grad():
        return float(
            output_error(slot.layer(cal.inputs, slot.dequantize(q)), slot.layer(cal.inputs))
        )


def test_efrap_flips_where_the_truncation_error_is_large():
    slot, cal = conv_slot()
    q, stats = efrap_integers(slot, cal, EFRAPConfig(schedule=FAST))
    slot.check_integers(q, "efrap")
    _, frac, _, _ = grid(slot)
    flipped = q != slot.nearest()
    near_edge = (frac - 0.5).abs() < 0.1  # e ≈ 0.5 steps: flipping costs little
    near_grid = (frac < 0.1) | (frac > 0.9)  # e ≈ 0: flipping costs a full step
    assert flipped[near_edge].float().mean() > 0.5
    assert flipped[near_grid].float().mean() < 0.05
    assert stats.steps <= FAST.iters


def test_efrap_is_deterministic_under_a_seed():
    slot, cal = conv_slot()
    a, _ = efrap_integers(slot, cal, EFRAPConfig(schedule=FAST), seed=3)
    b, _ = efrap_integers(slot, cal, EFRAPConfig(schedule=FAST), seed=3)
    assert torch.equal(a, b)


def test_flip_weight_zero_preserves_activations_at_least_as_well_as_nearest():
    slot, cal = conv_slot(seed=1)
    q, _ = efrap_integers(slot, cal, EFRAPConfig(flip_weight=0.0, schedule=FAST))
    assert layer_error(slot, cal, q) <= layer_error(slot, cal, slot.nearest()) * 1.01


def test_adaround_reduces_layer_output_error_versus_nearest():
    slot, cal = conv_slot(seed=2, bits=3)
    q, stats = adaround_integers(slot, cal, AdaRoundConfig(schedule=FAST))
    assert stats.steps == FAST.iters  # annealing is never cut short
    assert layer_error(slot, cal, q) < layer_error(slot, cal, slot.nearest())


def test_adaround_beta_schedule():
    config = AdaRoundConfig()
    assert beta_at(10, 100, config) is None
    assert beta_at(20, 100, config) == pytest.approx(20.0)
    assert beta_at(100, 100, config) == pytest.approx(2.0)


def test_neuron_wise_error_is_shared_per_output_channel():
    slot, _ = conv_slot()
    _, frac, s, _ = grid(slot)
    err = truncation_error(frac, s, EFRAPConfig(error_granularity="neuron"), 0)
    assert torch.equal(err, err[:, :1, :1, :1].expand_as(err))
    assert not torch.equal(err[0], err[1])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: EFRAPConfig(error_unit="bits"), "error_unit"),
        (lambda: EFRAPConfig(flip_weight=-1), "flip_weight"),
        (lambda: ReconstructionConfig(iters=0), "iters"),
        (lambda: ReconstructionConfig(lr=float("nan")), "lr"),
        (lambda: AdaRoundConfig(warm_up=1.5), "warm_up"),
    ],
)
def test_bad_configs(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_too_little_calibration_is_a_clear_error():
    slot, cal = conv_slot()
    with pytest.raises(DataError, match="needs at least 8"):
        efrap_integers(slot, SlotCalibration(cal.inputs[:3]), EFRAPConfig(schedule=FAST))


def test_guard_options_reach_the_defense_and_unknown_ones_are_refused(pm):
    slot, cal = conv_slot()
    config = GuardConfig(defense="efrap", options={"iters": 50, "min_iters": 0, "flip_weight": 0.1})
    result = round_slots([slot], config, pm=pm, calibrator=lambda s: cal, progress=False)
    assert result.slots[0].defense == "efrap" and result.slots[0].fallback is None
    with pytest.raises(ConfigError, match=r"unknown option\(s\) iterations"):
        bad = GuardConfig(defense="efrap", options={"iterations": 5}, on_defense_error="raise")
        round_slots([slot], bad, pm=pm, calibrator=lambda s: cal, progress=False)
    with pytest.raises(ConfigError, match="takes no options"):
        round_slots([slot], GuardConfig(defense="nearest", options={"iters": 5}), pm=pm)


def test_too_small_calibration_in_a_flow_falls_back_to_nearest_and_says_so(pm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    _, result = quantize_model(
        model, QuantSpec(4), defense="efrap", calibration=torch.rand(3, 1, 4, 4), pm=pm
    )
    summary = result.to_dict()
    assert summary["fallbacks"] == ["1.weight"] and summary["changed_total"] == 0
    assert "needs at least 8" in result.slots[0].fallback


def test_efrap_through_reference_quantizer_keeps_accuracy(pm):
    from qcb_guard.data import load_dataset
    from qcb_guard.models import accuracy, build_model, train_clean

    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = build_model("smallcnn", 1, 10, pool_size=2)
    train_clean(model, data.train.x, data.train.y, epochs=8, seed=0, progress=False)
    fp = accuracy(model, data.test.x, data.test.y)
    qmodel, result = quantize_model(
        model, QuantSpec(4), defense="efrap", calibration=data.train.x[:128], pm=pm,
        iters=200, check_every=50, min_iters=100,
    )  # fmt: skip
    assert result.to_dict()["changed_total"] > 0 and not result.to_dict()["fallbacks"]
    assert accuracy(qmodel, data.test.x, data.test.y) >= fp - 0.03
