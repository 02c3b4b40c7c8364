"""Robustness benchmark (issue 7): FGSM/PGD across bit-widths with and without Defensive
Quantization, universal patches per bit-width and their transfer, KnockoffNets against
vanilla QAT and DivQAT (with and without reverse sigmoid), on MNIST-5k and digits.

    nice -n 10 .venv/bin/python benchmarks/robustness.py            # both data sets
    nice -n 10 .venv/bin/python benchmarks/robustness.py --data digits --quick
    nice -n 10 .venv/bin/python benchmarks/robustness.py --experiment seeds --seeds 0 1 2
    nice -n 10 .venv/bin/python benchmarks/robustness.py --experiment patches --seeds 0 1 2

``study`` (the default) writes ``benchmarks/results/robustness.json`` (every study report)
and the HTML reports next to it, and prints the tables and the issue's targets (met or
missed, never assumed). ``seeds`` is the multi-seed evasion / Defensive Quantization
protocol below (``robustness_seeds.json``); ``patches`` runs the patch study per seed with
centre and random placement (``robustness_patches.json``).

Protocol of ``seeds``, fixed before any run (the ε rule and the β rule):

* per seed, the data split, the float model and every QAT model are re-drawn; 500 (MNIST-5k)
  or 300 (digits) training images are held out as a validation split, never trained on;
* robust accuracy = white-box PGD-20 accuracy on the first 500 test images (MNIST-5k) or
  the whole test split (digits, 360), **averaged over the ε grid (0.05, 0.1, 0.15, 0.2)**:
  the single figure every claim uses (per-ε values are reported, no ε is picked afterwards);
* DQ's β is picked per seed on the validation split (PGD-10, same ε grid) among (0.03, 0.1,
  0.3): the most robust β whose validation clean accuracy is within 1 point of vanilla
  QAT's (the most accurate β when none is); the test split is not looked at;
* the issue's DQ target is met when the gain in robust accuracy at 4 bits is ≥ 5 points and
  the clean loss ≤ 1 point, both as a mean over seeds;
* gradient masking check for FP, vanilla 4 and 2 bits and DQ at 4 bits on the first 100
  (MNIST-5k) or 200 (digits) test images: per image, the worst case over white-box PGD-20,
  PGD-100 with 2 random restarts, PGD-20 transferred from the float model and from the
  QAT model's own float weights.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, markdown_table, pct, save

from qcb_guard.robustness.report import write
from qcb_guard.robustness.study import StudyConfig, run_study

RESULTS = Path(__file__).resolve().parent / "results"
BETA, LAM = 0.1, 0.3  # β: the value validation chose most often (``seeds``)


def patch_table(block: dict) -> str:
    """Patch transfer ASR %: rows the model a patch was optimised on, columns evaluated on."""
    rows = [
        [s, *[pct(v) for v in row]] for s, row in zip(block["sources"], block["asr"], strict=True)
    ]
    return markdown_table(["source", *block["targets"]], rows)


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
        patch_size=11 if big else 4,
        patch_target=8,
        patch_placement="center",
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
                mean = statistics.fmean(gain)  # the pre-registered rule: mean over the ε grid
                ok = mean >= 5 and clean >= -1
                checks.append(
                    f"DQ at {b} bits: robust gain {', '.join(f'{g:+.1f}' for g in gain)} points "
                    f"(mean over ε {mean:+.1f}, one seed), clean {clean:+.1f} points"
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
        print(patch_table(block))
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


EPS_GRID = (0.05, 0.1, 0.15, 0.2)
BETAS = (0.03, 0.1, 0.3)
SEED_BITS = (8, 6, 4, 2)
VAL_SIZE = {"mnist5k": 500, "digits": 300}
MASK_SIZE = {"mnist5k": 100, "digits": 200}
MASK_MODELS = ("fp", "q4", "dq4", "q2")
TEST_SIZE = {"mnist5k": 500, "digits": 360}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def _correct(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [model(x[i : i + 500]).argmax(1) == y[i : i + 500] for i in range(0, len(x), 500)]
        )


def _pgd_curve(model: Any, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int):
    from qcb_guard.robustness.adversarial import accuracy_of, craft, pgd

    return [
        accuracy_of(model, craft(pgd, model, x, y, eps=e, steps=steps, seed=seed), y)
        for e in EPS_GRID
    ]


def _one_thread() -> None:
    torch.set_num_threads(1)


def _echo(message: str) -> None:
    print(message, flush=True)


def seed_run(data: str, seed: int, echo: Any = _echo) -> dict[str, Any]:
    """One seed of the ``seeds`` protocol (module docstring)."""
    from qcb_guard.data import load_dataset
    from qcb_guard.models import build_model_for, train_clean
    from qcb_guard.robustness.adversarial import accuracy_of, craft, pgd
    from qcb_guard.robustness.defensive_quantization import DQConfig, train_dq
    from qcb_guard.robustness.qat import QATConfig, qat
    from qcb_guard.robustness.study import CLEAN_EPOCHS

    start = time.perf_counter()
    split = load_dataset(data, seed=seed)
    order = torch.randperm(len(split.train), generator=torch.Generator().manual_seed(seed))
    n_val = VAL_SIZE[data]
    val_idx, fit_idx = order[:n_val], order[n_val:]
    fit = SimpleNamespace(x=split.train.x[fit_idx], y=split.train.y[fit_idx])
    vx, vy = split.train.x[val_idx], split.train.y[val_idx]
    tx, ty = split.test.x[: TEST_SIZE[data]], split.test.y[: TEST_SIZE[data]]
    torch.manual_seed(seed)
    fp = build_model_for("smallcnn", split.train.image_shape, split.train.num_classes)
    train_clean(fp, fit.x, fit.y, epochs=CLEAN_EPOCHS[data], seed=seed, progress=False)
    fp.eval()
    echo(f"{data} seed {seed}: float {100 * accuracy_of(fp, tx, ty):.1f} %")
    qcfg = QATConfig(epochs=3)
    vanilla = {b: qat(fp, fit, bits=b, seed=seed, config=qcfg) for b in SEED_BITS}
    models: dict[str, Any] = {"fp": fp, **{f"q{b}": r.fake_quantized() for b, r in vanilla.items()}}
    # β on the validation split only.
    base_val_clean = accuracy_of(models["q4"], vx, vy)
    candidates = []
    for beta in BETAS:
        r = train_dq(fp, fit, bits=4, seed=seed, config=DQConfig(epochs=3, beta=beta))
        q = r.fake_quantized()
        val_clean = accuracy_of(q, vx, vy)
        val_robust = statistics.fmean(_pgd_curve(q, vx, vy, 10, seed))
        candidates.append(
            {"beta": beta, "val_clean": val_clean, "val_robust": val_robust, "q": q, "r": r}
        )
        echo(f"  DQ β={beta:g}: val clean {100 * val_clean:.1f}, val robust {100 * val_robust:.1f}")
    ok = [c for c in candidates if c["val_clean"] >= base_val_clean - 0.01]
    chosen = (
        max(ok, key=lambda c: c["val_robust"])
        if ok
        else max(candidates, key=lambda c: c["val_clean"])
    )
    models["dq4"] = chosen["q"]
    shadows = {f"q{b}": r.model.eval() for b, r in vanilla.items()}
    shadows["dq4"] = chosen["r"].model.eval()
    rows = {}
    for name, model in models.items():
        curve = _pgd_curve(model, tx, ty, 20, seed)
        rows[name] = {
            "clean": accuracy_of(model, tx, ty),
            "pgd": curve,
            "robust": statistics.fmean(curve),
        }
        echo(
            f"  {name}: clean {100 * rows[name]['clean']:.1f}, PGD-20 "
            + " ".join(f"{100 * a:.1f}" for a in curve)
        )
    # Gradient masking: per-image worst case over four attacks.
    mx, my = tx[: MASK_SIZE[data]], ty[: MASK_SIZE[data]]
    masking = {}
    for name in MASK_MODELS:
        model = models[name]
        per_attack: dict[str, list[float]] = {}
        worst = []
        for eps in EPS_GRID:
            adv = {"pgd20": craft(pgd, model, mx, my, eps=eps, steps=20, seed=seed)}
            for r in range(2):
                adv[f"pgd100-r{r}"] = craft(pgd, model, mx, my, eps=eps, steps=100, seed=100 + r)
            if name != "fp":
                adv["transfer-fp"] = craft(pgd, fp, mx, my, eps=eps, steps=20, seed=seed)
                adv["transfer-own-float"] = craft(
                    pgd, shadows[name], mx, my, eps=eps, steps=20, seed=seed
                )
            ok_all = torch.ones(len(my), dtype=torch.bool)
            for key, a in adv.items():
                hit = _correct(model, a, my)
                label = "pgd100x2" if key.startswith("pgd100") else key
                if key == "pgd100-r0":
                    both = hit & _correct(model, adv["pgd100-r1"], my)
                    per_attack.setdefault(label, []).append(float(both.float().mean()))
                elif key != "pgd100-r1":
                    per_attack.setdefault(label, []).append(float(hit.float().mean()))
                ok_all &= hit
            worst.append(float(ok_all.float().mean()))
        per_attack["worst-case"] = worst
        masking[name] = per_attack
        echo(
            f"  masking {name}: "
            + "; ".join(f"{k} {100 * statistics.fmean(v):.1f}" for k, v in per_attack.items())
        )
    return {
        "seed": seed,
        "data": data,
        "val_size": n_val,
        "test_size": len(ty),
        "models": rows,
        "dq_selection": {
            "vanilla_val_clean": base_val_clean,
            "candidates": [{k: v for k, v in c.items() if k not in ("q", "r")} for c in candidates],
            "beta": chosen["beta"],
        },
        "masking": {"images": len(my), "eps": list(EPS_GRID), "accuracy": masking},
        "seconds": round(time.perf_counter() - start, 1),
    }


def summarise_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of every figure the docs quote; the target verdicts."""
    names = list(runs[0]["models"])
    out: dict[str, Any] = {"models": {}, "amplification": {}, "dq4": {}, "masking": {}}
    for n in names:
        out["models"][n] = {
            "clean": _mean_std([r["models"][n]["clean"] for r in runs]),
            "robust": _mean_std([r["models"][n]["robust"] for r in runs]),
            "pgd": [
                _mean_std([r["models"][n]["pgd"][i] for r in runs]) for i in range(len(EPS_GRID))
            ],
        }
    for b in SEED_BITS:
        q = f"q{b}"
        out["amplification"][q] = {
            "robust": _mean_std(
                [r["models"][q]["robust"] - r["models"]["fp"]["robust"] for r in runs]
            ),
            "pgd": [
                _mean_std([r["models"][q]["pgd"][i] - r["models"]["fp"]["pgd"][i] for r in runs])
                for i in range(len(EPS_GRID))
            ],
            "clean": _mean_std(
                [r["models"][q]["clean"] - r["models"]["fp"]["clean"] for r in runs]
            ),
        }
    gain = _mean_std([r["models"]["dq4"]["robust"] - r["models"]["q4"]["robust"] for r in runs])
    clean = _mean_std([r["models"]["dq4"]["clean"] - r["models"]["q4"]["clean"] for r in runs])
    out["dq4"] = {
        "betas": [r["dq_selection"]["beta"] for r in runs],
        "robust_gain": gain,
        "pgd_gain": [
            _mean_std([r["models"]["dq4"]["pgd"][i] - r["models"]["q4"]["pgd"][i] for r in runs])
            for i in range(len(EPS_GRID))
        ],
        "clean_change": clean,
        "target_met": gain["mean"] >= 0.05 and clean["mean"] >= -0.01,
    }
    for n in runs[0]["masking"]["accuracy"]:
        attacks = runs[0]["masking"]["accuracy"][n]
        out["masking"][n] = {
            a: _mean_std([statistics.fmean(r["masking"]["accuracy"][n][a]) for r in runs])
            for a in attacks
        }
        out["masking"][n]["per_eps"] = {
            a: [
                _mean_std([r["masking"]["accuracy"][n][a][i] for r in runs])
                for i in range(len(EPS_GRID))
            ]
            for a in attacks
        }
    worst = {
        n: [statistics.fmean(r["masking"]["accuracy"][n]["worst-case"]) for r in runs]
        for n in runs[0]["masking"]["accuracy"]
    }
    pairs = [("q4", "fp"), ("q2", "fp"), ("dq4", "q4")]
    out["worst_case_differences"] = {
        f"{a}-{b}": _mean_std([x - y for x, y in zip(worst[a], worst[b], strict=True)])
        for a, b in pairs
        if a in worst and b in worst
    }
    return out


