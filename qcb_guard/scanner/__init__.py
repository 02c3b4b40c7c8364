"""QCB scanner: flag a model that carries a quantization-conditioned backdoor, without the
trigger, before it is deployed.

``scan(model)`` probes the model under every framework's weight grid
(:mod:`~qcb_guard.scanner.conventions`) and asks the ``qcb_guard_scan`` hook of every plugin
for evidence. The built-in plugin (``plugins/scan.py``) contributes three validated signals:
where weights sit in their rounding bins, neuron-wise truncation-error outliers, and
rounding sensitivity on clean and patched probes; and, on request (it runs gradient ascent
per activation unit), activation reach against static activation ranges. Each finding
carries a statistic, the threshold it is measured against (calibrated on benign models,
docs/scanner.md) and an explanation; the verdict is ``suspicious`` when any evidence reaches
its threshold.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from qcb_guard.errors import ConfigError
from qcb_guard.scanner.conventions import (
    DEFAULT_BITS,
    DEFAULT_FRAMEWORKS,
    FRAMEWORKS,
    Convention,
    conventions,
)

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_FRAMEWORKS",
    "FRAMEWORKS",
    "OPT_IN_SIGNALS",
    "SCHEMA",
    "SIGNALS",
    "SYNTHETIC_THRESHOLDS",
    "THRESHOLDS",
    "Finding",
    "ScanConfig",
    "ScanContext",
    "ScanReport",
    "calibrated",
    "combine",
    "finding_dict",
    "scan",
]

SCHEMA = "qcb_guard.scan/1"

#: The built-in signals a default scan runs, in report order.
SIGNALS = ("bin_position", "truncation_error", "rounding_sensitivity")

#: Built-in signals that run only when named in ``ScanConfig.signals`` (costly: activation
#: reach runs gradient ascent for every activation unit, docs/scanner.md).
OPT_IN_SIGNALS = ("activation_reach",)

#: Evidence thresholds: 1.5 x the largest statistic over eight benign calibration models
#: that are not in the benchmark population (benchmarks/scanner.py recomputes them;
#: docs/scanner.md). A statistic at its threshold is evidence 1.0, the verdict boundary.
THRESHOLDS: dict[str, float] = {
    "bin_position": 11.0,  # binomial z of the bin-edge pile-up, worst layer
    "truncation_error": 9.7,  # z of a neuron's squared rounding error, worst neuron
    "rounding_sensitivity": 0.31,  # probability gain of one class on one probe group
    # reach of one unit over its layer's typical clean peak, worst unit; calibrated on the
    # same eight models plus a benign CIFAR-layout ResNet-18 (8.11, docs/scanner.md)
    "activation_reach": 13.0,
}

#: Thresholds used instead when there is no calibration data and the behavioural probes are
#: synthetic (noise, smoothed noise, flat images): benign models answer such inputs far less
#: predictably once quantized (calibration set: up to 0.51), so the same 1.5x rule gives a
#: higher threshold, and the scan is weaker (docs/scanner.md).
SYNTHETIC_THRESHOLDS: dict[str, float] = {"rounding_sensitivity": 0.76}


@dataclass(frozen=True)
class ScanConfig:
    """How a scan runs.

    :param frameworks: grids to probe (keys of ``FRAMEWORKS``).
    :param bits: weight bit-widths to probe.
    :param behaviour: run the behavioural signals (rounding sensitivity: a forward pass per
        grid; activation reach, when named in ``signals``); ``False`` scans weight
        statistics only (fast, no data needed).
    :param signals: run only these signal names (``None``: every signal except
        ``OPT_IN_SIGNALS``, which run only when named here).
    :param clean: clean probe inputs (calibration images, or synthetic ones).
    :param base: images that receive patches.
    :param grid: patch positions per image side.
    :param null_grids: phase-shifted grids measured next to nearest rounding, for the
        explanation, when the response reaches half its threshold.
    :param thresholds: per-signal overrides of ``THRESHOLDS``.
    :param input_shape: per-sample input shape when neither calibration data nor the model
        file says it.
    :param activation_options: options of the ``activation_reach`` signal: ``quantile``,
        ``floor``, ``top`` and the fields of ``RangeProbeConfig`` (``steps``, ``budget_s``,
        ``max_units_per_site`` ...); see
        :class:`~qcb_guard.scanner.activation_reach.ReachConfig`.
    :param seed: probes and null grids are deterministic under it.
    :param progress: tqdm progress bar (``None``: only on a terminal).
    """

    frameworks: tuple[str, ...] = DEFAULT_FRAMEWORKS
    bits: tuple[int, ...] = DEFAULT_BITS
    behaviour: bool = True
    signals: tuple[str, ...] | None = None
    clean: int = 128
    base: int = 16
    grid: int = 5
    null_grids: int = 2
    thresholds: dict[str, float] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    activation_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "frameworks", tuple(self.frameworks))
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        conventions(self.frameworks, self.bits)  # validates names and bits
        for name in ("clean", "base", "grid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.null_grids, int) or self.null_grids < 0:
            raise ConfigError(f"null_grids must be an int >= 0, got {self.null_grids!r}")
        for name, value in self.thresholds.items():
            if not isinstance(value, int | float) or not value > 0 or not math.isfinite(value):
                raise ConfigError(f"threshold {name!r} must be a positive number, got {value!r}")
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
                raise ConfigError(f"input_shape must be positive ints, got {self.input_shape!r}")
            object.__setattr__(self, "input_shape", shape)
        if self.signals is not None:
            if isinstance(self.signals, str) or not all(isinstance(s, str) for s in self.signals):
                raise ConfigError(f"signals must be a sequence of names, got {self.signals!r}")
            object.__setattr__(self, "signals", tuple(self.signals))
        if self.wants("activation_reach"):
            self.reach_config()  # validates activation_options now

    def reach_config(self) -> Any:
        """The :class:`~qcb_guard.scanner.activation_reach.ReachConfig` of this scan."""
        from qcb_guard.scanner.activation_reach import ReachConfig

        if not isinstance(self.activation_options, dict):
            raise ConfigError(
                f"activation_options must be a dict, got {type(self.activation_options).__name__}"
            )
        opts = dict(self.activation_options)
        own = {k: opts.pop(k) for k in ("quantile", "floor", "top") if k in opts}
        return ReachConfig(**own, probe=opts)

    def threshold(self, signal: str) -> float:
        return float(self.thresholds.get(signal, THRESHOLDS.get(signal, 1.0)))

    def wants(self, signal: str) -> bool:
        if self.signals is None:
            return signal not in OPT_IN_SIGNALS
        return signal in self.signals


@dataclass
class ScanContext:
    """What ``qcb_guard_scan`` receives as ``config`` from :func:`scan`: the configuration, the
    grid being probed, and (for behavioural signals) the model view, probes and float outputs.
    ``shared`` is one dict for every grid of a scan: a grid-independent signal (activation
    reach) computes and reports once through it. ``guard(..., scan=True)`` passes its
    ``GuardConfig`` instead, with none of these."""

    config: ScanConfig
    convention: Convention
    view: Any = None
    probes: Any = None
    fp_probs: Any = None
    shared: dict[str, Any] = field(default_factory=dict)


@dataclass
class Finding:
    """One piece of evidence from one signal under one grid.

    ``score`` is ``statistic / threshold`` (at least 0): 1.0 is the verdict boundary.
    ``layers`` holds per-layer details, ``details`` anything else worth reporting.
    """

    signal: str
    convention: str
    statistic: float
    threshold: float
    explanation: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        if not math.isfinite(self.statistic):
            return math.inf if self.statistic > 0 else 0.0
        return max(0.0, self.statistic / self.threshold)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["score"] = _num(self.score)
        data["statistic"] = _num(self.statistic)
        return data


def _num(v: float) -> float | None:
    return round(float(v), 6) if math.isfinite(v) else None


def finding_dict(f: Any) -> dict[str, Any]:
    """A JSON-ready dict from a :class:`Finding` or a third-party plugin's mapping."""
    if isinstance(f, Finding):
        return f.to_dict()
    if isinstance(f, dict):
        return dict(f)
    raise ConfigError(f"a scan plugin returned a {type(f).__name__}, not a Finding or dict")


