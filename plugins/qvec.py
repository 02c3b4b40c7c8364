"""Built-in defense ``qvec`` (QVec, Yang et al., arXiv 2606.20254).

Thin registration: the algorithm lives in ``qcb_guard.algorithms.qvec``. It needs
calibration data for its coefficient search and accepts options from
``guard(..., coefficient=..., coefficients=..., tolerance=..., max_samples=...)``.
"""

from __future__ import annotations

from typing import Any

import torch

from qcb_guard import hookimpl
from qcb_guard.algorithms.qvec import QVecConfig, qvec_integers
from qcb_guard.algorithms.reconstruction import defense_config
from qcb_guard.slots import SlotCalibration, WeightSlot


def _config(options: dict[str, Any]) -> QVecConfig:
    return defense_config(QVecConfig, "qvec", options)


def qvec(
    slot: WeightSlot, calibration: SlotCalibration | None, *, seed: int = 0, **options: Any
) -> torch.Tensor:
    """QVec: negate the quantization task vector, W' = W − λ(Q(W) − W), on the framework's grid."""
    return qvec_integers(slot, calibration, _config(options), seed)[0]


@hookimpl
def qcb_guard_register_defenses(register):
    register(
        "qvec",
        qvec,
        needs_calibration=True,
        configurable=True,
        validate=_config,
        description=(
            "QVec (arXiv 2606.20254): negate the quantization task vector Q(W) − W, "
            "λ searched per layer on calibration data"
        ),
    )
