"""Activation defenses: protect the activation ranges a static flow calibrates.

A static flow (ONNX Runtime ``quantize_static``, NNCF, PT2E, torch.ao static) fixes every
activation range from its calibration data. A QCB hidden in those ranges (DESIGN.md §3:
suppressor units that fire only on the trigger and get clipped) is out of reach of any
weight-rounding defense. An activation defense returns extra inputs that are appended to the
flow's calibration data, so the framework's own observers, unchanged, calibrate over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ActivationDefenseResult:
    """What an activation defense hands back to a static flow.

    :param inputs: extra calibration inputs ``[M, ...]`` (same trailing shape and dtype as the
        flow's calibration inputs) to append to the calibration data.
    :param seconds: wall time the defense took.
    :param notes: human-readable remarks for the report (skipped units, fallbacks ...).
    :param details: JSON-ready per-unit evidence (e.g. reachable vs calibrated maxima).
    """

    inputs: torch.Tensor
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def check(self, calibration: torch.Tensor, name: str) -> torch.Tensor:
        """Validate ``inputs`` against the calibration batch; return them on success."""
        x = self.inputs
        if not isinstance(x, torch.Tensor):
            kind = type(x).__name__
            raise TypeError(f"activation defense {name!r} returned {kind}, not a tensor")
        if x.dim() != calibration.dim() or tuple(x.shape[1:]) != tuple(calibration.shape[1:]):
            raise ValueError(
                f"activation defense {name!r} returned inputs of shape {tuple(x.shape)}; the "
                f"calibration data has shape {tuple(calibration.shape)}"
            )
        if x.dtype != calibration.dtype:
            raise ValueError(
                f"activation defense {name!r} returned {x.dtype}; calibration data is "
                f"{calibration.dtype}"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"activation defense {name!r} returned non-finite inputs")
        return x.detach()
