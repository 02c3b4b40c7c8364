"""Configuration of a guarded quantization run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcb_guard.errors import ConfigError

DEFAULT_DEFENSE = "nearest"


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
    """

    defense: str = DEFAULT_DEFENSE
    scan: bool = False
    report: str | Path | None = None
    calibration: Any = None
    seed: int = 0
    on_defense_error: str = "fallback"
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.defense, str) or not self.defense:
            raise ConfigError(f"defense must be a registered name, got {self.defense!r}")
        if self.on_defense_error not in ("fallback", "raise"):
            raise ConfigError(
                f"on_defense_error must be 'fallback' or 'raise', got {self.on_defense_error!r}"
            )
        if self.report is not None:
            self.report = Path(self.report)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
