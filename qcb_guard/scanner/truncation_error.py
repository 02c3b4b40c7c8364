"""Signal 2: neuron-wise truncation-error norms (EFRAP's observation), as outliers.

EFRAP (Li et al.) observed that in QCB models the neuron-wise norm of the rounding error
``|W - Q(W)|`` is larger than in benign ones: the attack needs weights far from their
nearest grid point to flip. With positions uniform in a bin, ``E[r^2] = 1/12`` and
``Var[r^2] = 1/180`` (in squared steps), so a neuron with ``n`` weights has a z-score
``(sum r^2 - n/12) / sqrt(n/180)``; the signal is the largest z over neurons.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MEAN_R2, VAR_R2 = 1.0 / 12.0, 1.0 / 180.0


def neuron_error_z(r: Tensor, inside: Tensor) -> Tensor:
    """Per output neuron (axis 0) z-score of the squared rounding error, clamped weights
    left out; neurons with no free weight get 0."""
    r2 = (r.float() ** 2 * inside).flatten(1).sum(1)
    n = inside.flatten(1).sum(1).float()
    z = (r2 - n * MEAN_R2) / torch.sqrt(torch.clamp(n * VAR_R2, min=1e-12))
    return torch.where(n > 0, z, torch.zeros_like(z))


def top_neurons(z: Tensor, k: int = 3) -> list[list]:
    """The ``k`` neurons with the largest z, as ``[index, z]`` pairs (JSON-ready)."""
    k = min(k, z.numel())
    values, idx = torch.topk(z, k)
    return [[int(i), round(float(v), 3)] for v, i in zip(values, idx, strict=True)]


def error_ratio(r: Tensor, inside: Tensor) -> float:
    """Layer mean ``r^2`` over its uniform expectation ``1/12`` (1.0 for a uniform layer)."""
    n = int(inside.sum())
    return float((r.float() ** 2 * inside).sum() / n / MEAN_R2) if n else math.nan
