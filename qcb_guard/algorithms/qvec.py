"""QVec: quantization as a malicious task, removed by task arithmetic.

Yang, Tsai and Yu, "Quantization as a Malicious Task: Removing Quantization-Conditioned
Backdoors via Task Arithmetic", arXiv 2606.20254 (2026). A QCB is planted so that the move
from the float weights to their quantized version, ``τ_q = Q(W) − W``, carries the backdoor:
quantization behaves like fine-tuning on a malicious task. QVec estimates ``τ_q`` with one
quantization pass and negates it before deployment, ``W' = W − λ·τ_q`` (task negation,
Ilharco et al., ICLR 2023, §3), then quantizes ``W'``; ``λ`` is found by a small search that
keeps clean behaviour.

qcb_guard deploys the framework's own scale and zero point, computed from ``W``, so ``W'`` is
quantized on that grid. With ``p = W/s + z`` and the framework's nearest integer ``q``, the
rounding error is ``f = p − q`` and ``W'/s + z = q + (1 + λ)·f``: QVec on a fixed grid moves
every weight whose error exceeds ``0.5 / (1 + λ)`` to the other side of ``q`` (two steps
once ``|f| > 1.5 / (1 + λ)``). Only the abstract was reachable: what it leaves open, and
every deviation, is recorded in ``docs/qvec.md``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from qcb_guard.algorithms.reconstruction import grid, output_error
from qcb_guard.errors import ConfigError, DataError
from qcb_guard.slots import SlotCalibration, WeightSlot

#: Candidate λ of the per-layer search: flip thresholds 0.5/(1+λ) from 0.5 (nearest) to 0.1.
DEFAULT_COEFFICIENTS: tuple[float, ...] = (
    0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0,
)  # fmt: skip


@dataclass(frozen=True)
class QVecConfig:
    """QVec's scaling coefficient and its search.

    :param coefficient: a fixed ``λ`` for every layer (the paper's single, model-wide
        coefficient, e.g. found by the user on labelled data with ``evaluate()``); ``None``
        searches ``λ`` per layer on calibration data.
    :param coefficients: the candidates of the search, ascending, starting at 0 (nearest).
    :param tolerance: the search keeps the largest ``λ`` whose layer-output error stays
        within ``(1 + tolerance)`` times the best candidate's (the clean-behaviour budget;
        0 keeps the most faithful ``λ``; 0.25 measured best on the efficacy rows,
        ``docs/qvec.md``).
    :param max_samples: calibration samples used by the search (a seeded subset if more).
    """

    coefficient: float | None = None
    coefficients: tuple[float, ...] = DEFAULT_COEFFICIENTS
    tolerance: float = 0.25
    max_samples: int = 1024

    def __post_init__(self) -> None:
        if self.coefficient is not None:
            _check_coefficient(self.coefficient, "coefficient")
        values = self.coefficients
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ConfigError(f"coefficients must be a sequence of numbers, got {values!r}")
        values = tuple(values)
        if not values:
            raise ConfigError("coefficients must not be empty")
        for value in values:
            _check_coefficient(value, "coefficients")
        if values[0] != 0 or any(b <= a for a, b in itertools.pairwise(values)):
            raise ConfigError(
                f"coefficients must start at 0 (nearest rounding) and increase, got {values!r}"
            )
        object.__setattr__(self, "coefficients", tuple(float(v) for v in values))
        tol = self.tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
            raise ConfigError(f"tolerance must be a non-negative finite number, got {tol!r}")
        n = self.max_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"max_samples must be a positive int, got {n!r}")


def _check_coefficient(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must hold numbers, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be finite and >= 0 (λ negates τ_q), got {value!r}")


@dataclass
class QVecStats:
    """What QVec did on one layer."""

    coefficient: float = 0.0
    changed: int = 0  # integers that differ from the framework's nearest ones
    errors: dict[float, float] = field(default_factory=dict)  # λ → layer-output error


def rounding_error(slot: WeightSlot, nearest: torch.Tensor) -> torch.Tensor:
    """``f = W/s + z − q``: the framework's rounding error in steps, ``τ_q = −s·f``.

    Computed against the integers the framework deployed, so that ``λ = 0`` is exactly its
    own rounding whatever arithmetic it used; clamped weights can have ``|f| > 0.5``.
    """
    _, _, s, zp = grid(slot)
    return slot.weight / s + zp - nearest.to(torch.float32)


def task_vector(slot: WeightSlot, nearest: torch.Tensor) -> torch.Tensor:
    """``τ_q = Q(W) − W`` in weight units: the 'malicious task' quantization applies."""
    return slot.dequantize(nearest) - slot.weight


def corrected_weight(weight: torch.Tensor, tau: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``W' = W − λ·τ_q``: task negation (Ilharco et al. 2023, §3) of the quantization shift."""
    return weight - coefficient * tau


