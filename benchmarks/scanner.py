"""Scanner population benchmark: benign versus QCB models → ROC AUC and TPR at 1% FPR.

Builds (or reuses) the population of ``scanner_population.py``, scans every model with
clean unlabelled calibration images of its data set (and, with ``--weights-only``, weight
statistics alone), and reports the separation of the combined score and of each signal,
plus the scan time of a ResNet-18 against one forward pass over the calibration data.

    python benchmarks/scanner.py --out benchmarks/results/scanner.json
"""

from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from _common import load, markdown_table, save
from scanner_population import BENIGN, CALIBRATION, QCB, WORKDIR, build_all
from tqdm import tqdm

from qcb_guard.data import load_dataset
from qcb_guard.manager import make_plugin_manager
from qcb_guard.scanner import (
    SIGNALS,
    SYNTHETIC_THRESHOLDS,
    THRESHOLDS,
    ScanConfig,
    calibrated,
    scan,
)


def roc_auc(neg: list[float], pos: list[float]) -> float:
    """Mann–Whitney AUC: probability that a random QCB scores above a random benign model."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def tpr_at_fpr(neg: list[float], pos: list[float], fpr: float = 0.01) -> tuple[float, float]:
    """Best TPR with at most ``fpr`` of benign models above the threshold, and that threshold."""
    allowed = math.floor(fpr * len(neg))
    ranked = sorted(neg, reverse=True)
    threshold = ranked[allowed] if allowed < len(ranked) else -math.inf
    return sum(p > threshold for p in pos) / len(pos), threshold


#: Smallest quantization-conditioned effect (ASR gain, CDA loss, victims gained once
#: quantized) for an attacked model to count as a working QCB.
MIN_EFFECT = 0.5


def conditioned(fp: dict, quantized: dict) -> bool:
    """Did the attack make a *quantization-conditioned* model (float clean, quantized not)?

    8-bit attacks on small networks leave the float model backdoored or do nothing
    (DESIGN.md §3); the benchmark reports them, and the figures on working QCBs only.
    """
    if quantized.get("asr") is not None and fp.get("asr") is not None:
        return quantized["asr"] - fp["asr"] >= MIN_EFFECT
    if quantized.get("victims") is not None and fp.get("victims") is not None:
        return quantized["victims"] - fp["victims"] >= MIN_EFFECT
    return fp.get("cda", 0) - quantized.get("cda", 0) >= MIN_EFFECT / 2


def card_summary(card: dict) -> dict:
    """Label, and the attack's measured float/quantized effect from its card."""
    if card.get("benign"):
        return {"label": 0, "kind": "benign", "qat": card.get("qat"), "cda": card.get("cda")}
    m = card.get("metrics", {}).get("attacked", {})
    fp = m.get("fp", {})
    real = next(iter(m.get("ort", {}).values()), None) or next(
        iter(m.get("simulated", {}).values()), {}
    )
    return {
        "label": 1,
        "conditioned": conditioned(fp, real),
        "kind": card.get("attack"),
        "bits": card.get("parameters", {}).get("bits"),
        "framework": card.get("parameters", {}).get("framework"),
        "fp": {k: v for k, v in fp.items() if k != "seconds"},
        "quantized": {k: v for k, v in real.items() if k in ("cda", "asr", "victims")},
    }


def scan_one(args: tuple[Path, bool]) -> dict:
    """Worker: scan one model directory in a fresh process (one thread, own plugin manager)."""
    path, calibration = args
    torch.set_num_threads(1)
    card = load(path / "card.json")
    pm = make_plugin_manager(autoload=False)
    row = {"model": path.name, **card_summary(card)}
    row.update(scan_dir(path, card, ScanConfig(progress=False), pm, calibration))
    return row