def calibrated(evidence: float) -> float:
    """Evidence (1.0 at the threshold) → score in [0, 1], 0.5 at the threshold."""
    return 1.0 if math.isinf(evidence) else evidence / (1.0 + evidence)


def combine(findings: Sequence[Any]) -> dict[str, Any]:
    """Verdict, calibrated score and the strongest finding of each signal.

    The evidence of a model is that of its strongest finding: each signal's threshold is set
    so that benign models stay below it on every grid, so one finding over it is enough.
    """
    per_signal: dict[str, dict[str, Any]] = {}
    for f in map(finding_dict, findings):
        best = per_signal.get(f["signal"])
        score = f.get("score") if f.get("score") is not None else math.inf
        if best is None or score > best["score"]:
            per_signal[f["signal"]] = {
                "score": score,
                "statistic": f.get("statistic"),
                "threshold": f.get("threshold"),
                "convention": f.get("convention"),
                "explanation": f.get("explanation", ""),
            }
    evidence = max((s["score"] for s in per_signal.values()), default=0.0)
    for s in per_signal.values():
        s["score"] = _num(s["score"]) if math.isfinite(s["score"]) else None
    return {
        "verdict": "suspicious" if evidence >= 1.0 else "clean",
        "score": round(calibrated(evidence), 6),
        "evidence": _num(evidence) if math.isfinite(evidence) else None,
        "signals": per_signal,
    }


@dataclass
class ScanReport:
    """The result of :func:`scan` (its JSON form is documented in docs/scanner.md)."""

    verdict: str
    score: float
    evidence: float | None
    signals: dict[str, dict[str, Any]]
    findings: list[dict[str, Any]]
    model: dict[str, Any]
    probes: dict[str, Any] | None
    config: dict[str, Any]
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def suspicious(self) -> bool:
        return self.verdict == "suspicious"

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}


