"""EFRAP efficacy: quantization-conditioned backdoors × real flows × defenses.

For each attack, builds (or reuses) its output directory with ``qcb-guard attack``, then
quantizes the backdoored model through every requested real flow unguarded (nearest
rounding, the framework's default), with AdaRound and with EFRAP — always with the flow's
own scales and zero points — and prints CDA / ASR per cell next to the float model's.

    python benchmarks/efrap_efficacy.py --out benchmarks/results/efrap_efficacy.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import add_defense_arguments, markdown_table, pct, save

from qcb_guard.data import Trigger, load_dataset
from qcb_guard.evaluate import evaluate
from qcb_guard.manager import make_plugin_manager
from qcb_guard.models import load_model

ATTACKS = ["quanti-backdoor", "compartifact", "pqbackdoor"]
#: ``--attacks quanti-indiscriminate quanti-targeted``: restoration rows (CDA; victims for
#: targeted, in the ASR column).


def build(
    name: str, bits: list[int], arch: str, data: str, workdir: Path, extra: list[str]
) -> Path:
    """Run ``qcb-guard attack`` once; reuse its directory when the card exists."""
    out = workdir / f"{name}-{arch}-{data}-w{''.join(map(str, bits))}"
    if not (out / "card.json").is_file():
        cmd = [sys.executable, "-m", "qcb_guard", "attack", name, "--arch", arch, "--data", data]
        cmd += ["--bits", *map(str, bits), "--out", str(out), *extra]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=ATTACKS)
    parser.add_argument("--bits", type=int, nargs="+", default=[4])
    parser.add_argument("--arch", default="smallcnn")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--flows", nargs="+", default=["ort-static", "pt2e-x86", "torch-ao-fx"])
    add_defense_arguments(parser)
    parser.add_argument("--attack-args", nargs=argparse.REMAINDER, default=["--threads", "1"])
    parser.add_argument("--workdir", default="benchmarks/results/attacks")
    parser.add_argument("--out", default="benchmarks/results/efrap_efficacy.json")
    args = parser.parse_args()

    pm = make_plugin_manager(autoload=False)
    workdir = Path(args.workdir)
    headers = [
        "attack",
        "flow",
        "bits",
        "defense",
        "CDA %",
        "ASR %",
        "float CDA %",
        "float ASR %",
        "s",
    ]
    rows, runs = [], []
    for name in args.attacks:
        out = build(name, args.bits, args.arch, args.data, workdir, args.attack_args)
        card = json.loads((out / "card.json").read_text())
        model = load_model(out / "model.safetensors")
        # Indiscriminate attacks have no trigger (CDA is the measure); targeted ones name
        # their victims, whose misclassification rate fills the ASR column.
        path = out / "trigger.npz"
        trigger = Trigger.load_npz(path) if path.is_file() else None
        victims = card.get("victim_test_indices")
        split = load_dataset(args.data, seed=card.get("seed", 0))
        start = time.perf_counter()

        def run(x, y, trig, model=model, split=split):
            return evaluate(
                model,
                x,
                y,
                trig,
                calibration=split.train.x[: args.calibration],
                bits=args.bits,
                flows=args.flows,
                defenses=[None, *args.defenses],
                pm=pm,
                options=args.options,
            )

        report = run(split.test.x, split.test.y, trigger)
        hit = None
        if victims:
            hit = run(split.test.x[victims], split.test.y[victims], None).rows
        fp = report.row("float32", None)
        fp_asr = fp.asr if hit is None else 1 - hit[0].cda
        for i, r in enumerate(report.rows):
            if i == 0:
                continue
            defense = r.defense or "nearest (unguarded)"
            asr = r.asr if hit is None else 1 - hit[i].cda
            rows.append(
                [
                    name,
                    r.flow,
                    r.bits,
                    defense,
                    pct(r.cda),
                    pct(asr),
                    pct(fp.cda),
                    pct(fp_asr),
                    r.seconds,
                ]
            )
            if r.error:
                print(f"{name} {r.flow} {r.bits} {defense}: {r.error}")
        seconds = round(time.perf_counter() - start, 1)
        card_metrics = card.get("metrics")
        runs.append(
            {"attack": name, "dir": str(out), "seconds": seconds, "card_metrics": card_metrics}
            | report.to_dict()
        )
    print(f"\n{args.arch} on {args.data}; calibration: {args.calibration} clean training images\n")
    print(markdown_table(headers, rows))
    save(args.out, {"args": vars(args), "table": {"headers": headers, "rows": rows}, "runs": runs})


if __name__ == "__main__":
    main()