def scan_dir(path: Path, card: dict, config: ScanConfig, pm, calibration: bool) -> dict:
    data = card.get("data", "mnist5k")
    cal = load_dataset(data, seed=100).train.x[:256] if calibration else None
    shape = tuple(card.get("image_shape") or load_dataset(data).train.image_shape)
    config = ScanConfig(**{**config.__dict__, "input_shape": shape})
    report = scan(path, calibration=cal, config=config, pm=pm)
    stats = {s: v["statistic"] for s, v in report.signals.items()}
    grids: dict[str, dict[str, float]] = {}
    for f in report.findings:
        grids.setdefault(f["signal"], {})[f["convention"]] = f["statistic"]
    where = {s: v["convention"] for s, v in report.signals.items()}
    return {
        "verdict": report.verdict,
        "score": report.score,
        "evidence": report.evidence,
        "statistics": stats,
        "grid_statistics": grids,
        "conventions": where,
        "explanation": {s: v["explanation"] for s, v in report.signals.items()},
        "seconds": report.seconds["total"],
    }


MARGIN = 1.5


def effect(metrics: dict | None) -> str:
    """``ASR/CDA`` in percent from an attack card's metrics (``-`` where absent)."""
    if not metrics:
        return "-"
    cell = [metrics.get("asr", metrics.get("victims")), metrics.get("cda")]
    return "/".join("-" if v is None else f"{100 * v:.0f}" for v in cell)


def calibrate(rows: list[dict]) -> dict[str, float]:
    """Per signal: the largest statistic over benign calibration models times ``MARGIN``,
    rounded up to two significant digits (how ``THRESHOLDS`` was set)."""
    out = {}
    for s in SIGNALS:
        top = max(max(0.0, r["statistics"].get(s) or 0.0) for r in rows) * MARGIN
        digits = 1 - math.floor(math.log10(top)) if top > 0 else 0
        out[s] = math.ceil(top * 10**digits) / 10**digits
    return out


def evidence_of(stats: dict, signals: tuple[str, ...], thresholds: dict | None = None) -> float:
    thresholds = thresholds or THRESHOLDS
    return max(max(0.0, stats.get(s) or 0.0) / thresholds[s] for s in signals)