def resummarise(path: Path) -> None:
    """Recompute the summaries of a ``seeds`` JSON from its per-seed runs and print them."""
    payload = load(path)
    for data, block in payload["results"].items():
        block["summary"] = summarise_seeds(block["runs"])
        print_seeds(data, block["summary"])
    save(path, payload)


def run_seeds(args: argparse.Namespace) -> None:
    results = {}
    for data in args.data:
        if args.jobs > 1:  # one process per seed, one thread each
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(min(args.jobs, len(args.seeds)), initializer=_one_thread) as pool:
                runs = pool.starmap(seed_run, [(data, s) for s in args.seeds])
        else:
            runs = [seed_run(data, s, echo=lambda m: print(m, flush=True)) for s in args.seeds]
        results[data] = {"runs": runs, "summary": summarise_seeds(runs)}
        print_seeds(data, results[data]["summary"])
    out = args.out or RESULTS / "robustness_seeds.json"
    save(
        out,
        {
            "command": " ".join(sys.argv),
            "eps": list(EPS_GRID),
            "betas": list(BETAS),
            "results": results,
        },
    )


PATCH_SIZE = {"mnist5k": 11, "digits": 4}


def run_patches(args: argparse.Namespace) -> None:
    """The patch study per seed and placement: ASR matrix (sources × targets), mean ± std."""
    results: dict[str, Any] = {}
    for data in args.data:
        for placement in ("center", "random"):
            reports = []
            # Random placement carries little signal on SmallCNN: one seed is enough to show it.
            for seed in args.seeds if placement == "center" else args.seeds[:1]:
                config = StudyConfig(
                    arch="smallcnn",
                    data=data,
                    seed=seed,
                    bits=(8, 6, 4, 2),
                    attacks=("patch",),
                    eps=(),
                    flows=("pt2e-x86", "ort-static"),
                    qat_epochs=3,
                    test_size=500,
                    patch_size=PATCH_SIZE[data],
                    patch_target=8,
                    patch_steps=100 if args.quick else 300,
                    patch_placement=placement,
                    patch_archs=("smallcnn_bn",),
                    spatial_size=200,
                    spatial_stride=2,
                )
                report = run_study(config, echo=lambda m: print(f"  .. {m}", flush=True))
                block = report["patch"]["patch"]
                print(f"\n{data} {placement} seed {seed}: ASR % (rows: source)\n")
                print(patch_table(block), flush=True)
                reports.append(report)
            first = reports[0]["patch"]["patch"]
            cells = [
                [
                    _mean_std([r["patch"]["patch"]["asr"][i][j] for r in reports])
                    for j in range(len(first["targets"]))
                ]
                for i in range(len(first["sources"]))
            ]
            results[f"{data}/{placement}"] = {
                "size": first["size"],
                "area": first["size"] ** 2 / (reports[0]["data"]["image_shape"][-1] ** 2),
                "sources": first["sources"],
                "targets": first["targets"],
                "asr": cells,
                "models": [r["models"] for r in reports],
                "flows": [r["flows"] for r in reports],
                "spatial": [r["patch"]["patch"]["spatial"] for r in reports],
                "reports": reports,
            }
            print(f"\n## {data}, {placement} placement: ASR % mean ± std over seeds\n")
            print(
                markdown_table(
                    ["source", *first["targets"]],
                    [
                        [s_, *[_pm(v) for v in row]]
                        for s_, row in zip(first["sources"], cells, strict=True)
                    ],
                ),
                flush=True,
            )
    out = args.out or RESULTS / "robustness_patches.json"
    save(out, {"command": " ".join(sys.argv), "results": results})


