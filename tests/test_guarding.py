"""The guarded rounding loop, WeightSlot validation and the reference quantizer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from qcb_guard import hookimpl
from qcb_guard.config import GuardConfig
from qcb_guard.errors import ConfigError, DataError, DefenseError, UnsupportedObjectError
from qcb_guard.guarding import guard, round_slots
from qcb_guard.quant import QuantSpec, compute_qparams, dequantize, quantize
from qcb_guard.reference import quantize_model
from qcb_guard.slots import SlotCalibration, WeightSlot

from .conftest import floor_integers


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    ).eval()


def make_slot(weight: torch.Tensor, bits: int = 4, **kw) -> WeightSlot:
    spec = QuantSpec(bits=bits)
    scale, zp = compute_qparams(weight, spec)
    return WeightSlot("w", "linear", weight, scale, zp, 0, spec.qmin, spec.qmax, **kw)


class TestWeightSlot:
    def test_nearest_and_dequantize(self):
        w = torch.randn(3, 5)
        slot = make_slot(w)
        q = slot.nearest()
        assert q.dtype == torch.int64 and q.min() >= -8 and q.max() <= 7
        assert torch.equal(q, quantize(w, slot.scale, slot.zero_point, 0, -8, 7))
        err = (slot.dequantize(q) - w).abs()
        assert (err <= slot.scale.view(-1, 1) / 2 + 1e-6).all()

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"kind": "conv5d"}, "kind must be one of"),
            ({"weight": torch.full((2, 2), float("nan"))}, "NaN/inf"),
            ({"weight": torch.zeros(2, 2, dtype=torch.int32)}, "floating-point"),
            ({"scale": torch.ones(3)}, "need 2 values"),
            ({"scale": torch.tensor([1.0, -1.0])}, "finite and positive"),
            ({"qmin": 7}, "must be below"),
            ({"kind": "conv2d"}, "must be 4-D"),
        ],
    )
    def test_bad_slots_are_rejected_clearly(self, kwargs, match):
        args = {
            "name": "w",
            "kind": "linear",
            "weight": torch.ones(2, 2),
            "scale": torch.ones(2),
            "zero_point": torch.zeros(2),
            "axis": 0,
            "qmin": -8,
            "qmax": 7,
        }
        args.update(kwargs)
        with pytest.raises(ConfigError, match=match):
            WeightSlot(**args)

    @pytest.mark.parametrize(
        ("q", "match"),
        [
            ("nope", "not a tensor"),
            (torch.zeros(3, 4, dtype=torch.int64), "shape"),
            (torch.full((3, 5), 0.5), "non-integer"),
            (torch.full((3, 5), 8), r"outside the framework's range \[-8, 7\]"),
        ],
    )
    def test_check_integers(self, q, match):
        with pytest.raises(DefenseError, match=match):
            make_slot(torch.randn(3, 5)).check_integers(q, "defense 'x'")

    def test_layer_matches_module(self):
        conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
        slot = WeightSlot(
            "c", "conv2d", conv.weight, torch.ones(6), torch.zeros(6), 0, -128, 127,
            bias=conv.bias.detach(), attrs={"stride": 2, "padding": 1, "groups": 2},
        )  # fmt: skip
        x = torch.randn(2, 4, 9, 9)
        torch.testing.assert_close(slot.layer(x), conv(x))

    def test_calibration_validation(self):
        with pytest.raises(DataError, match="empty"):
            SlotCalibration(torch.zeros(0, 3))
        with pytest.raises(DataError, match="NaN"):
            SlotCalibration(torch.tensor([[float("inf")]]))
        with pytest.raises(DataError, match="differ in shape"):
            SlotCalibration(torch.zeros(2, 3), torch.zeros(3, 3))


class TestRoundSlots:
    def test_registered_defense_is_deployed(self, pm):
        written = {}
        slots = [make_slot(torch.randn(4, 6), write=lambda q: written.setdefault("q", q))]
        result = round_slots(slots, GuardConfig(defense="floor"), pm=pm, progress=False)
        assert torch.equal(written["q"], floor_integers(slots[0]))
        assert result.slots[0].defense == "floor"
        assert result.slots[0].changed == int((written["q"] != slots[0].nearest()).sum()) > 0

    def test_round_weights_hook_overrides_first(self, pm):
        class KeepLinearNearest:
            @hookimpl
            def qcb_guard_round_weights(self, slot, calibration, config):
                return slot.nearest() if slot.name == "keep" else None

        pm.register(KeepLinearNearest())
        a, b = make_slot(torch.randn(4, 6)), make_slot(torch.randn(4, 6))
        a.name = "keep"
        result = round_slots([a, b], GuardConfig(defense="floor"), pm=pm, progress=False)
        assert [s.defense for s in result.slots] == ["hook", "floor"]
        assert torch.equal(a.integers, a.nearest())
        assert torch.equal(b.integers, floor_integers(b))

    def test_failing_defense_falls_back_to_nearest_and_is_reported(self, pm):
        class Broken:
            @hookimpl
            def qcb_guard_register_defenses(self, register):
                register("broken", lambda slot, cal: torch.zeros(1))

        pm.register(Broken())
        slot = make_slot(torch.randn(4, 6))
        result = round_slots([slot], GuardConfig(defense="broken"), pm=pm, progress=False)
        assert torch.equal(slot.integers, slot.nearest())
        assert result.slots[0].fallback and "shape" in result.slots[0].fallback
        assert result.to_dict()["fallbacks"] == ["w"]
        with pytest.raises(DefenseError, match="shape"):
            round_slots(
                [make_slot(torch.randn(4, 6))],
                GuardConfig(defense="broken", on_defense_error="raise"),
                pm=pm,
                progress=False,
            )

    def test_defense_needing_data_without_data_is_a_clear_error(self, pm):
        with pytest.raises(DefenseError, match="pass calibration="):
            round_slots([make_slot(torch.randn(2, 2))], GuardConfig(defense="floor-data"), pm=pm)

    def test_hooks_are_called_in_order(self, pm):
        calls = []

        class Recorder:
            @hookimpl
            def qcb_guard_before_quantize(self, slots, config):
                calls.append(("before", len(slots)))

            @hookimpl
            def qcb_guard_round_weights(self, slot):
                calls.append(("round", slot.name))

        pm.register(Recorder())
        a, b = make_slot(torch.randn(2, 3)), make_slot(torch.randn(2, 3))
        b.name = "w2"
        round_slots([a, b], GuardConfig(defense="nearest"), pm=pm, progress=False)
        assert calls == [("before", 2), ("round", "w"), ("round", "w2")]


class TestReferenceQuantizer:
    @pytest.mark.parametrize(
        "spec", [QuantSpec(8), QuantSpec(4, symmetric=False), QuantSpec(3, axis=None)]
    )
    def test_nearest_equals_direct_quantization(self, pm, spec):
        model = tiny_net()
        qmodel, result = quantize_model(model, spec, pm=pm)
        assert result.to_dict()["changed_total"] == 0
        for (name, m), qm in zip(model.named_modules(), qmodel.modules(), strict=True):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                scale, zp = compute_qparams(
                    m.weight,
                    QuantSpec(spec.bits, spec.symmetric, 0 if spec.axis is not None else None),
                )
                q = quantize(
                    m.weight, scale, zp, 0 if spec.axis is not None else None, spec.qmin, spec.qmax
                )
                expect = dequantize(q, scale, zp, 0 if spec.axis is not None else None)
                assert torch.equal(qm.weight.detach(), expect), name

    def test_caller_model_is_not_modified(self, pm):
        model = tiny_net()
        before = copy.deepcopy(model.state_dict())
        model.train()
        quantize_model(model, QuantSpec(4), defense="floor", pm=pm)
        assert model.training
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key

    def test_calibration_reaches_defenses_per_layer(self, pm, floor_plugin):
        model = tiny_net()
        x = torch.rand(10, 1, 8, 8)
        qmodel, _ = quantize_model(model, QuantSpec(4), defense="floor-data", calibration=x, pm=pm)
        seen = floor_plugin.seen
        assert list(seen) == ["0.weight", "2.weight", "5.weight"]
        # fp inputs are the float model's layer inputs; inputs come from the partly
        # quantized model (layer 0 deployed before layer 2 is calibrated).
        torch.testing.assert_close(seen["0.weight"].fp_inputs, x)
        torch.testing.assert_close(seen["2.weight"].fp_inputs, torch.relu(model[0](x)))
        assert not torch.equal(seen["2.weight"].inputs, seen["2.weight"].fp_inputs)
        torch.testing.assert_close(seen["2.weight"].inputs, torch.relu(qmodel[0](x)))

    def test_bad_calibration(self, pm):
        with pytest.raises(DataError, match="empty"):
            quantize_model(
                tiny_net(),
                QuantSpec(4),
                defense="floor-data",
                calibration=torch.zeros(0, 1, 8, 8),
                pm=pm,
            )
        with pytest.raises(DataError, match="NaN"):
            bad = torch.full((2, 1, 8, 8), float("nan"))
            quantize_model(tiny_net(), QuantSpec(4), defense="floor-data", calibration=bad, pm=pm)


def test_guard_rejects_unknown_objects_listing_supported_kinds(pm):
    with pytest.raises(UnsupportedObjectError, match=r"does not recognise builtins\.int"):
        guard(42, pm=pm)


def test_guard_rejects_unknown_defense_before_touching_the_framework(pm):
    from qcb_guard.errors import PluginError

    with pytest.raises(PluginError, match="unknown defense 'nope'"):
        guard(42, defense="nope", pm=pm)


def test_report_is_written_atomically(tmp_path, pm):
    from qcb_guard.guarding import finish

    slot = make_slot(torch.randn(3, 3))
    config = GuardConfig(defense="floor", report=tmp_path / "r" / "report.json")
    result = round_slots([slot], config, pm=pm, progress=False)
    finish(result, [slot], None, config, pm)
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["defense"] == "floor" and data["slots"][0]["name"] == "w"
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["report.json"]


def test_default_defense_is_efrap_and_needs_data(pm):
    """guard()'s default is EFRAP; a flow without data says how to give it or opt out."""
    assert GuardConfig().defense == "efrap"
    with pytest.raises(DefenseError, match=r"calibration=.*defense='nearest'"):
        round_slots([make_slot(torch.randn(4, 3))], GuardConfig(), pm=pm, progress=False)
