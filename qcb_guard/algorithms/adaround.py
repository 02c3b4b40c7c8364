"""AdaRound: learned rounding by layer-wise output reconstruction (the EFRAP baseline).

Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020:
rectified sigmoid h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1) with (γ, ζ) = (−0.1, 1.1) (Eq. 23),
regulariser λ Σ(1 − |2h − 1|^β) (Eq. 24) with β annealed 20 → 2 after a 20% warm-up during
which it is off. It is EFRAP without the flip term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qcb_guard.algorithms.reconstruction import (
    ReconstructionConfig,
    ReconstructionStats,
    reconstruct,
)
from qcb_guard.errors import ConfigError
from qcb_guard.slots import SlotCalibration, WeightSlot

GAMMA, ZETA = -0.1, 1.1


@dataclass(frozen=True)
class AdaRoundConfig:
    """AdaRound's regulariser and schedule (defaults as in the paper and MQBench)."""

    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_up: float = 0.2
    schedule: ReconstructionConfig = field(default_factory=ReconstructionConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.warm_up < 1:
            raise ConfigError(f"warm_up must be in [0, 1), got {self.warm_up!r}")
        if self.beta_start < self.beta_end or self.beta_end <= 0:
            raise ConfigError(
                f"need beta_start >= beta_end > 0, got {self.beta_start}, {self.beta_end}"
            )


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def beta_at(step: int, total: int, config: AdaRoundConfig) -> float | None:
    """β of the linear annealing, or ``None`` during warm-up (regulariser off)."""
    start = config.warm_up * total
    if step < start:
        return None
    rel = (step - start) / max(1.0, total - start)
    return config.beta_end + (config.beta_start - config.beta_end) * max(0.0, 1 - rel)


def adaround_integers(
    slot: WeightSlot,
    calibration: SlotCalibration | None,
    config: AdaRoundConfig | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, ReconstructionStats]:
    """AdaRound's integers for one slot."""
    config = config or AdaRoundConfig()
    total = config.schedule.iters

    def init_v(u: torch.Tensor) -> torch.Tensor:  # h(V) = u
        return -torch.log((ZETA - GAMMA) / (u - GAMMA) - 1)

    def regulariser(h: torch.Tensor, v: torch.Tensor, step: int) -> torch.Tensor:
        beta = beta_at(step, total, config)
        if beta is None:
            return h.new_zeros(())
        return config.round_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()

    # Early stopping must not cut the annealing short: decisions only settle as β falls.
    schedule = config.schedule
    if schedule.min_iters < total:
        schedule = ReconstructionConfig(**{**schedule.__dict__, "min_iters": total})
    return reconstruct(
        slot,
        calibration,
        init_v=init_v,
        soft=rectified_sigmoid,
        regulariser=regulariser,
        config=schedule,
        seed=seed,
    )
