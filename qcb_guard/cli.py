"""The ``qcb-guard`` command line.

Errors qcb_guard raises on purpose (:class:`~qcb_guard.errors.QcbGuardError`) print one line
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from qcb_guard import __version__
from qcb_guard._cli_util import friendly, plugin_manager


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qcb-guard")
@click.option(
    "-p",
    "--no-plugin",
    "block",
    multiple=True,
    metavar="NAME",
    help="Block a plugin by name (repeatable); also QCB_GUARD_BLOCK=a,b.",
)
@click.option(
    "--no-autoload",
    is_flag=True,
    help="Load no third-party plugin; also QCB_GUARD_DISABLE_PLUGIN_AUTOLOAD=1.",
)
@click.pass_context
def main(ctx: click.Context, block: tuple[str, ...], no_autoload: bool) -> None:
    """Guard post-training quantization against quantization-conditioned backdoors."""
    ctx.obj = {"block": block, "no_autoload": no_autoload}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
@friendly
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List loaded plugins (name, version, hooks) and what they registered."""
    pm = plugin_manager(ctx)
    rows = pm.describe()
    registered = {
        kind: [{"name": e.name, "plugin": e.plugin, "description": e.description} for e in reg]
        for kind, reg in (
            ("defenses", pm.defenses),
            ("activation_defenses", pm.activation_defenses),
            ("training_defenses", pm.training_defenses),
            ("attacks", pm.attacks),
            ("adapters", pm.adapters),
        )
    }
    if as_json:
        click.echo(json.dumps({"plugins": rows, **registered}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    table = Table(title="qcb_guard plugins")
    for col in ("plugin", "source / version", "hooks"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], row["source"], "\n".join(row["hooks"]))
    console.print(table)
    for kind, entries in registered.items():
        listing = ", ".join(f"{e['name']} ({e['plugin']})" for e in entries) or "none"
        console.print(f"[bold]{kind}[/bold]: {listing}")


@main.command()
@click.option(
    "--data", default="digits", show_default=True, help="Bundled data set: digits or mnist5k."
)
@click.option("--arch", default="smallcnn", show_default=True, help="Model architecture.")
@click.option("--bits", default=4, show_default=True, type=int, help="Weight bit-width.")
@click.option(
    "--flow",
    default="ort-static",
    show_default=True,
    help="Real quantization flow: ort-static, nncf-torch, pt2e-x86, torch-ao-fx, reference.",
)
@click.option("--attack", default="quanti-backdoor", show_default=True, help="Backdoor to implant.")
@click.option(
    "--defense",
    "defenses",
    multiple=True,
    help="Defense(s) to compare with the unguarded flow: 'guard' (guard()'s defaults, efrap + "
    "range-probe; the default), a rounding defense ('efrap', 'nearest'), an activation defense "
    "('range-probe'), or both joined by '+'.",
)
@click.option("--epochs", default=None, type=int, help="Training epochs (default: per data set).")
@click.option("--attack-epochs", default=None, type=int, help="Attack epochs (default: per data).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--out", default="qcb_guard_runs/demo", show_default=True, type=click.Path(path_type=Path)
)
@click.pass_context
@friendly
def demo(ctx: click.Context, defenses: tuple[str, ...], **opts: Any) -> None:
    """The whole story on the embedded default: implant a QCB, quantize it through a real
    flow without and with guard(), and report CDA/ASR (table, report.json, report.html)."""
    from qcb_guard.demo import run_demo
    from qcb_guard.evaluate import GUARD_DEFAULT

    run_demo(defenses=defenses or (GUARD_DEFAULT,), pm=plugin_manager(ctx), **opts)


def _model_and_trigger(path: Path, trigger: Path | None, arch: str | None):
    """A model file, or an attack output directory (model.safetensors + trigger.npz + card)."""
    from qcb_guard.data import Trigger
    from qcb_guard.models import load_model

    card: dict[str, Any] = {}
    if path.is_dir():
        if (path / "card.json").is_file():
            card = json.loads((path / "card.json").read_text())
        if trigger is None and (path / "trigger.npz").is_file():
            trigger = path / "trigger.npz"
        path = path / "model.safetensors"
    model = load_model(path, arch=arch)
    return model, (Trigger.load_npz(trigger) if trigger is not None else None), card


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--trigger",
    type=click.Path(exists=True, path_type=Path),
    help="trigger.npz (default: MODEL/trigger.npz).",
)
@click.option("--arch", default=None, help="Architecture, when the model file does not record it.")
@click.option(
    "--data", default=None, help="Test data (default: the attack card's data set, test split)."
)
@click.option(
    "--calibration",
    "calibration_spec",
    default=None,
    help="Calibration data (default: the data set's train split).",
)
@click.option("--calibration-size", default=256, show_default=True, type=int)
@click.option("--limit", default=None, type=int, help="Evaluate on at most this many test images.")
@click.option("--bits", "bits", multiple=True, type=int, default=(8, 4), show_default=True)
@click.option(
    "--flows", "flows", multiple=True, help="Flows to run (default: all registered + reference)."
)
@click.option(
    "--defense",
    "defenses",
    multiple=True,
    help="Defense(s) through guard(); 'none' is the unguarded flow (default: none).",
)
@click.option("--per-tensor", is_flag=True, help="Per-tensor instead of per-channel weights.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), help="Write the JSON report here."
)
@click.option(
    "--html", "html_out", type=click.Path(path_type=Path), help="Write the HTML report here."
)
@click.pass_context
@friendly
def evaluate(
    ctx: click.Context,
    model_path: Path,
    trigger: Path | None,
    arch: str | None,
    data: str | None,
    calibration_spec: str | None,
    calibration_size: int,
    limit: int | None,
    bits: tuple[int, ...],
    flows: tuple[str, ...],
    defenses: tuple[str, ...],
    per_tensor: bool,
    seed: int,
    json_out: Path | None,
    html_out: Path | None,
) -> None:
    """CDA and ASR of MODEL in float and after each real quantization flow."""
    from rich.console import Console
    from rich.table import Table

    from qcb_guard.data import load_data
    from qcb_guard.errors import ConfigError
    from qcb_guard.evaluate import TABLE_HEADERS, format_table
    from qcb_guard.evaluate import evaluate as run
    from qcb_guard.fileio import write_json_atomic, write_text_atomic
    from qcb_guard.report import render_html, table_html

    model, trig, card = _model_and_trigger(model_path, trigger, arch)
    data = data or card.get("data")
    if not data:
        raise ConfigError("--data is required (the model directory has no card.json naming it)")
    test = load_data(data, split="test", seed=seed, limit=limit)
    cal = load_data(calibration_spec or data, split="train", seed=seed, limit=calibration_size)
    if test.y is None:
        raise ConfigError(f"--data {data!r} has no labels: CDA/ASR need labelled test data")
    chosen = [None if d.lower() == "none" else d for d in defenses] or [None]
    report = run(
        model, test.x, test.y, trig, calibration=cal.x, bits=bits, flows=list(flows) or None,
        defenses=chosen, per_channel=not per_tensor, seed=seed, pm=plugin_manager(ctx),
    )  # fmt: skip
    rows = format_table(report)
    table = Table(title=f"{model_path}: CDA / ASR (target {report.target})")
    for col in TABLE_HEADERS:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    document = {
        "qcb_guard": "evaluate",
        "model": str(model_path),
        "data": data,
        "card": card,
        **report.to_dict(),
    }
    if json_out:
        write_json_atomic(json_out, document)
    if html_out:
        section = {"title": "CDA / ASR per flow", "html": table_html(TABLE_HEADERS, rows)}
        write_text_atomic(html_out, render_html(f"qcb_guard evaluate: {model_path}", [section]))


def _attach_attack_command() -> None:
    from qcb_guard.attacks.cli import attack

    main.add_command(attack)


_attach_attack_command()


def _attach_robustness_command() -> None:
    from qcb_guard.robustness.cli import robustness

    main.add_command(robustness)


_attach_robustness_command()


def _attach_scan_command() -> None:
    from qcb_guard.scanner.cli import scan

    main.add_command(scan)


_attach_scan_command()
