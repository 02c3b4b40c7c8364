"""Built-in defense ``lac`` (LAC, Li et al., ICML 2024).

Thin registration: the algorithm lives in ``qcb_guard.algorithms.lac``. It needs calibration
data and accepts options from ``guard(..., defense="lac", pda=False, iters=...)``.
"""

from __future__ import annotations

from typing import Any

import torch

from qcb_guard import hookimpl
from qcb_guard.algorithms.lac import lac_config, lac_integers
from qcb_guard.slots import SlotCalibration, WeightSlot


def lac(
    slot: WeightSlot, calibration: SlotCalibration, *, seed: int = 0, **options: Any
) -> torch.Tensor:
    """LAC: layer-wise activation correction with BN-based poisoned distribution approximation
    (Li et al., ICML 2024)."""
    return lac_integers(slot, calibration, lac_config(options), seed)[0]


@hookimpl
def qcb_guard_register_defenses(register):
    register(
        "lac",
        lac,
        needs_calibration=True,
        configurable=True,
        validate=lac_config,
        description=(
            "LAC (Li et al., ICML 2024): re-learns each layer's integers so that its output "
            "matches the float layer's, on inputs nudged towards the float model's activation "
            "statistics"
        ),
    )
