"""Signal 1: where weights sit inside their rounding bins.

For a benign model the position ``r = w/s - round(w/s)`` of each weight inside its bin is
close to uniform on [-0.5, 0.5] (a smooth weight density seen through a grid much finer than
its spread). Attacks that keep float behaviour while steering the rounding — PQBackdoor's
projection into the original bins, Qu-ANTI-zation's straight-through training — leave weights
piled up just inside the bin edges, where a tiny float move changes the integer. The test
counts weights in the outer band ``|r| >= 0.5 - band`` and scores the excess over the uniform
expectation as a binomial z-score. Weights clamped at the range ends (each channel's max-abs
weight is pinned to the grid's end by the scale formula) are left out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qcb_guard.slots import WeightSlot

EDGE_BAND = 0.05
HIST_BINS = 20
#: Weights looked at per layer (a seeded sample of columns, the same for every neuron).
#: Benign layers are not exactly uniform, and a z-score grows with the square root of the
#: count for a fixed deviation: a bounded sample keeps the benign range the same for a
#: 10k-weight layer and a 2M-weight one, and keeps a ResNet-18 scan fast.
MAX_LAYER_SAMPLE = 65_536
MIN_PER_NEURON = 64


def bin_residuals(slot: WeightSlot, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(r, inside)`` of shape ``[neurons, m]``: each sampled weight's offset from its
    nearest integer, in steps, in [-0.5, 0.5], and whether that integer lies strictly inside
    ``(qmin, qmax)``.

    ``w / s`` is computed by division whatever the framework's arithmetic: the statistics
    do not depend on how a tie at exactly .5 is broken.
    """
    w = slot.weight.reshape(slot.weight.shape[0], -1)
    out, cols = w.shape
    m = min(cols, max(MIN_PER_NEURON, MAX_LAYER_SAMPLE // out))
    if m < cols:
        g = torch.Generator().manual_seed(seed)
        w = w[:, torch.randperm(cols, generator=g)[:m].sort().values]
    s = slot.scale.reshape(-1, 1) if slot.axis is not None else slot.scale.reshape(())
    zp = slot.zero_point.reshape(-1, 1) if slot.axis is not None else slot.zero_point.reshape(())
    pos = w / s
    nearest = torch.round(pos)
    q = nearest + zp
    inside = (q > slot.qmin) & (q < slot.qmax)
    return (pos - nearest).clamp(-0.5, 0.5), inside


def edge_pileup(r: Tensor, inside: Tensor | None = None, band: float = EDGE_BAND):
    """``(z, ratio, n)``: binomial z-score and observed/expected ratio of ``|r|`` in the outer
    band among the ``inside`` residuals, under a uniform position (``z = 0`` when none)."""
    mask = torch.ones_like(r, dtype=torch.bool) if inside is None else inside
    n = int(mask.sum())
    if n == 0:
        return 0.0, 1.0, 0
    p = 2 * band
    k = int(((r.abs() >= 0.5 - band) & mask).sum())
    expected = n * p
    z = (k - expected) / math.sqrt(expected * (1 - p))
    return float(z), float(k / expected), n


def histogram(r: Tensor, inside: Tensor | None = None, bins: int = HIST_BINS) -> list[int]:
    """Counts of the ``inside`` residuals over ``bins`` equal bins of [-0.5, 0.5]."""
    idx = ((r.float() + 0.5) * bins).long().clamp(0, bins - 1).flatten()
    weights = None if inside is None else inside.flatten().to(torch.float32)
    counts = torch.bincount(idx, weights=weights, minlength=bins)
    return [int(c) for c in counts]
