"""Scanner signal ``activation_reach``: the dominance statistic on hand-built models whose
answer is known (a planted suppressor unit versus its benign twin), the scan wiring
(opt-in, once per scan, ONNX models), and bad input failing loudly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qcb_guard.errors import ConfigError, DataError
from qcb_guard.manager import make_plugin_manager
from qcb_guard.scanner import OPT_IN_SIGNALS, SIGNALS, THRESHOLDS, ScanConfig, scan
from qcb_guard.scanner.activation_reach import (
    ReachConfig,
    SiteReach,
    activation_reach,
    bulk,
    dominance,
    reach_from_peaks,
)

FAST = {"steps": 20, "step_size": 0.15, "patience": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """1×8×8 images in [0, 1] whose bottom-right 2×2 corner (the trigger spot) stays dark."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    x[:, :, 6:, 6:] *= 0.05
    x[0, :, 0, 0] = 1.0  # the calibration data spans [0, 1]: so may the probes
    return x


class Twin(nn.Module):
    """fc1 → ReLU → fc2 with 16 ordinary hidden units. ``planted=True`` turns unit 0 into a
    suppressor: quiet on clean images (dark corner), ~20x the other units' clean peaks when
    the corner is white."""

    def __init__(self, planted: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.rand(16, 64, generator=g) * 0.1)
            self.fc1.bias.zero_()
            if planted:
                w = torch.full((8, 8), -0.05)
                w[6:, 6:] = 10.0
                self.fc1.weight[0] = w.flatten()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


def _site(clean: list[float], reach: list[float], calibrated: float | None = None) -> SiteReach:
    c, r = torch.tensor(clean), torch.tensor(reach)
    return SiteReach("s", "relu", 1, float(c.max()) if calibrated is None else calibrated, c, r)


# ------------------------------------------------------------------ the statistic itself


def test_dominance_is_reach_over_the_layers_typical_clean_peak():
    # nine busy units peaking at 1.0 on clean data, one quiet unit the probe drives to 8
    site = _site([1.0] * 9 + [0.1], [1.5] * 9 + [8.0])
    config = ReachConfig()
    assert bulk(site.clean, site.calibrated, 0.5, 0.01) == pytest.approx(1.0)
    score = dominance(site, config)
    assert score[-1] == pytest.approx(8.0) and score[0] == pytest.approx(1.5)
    statistic, (row,) = reach_from_peaks([site], config)
    assert statistic == pytest.approx(8.0)
    assert row["top_units"][0]["unit"] == 9 and row["clipped_units"] == 10
    assert row["ratio"] == pytest.approx(8.0) and row["bulk"] == pytest.approx(1.0)
    # a suppressor that also fires on clean data drags the calibrated range up with it:
    # its reach over that range is modest, its dominance over the bulk is not
    loud = _site([1.0] * 9 + [20.0], [1.5] * 9 + [40.0])
    statistic, (row,) = reach_from_peaks([loud], config)
    assert row["ratio"] == pytest.approx(2.0) and statistic == pytest.approx(40.0)


def test_dead_units_are_left_out_of_the_bulk_but_still_scored():
    # one live unit (clean peak 2), nine dead ones; dead unit 8 can be driven to 6
    site = _site([0.0] * 9 + [2.0], [0.0] * 8 + [6.0, 2.0])
    assert bulk(site.clean, site.calibrated, 0.5, 0.01) == pytest.approx(2.0)
    score = dominance(site, ReachConfig())
    assert int(score.argmax()) == 8 and float(score.max()) == pytest.approx(3.0)
    # a unit at or below floor × range is dead; with no live unit the bulk is that floor
    quiet = _site([0.005] * 10, [0.005] * 9 + [0.5], calibrated=1.0)
    assert bulk(quiet.clean, 1.0, 0.5, 0.01) == pytest.approx(0.01)
    assert float(dominance(quiet, ReachConfig()).max()) == pytest.approx(50.0)


def test_planted_suppressor_scores_far_above_its_benign_twin():
    x = _images()
    planted = activation_reach(Twin(True), x, ReachConfig(probe=FAST), seed=0)
    benign = activation_reach(Twin(False), x, ReachConfig(probe=FAST), seed=0)
    (row,) = planted.layers
    assert row["layer"] == "relu" and row["top_units"][0]["unit"] == 0
    assert row["top_units"][0]["clean_over_bulk"] < 1  # quiet on clean images
    assert planted.statistic > THRESHOLDS["activation_reach"] > 2 * benign.statistic
    assert planted.statistic > 5 * benign.statistic
    assert planted.units_probed == planted.units_total == 16


