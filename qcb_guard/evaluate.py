"""Evaluation harness: clean accuracy (CDA) and attack success rate (ASR) of a model in float
and after each installed framework's real quantization flow, at each bit-width.

Flows come from the ``qcb_guard_register_flows`` hook (built-ins in ``plugins/flows.py``), so
the harness itself knows no framework. A flow that fails (framework missing, unsupported
bit-width, export error) gives a row with its error, never a silently missing row.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qcb_guard.errors import ConfigError, DataError, QcbGuardError
from qcb_guard.manager import PluginManager, get_plugin_manager
from qcb_guard.quant.spec import QuantSpec

Predictor = Callable[[torch.Tensor], torch.Tensor]
REFERENCE = "reference"


@dataclass
class FlowRequest:
    """What a registered flow is asked to do.

    :param bits: weight bit-width.
    :param defense: rounding defense for ``guard()``, or ``None`` for the unguarded flow.
    :param activation_defense: activation defense for ``guard()`` in static flows (``None``:
        the framework's ranges, untouched).
    :param per_channel: per-channel weight quantization (the frameworks' default) or per-tensor.
    :param seed: seed handed to ``guard()``.
    :param options: defense options handed to ``guard()``.
    :param pm: plugin manager handed to ``guard()``.
    :param workdir: a private directory for files the flow writes.
    """

    bits: int
    defense: str | None = None
    per_channel: bool = True
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    pm: PluginManager | None = None
    workdir: Path | None = None
    guard_result: Any = None  # set by flows that can read the guard report back
    activation_defense: str | None = None

    def guard_kwargs(self) -> dict[str, Any]:
        return {
            "defense": self.defense,
            "activation_defense": self.activation_defense,
            "seed": self.seed,
            "pm": self.pm,
            **self.options,
        }


@dataclass
class EvalRow:
    """One model × flow × bit-width × defense measurement."""

    flow: str
    bits: int | None
    defense: str | None
    cda: float | None = None
    asr: float | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Evaluation:
    """All rows of one evaluation, the float model's first."""

    rows: list[EvalRow] = field(default_factory=list)
    target: int | None = None
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "samples": self.samples,
            "rows": [asdict(r) for r in self.rows],
        }

    def row(self, flow: str, bits: int | None, defense: str | None = None) -> EvalRow:
        for r in self.rows:
            if (r.flow, r.bits, r.defense) == (flow, bits, defense):
                return r
        raise KeyError((flow, bits, defense))


#: The ``defenses`` entry that measures ``guard()``'s defaults (rounding + activation defense).
GUARD_DEFAULT = "guard"


def split_defense(spec: str, pm: PluginManager) -> tuple[str, str | None]:
    """``(rounding defense, activation defense)`` named by one ``defenses`` entry.

    ``"efrap"`` is that rounding defense alone (the framework's activation ranges untouched);
    ``"efrap+range-probe"`` adds an activation defense; an activation defense alone
    (``"range-probe"``) keeps nearest rounding; ``"guard"`` is ``guard()``'s defaults. Each
    row measures exactly what its label says, so defenses can be compared column by column.
    """
    from qcb_guard.config import DEFAULT_ACTIVATION_DEFENSE, DEFAULT_DEFENSE

    if spec == GUARD_DEFAULT:
        return DEFAULT_DEFENSE, DEFAULT_ACTIVATION_DEFENSE
    rounding, plus, activation = spec.partition("+")
    if not plus and rounding in pm.activation_defenses:
        rounding, activation = "nearest", spec
    pm.defenses.get(rounding)  # ConfigError naming the known ones
    if activation:
        pm.activation_defenses.get(activation)
    return rounding, activation or None


def predictions(predict: Predictor, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels of ``predict`` over ``x`` in batches."""
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = torch.as_tensor(predict(x[start : start + batch_size]))
            out.append(logits.argmax(1))
    return torch.cat(out)


def metrics(
    predict: Predictor, x: torch.Tensor, y: torch.Tensor, trigger: Any = None
) -> tuple[float, float | None]:
    """CDA on ``(x, y)``; ASR on the triggered images whose true label is not the target."""
    cda = float((predictions(predict, x) == y).float().mean())
    if trigger is None:
        return cda, None
    keep = y != trigger.target
    if not keep.any():
        raise DataError(
            f"every test label equals the target class {trigger.target}; ASR is undefined"
        )
    hit = predictions(predict, trigger.apply(x[keep])) == trigger.target
    return cda, float(hit.float().mean())


def module_predictor(model: nn.Module) -> Predictor:
    model = model.eval()
    return lambda batch: model(batch)


def _reference_flow(model: nn.Module, calibration: torch.Tensor, request: FlowRequest) -> Predictor:
    from qcb_guard.reference import quantize_model

    spec = QuantSpec(bits=request.bits, axis=0 if request.per_channel else None)
    options = request.options if request.defense is not None else {}  # unguarded: nearest
    qmodel, result = quantize_model(
        model,
        spec,
        defense=request.defense or "nearest",
        calibration=calibration,
        seed=request.seed,
        pm=request.pm,
        **options,
    )
    request.guard_result = result
    return module_predictor(qmodel)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Any = None,
    *,
    calibration: torch.Tensor,
    bits: Sequence[int] = (8, 4),
    flows: Iterable[str] | None = None,
    defenses: Sequence[str | None] = (None,),
    per_channel: bool = True,
    seed: int = 0,
    pm: PluginManager | None = None,
    workdir: str | Path | None = None,
    options: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> Evaluation:
    """Measure ``model`` in float and through every requested flow × bit-width × defense.

    :param flows: registered flow names and/or ``"reference"`` (the project's weight-only
        quantizer); ``None`` means the reference plus every registered flow.
    :param defenses: ``None`` is each flow's unguarded run; other entries go through
        ``guard()`` as :func:`split_defense` reads them (``"efrap"``, ``"efrap+range-probe"``,
        ``"range-probe"``, ``"guard"``).
    """
    pm = pm or get_plugin_manager()
    bits = [QuantSpec(bits=b).bits for b in bits]  # validates 2–8
    known = [REFERENCE, *pm.flows.names()]
    flows = list(flows) if flows is not None else known
    unknown = [f for f in flows if f not in known]
    if unknown:
        raise ConfigError(f"unknown flow(s) {', '.join(unknown)}; available: {', '.join(known)}")
    pairs = {d: split_defense(d, pm) for d in defenses if d is not None}
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"need matching, non-empty x and y, got {len(x)} and {len(y)}")
    if calibration is None or len(calibration) == 0:
        raise DataError("calibration inputs are empty: real static flows need them")
    model = copy.deepcopy(model).eval()
    report = Evaluation(target=None if trigger is None else int(trigger.target), samples=len(x))
    t0 = time.perf_counter()
    cda, asr = metrics(module_predictor(model), x, y, trigger)
    report.rows.append(EvalRow("float32", None, None, cda, asr, round(time.perf_counter() - t0, 3)))
    jobs = [(f, b, d) for f in flows for b in bits for d in defenses]
    workdir = Path(workdir) if workdir is not None else None
    for flow, b, defense in tqdm(
        jobs, desc="evaluate", unit="flow", disable=None if progress is None else not progress
    ):
        row = EvalRow(flow, b, defense)
        rounding, activation = pairs.get(defense, (None, None))
        request = FlowRequest(
            b, rounding, per_channel, seed, dict(options or {}), pm, workdir,
            activation_defense=activation,
        )  # fmt: skip
        start = time.perf_counter()
        try:
            if flow == REFERENCE:
                run = _reference_flow
            else:
                entry = pm.flows.get(flow)
                if b not in entry.options.get("bits", (8, 4)):
                    raise ConfigError(
                        f"flow {flow!r} supports {entry.options.get('bits')} bits, not {b}"
                    )
                run = entry.obj
            predict = run(model, calibration, request)
            row.cda, row.asr = metrics(predict, x, y, trigger)
        except (QcbGuardError, ImportError, RuntimeError, ValueError, TypeError) as exc:
            row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[
                :300
            ]
        row.seconds = round(time.perf_counter() - start, 3)
        report.rows.append(row)
    return report


def format_table(report: Evaluation) -> list[list[str]]:
    """Rows of strings for a console or HTML table."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    return [
        [
            r.flow,
            str(r.bits or "fp32"),
            r.defense or "-",
            pct(r.cda),
            pct(r.asr),
            f"{r.seconds:.1f}",
            r.error or "",
        ]
        for r in report.rows
    ]


TABLE_HEADERS = ["flow", "bits", "defense", "CDA %", "ASR %", "seconds", "error"]