def requantize(
    nearest: torch.Tensor, error: torch.Tensor, coefficient: float, qmin: int, qmax: int
) -> torch.Tensor:
    """Integers of ``W'`` on the framework's grid: ``clamp(q + R((1 + λ)·f), qmin, qmax)``.

    ``W'/s + z = q + (1 + λ)·f`` exactly; ``R`` rounds half towards zero so that a weight
    landing on a tie keeps the framework's own decision (``λ = 0`` returns ``q``).
    """
    g = (1.0 + coefficient) * error.clamp(-0.5, 0.5)  # beyond ±0.5 only clamped weights
    step = torch.sign(g) * torch.ceil(g.abs() - 0.5)
    return torch.clamp(nearest + step.to(torch.int64), qmin, qmax)


def flip_threshold(coefficient: float) -> float:
    """Rounding error ``|f|`` above which ``W − λ·τ_q`` rounds away from nearest."""
    return 0.5 / (1.0 + coefficient)


def layer_errors(
    slot: WeightSlot,
    inputs: torch.Tensor,
    fp_inputs: torch.Tensor,
    candidates: dict[float, torch.Tensor],
) -> dict[float, float]:
    """Layer-output error of each candidate's integers against the float layer on float
    inputs (the clean-behaviour criterion that replaces the paper's validation accuracy)."""
    with torch.no_grad():
        target = slot.layer(fp_inputs, slot.weight)
        return {
            lam: float(output_error(slot.layer(inputs, slot.dequantize(q)), target))
            for lam, q in candidates.items()
        }


def select_coefficient(errors: dict[float, float], tolerance: float) -> float:
    """Largest ``λ`` whose error is within ``(1 + tolerance)`` × the best candidate's (the task
    arithmetic negation rule: forget as much as clean behaviour allows)."""
    budget = min(errors.values()) * (1.0 + tolerance)
    return max(lam for lam, err in errors.items() if err <= budget)


def _subset(
    calibration: SlotCalibration | None, max_samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if calibration is None:
        raise DataError(
            "qvec's coefficient search needs calibration data (calibration=None); pass "
            "calibration=... to guard() or a fixed coefficient=..."
        )
    inputs, fp_inputs = calibration.inputs, calibration.targets_inputs
    if inputs.shape[0] > max_samples:
        keep = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(seed))
        keep = keep[:max_samples]
        inputs, fp_inputs = inputs[keep], fp_inputs[keep]
    return inputs, fp_inputs


def qvec_integers(
    slot: WeightSlot,
    calibration: SlotCalibration | None,
    config: QVecConfig | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, QVecStats]:
    """QVec's integers for one slot: ``Q(W − λ·(Q(W) − W))`` on the framework's grid."""
    config = config or QVecConfig()
    nearest = slot.nearest()
    error = rounding_error(slot, nearest)  # the single quantization pass
    if not torch.isfinite(error).all():
        raise DataError(f"slot {slot.name!r}: non-finite rounding error (check scale/weight)")
    stats = QVecStats()
    if config.coefficient is not None:
        lam = float(config.coefficient)
    else:
        inputs, fp_inputs = _subset(calibration, config.max_samples, seed)
        candidates = {
            c: requantize(nearest, error, c, slot.qmin, slot.qmax) for c in config.coefficients
        }
        stats.errors = layer_errors(slot, inputs, fp_inputs, candidates)
        if not all(math.isfinite(e) for e in stats.errors.values()):
            raise DataError(f"slot {slot.name!r}: non-finite layer output on calibration data")
        lam = select_coefficient(stats.errors, config.tolerance)
    q = requantize(nearest, error, lam, slot.qmin, slot.qmax)
    stats.coefficient, stats.changed = lam, int((q != nearest).sum())
    return q, stats