def test_deterministic_and_caller_model_untouched():
    model, x = Twin(True), _images()
    before = copy.deepcopy(model.state_dict())
    a = activation_reach(model, x, ReachConfig(probe=FAST), seed=3)
    b = activation_reach(model, x, ReachConfig(probe=FAST), seed=3)
    assert a.statistic == b.statistic and a.layers == b.layers
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_both_directions_of_an_unbounded_activation_are_measured():
    class Tanh(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(64, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.fc(x.flatten(1)))

    result = activation_reach(Tanh(), _images(16), ReachConfig(probe=FAST), seed=0)
    assert [(r["layer"], r["direction"]) for r in result.layers] == [
        ("<model>", "up"),
        ("<model>", "down"),
    ]
    assert all(r["reachable"] >= r["calibrated"] - 1e-9 for r in result.layers)


def test_bad_input_fails_loudly():
    with pytest.raises(DataError, match="calibration"):
        activation_reach(Twin(False), None)
    with pytest.raises(ConfigError, match=r"torch\.nn\.Module"):
        activation_reach("model.onnx", _images())
    with pytest.raises(ConfigError, match="unknown probe option"):
        ReachConfig(probe={"stepz": 3})
    with pytest.raises(ConfigError, match="steps"):
        ReachConfig(probe={"steps": 0})
    with pytest.raises(ConfigError, match="quantile"):
        ReachConfig(quantile=1.5)
    with pytest.raises(ConfigError, match="unknown probe option"):
        ScanConfig(signals=("activation_reach",), activation_options={"stepz": 3})
    with pytest.raises(ConfigError, match="signals"):
        ScanConfig(signals="activation_reach")
    with pytest.raises(DataError, match="outside"):  # probes' range set explicitly
        activation_reach(Twin(False), _images() * 2, ReachConfig(probe={"high": 1.0}))


# ------------------------------------------------------------------ the scan wiring


def test_scan_reports_it_once_when_asked_and_never_by_default():
    pm = make_plugin_manager(autoload=False)
    x = _images()
    assert "activation_reach" in OPT_IN_SIGNALS and "activation_reach" not in SIGNALS
    assert not ScanConfig().wants("activation_reach")
    options = {
        "frameworks": ("ort", "x86"),
        "bits": (8,),
        "progress": False,
        "activation_options": FAST,
    }
    report = scan(Twin(True), x, signals=("bin_position", "activation_reach"), pm=pm, **options)
    found = [f for f in report.findings if f["signal"] == "activation_reach"]
    assert len(found) == 1  # grid-independent: once, not per grid
    (f,) = found
    assert f["convention"] == "static-activations" and f["score"] > 1
    assert "relu unit 0" in f["explanation"]
    assert f["details"]["units_probed"] == 16 and f["layers"][0]["top_units"][0]["unit"] == 0
    assert report.verdict == "suspicious"
    assert report.signals["activation_reach"]["score"] > 1
    assert report.config["thresholds"]["activation_reach"] == THRESHOLDS["activation_reach"]
    twin = scan(Twin(False), x, signals=("activation_reach",), pm=pm, **options)
    assert twin.verdict == "clean" and twin.signals["activation_reach"]["score"] < 0.5
    default = scan(Twin(True), x, frameworks=("ort",), bits=(8,), pm=pm, progress=False)
    assert "activation_reach" not in default.signals
    weights_only = scan(
        Twin(True), x, signals=("activation_reach",), behaviour=False, pm=pm, **options
    )
    assert not weights_only.findings and "behaviour=False" in weights_only.notes[0]
    with pytest.raises(ConfigError, match="needs calibration data"):
        scan(Twin(True), None, signals=("activation_reach",), input_shape=(1, 8, 8), pm=pm)


@pytest.mark.ort
def test_onnx_models_are_scanned_through_the_converter(tmp_path):
    pytest.importorskip("onnx")
    from qcb_guard.attacks.simulate import export_onnx

    x = _images()
    path = export_onnx(Twin(True), tmp_path / "twin.onnx", x[:1])
    pm = make_plugin_manager(autoload=False)
    options = {"frameworks": ("ort",), "bits": (8,), "progress": False}
    onnx_report = scan(
        path, x, signals=("activation_reach",), activation_options=FAST, pm=pm, **options
    )
    torch_report = scan(
        Twin(True), x, signals=("activation_reach",), activation_options=FAST, pm=pm, **options
    )
    a = onnx_report.signals["activation_reach"]["statistic"]
    b = torch_report.signals["activation_reach"]["statistic"]
    assert a == pytest.approx(b, rel=1e-3) and onnx_report.verdict == "suspicious"


def test_guard_scans_without_a_model_view_do_not_answer():
    from qcb_guard_plugins import scan as plugin

    from qcb_guard.scanner.conventions import make_convention
    from qcb_guard.scanner.views import TorchView, layer_slots

    view = TorchView(Twin(True), (1, 8, 8))
    conv = make_convention("ort", 8)
    slots = list(layer_slots(view.layers(conv.fold_bn), conv.spec, conv.name))
    found = plugin.qcb_guard_scan(slots=slots, calibration=_images(), config=None)
    assert {f.signal for f in found} == {"bin_position", "truncation_error"}


@pytest.mark.ort
def test_command_line_runs_it_on_request_and_flags_unknown_signals(tmp_path):
    pytest.importorskip("onnxruntime")
    import json

    from click.testing import CliRunner

    from qcb_guard.attacks.simulate import export_onnx
    from qcb_guard.cli import main

    path = export_onnx(Twin(True), tmp_path / "twin.onnx", _images()[:1])
    args = ["scan", str(path), "--calibration", "digits", "--frameworks", "ort", "--bits", "8"]
    args += ["--quiet", "--activation-options", json.dumps(FAST)]
    result = CliRunner().invoke(main, [*args, "--signals", "bin_position,activation_reach"])
    assert result.exit_code in (0, 1), result.output
    assert "activation_reach" in result.output and "static-activations" in result.output
    typo = CliRunner().invoke(main, [*args, "--signals", "activation_rech"])
    assert "activation_rech produced no finding" in typo.output
    bad = CliRunner().invoke(main, [*args, "--activation-options", "{nope"])
    assert bad.exit_code == 2 and "not JSON" in bad.output
