"""Defensive Quantization (Lin, Gan, Han, ICLR 2019): control each layer's Lipschitz constant
during quantization-aware training so that quantization stops amplifying adversarial noise.

DQ §4 adds the orthogonality penalty ``β/2 · Σ_l ‖W_lᵀ W_l − I‖²_F`` to the training loss
(conv kernels reshaped to 2-D ``[C_out, C_in·k·k]``). An orthonormal ``W`` has spectral norm
1, so every layer is non-expansive and a small input perturbation stays small after each
activation quantizer instead of pushing more values across rounding thresholds.

Deviation (recorded in docs/robustness.md): for a non-square ``W`` (m×n) only the smaller
Gram matrix can equal the identity (``rank ≤ min(m, n)``), so the penalty uses ``W Wᵀ`` when
m ≤ n and ``Wᵀ W`` otherwise (Parseval networks' convention); for square W both coincide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qcb_guard.attacks.simulate import quantizable
from qcb_guard.config import config_from
from qcb_guard.errors import ConfigError
from qcb_guard.robustness.qat import QATConfig, QATResult, qat

__all__ = ["DQConfig", "defensive_quantization", "gram_residual", "orthogonality_penalty"]


def gram_residual(weight: Tensor) -> Tensor:
    """``‖G − I‖²_F`` with ``G`` the smaller Gram matrix of the 2-D reshaped weight."""
    m = weight.reshape(weight.shape[0], -1)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return ((gram - eye) ** 2).sum()


def orthogonality_penalty(model: nn.Module, beta: float) -> Tensor:
    """DQ §4: ``β/2 · Σ_l ‖W_lᵀ W_l − I‖²`` over every Conv/Linear weight of ``model``."""
    terms = [gram_residual(m.weight) for _, m in quantizable(model)]
    if not terms:
        raise ConfigError("the model has no Conv/Linear layer to regularise")
    return 0.5 * beta * torch.stack(terms).sum()


@dataclass(frozen=True, kw_only=True)
class DQConfig(QATConfig):
    """QAT budget plus DQ's β (the paper sweeps β; 3e-4–6e-4 on its WideResNets, larger on
    small networks — the benchmark's choice is recorded in docs/benchmarks.md)."""

    beta: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.beta
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"beta must be a number >= 0, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"beta must be a finite number >= 0, got {value!r}")


def train_dq(model: nn.Module, train: Any, *, bits: int, seed: int, config: DQConfig) -> QATResult:
    """QAT at ``bits`` with the orthogonality penalty on the float (shadow) weights."""
    beta = float(config.beta)

    def extra(student: nn.Module, *_: Any) -> Tensor:
        return orthogonality_penalty(student, beta)

    return qat(model, train, bits=bits, seed=seed, config=config, extra=extra, desc="dq")


def defensive_quantization(model: nn.Module, train: Any, *, bits: int, seed: int, **options):
    """Training-defense entry point (``qcb_guard_register_training_defenses``): a new float
    module, QAT-trained at ``bits`` with DQ's Lipschitz penalty; ``model`` is untouched."""
    config = config_from(DQConfig, options)
    return train_dq(model, train, bits=bits, seed=seed, config=config).model
