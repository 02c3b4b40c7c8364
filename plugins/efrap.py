"""Built-in defenses ``efrap`` (EFRAP, CVPR 2024) and ``adaround`` (its baseline).

Thin registration: the algorithms live in ``qcb_guard.algorithms``. Both need calibration
data and accept options from ``guard(..., iters=..., flip_weight=...)``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from qcb_guard import hookimpl
from qcb_guard.algorithms.adaround import AdaRoundConfig, adaround_integers
from qcb_guard.algorithms.efrap import EFRAPConfig, efrap_integers
from qcb_guard.algorithms.reconstruction import ReconstructionConfig
from qcb_guard.errors import ConfigError
from qcb_guard.slots import SlotCalibration, WeightSlot

_SCHEDULE = {f.name for f in fields(ReconstructionConfig)}


def _config(cls: type, name: str, options: dict[str, Any]) -> Any:
    own = {f.name for f in fields(cls)} - {"schedule"}
    unknown = set(options) - own - _SCHEDULE
    if unknown:
        raise ConfigError(
            f"defense {name!r}: unknown option(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(own | _SCHEDULE))}"
        )
    schedule = ReconstructionConfig(**{k: v for k, v in options.items() if k in _SCHEDULE})
    return cls(schedule=schedule, **{k: v for k, v in options.items() if k in own})


def efrap(
    slot: WeightSlot, calibration: SlotCalibration, *, seed: int = 0, **options: Any
) -> torch.Tensor:
    """EFRAP: error-guided flipped rounding with activation preservation (Li et al., CVPR 2024)."""
    return efrap_integers(slot, calibration, _config(EFRAPConfig, "efrap", options), seed)[0]


def adaround(
    slot: WeightSlot, calibration: SlotCalibration, *, seed: int = 0, **options: Any
) -> torch.Tensor:
    """AdaRound: adaptive rounding by layer-wise reconstruction (Nagel et al., ICML 2020)."""
    return adaround_integers(slot, calibration, _config(AdaRoundConfig, "adaround", options), seed)[
        0
    ]


@hookimpl
def qcb_guard_register_defenses(register):
    register(
        "efrap",
        efrap,
        needs_calibration=True,
        configurable=True,
        validate=lambda options: _config(EFRAPConfig, "efrap", options),
    )
    register(
        "adaround",
        adaround,
        needs_calibration=True,
        configurable=True,
        validate=lambda options: _config(AdaRoundConfig, "adaround", options),
    )
