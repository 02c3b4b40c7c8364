"""The command line: plugins listing, demo, and clean errors."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from qcb_guard.cli import main


def test_plugins_json_lists_builtins_and_registrations():
    result = CliRunner().invoke(main, ["--no-autoload", "plugins", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    names = {p["name"] for p in data["plugins"]}
    assert {"nearest", "ort", "nncf", "pt2e", "torch-ao"} <= names
    defenses = {d["name"]: d for d in data["defenses"]}
    assert {"nearest", "efrap", "adaround", "lac", "qvec"} <= set(defenses)
    assert defenses["nearest"]["plugin"] == "nearest" and defenses["lac"]["plugin"] == "lac"


def test_blocking_a_plugin_from_the_command_line():
    result = CliRunner().invoke(main, ["-p", "nearest", "plugins", "--json"])
    assert result.exit_code == 0, result.output
    assert "nearest" not in {p["name"] for p in json.loads(result.output)["plugins"]}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's main job as it ships (real ONNX Runtime int4 flow, ~1-2 min on 2 cores):
    fewer epochs leave the implanted backdoor too weak to show anything."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("demo")
    args = ["demo", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_demo_implants_a_qcb_that_guard_keeps_dormant(demo_run):
    out, output = demo_run
    report = json.loads((out / "report.json").read_text())
    rows = {(r["model"], r["defense"]): r for r in report["rows"]}
    assert report["flow"] == "ort-static" and report["defenses"] == ["guard"]
    clean_fp, bad_fp = rows["clean", "-"], rows["backdoored", "-"]
    woke, guarded = rows["backdoored", "none (nearest)"], rows["backdoored", "guard"]
    assert clean_fp["cda"] > 0.85 and rows["clean", "guard"]["cda"] > clean_fp["cda"] - 0.03
    assert bad_fp["asr"] < 0.3 < 0.7 < woke["asr"]  # dormant in float, awake once quantized
    assert guarded["asr"] < 0.1 and guarded["cda"] > bad_fp["cda"] - 0.05
    assert "wakes the backdoor" in report["story"] and "With guard(): ASR" in output
    # the scanner, without the trigger, tells the two float models apart
    assert report["scan"]["clean"]["verdict"] == "clean"
    assert report["scan"]["backdoored"]["verdict"] == "suspicious"
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and html.count("<svg") >= 2
    assert (out / "model.safetensors").stat().st_size > 10_000
    assert (out / "trigger.npz").is_file()


def test_bad_input_gives_one_line_error_and_status_2(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--bits", "9", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "bits must be in [2, 8], got 9" in result.output
    result = CliRunner().invoke(main, ["demo", "--flow", "tflite", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown flow 'tflite'" in result.output
    result = CliRunner().invoke(main, ["demo", "--attack", "fgsm", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "needs a backdoor attack" in result.output
    result = CliRunner().invoke(main, ["demo", "--data", "cifar100", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "error:" in result.output and "digits" in result.output


def test_evaluate_a_saved_model_with_a_trigger(tmp_path, demo_run):
    from qcb_guard.data import square

    out = tmp_path / "demo"
    shutil.copytree(demo_run[0], out)
    square((1, 8, 8), size=2, target=1).save_npz(out / "trigger.npz")
    report_path = tmp_path / "eval.json"
    args = ["evaluate", str(out), "--data", "digits", "--bits", "4", "--flows", "reference"]
    args += [
        "--defense",
        "none",
        "--defense",
        "nearest",
        "--json",
        str(report_path),
        "--html",
        str(tmp_path / "e.html"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["target"] == 1 and [r["flow"] for r in report["rows"]] == [
        "float32",
        "reference",
        "reference",
    ]
    plain, nearest = report["rows"][1], report["rows"][2]
    assert (plain["cda"], plain["asr"]) == (nearest["cda"], nearest["asr"])
    assert 0.0 <= plain["asr"] <= 1.0 and "<table>" in (tmp_path / "e.html").read_text()
    bad = CliRunner().invoke(main, ["evaluate", str(out), "--data", "digits", "--flows", "tflite"])
    assert bad.exit_code == 2 and "unknown flow" in bad.output
