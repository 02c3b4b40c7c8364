"""``qcb-guard scan MODEL``: exit status 0 clean, 1 suspicious, 2 error."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from qcb_guard._cli_util import friendly, plugin_manager
from qcb_guard.errors import ConfigError


def _shape(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise ConfigError(f"--input-shape takes C,H,W integers, got {value!r}") from None


@click.command("scan")
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, path_type=Path))
@click.option("--calibration", default=None, help="Unlabelled inputs (a --data spec).")
@click.option("--calibration-size", default=128, show_default=True, type=int)
@click.option("--arch", default=None, help="Architecture, when a safetensors file lacks it.")
@click.option("--input-shape", default=None, help="C,H,W when nothing else says it.")
@click.option(
    "--frameworks", default="ort,x86,nncf,reference", show_default=True, help="Grids to probe."
)
@click.option("--bits", default="4,8", show_default=True, help="Bit-widths to probe.")
@click.option("--weights-only", is_flag=True, help="Weight statistics only (no forward pass).")
@click.option(
    "--signals",
    default=None,
    help="Comma-separated signals to run (default: all but opt-in ones); add "
    "'activation_reach' for static-activation QCBs (gradient ascent: ~1 min on a 400k-weight "
    "CNN, ~10 min on ResNet-18).",
)
@click.option(
    "--activation-options",
    default=None,
    help="JSON options of the activation_reach signal, e.g. '{\"budget_s\": 300}'.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="JSON report.")
@click.option("--html", "html_out", type=click.Path(path_type=Path), help="HTML report.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
@friendly
def scan(ctx: click.Context, model_path: Path, **opts: Any) -> None:
    """Scan MODEL for a quantization-conditioned backdoor (exit 0 clean, 1 suspicious)."""
    from qcb_guard.scanner import ScanConfig
    from qcb_guard.scanner import scan as run
    from qcb_guard.scanner.report import write_html, write_json

    pm = plugin_manager(ctx)
    try:
        bits = tuple(int(b) for b in opts["bits"].split(","))
    except ValueError:
        raise ConfigError(f"--bits takes integers, got {opts['bits']!r}") from None
    if opts["calibration_size"] < 1:
        raise ConfigError(f"--calibration-size must be >= 1, got {opts['calibration_size']}")
    signals = None
    if opts["signals"]:
        signals = tuple(x.strip() for x in opts["signals"].split(",") if x.strip())
    activation_options: dict[str, Any] = {}
    if opts["activation_options"]:
        try:
            activation_options = json.loads(opts["activation_options"])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--activation-options is not JSON: {exc}") from None
        if not isinstance(activation_options, dict):
            raise ConfigError("--activation-options takes a JSON object")
    config = ScanConfig(
        signals=signals,
        activation_options=activation_options,
        frameworks=tuple(f.strip() for f in opts["frameworks"].split(",") if f.strip()),
        bits=bits,
        behaviour=not opts["weights_only"],
        clean=opts["calibration_size"],
        input_shape=_shape(opts["input_shape"]),
        seed=opts["seed"],
        progress=False if opts["quiet"] else None,
    )
    calibration = None
    if opts["calibration"]:
        from qcb_guard.data import load_data

        calibration = load_data(
            opts["calibration"], split="train", seed=opts["seed"], limit=opts["calibration_size"]
        ).x
    report = run(model_path, calibration, arch=opts["arch"], config=config, pm=pm)
    document = report.to_dict()
    if opts["json_out"]:
        write_json(opts["json_out"], document)
    if opts["html_out"]:
        write_html(opts["html_out"], document, pm)
    click.echo(f"{model_path}: {report.verdict} (score {report.score:.3f})")
    for name, s in report.signals.items():
        click.echo(f"  {name:22s} evidence {s['score']}  [{s['convention']}] {s['explanation']}")
    for note in report.notes:
        click.echo(f"  note: {note}")
    sys.exit(1 if report.suspicious else 0)
