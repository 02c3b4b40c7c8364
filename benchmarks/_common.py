"""Shared helpers for benchmark scripts: argument parsing, tables, JSON output."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from qcb_guard import __version__
from qcb_guard.fileio import write_json_atomic


def environment() -> dict[str, Any]:
    return {
        "qcb_guard": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save(path: str | Path, payload: dict[str, Any]) -> None:
    write_json_atomic(path, {"environment": environment(), **payload})
    print(f"\nJSON: {path}")


def pct(v: float | None) -> float | None:
    return None if v is None else 100.0 * v


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def add_defense_arguments(parser: argparse.ArgumentParser) -> None:
    """``--defenses``, ``--calibration`` and ``--options``, shared by the defense benchmarks."""
    parser.add_argument("--defenses", nargs="+", default=["adaround", "efrap"])
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument(
        "--options",
        type=json.loads,
        default={},
        help="defense options as JSON, e.g. '{\"iters\": 500}'",
    )
