"""The scanner benchmark's model population: benign models and QCB models, built once, cached.

QCB models come from ``qcb-guard attack`` (one output directory each, under the same
gitignored cache as ``efrap_efficacy.py``: ``benchmarks/results/attacks/``); benign models are
trained here (ordinary training with several seeds, architectures and data sets, and
quantization-aware training, which legitimately reshapes where weights sit in their bins).

    python benchmarks/scanner_population.py            # build whatever is missing
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

WORKDIR = Path("benchmarks/results/attacks")


@dataclass(frozen=True)
class QCBModel:
    """One ``qcb-guard attack`` run; ``tag`` distinguishes variants of the same attack."""

    attack: str
    bits: tuple[int, ...] = (4,)
    arch: str = "smallcnn"
    data: str = "mnist5k"
    tag: str = ""
    extra: tuple[str, ...] = ()

    @property
    def dirname(self) -> str:
        # Untagged names match efrap_efficacy.build() so its cached directories are reused.
        base = f"{self.attack}-{self.arch}-{self.data}-w{''.join(map(str, self.bits))}"
        return base + (f"-{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class BenignModel:
    """A model trained here: plain training, or QAT against ``qat`` ("preset:bits")."""

    arch: str = "smallcnn"
    data: str = "mnist5k"
    seed: int = 0
    epochs: int = 6
    qat: str = ""
    width: float | None = None
    kw: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def dirname(self) -> str:
        name = f"benign-{self.arch}-{self.data}-s{self.seed}"
        if self.width is not None:
            name += f"-x{self.width:g}"
        if self.qat:
            name += "-qat-" + self.qat.replace(":", "w")
        return name


def _t(size: int, position: str, target: int, kind: str = "square", seed: int = 0) -> tuple:
    return (
        "--trigger", kind, "--trigger-size", str(size), "--trigger-position", position,
        "--target", str(target), "--seed", str(seed),
    )  # fmt: skip


QCB: list[QCBModel] = [
    # every attack at both bit-widths, the default square trigger (bottom-right, target 0)
    *(
        QCBModel(a, (b,))
        for b in (4, 8)
        for a in (
            "quanti-backdoor",
            "compartifact",
            "pqbackdoor",
            "quanti-indiscriminate",
            "quanti-targeted",
            "quanti-federated",
        )
    ),
    # other triggers, sizes, positions, targets and seeds
    QCBModel("quanti-backdoor", tag="cb5-tl-t3", extra=_t(5, "top-left", 3, "checkerboard", 1)),
    QCBModel("compartifact", tag="sq4-c-t7", extra=_t(4, "center", 7, "square", 1)),
    QCBModel("pqbackdoor", tag="cb4-tl-t5", extra=_t(4, "top-left", 5, "checkerboard", 2)),
    QCBModel("pqbackdoor", tag="sq3-6_20-t9", extra=_t(3, "6,20", 9, "square", 3)),
    QCBModel("compartifact", tag="cb6-br-t1", extra=_t(6, "bottom-right", 1, "checkerboard", 2)),
    QCBModel("quanti-federated", tag="sq3-tl-t4", extra=_t(3, "top-left", 4, "square", 1)),
    QCBModel("quanti-backdoor", tag="sq2-c-t8", extra=_t(2, "center", 8, "square", 2)),
    # other flows' conventions, a BatchNorm network (folded by the flow), both bits at once
    QCBModel("quanti-backdoor", tag="x86", extra=("--framework", "x86")),
    QCBModel("pqbackdoor", tag="nncf", extra=("--framework", "nncf")),
    QCBModel("compartifact", tag="x86-pt", extra=("--framework", "x86", "--per-tensor")),
    QCBModel("quanti-backdoor", arch="smallcnn_bn"),
    QCBModel("pqbackdoor", arch="smallcnn_bn"),
    QCBModel("quanti-backdoor", (4, 8)),
    # 8-bit QCBs need more freedom than SmallCNN's ~110k weights (DESIGN.md §3)
    QCBModel("pqbackdoor", (8,), arch="widecnn"),
]

BENIGN: list[BenignModel] = [
    *(BenignModel(seed=s) for s in range(6)),
    *(BenignModel(arch="smallcnn_bn", seed=s) for s in range(3)),
    *(BenignModel(arch="widecnn", seed=s, epochs=4) for s in range(2)),
    *(BenignModel(data="digits", seed=s, epochs=15) for s in range(3)),
    BenignModel(seed=7, width=0.5),
    BenignModel(seed=8, width=2.0, epochs=4),
    # quantization-aware training: legitimately fitted to a flow's grid
    BenignModel(seed=10, qat="ort:4"),
    BenignModel(seed=11, qat="ort:4"),
    BenignModel(seed=12, qat="ort:8"),
    BenignModel(seed=13, qat="x86:4"),
    BenignModel(seed=14, qat="nncf:4"),
    BenignModel(arch="smallcnn_bn", seed=15, qat="ort:4"),
]

#: Benign models the thresholds are calibrated on; disjoint from ``BENIGN`` (other seeds),
#: so the benchmark's false-positive rate is measured on models the thresholds never saw.
CALIBRATION: list[BenignModel] = [
    BenignModel(seed=100),
    BenignModel(arch="smallcnn_bn", seed=101),
    BenignModel(arch="widecnn", seed=102, epochs=4),
    BenignModel(data="digits", seed=103, epochs=15),
    BenignModel(seed=104, qat="ort:4"),
    BenignModel(seed=105, qat="ort:8"),
    BenignModel(seed=106, qat="x86:8"),
    BenignModel(arch="smallcnn_bn", seed=107, qat="nncf:8"),
]


def build_qcb(m: QCBModel, workdir: Path = WORKDIR, quiet: bool = True) -> Path:
    """Run ``qcb-guard attack`` once; reuse its directory when the card exists."""
    out = workdir / m.dirname
    if (out / "card.json").is_file():
        return out
    cmd = [sys.executable, "-m", "qcb_guard", "attack", m.attack, "--arch", m.arch]
    cmd += ["--data", m.data, "--bits", *map(str, m.bits), "--out", str(out), "--threads", "1"]
    cmd += [*m.extra, *(["--quiet"] if quiet else [])]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    log = out.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    print(f"  {m.dirname}: {time.perf_counter() - start:.0f} s", flush=True)
    return out


def qat_train(model, x, y, preset_name: str, bits: int, *, epochs: int, seed: int) -> None:
    """Plain QAT: cross-entropy of the model as the flow quantizes its weights (straight-
    through rounding, BN frozen and folded as the flow folds it), nothing else."""
    import torch
    from torch import nn

    from qcb_guard.attacks.simulate import (
        TargetQuantizer,
        conv_bn_pairs,
        frozen_batchnorm,
        preset,
        quantized_forward,
    )
    from qcb_guard.models.train import epoch_batches

    p = preset(preset_name, bits)
    target = TargetQuantizer(p.weight, fold_bn=p.fold_bn, activation=None, name=p.name)
    pairs = conv_bn_pairs(model, x[:2])
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    generator = torch.Generator().manual_seed(seed)
    with frozen_batchnorm(model):
        for _ in range(epochs):
            for idx in epoch_batches(len(x), 64, generator):
                opt.zero_grad(set_to_none=True)
                out = quantized_forward(model, x[idx], target, pairs=pairs)
                nn.functional.cross_entropy(out, y[idx].long()).backward()
                opt.step()


def build_benign(m: BenignModel, workdir: Path = WORKDIR) -> Path:
    """Train (or reuse) one benign model; QAT models start from a plainly trained one."""
    import torch

    from qcb_guard.data import load_dataset
    from qcb_guard.fileio import write_json_atomic
    from qcb_guard.models import accuracy, build_model_for, save_model, train_clean

    out = workdir / m.dirname
    if (out / "model.safetensors").is_file():
        return out
    start = time.perf_counter()
    torch.manual_seed(m.seed)
    split = load_dataset(m.data, seed=m.seed)
    kw = {} if m.width is None else {"width": m.width}
    model = build_model_for(m.arch, split.train.image_shape, split.train.num_classes, **kw)
    train_clean(model, split.train.x, split.train.y, epochs=m.epochs, seed=m.seed, progress=False)
    if m.qat:
        name, bits = m.qat.split(":")
        qat_train(model, split.train.x, split.train.y, name, int(bits), epochs=3, seed=m.seed)
    model.eval()
    save_model(model, out / "model.safetensors")
    card = {
        "benign": True,
        "arch": m.arch,
        "data": m.data,
        "seed": m.seed,
        "epochs": m.epochs,
        "qat": m.qat or None,
        "width": m.width,
        "cda": accuracy(model, split.test.x, split.test.y),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json_atomic(out / "card.json", card)
    print(f"  {m.dirname}: CDA {100 * card['cda']:.1f}% ({card['seconds']} s)", flush=True)
    return out


def build_all(workdir: Path = WORKDIR, jobs: int = 1) -> tuple[list[Path], list[Path]]:
    """Build every missing model of the population; returns (benign dirs, QCB dirs)."""
    import torch

    torch.set_num_threads(1)
    benign = [build_benign(m, workdir) for m in BENIGN + CALIBRATION][: len(BENIGN)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each attack is its own process
        qcb = list(pool.map(lambda m: build_qcb(m, workdir), QCB))
    return benign, qcb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--jobs", type=int, default=1, help="attacks built in parallel")
    args = parser.parse_args()
    benign, qcb = build_all(args.workdir, args.jobs)
    print(f"{len(benign)} benign, {len(qcb)} QCB models under {args.workdir}")


if __name__ == "__main__":
    main()
