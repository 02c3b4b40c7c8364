"""The ``qcb-guard`` command line.

Errors qcb_guard raises on purpose (:class:`~qcb_guard.errors.QcbGuardError`) print one line
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from qcb_guard import __version__
from qcb_guard.errors import QcbGuardError


def _friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except QcbGuardError as exc:
            click.echo(f"qcb-guard: error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def _plugin_manager(ctx: click.Context):
    from qcb_guard.manager import get_plugin_manager, make_plugin_manager

    opts = ctx.find_root().obj or {}
    if opts.get("block") or opts.get("no_autoload"):
        import os

        env_block = [b for b in os.environ.get("QCB_GUARD_BLOCK", "").split(",") if b]
        return make_plugin_manager(
            autoload=False if opts.get("no_autoload") else None,
            block=[*env_block, *opts.get("block", ())],
        )
    return get_plugin_manager()


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
@_friendly
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List loaded plugins (name, version, hooks) and what they registered."""
    pm = _plugin_manager(ctx)
    rows = pm.describe()
    registered = {
        kind: [{"name": e.name, "plugin": e.plugin, "description": e.description} for e in reg]
        for kind, reg in (
            ("defenses", pm.defenses),
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
@click.option("--bits", "bits", multiple=True, type=int, default=(8, 4), show_default=True)
@click.option("--epochs", default=None, type=int, help="Training epochs (default: per data set).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--out", default="qcb_guard_runs/demo", show_default=True, type=click.Path(path_type=Path)
)
@click.pass_context
@_friendly
def demo(
    ctx: click.Context,
    data: str,
    arch: str,
    bits: tuple[int, ...],
    epochs: int | None,
    seed: int,
    out: Path,
) -> None:
    """Run the whole story on the embedded default data and model."""
    from qcb_guard.demo import run_demo

    run_demo(
        data=data,
        arch=arch,
        bits=list(bits),
        epochs=epochs,
        seed=seed,
        out=out,
        pm=_plugin_manager(ctx),
    )
