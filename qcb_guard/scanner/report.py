"""Scan reports: the JSON document (schema ``qcb_guard.scan/1``, docs/scanner.md) and a
self-contained HTML page whose plots are inline SVG (no script, no network)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qcb_guard.fileio import write_json_atomic, write_text_atomic
from qcb_guard.report import render_html, table_html

_EDGE = "#cf222e"
_BAR = "#0969da"


def histogram_svg(counts: Sequence[int], title: str, width: int = 220, height: int = 90) -> str:
    """Bars of a bin-position histogram over [-0.5, 0.5]; the outer bars (bin edges) in red,
    the uniform expectation as a dashed line."""
    total = sum(counts)
    bins = len(counts)
    top = max(max(counts, default=0), total / bins if bins else 0, 1)
    plot_h = height - 28
    bar_w = (width - 10) / max(bins, 1)
    bars = []
    for i, c in enumerate(counts):
        h = plot_h * c / top
        colour = _EDGE if i in (0, bins - 1) else _BAR
        bars.append(
            f'<rect class="bar" x="{5 + i * bar_w:.1f}" y="{16 + plot_h - h:.1f}" '
            f'width="{bar_w - 1:.1f}" height="{h:.1f}" fill="{colour}"/>'
        )
    uniform = 16 + plot_h - plot_h * (total / bins) / top if bins else 16
    return (
        f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' role="img"><title>{html.escape(title)}</title>'
        f'<text x="5" y="11" font-size="10">{html.escape(title)}</text>{"".join(bars)}'
        f'<line x1="5" x2="{width - 5}" y1="{uniform:.1f}" y2="{uniform:.1f}" stroke="#57606a"'
        f' stroke-dasharray="3,2"/><text x="5" y="{height - 2}" font-size="9">-0.5</text>'
        f'<text x="{width / 2 - 4:.0f}" y="{height - 2}" font-size="9">0</text>'
        f'<text x="{width - 25}" y="{height - 2}" font-size="9">+0.5</text></svg>'
    )


def flip_matrix_svg(matrix: Sequence[Sequence[int]], title: str, cell: int = 26) -> str:
    """Heat map of (float class → quantized class) counts; off-diagonal cells are flips."""
    n = len(matrix)
    peak = max((v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j), default=0)
    size = 40 + n * cell
    cells = []
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if i == j:
                fill = "#eaeef2"
            else:
                a = 0.0 if peak == 0 else math.log1p(v) / math.log1p(peak)
                fill = f"rgba(207,34,46,{a:.3f})"
            x, y = 30 + j * cell, 30 + i * cell
            cells.append(
                f'<rect class="cell" x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                f'fill="{fill}"><title>float {i} → quantized {j}: {v}</title></rect>'
                f'<text x="{x + cell / 2 - 1:.0f}" y="{y + cell / 2 + 3:.0f}" font-size="8" '
                f'text-anchor="middle">{v if v else ""}</text>'
            )
    labels = "".join(
        f'<text x="{30 + k * cell + cell / 2 - 3:.0f}" y="26" font-size="10">{k}</text>'
        f'<text x="16" y="{30 + k * cell + cell / 2 + 3:.0f}" font-size="10">{k}</text>'
        for k in range(n)
    )
    return (
        f'<svg class="flips" xmlns="http://www.w3.org/2000/svg" width="{max(size, 380)}" '
        f'height="{size}" role="img"><title>{html.escape(title)}</title>'
        f'<text x="30" y="12" font-size="11">{html.escape(title)} (rows: float, columns: '
        f"quantized)</text>{labels}{''.join(cells)}</svg>"
    )


def _worst(findings: list[dict[str, Any]], signal: str) -> dict[str, Any] | None:
    mine = [f for f in findings if f.get("signal") == signal]
    return max(mine, key=lambda f: f.get("score") or 0.0, default=None)


def sections(report: dict[str, Any]) -> list[dict[str, str]]:
    """The HTML sections of a scan report's JSON form."""
    verdict = report["verdict"]
    cls = "bad" if verdict == "suspicious" else "good"
    model = report.get("model", {})
    out = [
        {
            "title": "Verdict",
            "html": (
                f'<p class="{cls}" id="verdict"><strong>{html.escape(verdict)}</strong> — '
                f"score {report['score']:.3f} (0.5 is the decision boundary; evidence "
                f"{report.get('evidence')})</p><p>Model: <code>"
                f"{html.escape(str(model.get('path') or model.get('name')))}</code></p>"
                + "".join(f"<p>Note: {html.escape(n)}</p>" for n in report.get("notes", []))
            ),
        }
    ]
    rows, classes = [], []
    for name, s in report["signals"].items():
        rows.append(
            [name, s["score"], s["statistic"], s["threshold"], s["convention"], s["explanation"]]
        )
        classes.append("bad" if (s["score"] is None or s["score"] >= 1) else "")
    out.append(
        {
            "title": "Signals (strongest grid of each)",
            "html": table_html(
                ["signal", "evidence", "statistic", "threshold", "grid", "explanation"],
                rows,
                classes,
            ),
        }
    )
    findings = report.get("findings", [])
    bins = _worst(findings, "bin_position")
    if bins:
        plots = "".join(
            histogram_svg(ly["histogram"], f"{ly['layer']} (z {ly['edge_z']:.1f}, n {ly['n']})")
            for ly in bins.get("layers", [])
        )
        out.append(
            {
                "title": f"Bin positions per layer, grid {bins['convention']}",
                "html": "<p>Where each weight sits inside its rounding bin, in steps; red bars "
                "are the outer bands next to the bin edges, the dashed line is uniform.</p>"
                f'<div id="histograms">{plots}</div>',
            }
        )
        trunc = {
            ly["layer"]: ly for ly in (_worst(findings, "truncation_error") or {}).get("layers", [])
        }
        layer_rows = [
            [ly["layer"], ly["n"], ly["edge_z"], ly["edge_ratio"],
             trunc.get(ly["layer"], {}).get("max_z"), trunc.get(ly["layer"], {}).get("error_ratio")]
            for ly in bins.get("layers", [])
        ]  # fmt: skip
        out.append(
            {
                "title": "Per-layer weight statistics",
                "html": table_html(
                    [
                        "layer",
                        "free weights",
                        "edge z",
                        "edge ratio",
                        "max neuron z",
                        "error ratio",
                    ],
                    layer_rows,
                ),
            }
        )
    rounding = _worst(findings, "rounding_sensitivity")
    if rounding and rounding.get("details", {}).get("flip_matrix"):
        d = rounding["details"]
        out.append(
            {
                "title": f"Per-class flip matrix, grid {rounding['convention']}",
                "html": flip_matrix_svg(d["flip_matrix"], "predictions on all probes")
                + f"<p>Strongest response: class {d['class']} on probe group "
                f"<code>{html.escape(str(d['group']))}</code>.</p>",
            }
        )
    all_rows = [
        [f["signal"], f["convention"], f.get("statistic"), f.get("score")] for f in findings
    ]
    out.append(
        {
            "title": "All findings",
            "html": table_html(["signal", "grid", "statistic", "evidence"], all_rows),
        }
    )
    return out


def write_json(path: str | Path, report: dict[str, Any]) -> Path:
    return write_json_atomic(path, report)


def write_html(path: str | Path, report: dict[str, Any], pm: Any = None) -> Path:
    parts = sections(report)
    if pm is not None:
        for extra in pm.hook.qcb_guard_report_sections(report=report):
            parts.extend(extra or [])
    title = f"qcb_guard scan: {report['verdict']}"
    return write_text_atomic(path, render_html(title, parts))