def _pm(v: dict[str, float], signed: bool = False) -> str:
    return f"{100 * v['mean']:{'+' if signed else ''}.1f} ± {100 * v['std']:.1f}"


def print_seeds(data: str, summary: dict[str, Any]) -> None:
    print(f"\n## {data}: mean ± std over seeds (PGD-20 white-box, accuracy %)\n")
    print(
        markdown_table(
            ["model", "clean", *[f"ε={e:g}" for e in EPS_GRID], "mean over ε"],
            [
                [n, _pm(m["clean"]), *[_pm(v) for v in m["pgd"]], _pm(m["robust"])]
                for n, m in summary["models"].items()
            ],
        )
    )
    print("\nquantized − FP (points)\n")
    print(
        markdown_table(
            ["model", "clean", *[f"ε={e:g}" for e in EPS_GRID], "mean over ε"],
            [
                [
                    n,
                    _pm(a["clean"], True),
                    *[_pm(v, True) for v in a["pgd"]],
                    _pm(a["robust"], True),
                ]
                for n, a in summary["amplification"].items()
            ],
        )
    )
    dq = summary["dq4"]
    print(
        f"\nDQ at 4 bits (β per seed {dq['betas']}): robust gain {_pm(dq['robust_gain'], True)}"
        f" (per ε {', '.join(_pm(v, True) for v in dq['pgd_gain'])}), clean "
        f"{_pm(dq['clean_change'], True)} [target ≥5 / ≤1: "
        f"{'MET' if dq['target_met'] else 'MISSED'}]"
    )
    print(f"\nmasking check (first {MASK_SIZE[data]} test images, mean over ε)\n")
    attacks = sorted({a for m in summary["masking"].values() for a in m if a != "per_eps"})
    print(
        markdown_table(
            ["model", *attacks],
            [
                [n, *[_pm(m[a]) if a in m else "-" for a in attacks]]
                for n, m in summary["masking"].items()
            ],
        )
    )
    print("\nworst case per ε\n")
    print(
        markdown_table(
            ["model", *[f"ε={e:g}" for e in EPS_GRID]],
            [
                [n, *[_pm(v) for v in m["per_eps"]["worst-case"]]]
                for n, m in summary["masking"].items()
            ],
        )
    )
    print(
        "\nworst-case differences (points, mean over ε): "
        + ", ".join(f"{k} {_pm(v, True)}" for k, v in summary["worst_case_differences"].items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", choices=["study", "seeds", "patches"], default="study")
    parser.add_argument("--data", nargs="+", default=["mnist5k", "digits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="smaller budgets (smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel (seeds)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.experiment == "seeds":
        run_seeds(args)
        return
    if args.experiment == "patches":
        run_patches(args)
        return
    args.out = args.out or RESULTS / "robustness.json"
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
