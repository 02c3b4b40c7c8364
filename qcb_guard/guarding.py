"""The guarded rounding loop and ``guard()``, the one entry point users call.

Adapters build :class:`~qcb_guard.slots.WeightSlot` objects from their framework and hand
them to :func:`round_slots`; the loop asks the ``qcb_guard_round_weights`` hook first and
the registered defense second, validates every answer, and deploys it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from qcb_guard.config import DEFAULT_ACTIVATION_DEFENSE, DEFAULT_DEFENSE, GuardConfig
from qcb_guard.errors import ConfigError, DefenseError, UnsupportedObjectError
from qcb_guard.fileio import write_json_atomic
from qcb_guard.manager import PluginManager, get_plugin_manager
from qcb_guard.registry import Entry
from qcb_guard.slots import SlotCalibration, WeightSlot

#: ``calibrator(slot) -> SlotCalibration | None``; called lazily, in slot order, after the
#: previous slots are deployed, so it can return inputs of the partly quantized model.
Calibrator = Callable[[WeightSlot], SlotCalibration | None]


@dataclass
class SlotOutcome:
    """What happened to one slot."""

    name: str
    shape: list[int]
    defense: str
    changed: int  # integers that differ from nearest rounding
    seconds: float
    fallback: str | None = None  # why nearest rounding was kept instead


@dataclass
class GuardResult:
    """Summary of one guarded quantization (what the JSON report holds)."""

    framework: str
    defense: str
    slots: list[SlotOutcome] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["changed_total"] = sum(s.changed for s in self.slots)
        data["weights_total"] = sum(int(torch.Size(s.shape).numel()) for s in self.slots)
        data["fallbacks"] = [s.name for s in self.slots if s.fallback]
        return data


def _choose_integers(
    slot: WeightSlot,
    calibration: SlotCalibration | None,
    config: GuardConfig,
    pm: PluginManager,
    seed: int,
) -> tuple[torch.Tensor, str]:
    proposed = pm.hook.qcb_guard_round_weights(slot=slot, calibration=calibration, config=config)
    if proposed is not None:
        return slot.check_integers(proposed, "hook qcb_guard_round_weights"), "hook"
    entry = pm.defenses.get(config.defense)
    if entry.options.get("configurable", False):
        q = entry.obj(slot, calibration, seed=seed, **config.options)
    else:
        q = entry.obj(slot, calibration)
    return slot.check_integers(
        q, f"defense {config.defense!r} (plugin {entry.plugin!r})"
    ), config.defense


def check_options(entry: Entry, config: GuardConfig) -> None:
    """Refuse bad options before any framework work starts: options for a defense that takes
    none, and whatever the defense's own ``validate`` callback rejects."""
    if config.options and not entry.options.get("configurable", False):
        raise ConfigError(
            f"defense {config.defense!r} takes no options, got {', '.join(sorted(config.options))}"
        )
    validate = entry.options.get("validate")
    if validate is not None:
        validate(dict(config.options))


