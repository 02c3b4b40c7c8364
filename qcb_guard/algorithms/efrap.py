"""EFRAP: error-guided flipped rounding with activation preservation.

Li et al., "Nearest is Not Dearest: Towards Practical Defense against Quantization-conditioned
Backdoor Attacks", CVPR 2024. A QCB is planted so that *nearest* rounding wakes it; EFRAP
learns a rounding that flips the nearest decisions where the truncation error is large (the
flip term) while keeping each layer's output close to the float model's (activation
preservation). Deviations from the official code are listed in ``docs/efrap.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qcb_guard.algorithms.reconstruction import (
    ReconstructionConfig,
    ReconstructionStats,
    grid,
    reconstruct,
)
from qcb_guard.errors import ConfigError
from qcb_guard.slots import SlotCalibration, WeightSlot

#: Clamp of the in-bin fraction before the logit: u = 0 would give V = -inf.
FRACTION_EPS = 1e-4


@dataclass(frozen=True)
class EFRAPConfig:
    """EFRAP's loss weights and schedule.

    :param round_weight: weight of the binarisation term Σ(1 − |2h − 1|²) (official: 0.01).
    :param flip_weight: weight of the flip term Σ e ⊙ BCE(h, 1 − r) (official: 1.0 with ``e``
        in weight units; this project's default measures ``e`` in quantization steps, where
        0.015 was measured to balance the layer-output error, see ``docs/efrap.md``).
    :param error_unit: ``"step"`` (``e = |W/s − round(W/s)|``, scale-free, default) or
        ``"weight"`` (``e = |W − Q(W)|``, the official code).
    :param error_granularity: ``"neuron"`` (the paper's neuron-wise error norm, §4.2: every
        weight of an output channel shares ``‖e_channel‖₂``, normalised by the channel's size;
        default, measured better on every efficacy row, docs/benchmarks.md) or ``"element"``
        (the official code).
    :param schedule: the layer-wise optimisation schedule.
    """

    round_weight: float = 0.01
    flip_weight: float = 0.015
    error_unit: str = "step"
    error_granularity: str = "neuron"
    schedule: ReconstructionConfig = field(default_factory=ReconstructionConfig)

    def __post_init__(self) -> None:
        if self.error_unit not in ("step", "weight"):
            raise ConfigError(f"error_unit must be 'step' or 'weight', got {self.error_unit!r}")
        if self.error_granularity not in ("element", "neuron"):
            raise ConfigError(
                f"error_granularity must be 'element' or 'neuron', got {self.error_granularity!r}"
            )
        for name in ("round_weight", "flip_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")

    @classmethod
    def official(cls, **schedule: int | float) -> EFRAPConfig:
        """The official code's settings (10,000 iterations, error in weight units, weight 1)."""
        base = {"iters": 10_000, "patience": 10**9, "min_iters": 10_000}
        return cls(1e-2, 1.0, "weight", "element", ReconstructionConfig(**{**base, **schedule}))


def flip_targets(frac: torch.Tensor) -> torch.Tensor:
    """``1 − r``: the opposite of nearest rounding's up/down decision ``r = round(u)``."""
    return 1.0 - torch.round(frac)


def truncation_error(
    frac: torch.Tensor, s: torch.Tensor, config: EFRAPConfig, axis: int | None
) -> torch.Tensor:
    """Nearest rounding's error per weight (EFRAP §4.2), in steps or weight units, per element
    or as the neuron-wise norm."""
    err = (frac - torch.round(frac)).abs()
    if config.error_unit == "weight":
        err = err * s
    if config.error_granularity == "neuron":
        dims = tuple(d for d in range(err.dim()) if d != (axis if axis is not None else 0))
        norm = err.pow(2).sum(dims, keepdim=True).sqrt() / (err[0].numel() ** 0.5)
        err = norm.expand_as(err)
    return err


def efrap_integers(
    slot: WeightSlot,
    calibration: SlotCalibration | None,
    config: EFRAPConfig | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, ReconstructionStats]:
    """EFRAP's integers for one slot: L = L_A + λ_r Σ(1 − |2h−1|²) + λ_f Σ e ⊙ BCE(h, 1 − r)."""
    config = config or EFRAPConfig()
    _, frac, s, _ = grid(slot)
    target = flip_targets(frac)
    error = truncation_error(frac, s, config, slot.axis)

    def init_v(u: torch.Tensor) -> torch.Tensor:  # sigmoid(V) = u (official init)
        u = u.clamp(FRACTION_EPS, 1 - FRACTION_EPS)
        return torch.log(u / (1 - u))

    def regulariser(h: torch.Tensor, v: torch.Tensor, step: int) -> torch.Tensor:
        binarise = (1 - (2 * h - 1).abs().pow(2)).sum()
        flip = (error * torch.nn.functional.binary_cross_entropy(h, target, reduction="none")).sum()
        return config.round_weight * binarise + config.flip_weight * flip

    return reconstruct(
        slot,
        calibration,
        init_v=init_v,
        soft=torch.sigmoid,
        regulariser=regulariser,
        config=config.schedule,
        seed=seed,
    )
