"""``qcb-guard demo``: the main job on the embedded default (bundled data, small model).

Trains a model on a bundled data set, then quantizes it with every registered rounding
defense at each bit-width through the reference quantizer, and reports clean accuracy of
the float and quantized models as a table, ``report.json`` and ``report.html``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from qcb_guard import __version__
from qcb_guard.data import load_dataset
from qcb_guard.manager import PluginManager, get_plugin_manager
from qcb_guard.models import accuracy, build_model_for, save_model, train
from qcb_guard.quant import QuantSpec
from qcb_guard.reference import quantize_model
from qcb_guard.report import bar_chart_svg, table_html, write_report

DEFAULT_EPOCHS = {"digits": 15, "mnist5k": 4}
CALIBRATION_SIZE = 256


def run_demo(
    *,
    data: str = "digits",
    arch: str = "smallcnn",
    bits: list[int] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    out: str | Path = "qcb_guard_runs/demo",
    pm: PluginManager | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo and return the report dictionary (also written to ``out``)."""
    pm = pm or get_plugin_manager()
    console = console or Console()
    bits = bits or [8, 4]
    specs = [QuantSpec(bits=b) for b in bits]  # validates bit-widths before any work
    start = time.perf_counter()
    split = load_dataset(data, seed=seed)
    torch.manual_seed(seed)
    model = build_model_for(arch, split.train.image_shape, split.train.num_classes)
    epochs = epochs or DEFAULT_EPOCHS.get(data, 5)
    console.print(
        f"[bold]qcb_guard {__version__} demo[/bold]: {arch} on {data} "
        f"({len(split.train)} train / {len(split.test)} test), {epochs} epochs"
    )
    trained = train(
        model, split.train.x, split.train.y, epochs=epochs, batch_size=64, lr=2e-3, seed=seed
    )
    x_test, y_test = split.test.x, split.test.y
    fp_cda = accuracy(model, x_test, y_test)
    calibration = split.train.x[:CALIBRATION_SIZE]

    rows: list[dict[str, Any]] = [
        {
            "model": "float32",
            "bits": None,
            "defense": None,
            "cda": fp_cda,
            "changed": 0,
            "seconds": 0.0,
        }
    ]
    for spec in specs:
        for entry in pm.defenses:
            needs = entry.options.get("needs_calibration", False)
            qmodel, result = quantize_model(
                model,
                spec,
                defense=entry.name,
                calibration=calibration if needs else None,
                seed=seed,
                pm=pm,
                progress=False,
            )
            summary = result.to_dict()
            rows.append(
                {
                    "model": "reference weight-only",
                    "bits": spec.bits,
                    "defense": entry.name,
                    "cda": accuracy(qmodel, x_test, y_test),
                    "changed": summary["changed_total"],
                    "seconds": summary["seconds"],
                    "fallbacks": summary["fallbacks"],
                }
            )

    table = Table(title=f"Clean accuracy (CDA) of {arch} on {data}:test")
    for col in ("model", "bits", "defense", "CDA", "changed ints", "seconds"):
        table.add_column(col, justify="right" if col not in ("model", "defense") else "left")
    for r in rows:
        table.add_row(
            r["model"],
            str(r["bits"] or "fp32"),
            r["defense"] or "-",
            f"{r['cda']:.4f}",
            str(r["changed"]),
            f"{r['seconds']:.2f}",
        )
    console.print(table)

    out = Path(out)
    save_model(model, out / "model.safetensors")  # records arch + constructor options
    report = {
        "title": f"qcb_guard demo: {arch} on {data}",
        "qcb_guard": __version__,
        "data": data,
        "arch": arch,
        "seed": seed,
        "epochs": epochs,
        "train_seconds": round(trained.seconds, 2),
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 2),
    }
    labels = [f"{r['bits'] or 'fp32'} {r['defense'] or ''}".strip() for r in rows]
    sections = [
        {
            "title": "Clean accuracy",
            "html": table_html(
                ["model", "bits", "defense", "CDA", "changed integers", "seconds"],
                [
                    [
                        r["model"],
                        r["bits"] or "fp32",
                        r["defense"] or "-",
                        r["cda"],
                        r["changed"],
                        r["seconds"],
                    ]
                    for r in rows
                ],
            ),
        },
        {
            "title": "CDA per configuration",
            "html": bar_chart_svg(labels, [r["cda"] for r in rows], title="clean accuracy"),
        },
    ]
    json_path, html_path = write_report(out, report, sections, pm)
    console.print(f"model: {out / 'model.safetensors'}\nreport: {json_path}, {html_path}")
    return report
