"""The robustness study behind ``qcb-guard robustness``: one float model, its quantized
versions at each bit-width (vanilla QAT and every requested training defense), and the
registered attacks run against all of them.

* **evasion** attacks (``fgsm``, ``pgd``, any plugin of kind ``evasion``): accuracy under
  attack versus ε per bit-width, white-box through fake quantization (STE) and transferred
  from the float model, plus the float model's adversarial examples on each requested real
  framework flow (e.g. torchao PT2E x86 at 8/4/2-bit weights, ONNX Runtime at 8/4).
* **patch** attacks: universal patches optimised on the float model, on each fake-quantized
  model and on float models of other architectures; the ASR matrix source × target (targets
  include the real flows) and a spatial-sensitivity map.
* **extraction** attacks (``knockoff``): surrogate accuracy and fidelity against each
  victim (vanilla QAT, defenses) with and without reverse sigmoid, soft and hard labels.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcb_guard.errors import ConfigError, QcbGuardError
from qcb_guard.robustness.adversarial import accuracy_of, check_eps, craft
from qcb_guard.robustness.fakequant import FakeQuantModel, QuantConfig
from qcb_guard.robustness.qat import QATConfig, qat

__all__ = ["ATTACK_KINDS", "CLEAN_EPOCHS", "StudyConfig", "Variant", "run_study"]

ATTACK_KINDS = ("evasion", "patch", "extraction")
CLEAN_EPOCHS = {"digits": 15, "mnist5k": 6}


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """Everything ``qcb-guard robustness`` takes; validated at construction.

    :param bits: weight = activation bit-widths of the quantized models, each in [2, 8].
    :param eps: L∞ budgets of the evasion attacks (images in [0, 1]).
    :param defenses: registered training defenses (``defensive-quantization``, ``divqat``).
    :param defense_options: per defense, keyword options handed to it.
    :param attack_options: per attack, keyword options (e.g. ``{"pgd": {"steps": 40}}``).
    :param flows: real framework flows the float model is quantized with (transfer targets).
    :param test_size: test images used (the first ones of the seeded split).
    :param patch_placement: ``random`` (uniform over every place, per image) or ``center``
        (one fixed place), for optimising and measuring patches alike.
    :param patch_archs: extra float architectures whose patches are transferred.
    :param knockoff_bits: bit-width of the extraction victims (default 8 if studied, else
        the largest); ``knockoff_flow`` deploys them through a real flow instead of the
        fake-quantized simulation.
    """

    arch: str = "smallcnn"
    data: str = "digits"
    bits: tuple[int, ...] = (8, 4, 2)
    attacks: tuple[str, ...] = ("fgsm", "pgd")
    eps: tuple[float, ...] = (0.05, 0.1, 0.15)
    defenses: tuple[str, ...] = ()
    defense_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    flows: tuple[str, ...] = ()
    seed: int = 0
    limit: int | None = None
    epochs: int | None = None
    qat_epochs: int = 3
    test_size: int = 500
    patch_size: int | None = None
    patch_target: int = 0
    patch_steps: int = 300
    patch_placement: str = "random"
    patch_archs: tuple[str, ...] = ()
    spatial_stride: int = 2
    spatial_size: int = 200
    knockoff_bits: int | None = None
    knockoff_flow: str | None = None
    queries: int = 2000
    transfer: str = "natural"
    knockoff_epochs: int = 20
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("bits", "attacks", "eps", "defenses", "flows", "patch_archs"):
            value = getattr(self, name)
            if isinstance(value, str | int | float):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if not self.bits:
            raise ConfigError("at least one bit-width is needed")
        for b in self.bits:
            QuantConfig(b)  # bits in [2, 8]
        if len(set(self.bits)) != len(self.bits):
            raise ConfigError(f"bits repeat: {self.bits}")
        if not self.attacks:
            raise ConfigError("at least one attack is needed")
        object.__setattr__(self, "eps", tuple(check_eps(e) for e in self.eps))
        _int("seed", self.seed, 0)
        _int("qat_epochs", self.qat_epochs, 1)
        _int("test_size", self.test_size, 1)
        _int("patch_steps", self.patch_steps, 1)
        _int("patch_target", self.patch_target, 0)
        from qcb_guard.robustness.patch import check_placement

        check_placement(self.patch_placement)
        _int("spatial_stride", self.spatial_stride, 1)
        _int("spatial_size", self.spatial_size, 1)
        _int("queries", self.queries, 1)
        _int("knockoff_epochs", self.knockoff_epochs, 1)
        if self.epochs is not None:
            _int("epochs", self.epochs, 1)
        if self.knockoff_bits is not None:
            QuantConfig(self.knockoff_bits)
        for name in ("defense_options", "attack_options"):
            value = getattr(self, name)
            if not isinstance(value, dict) or any(not isinstance(v, dict) for v in value.values()):
                raise ConfigError(f"{name} must map names to option dicts, got {value!r}")
        stray = sorted(set(self.defense_options) - set(self.defenses))
        if stray:
            raise ConfigError(f"options given for defense(s) not requested: {', '.join(stray)}")
        from qcb_guard.data import DATASETS
        from qcb_guard.robustness.extraction import TRANSFER_SETS

        if self.data not in DATASETS:
            raise ConfigError(f"unknown data set {self.data!r}; known: {', '.join(DATASETS)}")
        if self.transfer not in TRANSFER_SETS:
            raise ConfigError(
                f"unknown transfer set {self.transfer!r}; known: {', '.join(TRANSFER_SETS)}"
            )
        if self.patch_target >= DATASETS[self.data].num_classes:
            raise ConfigError(f"patch_target {self.patch_target} is not a class of {self.data}")

    @property
    def victim_bits(self) -> int:
        if self.knockoff_bits is not None:
            return self.knockoff_bits
        return 8 if 8 in self.bits else max(self.bits)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("progress")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass
class Variant:
    """One model under study: the float model, or a quantized one at ``bits``."""

    name: str
    bits: int | None
    defense: str | None  # None: float or vanilla QAT
    model: nn.Module  # what attacks differentiate and metrics evaluate
    weights: nn.Module  # the float module behind it
    clean: float = 0.0
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bits": self.bits,
            "defense": self.defense,
            "clean": self.clean,
            "train_seconds": round(self.seconds, 2),
        }


def validate(config: StudyConfig, pm: Any) -> dict[str, Any]:
    """Resolve attack, defense and flow names before any training; ConfigError names the
    unknown one or the attack of the wrong kind (implant attacks belong to ``attack``)."""
    attacks = {}
    for name in config.attacks:
        entry = pm.attacks.get(name)  # unknown: PluginError listing registered attacks
        kind = entry.options.get("kind", getattr(entry.obj, "kind", None))
        if kind not in ATTACK_KINDS:
            raise ConfigError(
                f"attack {name!r} is a {kind or 'implant'} attack (use `qcb-guard attack "
                f"{name}`); robustness runs attacks of kind {', '.join(ATTACK_KINDS)}"
            )
        attacks[name] = (kind, entry.obj)
    for name in config.defenses:
        pm.training_defenses.get(name)
    for name in (*config.flows, *([config.knockoff_flow] if config.knockoff_flow else [])):
        pm.flows.get(name)
    return attacks


def _real_flow(
    pm: Any,
    name: str,
    model: nn.Module,
    calibration: torch.Tensor,
    bits: int,
    seed: int,
    workdir: str,
) -> Callable[[torch.Tensor], torch.Tensor]:
    from qcb_guard.evaluate import FlowRequest

    entry = pm.flows.get(name)
    allowed = entry.options.get("bits", (8, 4))
    if bits not in allowed:
        raise ConfigError(f"flow {name!r} supports {tuple(allowed)} bits, not {bits}")
    request = FlowRequest(bits, None, True, seed, {}, pm, Path(workdir))
    return entry.obj(model, calibration, request)


def run_study(
    config: StudyConfig,
    *,
    pm: Any = None,
    base: nn.Module | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the whole study; returns the JSON-ready report (see :mod:`.report`)."""
    from qcb_guard.data import load_dataset
    from qcb_guard.manager import get_plugin_manager
    from qcb_guard.models import build_model_for, train_clean

    pm = pm or get_plugin_manager()
    attacks = validate(config, pm)
    start = time.perf_counter()
    split = load_dataset(config.data, seed=config.seed, limit=config.limit)
    test = split.test.head(config.test_size)
    x, y = test.x, test.y
    calibration = split.train.x[:256]
    image_shape, num_classes = split.train.image_shape, split.train.num_classes

    def fresh(arch: str, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model_for(arch, image_shape, num_classes)

    def trained(arch: str) -> nn.Module:
        model = fresh(arch, config.seed)
        epochs = config.epochs or CLEAN_EPOCHS.get(config.data, 5)
        echo(f"training a float {arch} on {config.data} ({epochs} epochs)")
        train_clean(
            model,
            split.train.x,
            split.train.y,
            epochs=epochs,
            seed=config.seed,
            progress=config.progress,
        )
        return model.eval()

    if base is not None and getattr(base, "num_classes", num_classes) != num_classes:
        raise ConfigError(f"base model has {base.num_classes} classes, data has {num_classes}")
    fp = base if base is not None else trained(config.arch)
    variants = [Variant("fp", None, None, fp, fp, accuracy_of(fp, x, y))]
    for b in config.bits:
        t0 = time.perf_counter()
        echo(f"QAT at {b} bits (vanilla)")
        result = qat(
            fp,
            split.train,
            bits=b,
            seed=config.seed,
            config=QATConfig(epochs=config.qat_epochs, progress=config.progress),
        )
        q = result.fake_quantized()
        variants.append(
            Variant(
                f"q{b}", b, None, q, result.model, accuracy_of(q, x, y), time.perf_counter() - t0
            )
        )
        for name in config.defenses:
            t0 = time.perf_counter()
            echo(f"training defense {name} at {b} bits")
            defense = pm.training_defenses.get(name).obj
            options = dict(config.defense_options.get(name, {}))
            weights = defense(fp, split.train, bits=b, seed=config.seed, **options)
            if not isinstance(weights, nn.Module):
                raise QcbGuardError(f"training defense {name!r} returned {type(weights).__name__}")
            q = FakeQuantModel.calibrated(weights.eval(), QuantConfig(b), calibration)
            variants.append(
                Variant(
                    f"{name}-q{b}",
                    b,
                    name,
                    q,
                    weights,
                    accuracy_of(q, x, y),
                    time.perf_counter() - t0,
                )
            )
    report: dict[str, Any] = {
        "qcb_guard": "robustness",
        "title": f"qcb_guard robustness: {config.arch} on {config.data}",
        "config": config.to_dict(),
        "data": {
            "name": config.data,
            "train": len(split.train),
            "test": len(test),
            "image_shape": list(image_shape),
        },
        "quantization": {
            "weights": "symmetric narrow-range per-channel, max|w|/(2^(b-1)-1), STE",
            "activations": "unsigned min/max static ranges at the same bits, STE; input at 8 bits",
        },
        "models": [v.row() for v in variants],
    }
    workdir = tempfile.mkdtemp(prefix="qcb_robustness_")
    flows = _build_flows(config, pm, fp, calibration, workdir, x, y, echo)
    report["flows"] = [{k: v for k, v in f.items() if k != "predict"} for f in flows]
    evasion = {n: a for n, (k, a) in attacks.items() if k == "evasion"}
    if evasion:
        report["evasion"] = _evasion(config, evasion, variants, flows, x, y, echo)
    patches = {n: a for n, (k, a) in attacks.items() if k == "patch"}
    for name, attack in patches.items():
        report.setdefault("patch", {})[name] = _patch(
            config, attack, variants, flows, split.train, x, y, fresh, trained, echo
        )
    extraction = {n: a for n, (k, a) in attacks.items() if k == "extraction"}
    for name, attack in extraction.items():
        report.setdefault("extraction", {})[name] = _extraction(
            config, attack, variants, pm, calibration, workdir, x, y, fresh, echo
        )
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def _build_flows(config, pm, fp, calibration, workdir, x, y, echo) -> list[dict[str, Any]]:
    """The float model through each requested real flow at each studied bit-width it supports."""
    out = []
    for name in config.flows:
        allowed = pm.flows.get(name).options.get("bits", (8, 4))
        for b in config.bits:
            if b not in allowed:
                continue
            row: dict[str, Any] = {"flow": name, "bits": b, "clean": None, "error": None}
            try:
                echo(f"real flow {name} at {b} bits")
                row["predict"] = _real_flow(pm, name, fp, calibration, b, config.seed, workdir)
                row["clean"] = accuracy_of(row["predict"], x, y)
            except (QcbGuardError, ImportError, RuntimeError, ValueError, TypeError) as exc:
                row["error"] = (
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                )
            out.append(row)
    return out


def _evasion(config, attacks, variants, flows, x, y, echo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fp = variants[0]
    for name, attack in attacks.items():
        options = dict(config.attack_options.get(name, {}))
        curves: dict[tuple[str, str], list[float]] = {}
        for eps in config.eps:
            echo(f"{name} at eps={eps:g}")
            common = {"eps": eps, "seed": config.seed, "progress": config.progress, **options}
            adv_fp = craft(attack, fp.model, x, y, desc=f"{name} fp", **common)
            curves.setdefault((fp.name, "white-box"), []).append(accuracy_of(fp.model, adv_fp, y))
            for v in variants[1:]:
                adv = craft(attack, v.model, x, y, desc=f"{name} {v.name}", **common)
                curves.setdefault((v.name, "white-box"), []).append(accuracy_of(v.model, adv, y))
                curves.setdefault((v.name, "transfer"), []).append(accuracy_of(v.model, adv_fp, y))
            for f in flows:
                if f.get("predict") is not None:
                    key = (f"{f['flow']}-{f['bits']}", "real-transfer")
                    curves.setdefault(key, []).append(accuracy_of(f["predict"], adv_fp, y))
        meta = {v.name: v for v in variants}
        rows = []
        for (model, mode), acc in curves.items():
            v = meta.get(model)
            bits = v.bits if v is not None else int(model.rsplit("-", 1)[1])
            rows.append(
                {
                    "model": model,
                    "mode": mode,
                    "bits": bits,
                    "defense": None if v is None else v.defense,
                    "accuracy": acc,
                }
            )
        out[name] = {"eps": list(config.eps), "options": options, "curves": rows}
    return out


def _patch(config, attack, variants, flows, train, x, y, fresh, trained, echo) -> dict[str, Any]:
    """Patches from each source model; ASR on every target; a spatial map of the float
    model's patch on the float model and on the lowest-bit quantized model."""
    options = {
        "target": config.patch_target,
        "steps": config.patch_steps,
        "size": config.patch_size,
        "progress": config.progress,
    }
    where: dict[str, Any] = {}
    if config.patch_placement != "random":  # third-party patch attacks may not take it
        options["placement"] = where["placement"] = config.patch_placement
    sources: list[tuple[str, nn.Module]] = [
        (v.name, v.model) for v in variants if v.defense is None
    ]
    for arch in config.patch_archs:
        sources.append((f"fp-{arch}", trained(arch)))
    targets: list[tuple[str, Any]] = [(v.name, v.model) for v in variants]
    targets += [(f"{f['flow']}-{f['bits']}", f["predict"]) for f in flows if f.get("predict")]
    targets += [(n, m) for n, m in sources if n.startswith("fp-")]
    patches = {}
    for name, model in sources:
        echo(f"optimising a universal patch on {name}")
        patches[name] = attack(model, train.x, train.y, seed=config.seed, **options)
    asr = [
        [
            attack.asr(model, x, y, patches[s], config.patch_target, seed=config.seed, **where)
            for _, model in targets
        ]
        for s, _ in sources
    ]
    lowest = min(config.bits)
    sub_x, sub_y = x[: config.spatial_size], y[: config.spatial_size]
    spatial = {}
    for model_name in ("fp", f"q{lowest}"):
        model = dict(targets)[model_name]
        spatial[model_name] = attack.spatial(
            model, sub_x, sub_y, patches["fp"], config.patch_target, stride=config.spatial_stride
        )
    return {
        "target": config.patch_target,
        "size": int(patches["fp"].shape[-1]),
        "steps": config.patch_steps,
        "placement": config.patch_placement,
        "sources": [s for s, _ in sources],
        "targets": [t for t, _ in targets],
        "asr": asr,
        "spatial": {
            "patch_from": "fp",
            "stride": config.spatial_stride,
            "images": len(sub_x),
            "maps": spatial,
        },
        "patches": {k: p.tolist() for k, p in patches.items()},
    }


def _extraction(config, attack, variants, pm, calibration, workdir, x, y, fresh, echo):
    from qcb_guard.robustness.extraction import (
        agreement,
        query,
        reverse_sigmoid,
        top1_kept,
        transfer_set,
    )

    bits = config.victim_bits
    victims = [v for v in variants if v.bits == bits]
    if not victims:
        raise ConfigError(f"knockoff_bits {bits} is not among the studied bits {config.bits}")
    queries = transfer_set(
        config.transfer, config.queries, tuple(x.shape[1:]), data=config.data, seed=config.seed + 1
    )
    rows = []
    for v in victims:
        deployed: Any = v.model
        if config.knockoff_flow:
            deployed = _real_flow(
                pm, config.knockoff_flow, v.weights, calibration, bits, config.seed, workdir
            )
        victim_clean = accuracy_of(deployed, x, y)
        for perturb_name, perturb in (("none", None), ("reverse-sigmoid", reverse_sigmoid)):
            for labels in ("soft", "hard"):
                echo(f"knockoff on {v.name} ({labels} labels, perturbation {perturb_name})")
                surrogate = fresh(config.arch, config.seed + 7)
                result = attack(
                    deployed,
                    queries,
                    surrogate,
                    seed=config.seed,
                    perturb=perturb,
                    queries=config.queries,
                    labels=labels,
                    epochs=config.knockoff_epochs,
                    progress=config.progress,
                )
                answers = query(deployed, queries[: config.queries])
                released = answers if perturb is None else perturb(answers)
                rows.append(
                    {
                        "victim": v.name,
                        "defense": v.defense,
                        "bits": bits,
                        "deployed": config.knockoff_flow or "fake-quant",
                        "perturbation": perturb_name,
                        "labels": labels,
                        "victim_clean": victim_clean,
                        "surrogate_accuracy": accuracy_of(result.surrogate, x, y),
                        "fidelity": agreement(result.surrogate, deployed, x),
                        "top1_kept": top1_kept(answers, released),
                    }
                )
    return {
        "bits": bits,
        "queries": config.queries,
        "transfer": config.transfer,
        "epochs": config.knockoff_epochs,
        "rows": rows,
    }
