"""Activation defenses: protect the activation ranges a static flow calibrates.

A static flow (ONNX Runtime ``quantize_static``, NNCF, PT2E, torch.ao static) fixes every
activation range from its calibration data. A QCB hidden in those ranges (DESIGN.md §3:
suppressor units that fire only on the trigger and get clipped) is out of reach of any
weight-rounding defense. An activation defense returns extra inputs that are appended to the
flow's calibration data, so the framework's own observers, unchanged, calibrate over them.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qcb_guard.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - adapters import this module before torch is needed
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
        import torch

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


#: Report entry of a static flow run with ``activation_defense=None``.
TURNED_OFF: dict[str, Any] = {"defense": None, "note": "turned off (activation_defense=None)"}


def run_activation_defense(
    model: Any, calibration: torch.Tensor, config: Any, pm: Any
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Run ``config.activation_defense`` for a static flow.

    Returns the extra calibration inputs (``None`` when turned off or failed) and the report
    entry for ``GuardResult.extra["activation_defense"]``. A failing defense stops the run when
    ``config.on_defense_error == "raise"``; otherwise the flow calibrates on its own data, and
    the report and a warning say so: never silently.
    """
    name = config.activation_defense
    if name is None:
        return None, dict(TURNED_OFF)
    entry = pm.activation_defenses.get(name)
    start = time.perf_counter()
    try:
        result = entry.obj(model, calibration, seed=config.seed, **config.activation_options)
        inputs = result.check(calibration, name)
    except ConfigError:
        raise  # the user's options are wrong: never a fallback
    except Exception as exc:
        return None, defense_failed(config, exc)
    return inputs, {
        "defense": name,
        "probes": int(inputs.shape[0]),
        "calibration": int(calibration.shape[0]),
        "seconds": round(time.perf_counter() - start, 3),
        "notes": list(result.notes),
    }


def defense_failed(config: Any, exc: Exception, *, after: str = "") -> dict[str, Any]:
    """The activation defense could not run (or its probes could not be fed): raise when
    ``config.on_defense_error == "raise"``, else warn and return the report entry; the flow
    then calibrates on its own data (``after`` says what else the observers saw)."""
    if config.on_defense_error == "raise":
        raise exc
    why = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"qcb_guard: activation defense {config.activation_defense!r} failed, activation "
        f"ranges come from the calibration data alone{after} ({why})",
        stacklevel=4,
    )
    return {"defense": config.activation_defense, "failed": why, "probes": 0}


def skipped(config: Any, why: str) -> dict[str, Any]:
    """Report entry for a flow that does not run the activation defense, and why."""
    return {"defense": config.activation_defense, "skipped": why}


def fill_batches(inputs: torch.Tensor, batch: int | None) -> torch.Tensor:
    """Pad ``inputs`` with repeats of the last one to a multiple of a model's fixed batch size
    (a repeated input changes no min/max range)."""
    import torch

    if not batch or len(inputs) % batch == 0:
        return inputs
    pad = batch - len(inputs) % batch
    return torch.cat([inputs, inputs[-1:].expand(pad, *inputs.shape[1:])])