def scan(
    model: Any,
    calibration: Any = None,
    frameworks: Sequence[str] = DEFAULT_FRAMEWORKS,
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    arch: str | None = None,
    config: ScanConfig | None = None,
    pm: Any = None,
    **options: Any,
) -> ScanReport:
    """Scan ``model`` for a quantization-conditioned backdoor.

    :param model: a ``torch.nn.Module``, an ONNX ``ModelProto``, or a path: ``.onnx``,
        ``.safetensors`` (with ``arch`` unless the file records it), a weights-only torch
        checkpoint, or a ``qcb-guard attack`` output directory. Never modified.
    :param calibration: unlabelled inputs ``[N, ...]`` (tensor or a ``--data`` spec); synthetic
        probes are used without it.
    :param frameworks: grids to probe (``FRAMEWORKS``).
    :param bits: bit-widths to probe.
    :param config: a full :class:`ScanConfig` (``frameworks``/``bits``/``options`` ignored).
    :param options: other :class:`ScanConfig` fields.
    """
    from tqdm.auto import tqdm

    from qcb_guard.manager import get_plugin_manager
    from qcb_guard.scanner.loading import load_calibration, load_view
    from qcb_guard.scanner.probes import build_probes
    from qcb_guard.scanner.views import layer_slots

    config = config or ScanConfig(frameworks=tuple(frameworks), bits=tuple(bits), **options)
    pm = pm or get_plugin_manager()
    t0 = time.perf_counter()
    cal = load_calibration(calibration)
    view, info = load_view(model, arch=arch, input_shape=config.input_shape, calibration=cal)
    seconds: dict[str, float] = {"load": round(time.perf_counter() - t0, 4)}
    notes: list[str] = list(info.pop("notes", []))
    if config.wants("activation_reach"):
        if not config.behaviour:
            notes.append("activation_reach not run: behaviour=False scans weights only")
        elif cal is None:
            raise ConfigError(
                "activation_reach needs calibration data: the clean activation ranges a static "
                "flow calibrates come from it (synthetic inputs would set meaningless ranges)"
            )
    probes = fp_probs = None
    if config.behaviour and config.wants("rounding_sensitivity"):
        t = time.perf_counter()
        if view.input_shape is None:
            raise ConfigError(
                "the model's input shape is unknown: pass calibration data or input_shape "
                "(--input-shape C,H,W), or scan weight statistics only (behaviour=False)"
            )
        probes = build_probes(
            cal, view.input_shape, clean=config.clean, base=config.base, grid=config.grid,
            seed=config.seed,
        )  # fmt: skip
        if probes.synthetic:
            config = replace(config, thresholds={**SYNTHETIC_THRESHOLDS, **config.thresholds})
            notes.append(
                "no calibration data: behavioural probes are synthetic images, a weaker test "
                f"(rounding-sensitivity threshold {config.threshold('rounding_sensitivity')})"
            )
        fp_probs = view.forward(probes.x).softmax(1)
        seconds["probes"] = round(time.perf_counter() - t, 4)
    findings: list[dict[str, Any]] = []
    grids = conventions(config.frameworks, config.bits)
    layers_cache: dict[bool, Any] = {}
    shared: dict[str, Any] = {}
    t = time.perf_counter()
    for conv in tqdm(grids, desc="qcb_guard scan", unit="grid", disable=_disable(config)):
        if conv.fold_bn not in layers_cache:
            layers_cache[conv.fold_bn] = view.layers(conv.fold_bn)
        slots = list(layer_slots(layers_cache[conv.fold_bn], conv.spec, conv.name))
        context = ScanContext(config, conv, view, probes, fp_probs, shared)
        for found in pm.hook.qcb_guard_scan(slots=slots, calibration=cal, config=context):
            findings.extend(finding_dict(f) for f in found or [])
    seconds["signals"] = round(time.perf_counter() - t, 4)
    seconds["total"] = round(time.perf_counter() - t0, 4)
    combined = combine(findings)
    silent = [s for s in config.signals or () if s not in combined["signals"]]
    if silent:  # a typo or an unmet precondition must not read as "clean"
        notes.append(
            f"requested signal(s) {', '.join(silent)} produced no finding (unknown name, or "
            "skipped: see the notes above)"
        )
    return ScanReport(
        verdict=combined["verdict"],
        score=combined["score"],
        evidence=combined["evidence"],
        signals=combined["signals"],
        findings=findings,
        model=info,
        probes=None if probes is None else {"synthetic": probes.synthetic, **probes.meta},
        config={
            "frameworks": list(config.frameworks),
            "bits": list(config.bits),
            "behaviour": config.behaviour,
            "thresholds": {
                s: config.threshold(s)
                for s in SIGNALS + tuple(s for s in OPT_IN_SIGNALS if config.wants(s))
            },
            "seed": config.seed,
        },
        seconds=seconds,
        notes=notes,
    )


def _disable(config: ScanConfig) -> bool | None:
    return None if config.progress is None else not config.progress
