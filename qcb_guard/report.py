"""Reports: a JSON document and a self-contained HTML page (no external assets).

Plugins add HTML sections through ``qcb_guard_report_sections``; plots are inline SVG so
the page opens anywhere, offline.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qcb_guard.fileio import write_json_atomic, write_text_atomic

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:72rem;color:#1b1f23}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #d0d7de;padding:.3rem .6rem;
text-align:right}th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}
.bad{background:#ffebe9}.good{background:#dafbe1}code{background:#f6f8fa;padding:0 .2rem}
"""


def table_html(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] | None = None
) -> str:
    """An HTML table; ``classes`` gives an optional CSS class per row (``good``/``bad``)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def bar_chart_svg(
    labels: Sequence[str], values: Sequence[float], *, title: str, vmax: float = 1.0
) -> str:
    """A horizontal bar chart as inline SVG (values in [0, vmax])."""
    height = 22 * len(labels) + 30
    bars = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = 25 + 22 * i
        width = 0 if vmax <= 0 else max(0.0, min(1.0, value / vmax)) * 300
        bars.append(
            f'<text x="0" y="{y + 13}" font-size="12">{html.escape(label)}</text>'
            f'<rect x="190" y="{y}" width="{width:.1f}" height="16" fill="#0969da"/>'
            f'<text x="{195 + width:.1f}" y="{y + 13}" font-size="12">{value:.3f}</text>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="560" height="{height}" role="img">'
        f'<title>{html.escape(title)}</title><text x="0" y="14" font-weight="bold" '
        f'font-size="13">{html.escape(title)}</text>{"".join(bars)}</svg>'
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def render_html(title: str, sections: Sequence[dict[str, str]]) -> str:
    """A complete HTML page from ``{"title", "html"}`` sections (their HTML is trusted)."""
    parts = [f"<h2>{html.escape(s['title'])}</h2>\n{s['html']}" for s in sections]
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def write_report(
    directory: str | Path, report: dict[str, Any], sections: list[dict[str, str]], pm: Any = None
) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` atomically into ``directory``.

    Plugins' ``qcb_guard_report_sections`` are appended to ``sections``.
    """
    directory = Path(directory)
    if pm is not None:
        for extra in pm.hook.qcb_guard_report_sections(report=report):
            sections = [*sections, *(extra or [])]
    json_path = write_json_atomic(directory / "report.json", report)
    html_path = write_text_atomic(
        directory / "report.html",
        render_html(str(report.get("title", "qcb_guard report")), sections),
    )
    return json_path, html_path
