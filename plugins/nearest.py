"""Built-in defense ``nearest``: what the frameworks do by default.

It exists so that ``guard(..., defense="nearest")`` reproduces the unguarded flow bit for
bit, and as the baseline every other defense is measured against.
"""

from __future__ import annotations

import torch

from qcb_guard import hookimpl
from qcb_guard.slots import SlotCalibration, WeightSlot


def nearest(slot: WeightSlot, calibration: SlotCalibration | None = None) -> torch.Tensor:
    """Nearest rounding with the framework's own arithmetic and tie rule (no defense)."""
    return slot.nearest()


@hookimpl
def qcb_guard_register_defenses(register):
    register("nearest", nearest, needs_calibration=False)
