"""Robustness benchmark (issue 7): FGSM/PGD across bit-widths with and without Defensive
Quantization, universal patches per bit-width and their transfer, KnockoffNets against
vanilla QAT and DivQAT (with and without reverse sigmoid), on MNIST-5k and digits.

    nice -n 10 .venv/bin/python benchmarks/robustness.py            # both data sets
    nice -n 10 .venv/bin/python benchmarks/robustness.py --data digits --quick

Writes ``benchmarks/results/robustness.json`` (every study report) and the HTML reports next
to it, and prints the tables and the issue's targets (met or missed, never assumed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, pct, save

from qcb_guard.robustness.report import write
from qcb_guard.robustness.study import StudyConfig, run_study

RESULTS = Path(__file__).resolve().parent / "results"
BETA, LAM = 0.3, 0.3


def configs(data: str, quick: bool) -> list[StudyConfig]:
    big = data == "mnist5k"
    common: dict[str, Any] = {
        "arch": "smallcnn",
        "data": data,
        "seed": 0,
        "defense_options": {
            "defensive-quantization": {"beta": BETA, "epochs": 3},
            "divqat": {"lam": LAM, "epochs": 3},
        },
        "defenses": ("defensive-quantization", "divqat"),
        "qat_epochs": 3,
        "progress": False,
    }
    main = StudyConfig(
        **common,
        bits=(8, 6, 4, 2),
        attacks=("fgsm", "pgd", "patch", "knockoff"),
        eps=(0.05, 0.1, 0.15, 0.2),
        attack_options={"pgd": {"steps": 10 if quick else 20}},
        flows=("pt2e-x86", "ort-static"),
        test_size=300 if quick else 1000,
        patch_size=12 if big else 4,
        patch_target=8,
        patch_steps=100 if quick else 300,
        patch_archs=("smallcnn_bn",),
        queries=2000 if big else 1000,
        transfer="natural",
        knockoff_bits=8,
    )
    out = [main]
    if big and not quick:  # the same victims deployed through torchao PT2E x86 int8
        out.append(
            StudyConfig(
                **common,
                bits=(8,),
                attacks=("knockoff",),
                eps=(),
                test_size=1000,
                queries=2000,
                transfer="natural",
                knockoff_flow="pt2e-x86",
            )
        )
    return out


def _model(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in report["models"] if m["name"] == name)


def _curve(report: dict[str, Any], attack: str, model: str, mode: str) -> list[float] | None:
    for c in report.get("evasion", {}).get(attack, {}).get("curves", []):
        if c["model"] == model and c["mode"] == mode:
            return c["accuracy"]
    return None


def print_report(report: dict[str, Any]) -> list[str]:
    """Tables and target checks of one study; returns the target lines."""
    print(f"\n## {report['title']} ({report['seconds']:.0f} s)\n")
    print(
        markdown_table(
            ["model", "bits", "defense", "clean %"],
            [
                [m["name"], m["bits"] or "fp32", m["defense"] or "-", pct(m["clean"])]
                for m in report["models"]
            ],
        )
    )
    checks = []
    for attack, block in report.get("evasion", {}).items():
        eps = block["eps"]
        rows = [[c["model"], c["mode"], *[pct(a) for a in c["accuracy"]]] for c in block["curves"]]
        print(f"\n{attack} accuracy % under attack\n")
        print(markdown_table(["model", "mode", *[f"ε={e:g}" for e in eps]], rows))
        if attack != "pgd":
            continue
        fp = _curve(report, "pgd", "fp", "white-box")
        for b in report["config"]["bits"]:
            q = _curve(report, "pgd", f"q{b}", "white-box")
            dq = _curve(report, "pgd", f"defensive-quantization-q{b}", "white-box")
            if q is None or fp is None:
                continue
            loss_fp = [100 * (1 - a) for a in fp]
            worse = [f"{100 * (v - f):+.1f}" for f, v in zip(fp, q, strict=True)]
            checks.append(
                f"PGD {b}-bit vanilla − FP robust accuracy per ε "
                "(points, < 0: quantized loses more): "
                f"{', '.join(worse)} (FP loses {', '.join(f'{v:.1f}' for v in loss_fp)})"
            )
            if dq is not None:
                gain = [100 * (d - v) for d, v in zip(dq, q, strict=True)]
                clean = 100 * (
                    _model(report, f"defensive-quantization-q{b}")["clean"]
                    - _model(report, f"q{b}")["clean"]
                )
                best = max(range(len(gain)), key=lambda i: gain[i])
                ok = gain[best] >= 5 and clean >= -1
                checks.append(
                    f"DQ at {b} bits: robust gain {', '.join(f'{g:+.1f}' for g in gain)} points "
                    f"(best {gain[best]:+.1f} at ε={eps[best]:g}), clean {clean:+.1f} points"
                    + (
                        " [target ≥5 / ≤1: MET]"
                        if b == 4 and ok
                        else " [target ≥5 / ≤1: MISSED]"
                        if b == 4
                        else ""
                    )
                )
    for name, block in report.get("patch", {}).items():
        print(f"\n{name}: ASR % (rows: optimised on; columns: evaluated on)\n")
        print(
            markdown_table(
                ["source", *block["targets"]],
                [
                    [s, *[pct(v) for v in row]]
                    for s, row in zip(block["sources"], block["asr"], strict=True)
                ],
            )
        )
    for name, block in report.get("extraction", {}).items():
        print(
            f"\n{name}: {block['queries']} {block['transfer']} queries, victims at "
            f"{block['bits']} bits\n"
        )
        rows = [
            [
                r["victim"],
                r["deployed"],
                r["perturbation"],
                r["labels"],
                pct(r["victim_clean"]),
                pct(r["surrogate_accuracy"]),
                pct(r["fidelity"]),
                pct(r["top1_kept"]),
            ]
            for r in block["rows"]
        ]
        print(
            markdown_table(
                [
                    "victim",
                    "deployed",
                    "perturbation",
                    "labels",
                    "victim clean %",
                    "surrogate %",
                    "fidelity %",
                    "top-1 kept %",
                ],
                rows,
            )
        )
        by = {(r["defense"], r["perturbation"], r["labels"]): r for r in block["rows"]}
        for pert in ("none", "reverse-sigmoid"):
            for labels in ("soft", "hard"):
                base, div = by.get((None, pert, labels)), by.get(("divqat", pert, labels))
                if base is None or div is None:
                    continue
                drop = 100 * (base["fidelity"] - div["fidelity"])
                clean = 100 * (div["victim_clean"] - base["victim_clean"])
                ok = drop >= 10 and clean >= -1
                checks.append(
                    f"DivQAT vs QAT ({base['deployed']}, "
                    f"{pert}, {labels}): fidelity {100 * base['fidelity']:.1f} → "
                    f"{100 * div['fidelity']:.1f} (drop {drop:+.1f}), clean {clean:+.1f} points "
                    f"[target ≥10 / ≤1: {'MET' if ok else 'MISSED'}]"
                )
    print("\nTargets:")
    for line in checks:
        print("  " + line)
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["mnist5k", "digits"])
    parser.add_argument("--quick", action="store_true", help="smaller budgets (smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "robustness.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reports, targets = [], {}
    for data in args.data:
        for i, config in enumerate(configs(data, args.quick)):
            report = run_study(config, echo=lambda m: print(f"  .. {m}", flush=True))
            html = args.out.with_name(f"robustness_{data}{'_flow' if i else ''}.html")
            write(report, html_path=html)
            reports.append(report)
            targets[f"{data}#{i}"] = print_report(report)
    save(args.out, {"command": " ".join(sys.argv), "targets": targets, "reports": reports})


if __name__ == "__main__":
    main()