def resnet_timing(repeats: int = 3) -> dict:
    """Scan time of a CIFAR ResNet-18 versus one forward pass over 256 calibration images."""
    from qcb_guard.models import resnet18

    torch.manual_seed(0)
    model = resnet18(3, 10).eval()
    cal = torch.rand(256, 3, 32, 32)
    pm = make_plugin_manager(autoload=False)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.no_grad():
        forward = best(lambda: [model(x) for x in cal.split(64)])
    weights_only = ScanConfig(behaviour=False, input_shape=(3, 32, 32), progress=False)
    w_report = scan(model, config=weights_only, pm=pm)
    w_signals = best(lambda: scan(model, config=weights_only, pm=pm))
    full_cfg = ScanConfig(input_shape=(3, 32, 32), progress=False)
    t = time.perf_counter()
    scan(model, calibration=cal, config=full_cfg, pm=pm)
    full = time.perf_counter() - t
    return {
        "weights": sum(p.numel() for p in model.parameters()),
        "forward_s": round(forward, 4),
        "weights_only_scan_s": round(w_signals, 4),
        "weights_only_signal_s": w_report.seconds["signals"],
        "full_scan_s": round(full, 2),
        "weights_only_ratio": round(w_signals / forward, 3),
        "full_ratio": round(full / forward, 1),
        "grids": len(full_cfg.frameworks) * len(full_cfg.bits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument(
        "--jobs", type=int, default=1, help="attacks built and models scanned in parallel"
    )
    parser.add_argument("--no-calibration", action="store_true", help="synthetic probes only")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--resnet-only", action="store_true", help="only the ResNet-18 timing")
    parser.add_argument(
        "--existing", action="store_true", help="scan only models already built (no training)"
    )
    parser.add_argument("--reuse", type=Path, default=None, help="rescore a previous JSON")
    parser.add_argument(
        "--resume", type=Path, default=None, help="keep the rows of a previous JSON, scan the rest"
    )
    parser.add_argument("--out", default="benchmarks/results/scanner.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.resnet_only:  # refresh only the timing of an existing result file
        timing = resnet_timing()
        print("ResNet-18:", timing)
        if Path(args.out).is_file():
            previous = load(args.out)
            previous.pop("environment", None)
            save(args.out, {**previous, "resnet18": timing})
        return
    if args.reuse:
        previous = load(args.reuse)
        rows, cal_rows = previous["models"], previous["calibration_models"]
    else:
        if not args.existing:
            build_all(args.workdir, args.jobs)

        done: dict[str, dict] = {}
        if args.resume and args.resume.is_file():
            previous = load(args.resume)
            done = {r["model"]: r for r in previous["models"] + previous["calibration_models"]}

        def scan_all(models: list, what: str) -> list[dict]:
            dirs = [args.workdir / m.dirname for m in models]
            dirs = [d for d in dirs if (d / "card.json").is_file()]
            jobs = [(d, not args.no_calibration) for d in dirs if d.name not in done]
            with ProcessPoolExecutor(max_workers=args.jobs) as pool:
                fresh = list(tqdm(pool.map(scan_one, jobs), total=len(jobs), desc=what))
            rows = {r["model"]: r for r in fresh} | {
                d.name: done[d.name] for d in dirs if d.name in done
            }
            return [rows[d.name] for d in dirs]

        cal_rows = scan_all(CALIBRATION, "calibration models")
        rows = scan_all(BENIGN + QCB, "population")
    proposed = calibrate(cal_rows)
    thresholds = {**THRESHOLDS, **(SYNTHETIC_THRESHOLDS if args.no_calibration else {})}
    print("thresholds from the calibration models (max x 1.5):", proposed)
    print("thresholds of qcb_guard.scanner for these probes:  ", thresholds)
    neg = [r for r in rows if r["label"] == 0]
    populations = {
        "all attacked": [r for r in rows if r["label"] == 1],
        "working QCBs": [r for r in rows if r["label"] == 1 and r.get("conditioned")],
    }
    summary: dict[str, dict] = {}
    for population, pos in populations.items():
        for name, signals in [("combined", SIGNALS), ("weights only", SIGNALS[:2])] + [
            (s, (s,)) for s in SIGNALS
        ]:
            n = [evidence_of(r["statistics"], signals, thresholds) for r in neg]
            p = [evidence_of(r["statistics"], signals, thresholds) for r in pos]
            tpr, _ = tpr_at_fpr(n, p)
            summary[f"{population}: {name}"] = {
                "positives": len(p),
                "auc": round(roc_auc(n, p), 4),
                "tpr_at_1pct_fpr": round(tpr, 4),
                "fpr_at_threshold": round(sum(v >= 1.0 for v in n) / len(n), 4),
                "tpr_at_threshold": round(sum(v >= 1.0 for v in p) / len(p), 4),
                "max_benign_evidence": round(max(n), 3),
                "min_qcb_evidence": round(min(p), 3),
            }
    pos = populations["all attacked"]
    headers = ["model", "label", "bits", "fp ASR/CDA %", "quantized ASR/CDA %", "working",
               *SIGNALS, "score", "verdict", "s"]  # fmt: skip
    table = [
        [r["model"], r["kind"], r.get("bits") or "-", effect(r.get("fp")),
         effect(r.get("quantized")), {None: "-", True: "yes", False: "no"}[r.get("conditioned")],
         *[round(r["statistics"].get(s) or 0.0, 3) for s in SIGNALS],
         round(calibrated(evidence_of(r["statistics"], SIGNALS, thresholds)), 3),
         "suspicious" if evidence_of(r["statistics"], SIGNALS, thresholds) >= 1 else "clean",
         r["seconds"]]
        for r in rows
    ]  # fmt: skip
    print(markdown_table(headers, table))
    print()
    sheaders = ["population: signals", "QCBs", "AUC", "TPR@1%FPR", "FPR@thr", "TPR@thr",
                "max benign", "min QCB"]  # fmt: skip
    print(markdown_table(sheaders, [[k, *v.values()] for k, v in summary.items()]))
    print(f"\n{len(neg)} benign, {len(pos)} QCB models; thresholds {thresholds}")
    timing = None if args.skip_resnet else resnet_timing()
    if timing:
        print("ResNet-18:", timing)
    save(
        args.out,
        {"args": {k: str(v) for k, v in vars(args).items()}, "thresholds": thresholds,
         "calibrated_thresholds": proposed, "margin": MARGIN, "summary": summary,
         "resnet18": timing, "models": rows, "calibration_models": cal_rows},
    )  # fmt: skip


if __name__ == "__main__":
    main()
