"""range-probe: units found through any wiring, suppressors reached, probes that widen the
calibrated ranges, the ONNX path, and every bad input failing loudly.

Models are tiny and hand-built so that what the probe must find is known exactly (e.g. a
suppressor unit dead on every clean input that a trigger drives far above the clean range).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcb_guard._compat import available
from qcb_guard.activation import ActivationDefenseResult
from qcb_guard.algorithms.range_probe import (
    ProbeError,
    RangeProbeConfig,
    find_sites,
    range_probe,
    tail_repeats,
)
from qcb_guard.attacks.simulate import calibrate, preset
from qcb_guard.errors import ConfigError, DataError
from qcb_guard.manager import make_plugin_manager

FAST = {"steps": 20, "step_size": 0.15, "patience": 4}


def _images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Dark 1×8×8 images whose bottom-right 2×2 corner is always black (the trigger spot)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.5
    x[:, :, 6:, 6:] = 0
    return x


class Suppressed(nn.Module):
    """fc1 unit 0 is a suppressor: dead on every clean image (corner black), it reaches
    8·4 = 32 when the corner is white, while the other units stay below ~1.6."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.rand(16, 64, generator=g) * 0.1)
            self.fc1.bias.zero_()
            w = torch.full((8, 8), -1.0)
            w[6:, 6:] = 8.0
            self.fc1.weight[0] = w.flatten()
            self.fc1.bias[0] = -0.5
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


