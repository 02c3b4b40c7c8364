"""The QCB scanner on real (small) attacks: signals, verdicts, loading, reports, CLI."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qcb_guard.attacks.pqbackdoor import PQBackdoorConfig, pqbackdoor
from qcb_guard.attacks.quanti import QuantiConfig, backdoor
from qcb_guard.cli import main
from qcb_guard.data import load_dataset
from qcb_guard.errors import ConfigError, ModelFileError, UnsafeFileError
from qcb_guard.models import build_model, save_model, train_clean
from qcb_guard.scanner import SCHEMA, SIGNALS, Finding, ScanConfig, combine, scan
from qcb_guard.scanner.bin_position import edge_pileup, histogram
from qcb_guard.scanner.conventions import conventions
from qcb_guard.scanner.loading import load_onnx
from qcb_guard.scanner.report import flip_matrix_svg, histogram_svg
from qcb_guard.scanner.truncation_error import neuron_error_z

CHROMIUM = Path("/usr/bin/chromium")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def calibration(digits):
    return digits.train.x[:128]


@pytest.fixture(scope="module")
def clean(digits):
    torch.manual_seed(0)
    model = build_model("smallcnn", 1, 10, pool_size=2)
    train_clean(model, digits.train.x, digits.train.y, epochs=15, seed=0, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def quanti(clean, digits):
    """A real Qu-ANTI-zation backdoor aimed at ONNX Runtime's 4-bit flow."""
    return backdoor(clean, digits.train, QuantiConfig(trigger_size=2, epochs=30)).model


@pytest.fixture(scope="module")
def pq(clean, digits):
    """A real PQBackdoor (bin-projected) aimed at ONNX Runtime's 4-bit flow."""
    return pqbackdoor(clean, digits.train, PQBackdoorConfig(trigger_size=2, epochs=6)).model


@pytest.fixture
def pm():
    from qcb_guard.manager import make_plugin_manager

    return make_plugin_manager(autoload=False, block=[])


def _scan(model, calibration, pm, **kw):
    return scan(model, calibration, pm=pm, progress=False, **kw)


# ------------------------------------------------------------------------------------------
# the signals' arithmetic


def test_edge_pileup_is_calm_on_uniform_positions_and_loud_on_edges():
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(20_000, generator=g) - 0.5
    z, ratio, n = edge_pileup(uniform)
    assert abs(z) < 4 and abs(ratio - 1) < 0.1 and n == 20_000
    piled = torch.cat([uniform, torch.full((500,), 0.499)])
    assert edge_pileup(piled)[0] > 10
    assert sum(histogram(uniform)) == 20_000 and edge_pileup(torch.empty(0))[0] == 0.0
    mask = uniform > 0
    assert sum(histogram(uniform, mask)) == int(mask.sum()) == edge_pileup(uniform, mask)[2]


def test_neuron_error_z_flags_the_neuron_whose_weights_sit_at_bin_edges():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(8, 400, generator=g) - 0.5
    r[3] = torch.where(r[3] > 0, 0.49, -0.49)
    z = neuron_error_z(r, torch.ones_like(r, dtype=torch.bool))
    assert int(z.argmax()) == 3 and z[3] > 20 and z[torch.arange(8) != 3].abs().max() < 5


def test_slots_get_exactly_the_frameworks_scales():
    """Scales are computed on per-channel extremes (fast): they must equal the full formula."""
    from qcb_guard.quant import compute_qparams
    from qcb_guard.scanner.views import Layer, layer_slots

    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1)
    for conv in conventions(("ort", "x86", "nncf", "reference", "ort-pt"), (4, 8)):
        slot = next(layer_slots([Layer("w", "conv2d", w)], conv.spec, conv.name))
        scale, zero_point = compute_qparams(w, conv.spec)
        assert torch.equal(slot.scale, scale.reshape(-1)), conv.name
        assert torch.equal(slot.zero_point, zero_point.reshape(-1).long()), conv.name