def round_slots(
    slots: list[WeightSlot],
    config: GuardConfig,
    *,
    pm: PluginManager | None = None,
    calibrator: Calibrator | None = None,
    framework: str = "",
    progress: bool | None = None,
    first_index: int = 0,
) -> GuardResult:
    """Choose and deploy the integers of every slot, in order.

    A defense that needs calibration data gets ``calibrator(slot)``; without a calibrator it
    is an error naming the ``calibration=`` argument. A defense that fails on one layer keeps
    nearest rounding there and the report says so (``config.on_defense_error="fallback"``),
    or stops the run (``"raise"``). Adapters that round one layer at a time pass
    ``first_index`` (the layer's position) so that every layer gets its own seed.
    """
    pm = pm or get_plugin_manager()
    entry = pm.defenses.get(config.defense)  # fail fast on an unknown name
    needs_data = bool(entry.options.get("needs_calibration", False))
    check_options(entry, config)
    if needs_data and calibrator is None:
        raise DefenseError(
            f"defense {config.defense!r} needs calibration data and this flow has none: "
            "pass calibration=<tensor of inputs> to guard() (a few hundred unlabelled "
            "inputs), or defense='nearest' to keep the framework's own rounding"
        )
    result = GuardResult(
        framework=framework or (slots[0].framework if slots else ""), defense=config.defense
    )
    pm.hook.qcb_guard_before_quantize(slots=slots, config=config)
    start = time.perf_counter()
    bar = tqdm(
        slots,
        desc=f"qcb_guard {config.defense}",
        unit="layer",
        disable=None if progress is None else not progress,
    )
    # Seeds are per layer; the caller's global RNG stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        for index, slot in enumerate(bar, start=first_index):
            t0 = time.perf_counter()
            seed = config.seed * 100_003 + index  # per layer, so a layer's result is reproducible
            torch.manual_seed(seed)
            nearest = slot.nearest()
            fallback = None
            # A calibrator failure is a data problem of the whole run: raise, never fall back.
            calibration = calibrator(slot) if (calibrator is not None and needs_data) else None
            try:
                q, used = _choose_integers(slot, calibration, config, pm, seed)
            except Exception as exc:  # any defense failure is reported, never silent
                if config.on_defense_error == "raise" or isinstance(exc, ConfigError):
                    raise
                q, used, fallback = nearest, "nearest", f"{type(exc).__name__}: {exc}"
                result.notes.append(
                    f"slot {slot.name!r}: defense failed, kept nearest rounding ({fallback})"
                )
            slot.deploy(q)
            result.slots.append(
                SlotOutcome(
                    name=slot.name,
                    shape=list(slot.weight.shape),
                    defense=used,
                    changed=int((q != nearest).sum()),
                    seconds=round(time.perf_counter() - t0, 4),
                    fallback=fallback,
                )
            )
    result.seconds = round(time.perf_counter() - start, 4)
    result.notes.extend(config.notes)
    return result


def finish(
    result: GuardResult,
    slots: list[WeightSlot],
    artefact: Any,
    config: GuardConfig,
    pm: PluginManager,
) -> None:
    """Run the after-quantize hooks and write the JSON report if one was asked for."""
    pm.hook.qcb_guard_after_quantize(slots=slots, result=artefact, config=config)
    if config.scan:
        findings = pm.hook.qcb_guard_scan(
            slots=slots, calibration=config.calibration, config=config
        )
        from qcb_guard.scanner import combine, finding_dict

        result.extra["scan"] = [finding_dict(f) for found in findings if found for f in found]
        result.extra["scan_verdict"] = combine(result.extra["scan"])
    if config.report is not None:
        write_json_atomic(config.report, {"qcb_guard": "guard", **result.to_dict()})


def guard(
    obj: Any,
    *,
    defense: str = DEFAULT_DEFENSE,
    scan: bool = False,
    report: Any = None,
    calibration: Any = None,
    seed: int = 0,
    activation_defense: str | None = DEFAULT_ACTIVATION_DEFENSE,
    activation_options: dict[str, Any] | None = None,
    pm: PluginManager | None = None,
    **options: Any,
) -> Any:
    """Return the guarded counterpart of a framework object.

    ``obj`` is a quantization entry point or object of a supported framework (see
    ``qcb-guard plugins`` for the installed adapters): the result is used exactly like
    ``obj``, but the deployed weight integers come from ``defense`` and, in static flows, the
    calibration data also holds the inputs of ``activation_defense`` (``None`` turns it off).
    Extra keywords are options of ``defense``.
    """
    pm = pm or get_plugin_manager()
    config = GuardConfig(
        defense=defense,
        scan=scan,
        report=report,
        calibration=calibration,
        seed=seed,
        options=options,
        activation_defense=activation_defense,
        activation_options=dict(activation_options or {}),
    )
    check_options(pm.defenses.get(config.defense), config)  # fail before touching the framework
    if config.activation_defense is not None:
        pm.activation_defenses.get(config.activation_defense)  # unknown name: fail now
    for entry in pm.adapters:
        if entry.obj.matches(obj):
            return entry.obj.wrap(obj, config, pm)
    kinds = (
        "; ".join(f"{e.name}: {e.description}" for e in pm.adapters) or "no adapter is registered"
    )
    raise UnsupportedObjectError(
        f"guard() does not recognise {type(obj).__module__}.{type(obj).__qualname__}. "
        f"Supported: {kinds}"
    )
