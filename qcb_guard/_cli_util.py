"""Helpers shared by every ``qcb-guard`` subcommand (the main group's and plugins')."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from qcb_guard.errors import QcbGuardError


def friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Errors raised on purpose print one line and exit with status 2; anything else is a
    bug and keeps its traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except QcbGuardError as exc:
            click.echo(f"qcb-guard: error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def plugin_manager(ctx: click.Context) -> Any:
    """The plugin manager for a command: one handed in by the caller (``obj={"pm": pm}``), a
    fresh one honouring ``-p NAME`` / ``--no-autoload``, or the process-wide one."""
    from qcb_guard.manager import get_plugin_manager, make_plugin_manager

    opts = ctx.find_root().obj or {}
    if not isinstance(opts, dict):
        return get_plugin_manager()
    if opts.get("pm") is not None:
        return opts["pm"]
    if opts.get("block") or opts.get("no_autoload"):
        env_block = [b for b in os.environ.get("QCB_GUARD_BLOCK", "").split(",") if b]
        return make_plugin_manager(
            autoload=False if opts.get("no_autoload") else None,
            block=[*env_block, *opts.get("block", ())],
        )
    return get_plugin_manager()
