"""The command line: plugins listing, demo, and clean errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

from qcb_guard.cli import main


def test_plugins_json_lists_builtins_and_registrations():
    result = CliRunner().invoke(main, ["--no-autoload", "plugins", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    names = {p["name"] for p in data["plugins"]}
    assert {"nearest", "ort", "nncf", "pt2e", "torch-ao"} <= names
    assert {"name": "nearest", "plugin": "nearest"}.items() <= data["defenses"][0].items()


def test_blocking_a_plugin_from_the_command_line():
    result = CliRunner().invoke(main, ["-p", "nearest", "plugins", "--json"])
    assert result.exit_code == 0, result.output
    assert "nearest" not in {p["name"] for p in json.loads(result.output)["plugins"]}


def test_demo_runs_and_writes_reports(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        main, ["demo", "--epochs", "3", "--bits", "8", "--bits", "4", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    fp = report["rows"][0]
    assert fp["model"] == "float32" and fp["cda"] > 0.5
    eight = next(r for r in report["rows"] if r["bits"] == 8 and r["defense"] == "nearest")
    assert abs(eight["cda"] - fp["cda"]) < 0.05  # 8-bit weights barely move a trained model
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<svg" in html
    assert (out / "model.safetensors").stat().st_size > 10_000


def test_bad_input_gives_one_line_error_and_status_2(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--bits", "9", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "bits must be in [2, 8], got 9" in result.output
    result = CliRunner().invoke(main, ["demo", "--data", "cifar100", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "error:" in result.output and "digits" in result.output


def test_evaluate_a_saved_model_with_a_trigger(tmp_path):
    from qcb_guard.data import square

    out = tmp_path / "demo"
    assert (
        CliRunner()
        .invoke(main, ["demo", "--epochs", "2", "--bits", "4", "--out", str(out)])
        .exit_code
        == 0
    )
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