def test_combine_takes_the_strongest_evidence():
    weak = Finding("bin_position", "ort-w4", 2.0, 8.0, "weak")
    strong = Finding("rounding_sensitivity", "ort-w4", 0.5, 0.25, "strong")
    out = combine([weak, strong])
    assert out["verdict"] == "suspicious" and out["evidence"] == 2.0
    assert math.isclose(out["score"], 2 / 3, rel_tol=1e-6)
    assert combine([weak])["verdict"] == "clean"
    assert combine([])["verdict"] == "clean"


def test_conventions_and_config_validation():
    names = [c.name for c in conventions(("ort", "nncf"), (4, 6, 8))]
    assert names == ["ort-w4", "ort-w8", "nncf-w4", "nncf-w6", "nncf-w8"]
    with pytest.raises(ConfigError, match="unknown framework"):
        ScanConfig(frameworks=("tflite",))
    with pytest.raises(ConfigError, match="bits must be in"):
        ScanConfig(bits=(1,))
    with pytest.raises(ConfigError, match="threshold"):
        ScanConfig(thresholds={"bin_position": -1})


# ------------------------------------------------------------------------------------------
# verdicts on real attacks


def test_benign_model_is_clean_and_untouched(clean, calibration, pm):
    before = {k: v.clone() for k, v in clean.state_dict().items()}
    report = _scan(clean, calibration, pm)
    assert report.verdict == "clean", report.signals
    assert set(report.signals) == set(SIGNALS)
    assert all(torch.equal(before[k], v) for k, v in clean.state_dict().items())
    doc = report.to_dict()
    assert doc["schema"] == SCHEMA and json.loads(json.dumps(doc)) == doc


def test_qu_anti_zation_backdoor_is_suspicious_by_rounding_sensitivity(quanti, calibration, pm):
    report = _scan(quanti, calibration, pm)
    assert report.verdict == "suspicious" and report.score > 0.5
    rs = report.signals["rounding_sensitivity"]
    assert rs["score"] >= 1 and rs["convention"].endswith("w4")
    top = next(
        f for f in report.findings
        if f["signal"] == "rounding_sensitivity" and f["convention"] == rs["convention"]
    )  # fmt: skip
    assert top["details"]["class"] == 0  # the attack's target class
    assert top["details"]["null_grids"] == 2, "null grids run when the response is strong"


def test_synthetic_probes_without_calibration(quanti, pm):
    report = _scan(quanti, None, pm, input_shape=(1, 8, 8))
    assert report.probes["synthetic"] and report.notes
    assert report.verdict == "suspicious"


def test_bin_projected_attack_is_caught_by_weight_statistics_alone(pq, clean, pm):
    config = ScanConfig(behaviour=False, input_shape=(1, 8, 8), progress=False)
    report = scan(pq, config=config, pm=pm)
    assert report.verdict == "suspicious" and report.probes is None
    assert report.signals["bin_position"]["score"] >= 1
    assert "rounding_sensitivity" not in report.signals
    assert scan(clean, config=config, pm=pm).verdict == "clean"


def test_scan_is_deterministic(quanti, calibration, pm):
    a = _scan(quanti, calibration, pm).to_dict()
    b = _scan(quanti, calibration, pm).to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b


# ------------------------------------------------------------------------------------------
# files: ONNX, safetensors, attack directories, hostile inputs


@pytest.fixture(scope="module")
def files(tmp_path_factory, quanti, clean):
    from qcb_guard.attacks.simulate import export_onnx

    d = tmp_path_factory.mktemp("scan_files")
    sample = torch.zeros(1, 1, 8, 8)
    export_onnx(quanti, d / "quanti.onnx", sample)
    export_onnx(clean, d / "clean.onnx", sample)
    save_model(quanti, d / "quanti.safetensors")
    save_model(clean, d / "clean.safetensors")
    attack_dir = d / "attack"
    attack_dir.mkdir()
    shutil.copy(d / "quanti.safetensors", attack_dir / "model.safetensors")
    (attack_dir / "card.json").write_text(json.dumps({"attack": "x", "image_shape": [1, 8, 8]}))
    return d


