"""EFRAP (and AdaRound) versus nearest rounding on clean models, through real flows.

Trains clean models on bundled data (several seeds), quantizes each through every
registered flow at each bit-width unguarded and with each defense, and prints CDA per
cell plus the defense's cost in points versus the unguarded (nearest) flow.

    python benchmarks/benign.py --data mnist5k --seeds 0 1 2 --out benchmarks/results/benign.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import add_defense_arguments, markdown_table, pct, save

from qcb_guard.data import load_dataset
from qcb_guard.evaluate import evaluate
from qcb_guard.manager import make_plugin_manager
from qcb_guard.models import build_model_for, train_clean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--arch", default="smallcnn")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--flows", nargs="+", default=None)
    add_defense_arguments(parser)
    parser.add_argument("--out", default="benchmarks/results/benign.json")
    args = parser.parse_args()

    pm = make_plugin_manager(autoload=False)
    cells: dict[tuple[str, int, str | None], list[float]] = {}
    seconds: dict[tuple[str, int, str | None], list[float]] = {}
    runs = []
    for seed in args.seeds:
        data = load_dataset(args.data, seed=seed)
        torch.manual_seed(seed)
        model = build_model_for(args.arch, data.train.image_shape, data.train.num_classes)
        train_clean(model, data.train.x, data.train.y, epochs=args.epochs, seed=seed)
        start = time.perf_counter()
        report = evaluate(
            model, data.test.x, data.test.y, calibration=data.train.x[: args.calibration],
            bits=args.bits, flows=args.flows, defenses=[None, *args.defenses], seed=seed, pm=pm,
            options=args.options,
        )  # fmt: skip
        runs.append(
            {"seed": seed, "seconds": round(time.perf_counter() - start, 1), **report.to_dict()}
        )
        for row in report.rows:
            if row.error:
                print(f"seed {seed} {row.flow} {row.bits} {row.defense}: {row.error}")
                continue
            cells.setdefault((row.flow, row.bits, row.defense), []).append(pct(row.cda))
            seconds.setdefault((row.flow, row.bits, row.defense), []).append(row.seconds)

    headers = [
        "flow",
        "bits",
        "defense",
        "CDA % (mean)",
        "min",
        "max",
        "Δ vs nearest (points)",
        "s/run",
    ]
    rows = []
    for (flow, bits, defense), values in cells.items():
        base = cells.get((flow, bits, None))
        delta = (
            None
            if defense is None or base is None
            else statistics.mean(values) - statistics.mean(base)
        )
        rows.append([
            flow, bits or "fp32", defense or ("-" if flow == "float32" else "nearest"),
            statistics.mean(values), min(values), max(values), delta,
            statistics.mean(seconds[(flow, bits, defense)]),
        ])  # fmt: skip
    print(
        f"\n{args.arch} on {args.data}, seeds {args.seeds}, {args.calibration} calibration images\n"
    )
    print(markdown_table(headers, rows))
    save(args.out, {"args": vars(args), "table": {"headers": headers, "rows": rows}, "runs": runs})


if __name__ == "__main__":
    main()