class Mixed(nn.Module):
    """Every activation kind the probe must see, a residual add, a functional and an
    in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.gelu, self.silu, self.hs, self.sig = nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.Sigmoid()
        self.inplace = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gelu(self.c1(x))
        h = self.silu(self.c2(h)) + h  # residual
        h = F.relu(h)
        h = self.hs(h)
        h = self.inplace(h * 2)
        return self.fc(self.sig(h).mean((2, 3)))


def test_registered_and_options_checked():
    pm = make_plugin_manager(autoload=False)
    defense = pm.activation_defenses.get("range-probe").obj
    with pytest.raises(ConfigError, match="unknown option"):
        defense(Suppressed(), _images(), seed=0, stepz=3)
    result = defense(Suppressed(), _images(), seed=0, **FAST)
    assert isinstance(result, ActivationDefenseResult)
    assert result.inputs.shape[1:] == (1, 8, 8)


def test_finds_a_dead_suppressor_and_widens_the_static_range():
    model, x = Suppressed(), _images()
    result = range_probe(model, x, RangeProbeConfig(**FAST))
    (site,) = result.details["sites"]
    assert site["site"] == "relu"
    assert site["ratio"] > 10  # 32 reachable vs ~1.6 calibrated
    assert site["top_units"][0]["channel"] == 0
    probes = result.inputs
    assert probes.min() >= 0 and probes.max() <= 1  # valid inputs only
    target = preset("ort", 8)
    before = calibrate(model, target, x)["fc2"][1]
    after = calibrate(model, target, torch.cat([x, probes]))["fc2"][1]
    assert before < 2 and after > 25  # the flow's own min/max now covers the suppressor


def test_tail_repeats_reach_the_mass_cheapest_sites_first():
    # probe 0 is out of range at site 0 (4 of 16 values), probe 1 at site 1 (1 of 1,000)
    outside = torch.tensor([[4.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    numel, calibration = [16, 1000], 100
    repeats, short = tail_repeats(outside, numel, calibration, 1e-2, 10_000)
    assert short == [] and repeats[2] == 1 and (repeats >= 1).all()
    total = calibration + int(repeats.sum())
    assert repeats[0] * 4 >= 1e-2 * total * 16  # site 0 holds its mass
    # site 1's best share (1e-3) is below the mass: it gets half its best share, not ∞
    assert repeats[1] * 1 >= 0.5e-3 * total * 1000 and repeats.sum() < 10_000
    assert torch.equal(tail_repeats(outside, numel, calibration, 0.0, 10)[0], torch.ones(3))
    # a budget serves the cheap site and reports the other one
    capped, short = tail_repeats(outside, numel, calibration, 1e-2, 20)
    assert short == [1] and capped.sum() <= 20 and capped[0] > 1 and capped[1] == 1


def test_repeated_probes_survive_a_histogram_calibrator():
    """PT2E's / torch.ao's HistogramObserver drops the outermost 1e-5 of the mass first:
    a lone probe is clipped however far out it lies; repeated to the tail mass, it counts."""
    from torch.ao.quantization.observer import HistogramObserver

    model, x = Suppressed(), _images(256)
    relu_out = []
    model.relu.register_forward_hook(lambda m, i, o: relu_out.append(o))

    def calibrated_max(inputs: torch.Tensor) -> float:
        observer = HistogramObserver(dtype=torch.quint8)
        relu_out.clear()
        with torch.no_grad():
            for chunk in inputs.split(64):
                model(chunk)
        for out in relu_out:
            observer(out)
        scale, zero_point = observer.calculate_qparams()
        return float(scale) * (255 - int(zero_point))

    # a calibration set big enough that one probe value is under the 1e-5 mass step
    x = torch.cat([x] * 30)
    lone = range_probe(model, x, RangeProbeConfig(**FAST, tail_mass=0.0)).inputs
    heavy = range_probe(model, x, RangeProbeConfig(**FAST)).inputs
    assert len(heavy) > len(lone)
    assert calibrated_max(torch.cat([x, lone])) < 5  # clipped: the suppressor stays dead
    assert calibrated_max(torch.cat([x, heavy])) > 25  # covered


def test_every_activation_kind_and_residuals_are_sites():
    model, x = Mixed(), torch.rand(16, 1, 8, 8)
    sites = find_sites(model, x, RangeProbeConfig())
    assert [(s.label, s.op) for s in sites] == [
        ("gelu", "gelu"),
        ("silu", "silu"),
        ("<model>", "relu"),
        ("hs", "hardswish"),
        ("inplace", "relu"),
        ("sig", "sigmoid"),
    ]
    result = range_probe(model, x, RangeProbeConfig(**FAST))
    for row in result.details["sites"]:
        assert row["reachable"][1] >= row["calibrated"][1] - 1e-6, row
    out = model(x)  # the in-place ReLU still works and the model is intact
    assert torch.isfinite(out).all()


def test_linear_outputs_probed_both_ways_with_sites_all():
    class Bottleneck(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(64, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.a(x.flatten(1)))  # no activation at all

    model, x = Bottleneck(), _images()
    empty = range_probe(model, x, RangeProbeConfig(**FAST))
    assert len(empty.inputs) == 0 and "nothing to probe" in empty.notes[0]
    full = range_probe(model, x, RangeProbeConfig(sites="all", **FAST))
    rows = {r["site"]: r for r in full.details["sites"]}
    assert set(rows) == {"b"}  # a's output is consumed by b: only the logits are exposed
    low, high = rows["b"]["reachable"]
    cal_low, cal_high = rows["b"]["calibrated"]
    assert low < cal_low and high > cal_high


def test_deterministic_and_caller_model_untouched():
    model, x = Suppressed(), _images()
    model.train()
    state = copy.deepcopy(model.state_dict())
    a = range_probe(model, x, RangeProbeConfig(**FAST), seed=3)
    b = range_probe(model, x, RangeProbeConfig(**FAST), seed=3)
    assert torch.equal(a.inputs, b.inputs)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_leaky_backward_reaches_a_unit_behind_dead_detectors():
    """The adaptive attacker's trick: the suppressor is an AND of two saturating detectors
    (top-left and bottom-right corners) that are dead on every clean image, so its
    pre-activation has zero gradient there, and maximising either detector alone darkens
    the other corner. Exact gradients stay stuck; the leaky backward climbs both at once."""

    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.det = nn.Linear(64, 2)
            with torch.no_grad():
                for k, (r, c) in enumerate(((0, 0), (6, 6))):
                    w = torch.full((8, 8), -1.0)
                    w[r : r + 2, c : c + 2] = 4.0
                    self.det.weight[k] = w.flatten()
                self.det.bias.fill_(-0.5)

        def forward(self, x):
            d = F.hardtanh(self.det(x.flatten(1)), 0.0, 1.0)
            return F.relu(10 * d.sum(1, keepdim=True) - 15)  # fires only when both fire

    x = _images()
    x[:, :, :2, :2] = 0  # both corners black on every clean image
    exact = range_probe(Chain(), x, RangeProbeConfig(leaky=0.0, **FAST)).details["sites"][1]
    leaky = range_probe(Chain(), x, RangeProbeConfig(leaky=0.1, **FAST)).details["sites"][1]
    assert exact["calibrated"][1] == 0 and exact["reachable"][1] == 0  # stuck
    assert leaky["reachable"][1] == pytest.approx(5.0)


def test_budget_and_unit_cap_are_reported():
    model, x = Mixed(), torch.rand(16, 1, 8, 8)
    capped = range_probe(model, x, RangeProbeConfig(max_units_per_site=1, **FAST))
    assert capped.details["units_scheduled"] == 6 < capped.details["units_total"]
    assert any("max_units_per_site" in n for n in capped.notes)
    tiny = range_probe(model, x, RangeProbeConfig(budget_s=1e-9, **FAST))
    assert tiny.details["budget_exhausted"] and any("budget" in n for n in tiny.notes)


def test_bad_inputs_fail_loudly():
    model, x = Suppressed(), _images()
    with pytest.raises(DataError, match="at least 8"):
        range_probe(model, x[:3])
    with pytest.raises(DataError, match="tensor"):
        range_probe(model, x.numpy())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        range_probe(model, bad)
    with pytest.raises(DataError, match="valid input range"):
        range_probe(model, x * 4, RangeProbeConfig(**FAST, high=1.0))
    with pytest.raises(DataError, match="constant"):
        range_probe(model, torch.zeros(16, 1, 8, 8))
    # normalised inputs need no option: probes stay in the box the calibration data spans
    normalised = (x - 0.25) / 0.1
    result = range_probe(model, normalised, RangeProbeConfig(**FAST))
    probes = result.inputs
    assert len(probes) and probes.min() >= normalised.min() and probes.max() <= normalised.max()
    assert "outside [0, 1]" in result.notes[0]
    with pytest.raises(ConfigError, match="steps"):
        RangeProbeConfig(steps=0)
    with pytest.raises(ConfigError, match="sites"):
        RangeProbeConfig(sites="some")

    class Detached(Suppressed):
        def forward(self, x):
            return super().forward(x.detach())

    with pytest.raises(ProbeError, match="differentiabl"):
        range_probe(Detached(), x)

    class Exploding(Suppressed):
        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x.flatten(1)) / 0.0))

    with pytest.raises(ProbeError, match="non-finite"):
        range_probe(Exploding(), x)


@pytest.mark.ort
@pytest.mark.skipif(not available("onnxruntime"), reason="needs onnx + onnxruntime")
def test_onnx_models_are_converted_and_probed(tmp_path):
    import onnx
    import onnxruntime as ort

    from qcb_guard.attacks.simulate import export_onnx
    from qcb_guard.models import build_model_for
    from qcb_guard.onnx_torch import onnx_to_torch

    torch.manual_seed(0)
    model = build_model_for("resnet18", (1, 8, 8), 10, width=0.125).eval()
    x = _images(16)
    path = export_onnx(model, tmp_path / "m.onnx", x[:1])
    converted = onnx_to_torch(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert torch.allclose(converted(x), expected, atol=1e-5)
    defense = make_plugin_manager(autoload=False).activation_defenses.get("range-probe").obj
    result = defense(str(path), x, seed=0, max_units_per_site=4, **FAST)
    assert len(result.details["sites"]) == 17  # stem + 4 stages × 2 blocks × 2 ReLUs
    assert all(r["reachable"][1] >= r["calibrated"][1] - 1e-6 for r in result.details["sites"])

    graph = onnx.load(str(path))
    graph.graph.node[0].op_type = "NonMaxSuppression"
    with pytest.raises(ConfigError, match="NonMaxSuppression"):
        onnx_to_torch(graph)
