"""``qcb-guard demo``: the whole story on the embedded default (bundled data, small model).

1. Train a clean model on a bundled data set.
2. Implant a quantization-conditioned backdoor aimed at a real flow (Qu-ANTI-zation, 4-bit
   ONNX Runtime by default): dormant in float, live once quantized.
3. Quantize the clean and the backdoored model through that flow, unguarded and through
   ``guard()`` (EFRAP by default), with the flow's own scales and zero points.
4. Scan both float models without the trigger (``qcb_guard.scan`` on the flow's grid).
5. Report clean accuracy (CDA), attack success (ASR) and the scanner's verdicts as a table,
   ``report.json`` and ``report.html``; the backdoored model and its trigger are saved next to
   them so anyone can check the result with their own tools.
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
from qcb_guard.errors import ConfigError
from qcb_guard.evaluate import GUARD_DEFAULT, REFERENCE, evaluate, split_defense
from qcb_guard.manager import PluginManager, get_plugin_manager
from qcb_guard.models import build_model_for, save_model, train_clean
from qcb_guard.quant import QuantSpec
from qcb_guard.report import bar_chart_svg, table_html, write_report
from qcb_guard.scanner import scan

DEFAULT_EPOCHS = {"digits": 15, "mnist5k": 4}
#: Attack epochs: the Qu-ANTI-zation objective needs more passes over 1.4k digits than 4.5k MNIST.
ATTACK_EPOCHS = {"digits": 30, "mnist5k": 10}
CALIBRATION_SIZE = 256
#: The rounding convention each flow quantizes with, i.e. what the attack must aim at.
FLOW_CONVENTION = {
    "ort-static": "ort",
    "nncf-torch": "nncf",
    "pt2e-x86": "x86",
    "torch-ao-fx": "x86",
    REFERENCE: "reference",
}


def _trigger_size(image_shape: tuple[int, int, int]) -> int:
    # The paper's (h/8)² square is one pixel on 8×8 digits: too small to learn reliably.
    return max(2, image_shape[1] // 8)


def _guard_call(spec: str) -> str:
    if spec == GUARD_DEFAULT:
        return "guard()"
    rounding, _, activation = spec.partition("+")
    return f"guard(defense={rounding!r}" + (
        f", activation_defense={activation!r})" if activation else ")"
    )


def run_demo(
    *,
    data: str = "digits",
    arch: str = "smallcnn",
    bits: int = 4,
    flow: str = "ort-static",
    attack: str = "quanti-backdoor",
    defenses: tuple[str, ...] = (GUARD_DEFAULT,),
    epochs: int | None = None,
    attack_epochs: int | None = None,
    seed: int = 0,
    out: str | Path = "qcb_guard_runs/demo",
    pm: PluginManager | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo and return the report dictionary (also written to ``out``)."""
    pm = pm or get_plugin_manager()
    console = console or Console()
    QuantSpec(bits=bits)  # validates the bit-width before any work
    if flow not in FLOW_CONVENTION:
        raise ConfigError(f"unknown flow {flow!r}; the demo runs: {', '.join(FLOW_CONVENTION)}")
    if flow != REFERENCE:
        entry = pm.flows.get(flow)
        if bits not in entry.options.get("bits", (8, 4)):
            raise ConfigError(
                f"flow {flow!r} supports {entry.options.get('bits')} bits, not {bits}"
            )
    spec = pm.attacks.get(attack).obj
    if getattr(spec, "kind", None) != "backdoor":
        raise ConfigError(f"the demo needs a backdoor attack, {attack!r} is not one")
    for name in defenses:
        split_defense(name, pm)  # "guard" is guard()'s defaults: efrap + range-probe
    start = time.perf_counter()
    split = load_dataset(data, seed=seed)
    shape, classes = split.train.image_shape, split.train.num_classes
    config = spec.config_class(
        framework=FLOW_CONVENTION[flow],
        bits=(bits,),
        trigger_size=_trigger_size(shape),
        num_classes=classes,
        image_shape=shape,
        epochs=attack_epochs or ATTACK_EPOCHS.get(data, 10),
        seed=seed,
        progress=False,
    )

    torch.manual_seed(seed)
    clean = build_model_for(arch, shape, classes)
    epochs = epochs or DEFAULT_EPOCHS.get(data, 5)
    console.print(
        f"[bold]qcb_guard {__version__} demo[/bold]: {arch} on {data} "
        f"({len(split.train)} train / {len(split.test)} test)\n"
        f"1. training a clean model ({epochs} epochs)"
    )
    trained = train_clean(clean, split.train.x, split.train.y, epochs=epochs, seed=seed)
    console.print(
        f"2. implanting {attack} aimed at {flow} {bits}-bit ({config.epochs} epochs); "
        "the float model keeps behaving"
    )
    t0 = time.perf_counter()
    implanted = spec(clean.eval(), split.train, config)
    attack_seconds = time.perf_counter() - t0
    trigger = implanted.trigger
    console.print(f"3. quantizing both through {flow}, unguarded and with guard()")
    calibration = split.train.x[:CALIBRATION_SIZE]
    rows: list[dict[str, Any]] = []
    for label, model in (("clean", clean), ("backdoored", implanted.model)):
        result = evaluate(
            model,
            split.test.x,
            split.test.y,
            trigger,
            calibration=calibration,
            bits=[bits],
            flows=[flow],
            defenses=[None, *defenses],
            seed=seed,
            pm=pm,
            progress=False,
        )
        for r in result.rows:
            if r.error:
                raise ConfigError(f"{flow} failed on the {label} model: {r.error}")
            rows.append(
                {
                    "model": label,
                    "quantization": "float32" if r.bits is None else f"{flow} {bits}-bit",
                    "defense": "-" if r.bits is None else (r.defense or "none (nearest)"),
                    "cda": r.cda,
                    "asr": r.asr,
                    "seconds": r.seconds,
                }
            )

    table = Table(title=f"{attack} on {arch}/{data}: clean accuracy and attack success")
    for col in ("model", "quantization", "defense", "CDA %", "ASR %", "seconds"):
        table.add_column(col, justify="right" if "%" in col or col == "seconds" else "left")
    for r in rows:
        table.add_row(
            r["model"],
            r["quantization"],
            r["defense"],
            f"{100 * r['cda']:.1f}",
            f"{100 * r['asr']:.1f}",
            f"{r['seconds']:.1f}",
        )
    console.print(table)
    woke = next(r for r in rows if r["model"] == "backdoored" and r["defense"].startswith("none"))
    guarded = [r for r in rows if r["model"] == "backdoored" and r["defense"] in defenses]
    story = f"Unguarded, {flow} wakes the backdoor: ASR {100 * woke['asr']:.1f}%. " + " ".join(
        f"With {_guard_call(r['defense'])}: ASR {100 * r['asr']:.1f}%." for r in guarded
    )
    console.print(story)

    # What a user could have known before quantizing: the scanner, without the trigger.
    grid = FLOW_CONVENTION[flow]
    console.print(f"4. scanning both float models, without the trigger ({grid} grid)")
    scans = {}
    for label, model in (("clean", clean), ("backdoored", implanted.model)):
        found = scan(
            model,
            calibration=calibration,
            frameworks=[grid],
            bits=[bits],
            seed=seed,
            pm=pm,
        )
        scans[label] = {"verdict": found.verdict, "score": round(found.score, 4)}
        console.print(f"   {label}: {found.verdict} (score {found.score:.3f})")

    out = Path(out)
    save_model(implanted.model, out / "model.safetensors")  # arch + options recorded
    trigger.save_npz(out / "trigger.npz")
    report = {
        "title": f"qcb_guard demo: {attack} on {arch}/{data} through {flow}",
        "qcb_guard": __version__,
        "data": data,
        "arch": arch,
        "attack": attack,
        "flow": flow,
        "bits": bits,
        "defenses": list(defenses),
        "seed": seed,
        "epochs": epochs,
        "train_seconds": round(trained.seconds, 2),
        "attack_seconds": round(attack_seconds, 2),
        "target": int(trigger.target),
        "story": story,
        "rows": rows,
        "scan": scans,
        "seconds": round(time.perf_counter() - start, 2),
    }
    labels = [f"{r['model']} · {r['defense']}" for r in rows]
    headers = ["model", "quantization", "defense", "CDA", "ASR", "seconds"]
    sections = [
        {"title": "What happened", "html": f"<p>{story}</p>"},
        {
            "title": "Scanner verdicts (float models, no trigger given)",
            "html": table_html(
                ["model", "verdict", "score"],
                [[k, v["verdict"], v["score"]] for k, v in scans.items()],
                ["bad" if v["verdict"] == "suspicious" else "good" for v in scans.values()],
            ),
        },
        {
            "title": "Clean accuracy and attack success",
            "html": table_html(
                headers,
                [[r[k.lower()] for k in headers] for r in rows],
                ["bad" if r["asr"] > 0.5 else "good" for r in rows],
            ),
        },
        {
            "title": "Attack success rate (triggered non-target test images)",
            "html": bar_chart_svg(labels, [r["asr"] for r in rows], title="ASR"),
        },
        {
            "title": "Clean accuracy",
            "html": bar_chart_svg(labels, [r["cda"] for r in rows], title="CDA"),
        },
    ]
    json_path, html_path = write_report(out, report, sections, pm)
    console.print(
        f"backdoored model: {out / 'model.safetensors'} (trigger: {out / 'trigger.npz'})\n"
        f"report: {json_path}, {html_path}"
    )
    return report