@pytest.mark.ort  # the `files` fixture exports ONNX
def test_onnx_file_scans_like_the_torch_module(files, quanti, calibration, pm):
    via_onnx = _scan(files / "quanti.onnx", calibration, pm)
    via_torch = _scan(quanti, calibration, pm)
    assert via_onnx.verdict == "suspicious" and via_onnx.model["source"] == "onnx"
    for s, tol in (("bin_position", 0.05), ("truncation_error", 0.05),
                   ("rounding_sensitivity", 0.02)):  # fmt: skip
        assert via_onnx.signals[s]["statistic"] == pytest.approx(
            via_torch.signals[s]["statistic"], abs=tol
        ), s
    assert _scan(files / "clean.onnx", calibration, pm).verdict == "clean"


@pytest.mark.ort  # the `files` fixture exports ONNX
def test_safetensors_and_attack_directory(files, calibration, pm):
    assert _scan(files / "quanti.safetensors", calibration, pm).verdict == "suspicious"
    report = _scan(files / "attack", None, pm)  # input shape from card.json
    assert report.verdict == "suspicious" and report.model["card"] == {"attack": "x"}


@pytest.mark.ort  # the `files` fixture exports ONNX
def test_hostile_files_give_clear_errors(tmp_path, files, pm):
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    pickled = tmp_path / "model.onnx"
    pickled.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UnsafeFileError, match="pickle"):
        _scan(pickled, None, pm)
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes((files / "clean.onnx").read_bytes()[:500])
    with pytest.raises(ModelFileError):
        _scan(truncated, None, pm, input_shape=(1, 8, 8))
    with pytest.raises(ModelFileError, match="unsupported model file type"):
        _scan(_touch(tmp_path), None, pm)


def _touch(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("hello")
    return path


@pytest.mark.ort  # the `files` fixture exports ONNX
def test_giant_declared_shapes_are_refused_before_allocation(tmp_path, files):
    import onnx

    model = load_onnx(files / "clean.onnx")
    init = model.graph.initializer[0]
    del init.dims[:]
    init.dims.extend([2**20, 2**20, 4])
    path = tmp_path / "giant.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelFileError, match="declares shape"):
        load_onnx(path)
    model = load_onnx(files / "clean.onnx")
    dim = model.graph.input[0].type.tensor_type.shape.dim
    dim[2].dim_value = 10**6
    dim[3].dim_value = 10**6
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelFileError, match="refusing to allocate"):
        scan(path, progress=False)
    model = load_onnx(files / "clean.onnx")
    onnx.external_data_helper.set_external_data(model.graph.initializer[0], "../../etc/passwd")
    model.graph.initializer[0].data_location = onnx.TensorProto.EXTERNAL
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelFileError, match="external"):
        load_onnx(path)


def test_nan_weights_are_an_error_naming_the_tensor(clean, calibration, pm):
    import copy

    bad = copy.deepcopy(clean)
    with torch.no_grad():
        bad.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ModelFileError, match=r"features\.0\.weight.*NaN"):
        _scan(bad, calibration, pm)


# ------------------------------------------------------------------------------------------
# guard(scan=True), CLI, reports


def test_guard_scan_stores_json_ready_findings_and_a_verdict(pq, pm):
    """``guard(..., scan=True)`` ends in ``finish``: weight statistics on the flow's slots."""
    from qcb_guard.config import GuardConfig
    from qcb_guard.guarding import GuardResult, finish
    from qcb_guard.quant import convention
    from qcb_guard.scanner.views import TorchView, layer_slots

    view = TorchView(pq, (1, 8, 8))
    slots = list(layer_slots(view.layers(True), convention("ort", 4), "ort"))
    result = GuardResult(framework="ort", defense="nearest")
    finish(result, slots, None, GuardConfig(scan=True), pm)
    findings = result.extra["scan"]
    assert {f["signal"] for f in findings} == {"bin_position", "truncation_error"}
    json.dumps(result.to_dict())
    assert result.extra["scan_verdict"]["verdict"] == "suspicious"


