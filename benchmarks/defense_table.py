"""Defenses side by side: every QCB kind × the real flows where it is live × every defense.

Rows: the 4-bit weight-rounding QCBs (Qu-ANTI-zation backdoor, CompArtifact, PQBackdoor on
SmallCNN) and the 8-bit static-activation QCB (``quanti-static`` on WideCNN), each through
the real static flows, unguarded and through ``guard()`` with each defense: the rounding
defenses alone (``adaround``, ``efrap``, ``lac``, ``qvec``: activation ranges untouched), the
activation defense alone (``range-probe``: nearest rounding) and ``guard``, i.e. ``guard()``'s
defaults (``efrap`` + ``range-probe``). The goal column checks the issue's bar: ASR ≤ max(2%,
float ASR + 1 point) and CDA within 1 point of float. Benign models of both architectures give
each defense's accuracy cost against the unguarded flow.

    python benchmarks/defense_table.py --out benchmarks/results/defense_table.json

Attack models are built once (``qcb-guard attack``) and reused from ``--workdir``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _common import markdown_table, pct, save
from activation_qcb import benign
from activation_qcb import build as build_static
from efrap_efficacy import build as build_rounding

from qcb_guard.data import Trigger, load_dataset
from qcb_guard.evaluate import GUARD_DEFAULT, evaluate
from qcb_guard.manager import make_plugin_manager
from qcb_guard.models import load_model

DEFENSES = ["adaround", "efrap", "lac", "qvec", "range-probe", GUARD_DEFAULT]
#: name → (kind, bits, arch); kind "rounding" builds with qcb-guard attack NAME --bits BITS,
#: "static:FRAMEWORK" with qcb-guard attack quanti-static --framework FRAMEWORK.
ATTACKS = {
    "quanti-backdoor": ("rounding", 4, "smallcnn"),
    "compartifact": ("rounding", 4, "smallcnn"),
    "pqbackdoor": ("rounding", 4, "smallcnn"),
    "quanti-static (ort)": ("static:ort", 8, "widecnn"),
    "quanti-static (x86)": ("static:x86", 8, "widecnn"),
    # the adaptive attacker against range-probe (docs/activation-defenses.md); not by default
    "quanti-static evasive (ort)": ("static:ort:evasive", 8, "widecnn"),
}
DEFAULT_ATTACKS = [n for n in ATTACKS if "evasive" not in n]
LIVE = 0.9  # an unguarded ASR below this: the row proves nothing (reported, flagged)


def attack_dir(name: str, data: str, workdir: Path) -> Path:
    kind, bits, arch = ATTACKS[name]
    if kind == "rounding":
        return build_rounding(name, [bits], arch, data, workdir, ["--threads", "1"])
    _, framework, variant = (kind + ":standard").split(":")[:3]
    return build_static(framework, variant, arch, data, workdir)


def goal(row: Any, fp: Any) -> bool:
    """The issue's bar for a defended row."""
    return row.asr <= max(0.02, fp.asr + 0.01) and row.cda >= fp.cda - 0.01


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=DEFAULT_ATTACKS, choices=list(ATTACKS))
    parser.add_argument(
        "--flows",
        nargs="+",
        default=["ort-static", "pt2e-x86", "nncf-torch"],
        help="flows to run; each attack runs those of them that support its bit-width",
    )
    parser.add_argument("--defenses", nargs="+", default=DEFENSES)
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--no-benign", action="store_true", help="skip the benign-model rows")
    parser.add_argument("--workdir", default="benchmarks/results/attacks")
    parser.add_argument("--out", default="benchmarks/results/defense_table.json")
    args = parser.parse_args()

    pm = make_plugin_manager(autoload=False)
    workdir = Path(args.workdir)
    split = load_dataset(args.data, seed=0)
    calibration = split.train.x[: args.calibration]
    headers = ["model", "flow", "bits", "defense", "CDA %", "ASR %", "s", "goal"]
    rows: list[list[Any]] = []
    payload: dict[str, Any] = {"args": vars(args), "attacks": [], "benign": []}

    def flows_for(bits: int) -> list[str]:
        return [f for f in args.flows if bits in pm.flows.get(f).options.get("bits", (8, 4))]

    def run(model, trigger, bits):
        return evaluate(
            model, split.test.x, split.test.y, trigger, calibration=calibration, bits=[bits],
            flows=flows_for(bits), defenses=[None, *args.defenses], pm=pm,
        )  # fmt: skip

    for name in args.attacks:
        out = attack_dir(name, args.data, workdir)
        bits = ATTACKS[name][1]
        start = time.perf_counter()
        report = run(
            load_model(out / "model.safetensors"), Trigger.load_npz(out / "trigger.npz"), bits
        )
        fp = report.row("float32", None)
        rows.append([name, "float32", "-", "-", pct(fp.cda), pct(fp.asr), None, None])
        for flow in flows_for(bits):
            plain = report.row(flow, bits)
            live = plain.error is None and plain.asr >= LIVE
            for r in report.rows[1:]:
                if r.flow != flow:
                    continue
                mark = None
                if r.error:
                    mark = "error"
                    print(f"{name} {flow} {r.defense}: {r.error}")
                elif r.defense is not None:
                    mark = ("yes" if goal(r, fp) else "no") + ("" if live else " (not live)")
                label = r.defense or "unguarded"
                rows.append([name, flow, bits, label, pct(r.cda), pct(r.asr), r.seconds, mark])
        payload["attacks"].append(
            {"name": name, "dir": str(out), "seconds": round(time.perf_counter() - start, 1)}
            | report.to_dict()
        )
        save(args.out, payload | {"table": {"headers": headers, "rows": rows}})  # partial

    if not args.no_benign:
        for arch, bits in sorted({(a, b) for _, b, a in (ATTACKS[n] for n in args.attacks)}):
            report = run(benign(arch, args.data, workdir, 0, split), None, bits)
            fp = report.row("float32", None)
            name = f"benign {arch}"
            rows.append([name, "float32", "-", "-", pct(fp.cda), None, None, None])
            for flow in flows_for(bits):
                plain = report.row(flow, bits)
                for r in report.rows[1:]:
                    if r.flow != flow:
                        continue
                    mark = None  # the benign bar: ≤ 0.5 points below the unguarded flow
                    if r.defense is not None and r.cda is not None and plain.cda is not None:
                        mark = "yes" if r.cda >= plain.cda - 0.005 else "no"
                    label = r.defense or "unguarded"
                    rows.append([name, flow, bits, label, pct(r.cda), None, r.seconds, mark])
            payload["benign"].append({"arch": arch, "bits": bits} | report.to_dict())
            save(args.out, payload | {"table": {"headers": headers, "rows": rows}})  # partial

    print(f"\n{args.data}; calibration: {args.calibration} clean training images\n")
    print(markdown_table(headers, rows))
    payload["table"] = {"headers": headers, "rows": rows}
    save(args.out, payload)


if __name__ == "__main__":
    main()
