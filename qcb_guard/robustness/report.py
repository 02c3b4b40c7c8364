"""The robustness study's report: the JSON document and a self-contained HTML page whose
plots are inline SVG (accuracy–ε curves per bit-width, transfer heat maps, spatial map,
the patches themselves), in the style of :mod:`qcb_guard.report`."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qcb_guard.fileio import write_json_atomic, write_text_atomic
from qcb_guard.report import render_html, table_html

__all__ = ["heatmap_svg", "line_chart_svg", "render", "sections", "write"]

_PALETTE = [
    "#1b1f23",
    "#0969da",
    "#1a7f37",
    "#bf8700",
    "#cf222e",
    "#8250df",
    "#57606a",
    "#fb8500",
    "#0a9396",
    "#9b2226",
]


def _esc(v: Any) -> str:
    return html.escape(str(v))


def line_chart_svg(
    xs: Sequence[float],
    series: Sequence[dict[str, Any]],
    *,
    title: str,
    xlabel: str = "ε",
    ylabel: str = "accuracy",
    width: int = 520,
    height: int = 300,
) -> str:
    """Lines ``{"label", "values", "color"?, "dashed"?}`` over ``xs``, y in [0, 1]."""
    left, right, top, bottom = 50, 170, 28, 40
    pw, ph = width - left - right, height - top - bottom
    lo, hi = min(xs), max(xs)
    span = (hi - lo) or 1.0

    def px(x: float) -> float:
        return left + (x - lo) / span * pw

    def py(v: float) -> float:
        return top + (1 - max(0.0, min(1.0, v))) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
        f"<title>{_esc(title)}</title>",
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{_esc(title)}</text>',
    ]
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        y = py(t)
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#d0d7de"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{t:.2f}</text>'
        )
    for x in xs:
        parts.append(
            f'<text x="{px(x):.1f}" y="{top + ph + 14}" font-size="10" '
            f'text-anchor="middle">{x:g}</text>'
        )
    parts.append(
        f'<text x="{left + pw / 2}" y="{height - 6}" font-size="11" '
        f'text-anchor="middle">{_esc(xlabel)}</text>'
        f'<text x="12" y="{top + ph / 2}" font-size="11" transform="rotate(-90 12 '
        f'{top + ph / 2})" text-anchor="middle">{_esc(ylabel)}</text>'
    )
    for i, s in enumerate(series):
        color = s.get("color") or _PALETTE[i % len(_PALETTE)]
        dash = ' stroke-dasharray="5 3"' if s.get("dashed") else ""
        pts = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in zip(xs, s["values"], strict=True))
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}/>'
        )
        for x, v in zip(xs, s["values"], strict=True):
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="2.5" fill="{color}"/>')
        ly = top + 12 + 15 * i
        parts.append(
            f'<line x1="{left + pw + 10}" y1="{ly - 4}" x2="{left + pw + 30}" y2="{ly - 4}" '
            f'stroke="{color}" stroke-width="2"{dash}/>'
            f'<text x="{left + pw + 34}" y="{ly}" font-size="11">{_esc(s["label"])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _heat(v: float | None, vmin: float, vmax: float) -> str:
    if v is None:
        return "#eeeeee"
    t = 0.0 if vmax <= vmin else max(0.0, min(1.0, (v - vmin) / (vmax - vmin)))
    r, g, b = int(255 - 48 * t), int(255 - 215 * t), int(255 - 215 * t)  # white → red
    return f"rgb({r},{g},{b})"


def heatmap_svg(
    matrix: Sequence[Sequence[float | None]],
    rows: Sequence[str] | None,
    cols: Sequence[str] | None,
    *,
    title: str,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cell: int = 44,
    numbers: bool = True,
) -> str:
    """A colour-coded matrix (white = ``vmin``, red = ``vmax``), optional labels and values."""
    left = 8 + (max((len(r) for r in rows), default=0) * 7 if rows else 0)
    top = 24 + (max((len(c) for c in cols), default=0) * 6 if cols else 0)
    n_rows, n_cols = len(matrix), max((len(r) for r in matrix), default=0)
    width, height = left + n_cols * cell + 10, top + n_rows * cell + 10
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
        f"<title>{_esc(title)}</title>",
        f'<text x="0" y="14" font-size="13" font-weight="bold">{_esc(title)}</text>',
    ]
    for j, c in enumerate(cols or []):
        x = left + j * cell + cell / 2
        parts.append(
            f'<text x="{x:.1f}" y="{top - 4}" font-size="10" transform="rotate(-45 {x:.1f} '
            f'{top - 4})">{_esc(c)}</text>'
        )
    for i, row in enumerate(matrix):
        y = top + i * cell
        if rows:
            parts.append(
                f'<text x="{left - 4}" y="{y + cell / 2 + 4:.1f}" font-size="10" '
                f'text-anchor="end">{_esc(rows[i])}</text>'
            )
        for j, v in enumerate(row):
            x = left + j * cell
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" '
                f'fill="{_heat(v, vmin, vmax)}" stroke="#ffffff"/>'
            )
            if numbers and v is not None:
                parts.append(
                    f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" font-size="10" '
                    f'text-anchor="middle">{100 * v:.0f}</text>'
                )
    parts.append("</svg>")
    return "".join(parts)


def image_svg(pixels: Sequence[Sequence[Sequence[float]]], *, title: str, scale: int = 8) -> str:
    """A [C, H, W] image in [0, 1] as SVG rectangles (grey for one channel, else RGB)."""
    c = len(pixels)
    h, w = len(pixels[0]), len(pixels[0][0])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * scale}" height="{h * scale + 16}" '
        f'role="img"><title>{_esc(title)}</title>'
        f'<text x="0" y="12" font-size="11">{_esc(title)}</text>'
    ]
    for i in range(h):
        for j in range(w):
            rgb = [pixels[k if c == 3 else 0][i][j] for k in range(3)]
            r, g, b = (int(255 * max(0.0, min(1.0, v))) for v in rgb)
            parts.append(
                f'<rect x="{j * scale}" y="{16 + i * scale}" width="{scale}" height="{scale}" '
                f'fill="rgb({r},{g},{b})"/>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _models_section(report: dict[str, Any]) -> dict[str, str]:
    rows = [
        [m["name"], m["bits"] or "fp32", m["defense"] or "-", _pct(m["clean"]), m["train_seconds"]]
        for m in report["models"]
    ]
    flows = [
        [f"{f['flow']} (real)", f["bits"], "-", _pct(f["clean"]), f["error"] or ""]
        for f in report.get("flows", [])
    ]
    body = table_html(["model", "bits", "defense", "clean %", "train s / error"], rows + flows)
    q = report.get("quantization", {})
    note = "".join(f"<li>{_esc(k)}: {_esc(v)}</li>" for k, v in q.items())
    return {"title": "Models", "html": f"<ul>{note}</ul>{body}"}


def _evasion_sections(report: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for attack, block in report.get("evasion", {}).items():
        eps = block["eps"]
        charts = []
        for mode, label in (
            ("white-box", "white-box (through fake quantization, STE)"),
            ("transfer", "transferred from the float model"),
        ):
            wanted = {mode, "real-transfer"} if mode == "transfer" else {mode}
            series = [
                {
                    "label": c["model"] + (" (real flow)" if c["mode"] == "real-transfer" else ""),
                    "values": c["accuracy"],
                    "dashed": c["defense"] is not None or c["mode"] == "real-transfer",
                }
                for c in block["curves"]
                if c["mode"] in wanted or c["model"] == "fp"
            ]
            charts.append(line_chart_svg(eps, series, title=f"{attack}: accuracy vs ε, {label}"))
        rows = [
            [
                c["model"],
                c["mode"],
                c["bits"] or "fp32",
                c["defense"] or "-",
                *[_pct(a) for a in c["accuracy"]],
            ]
            for c in block["curves"]
        ]
        table = table_html(["model", "mode", "bits", "defense", *[f"ε={e:g}" for e in eps]], rows)
        out.append({"title": f"Evasion: {attack}", "html": "".join(charts) + table})
    return out


def _patch_sections(report: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for name, block in report.get("patch", {}).items():
        heat = heatmap_svg(
            block["asr"],
            block["sources"],
            block["targets"],
            title=f"{name}: ASR % (rows: patch optimised on; columns: evaluated on)",
        )
        maps = "".join(
            heatmap_svg(
                grid,
                None,
                None,
                numbers=False,
                cell=10,
                title=f"spatial ASR on {model} (top-left corner, stride "
                f"{block['spatial']['stride']})",
            )
            for model, grid in block["spatial"]["maps"].items()
        )
        images = "".join(image_svg(p, title=src) for src, p in block["patches"].items())
        intro = (
            f"<p>Target class {block['target']}, {block['size']}×{block['size']} patch, "
            f"{block['steps']} Adam steps, {block.get('placement', 'random')} placement.</p>"
        )
        out.append(
            {"title": f"Patch: {name}", "html": intro + heat + maps + "<div>" + images + "</div>"}
        )
    return out


def _extraction_sections(report: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for name, block in report.get("extraction", {}).items():
        rows = [
            [
                r["victim"],
                r["deployed"],
                r["perturbation"],
                r["labels"],
                _pct(r["victim_clean"]),
                _pct(r["surrogate_accuracy"]),
                _pct(r["fidelity"]),
                _pct(r["top1_kept"]),
            ]
            for r in block["rows"]
        ]
        table = table_html(
            [
                "victim",
                "deployed",
                "perturbation",
                "labels",
                "victim clean %",
                "surrogate acc %",
                "fidelity %",
                "top-1 kept %",
            ],
            rows,
        )
        labels = [f"{r['victim']} {r['perturbation']} {r['labels']}" for r in block["rows"]]
        matrix = [[r["fidelity"]] for r in block["rows"]]
        chart = heatmap_svg(matrix, labels, ["fidelity"], title="surrogate fidelity %")
        intro = (
            f"<p>{block['queries']} queries from the <code>{_esc(block['transfer'])}</code> "
            f"transfer set, victims at {block['bits']} bits, surrogate {block['epochs']} "
            "epochs.</p>"
        )
        out.append({"title": f"Extraction: {name}", "html": intro + table + chart})
    return out


def sections(report: dict[str, Any]) -> list[dict[str, str]]:
    """HTML sections of a study report, in reading order."""
    return [
        _models_section(report),
        *_evasion_sections(report),
        *_patch_sections(report),
        *_extraction_sections(report),
    ]


def render(report: dict[str, Any]) -> str:
    return render_html(str(report.get("title", "qcb_guard robustness")), sections(report))


def write(
    report: dict[str, Any],
    *,
    json_path: str | Path | None = None,
    html_path: str | Path | None = None,
    pm: Any = None,
) -> list[Path]:
    """Write the JSON and/or HTML atomically; plugins' ``qcb_guard_report_sections`` are
    appended to the HTML."""
    written = []
    if json_path is not None:
        written.append(write_json_atomic(json_path, report))
    if html_path is not None:
        extra: list[dict[str, str]] = []
        if pm is not None:
            for more in pm.hook.qcb_guard_report_sections(report=report):
                extra += list(more or [])
        page = render_html(
            str(report.get("title", "qcb_guard robustness")), sections(report) + extra
        )
        written.append(write_text_atomic(html_path, page))
    return written