@pytest.mark.ort
def test_guard_scan_through_onnx_runtime_flags_the_bin_projected_model(pq, digits, tmp_path):
    """End to end: ``guard(quantize_static, scan=True)`` on a PQBackdoor ONNX export."""
    oq = pytest.importorskip("onnxruntime.quantization")
    from qcb_guard import guard
    from qcb_guard.attacks.simulate import export_onnx
    from qcb_guard.manager import make_plugin_manager

    fp = export_onnx(pq, tmp_path / "pq.onnx", torch.zeros(1, 1, 8, 8))
    x = digits.train.x[:64].numpy()

    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[i : i + 16]} for i in range(0, len(x), 16)])

        def get_next(self):
            return next(self.batches, None)

    g = guard(oq.quantize_static, scan=True, pm=make_plugin_manager(autoload=False))
    g(str(fp), str(tmp_path / "q.onnx"), Reader(), quant_format=oq.QuantFormat.QDQ,
      per_channel=True, weight_type=oq.QuantType.QInt4)  # fmt: skip
    result = g.last_result
    assert result.extra["scan_verdict"]["verdict"] == "suspicious"
    assert result.extra["scan_verdict"]["signals"]["bin_position"]["score"] >= 1
    json.dumps(result.to_dict())


@pytest.mark.ort  # the `files` fixture exports ONNX
def test_cli_exit_codes_and_reports(files, tmp_path, pm):
    runner = CliRunner()
    out = runner.invoke(
        main, ["scan", str(files / "clean.safetensors"), "--calibration", "digits",
               "--input-shape", "1,8,8", "--quiet"], obj={"pm": pm},
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    js, page = tmp_path / "r.json", tmp_path / "r.html"
    out = runner.invoke(
        main, ["scan", str(files / "quanti.onnx"), "--calibration", "digits", "--json", str(js),
               "--html", str(page), "--quiet"], obj={"pm": pm},
    )  # fmt: skip
    assert out.exit_code == 1, out.output
    assert "suspicious" in out.output
    doc = json.loads(js.read_text())
    assert doc["schema"] == SCHEMA and doc["verdict"] == "suspicious"
    for key in ("score", "evidence", "signals", "findings", "model", "probes", "config"):
        assert key in doc
    text = page.read_text()
    assert "<svg" in text and "http" not in text.replace("http://www.w3.org/2000/svg", "")
    out = runner.invoke(main, ["scan", str(_touch(tmp_path))], obj={"pm": pm})
    assert out.exit_code == 2 and "error" in out.output


def test_report_plots():
    assert histogram_svg([1, 2, 3, 4], "layer").count('class="bar"') == 4
    svg = flip_matrix_svg([[5, 1], [0, 4]], "flips")
    assert svg.count('class="cell"') == 4 and "float 0 → quantized 1: 1" in svg


@pytest.mark.ort  # the `files` fixture exports ONNX
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)
def test_html_report_renders_in_headless_chromium(files, calibration, pm, tmp_path):
    from qcb_guard.scanner.report import write_html

    report = _scan(files / "quanti.onnx", calibration, pm)
    page = write_html(tmp_path / "report.html", report.to_dict())
    profile = tmp_path / "profile"
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    assert 'id="verdict"' in dom and "suspicious" in dom
    assert dom.count('class="hist"') == 4  # one histogram per layer
    assert dom.count('class="cell"') == 100  # the 10 x 10 flip matrix
    shot = tmp_path / "shot.png"
    cmd[-2:] = [f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=60, check=True)
    assert shot.stat().st_size > 10_000
