"""EFRAP speed: wall time of a guarded flow versus the same flow unguarded, same model, same run.

For each architecture (SmallCNN on MNIST 5k; ResNet-18 in the CIFAR layout, 3×32×32, on MNIST
5k padded and repeated to three channels) a model is trained once (cached under
``benchmarks/results/models/``), then quantized through each requested real flow at 4 bits
per-channel, unguarded and with ``guard(defense="efrap")``, on 1,024 calibration images.
Prints the table (seconds, ratio, CDA of both) and writes JSON.

    python benchmarks/efrap_speed.py --out benchmarks/results/efrap_speed.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import add_defense_arguments, markdown_table, pct, save

from qcb_guard.data import DataSplit, load_dataset
from qcb_guard.evaluate import FlowRequest, metrics, split_defense
from qcb_guard.manager import make_plugin_manager
from qcb_guard.models import build_model_for, load_model, save_model, train_clean

#: Training epochs of the cached model per architecture (a few CPU minutes each).
EPOCHS = {"smallcnn": 4, "resnet18": 1}


def cifar_layout(split: DataSplit) -> DataSplit:
    """28×28 grey → 3×32×32 (zero-padded, channel-repeated): ResNet-18's CIFAR layout."""
    x = F.pad(split.x, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous()
    return DataSplit(x, split.y, split.num_classes, split.name + ":3x32x32", split.class_names)


def model_for(arch: str, train_split: DataSplit, cache: Path, seed: int) -> torch.nn.Module:
    path = cache / f"{arch}-{train_split.name.replace(':', '_')}-s{seed}.safetensors"
    if path.is_file():
        return load_model(path)
    torch.manual_seed(seed)
    model = build_model_for(arch, train_split.image_shape, train_split.num_classes)
    epochs = EPOCHS.get(arch, 2)
    print(f"training {arch} ({epochs} epochs) for the benchmark ...", flush=True)
    train_clean(model, train_split.x, train_split.y, epochs=epochs, seed=seed)
    save_model(model, path)
    return model.eval()


def timed(flow, model, calibration, request) -> tuple[float, object]:
    start = time.perf_counter()
    predict = flow(model, calibration, request)
    return time.perf_counter() - start, predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["smallcnn", "resnet18"])
    parser.add_argument("--flows", nargs="+", default=["pt2e-x86", "ort-static"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", type=int, default=1000, help="test images for the CDA check")
    parser.add_argument("--cache", default="benchmarks/results/models")
    parser.add_argument("--out", default="benchmarks/results/efrap_speed.json")
    add_defense_arguments(parser)
    # "guard": guard()'s defaults (efrap + range-probe); "efrap" alone leaves activation ranges.
    parser.set_defaults(defenses=["guard"], calibration=1024)
    args = parser.parse_args()

    pm = make_plugin_manager(autoload=False)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    split = load_dataset("mnist5k", seed=args.seed)
    headers = ["arch", "weights", "flow", "defense", "unguarded s", "guarded s", "ratio"]
    headers += ["CDA unguarded %", "CDA guarded %"]
    rows, records = [], []
    for arch in args.archs:
        tr, te = split.train, split.test.head(args.test)
        if arch.startswith("resnet"):
            tr, te = cifar_layout(tr), cifar_layout(te)
        model = model_for(arch, tr, cache, args.seed)
        weights = sum(p.numel() for p in model.parameters() if p.dim() > 1)
        calibration = tr.x[: args.calibration]
        for flow_name in args.flows:
            flow = pm.flows.get(flow_name).obj
            base = dict(bits=args.bits, seed=args.seed, pm=pm)
            plain_s, plain = timed(flow, model, calibration, FlowRequest(**base))
            plain_cda, _ = metrics(plain, te.x, te.y)
            for defense in args.defenses:
                rounding, activation = split_defense(defense, pm)
                request = FlowRequest(
                    **base, defense=rounding, activation_defense=activation, options=args.options
                )
                guarded_s, guarded = timed(flow, model, calibration, request)
                cda, _ = metrics(guarded, te.x, te.y)
                record = {
                    "arch": arch,
                    "weights": weights,
                    "flow": flow_name,
                    "defense": defense,
                    "bits": args.bits,
                    "calibration": len(calibration),
                    "unguarded_seconds": round(plain_s, 2),
                    "guarded_seconds": round(guarded_s, 2),
                    "ratio": round(guarded_s / plain_s, 2),
                    "cda_unguarded": plain_cda,
                    "cda_guarded": cda,
                }
                records.append(record)
                rows.append(
                    [
                        arch,
                        weights,
                        flow_name,
                        defense,
                        record["unguarded_seconds"],
                        record["guarded_seconds"],
                        record["ratio"],
                        pct(plain_cda),
                        pct(cda),
                    ]
                )
                print(markdown_table(headers, rows[-1:]), flush=True)
                # Saved after every row: a ResNet-18 row takes many minutes on 2 cores.
                save(args.out, {"options": args.options, "rows": records})
    print("\n" + markdown_table(headers, rows))


if __name__ == "__main__":
    main()
