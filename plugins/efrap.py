"""Built-in defenses ``efrap`` (EFRAP, CVPR 2024) and ``adaround`` (its baseline).

Thin registration: the algorithms live in ``qcb_guard.algorithms``. Both need calibration
data and accept options from ``guard(..., iters=..., flip_weight=...)``.
"""

from __future__ import annotations

from typing import Any

import torch

from qcb_guard import hookimpl
from qcb_guard.algorithms.adaround import AdaRoundConfig, adaround_integers
from qcb_guard.algorithms.efrap import EFRAPConfig, efrap_integers
from qcb_guard.algorithms.reconstruction import defense_config
from qcb_guard.slots import SlotCalibration, WeightSlot


def efrap(
    slot: WeightSlot, calibration: SlotCalibration, *, seed: int = 0, **options: Any
) -> torch.Tensor:
    """EFRAP: error-guided flipped rounding with activation preservation (Li et al., CVPR 2024)."""
    return efrap_integers(slot, calibration, defense_config(EFRAPConfig, "efrap", options), seed)[0]


def adaround(
    slot: WeightSlot, calibration: SlotCalibration, *, seed: int = 0, **options: Any
) -> torch.Tensor:
    """AdaRound: adaptive rounding by layer-wise reconstruction (Nagel et al., ICML 2020)."""
    config = defense_config(AdaRoundConfig, "adaround", options)
    return adaround_integers(slot, calibration, config, seed)[0]


@hookimpl
def qcb_guard_register_defenses(register):
    register(
        "efrap",
        efrap,
        needs_calibration=True,
        configurable=True,
        validate=lambda options: defense_config(EFRAPConfig, "efrap", options),
    )
    register(
        "adaround",
        adaround,
        needs_calibration=True,
        configurable=True,
        validate=lambda options: defense_config(AdaRoundConfig, "adaround", options),
    )
