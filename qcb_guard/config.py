"""Configuration of a guarded quantization run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcb_guard.errors import ConfigError

#: EFRAP (CVPR 2024): the measured defense against weight-rounding QCBs (docs/benchmarks.md).
#: ``defense="nearest"`` reproduces the unguarded flow bit for bit.
DEFAULT_DEFENSE = "efrap"
#: Range probing: static flows calibrate activation ranges that cover what each unit can reach,
#: so QCBs hidden in static activation quantization stay dormant (docs/activation-defenses.md).
DEFAULT_ACTIVATION_DEFENSE = "range-probe"


@dataclass
class GuardConfig:
    """Options shared by every guarded flow.

    :param defense: name of the registered rounding defense.
    :param scan: run the scan hooks on the result.
    :param report: path of a JSON report to write (atomically), or ``None``.
    :param calibration: explicit calibration inputs when the flow offers none.
    :param seed: seed for every random choice a defense makes.
    :param on_defense_error: ``"fallback"`` keeps nearest rounding for a layer the defense
        cannot handle and records it in the report; ``"raise"`` stops the run.
    :param options: defense-specific options, passed through untouched.
    :param activation_defense: name of the registered activation defense that static flows
        run on their calibration data, or ``None`` to calibrate on the data alone.
    :param activation_options: options of the activation defense.
    """

    defense: str = DEFAULT_DEFENSE
    scan: bool = False
    report: str | Path | None = None
    calibration: Any = None
    seed: int = 0
    on_defense_error: str = "fallback"
    options: dict[str, Any] = field(default_factory=dict)
    activation_defense: str | None = DEFAULT_ACTIVATION_DEFENSE
    activation_options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.defense, str) or not self.defense:
            raise ConfigError(f"defense must be a registered name, got {self.defense!r}")
        if self.activation_defense is not None and (
            not isinstance(self.activation_defense, str) or not self.activation_defense
        ):
            raise ConfigError(
                "activation_defense must be a registered name or None, "
                f"got {self.activation_defense!r}"
            )
        if not isinstance(self.activation_options, dict):
            raise ConfigError(
                f"activation_options must be a dict, got {type(self.activation_options).__name__}"
            )
        if self.on_defense_error not in ("fallback", "raise"):
            raise ConfigError(
                f"on_defense_error must be 'fallback' or 'raise', got {self.on_defense_error!r}"
            )
        if self.report is not None:
            self.report = Path(self.report)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")


def config_from(cls: type, options: dict[str, Any], what: str = "option") -> Any:
    """``cls(**options)`` for a config dataclass; unknown keys are a ConfigError that names
    them and the allowed ones (CLI ``--set``, plugin options)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(
            f"unknown {what}(s) {', '.join(unknown)} for {cls.__name__}; "
            f"allowed: {', '.join(sorted(names))}"
        )
    return cls(**options)
