"""Signal 3: rounding sensitivity — how the model's answers move when its weights are
rounded to the framework's grid, on clean and patched probes.

A benign model's rounding error is noise: nearest rounding moves a few predictions, in no
particular direction. A QCB's rounding error is the backdoor: on some probe group (a patch
near the trigger, or everything for an accuracy-collapse attack) nearest rounding pushes the
probabilities towards one class. The statistic is the largest mean probability gain of one
class over one probe group, ``max_{g,c} mean_{x in g} (p_q(c|x) - p_fp(c|x))``; the flip rate
per group is measured too. A benign model can be fragile under a coarse grid (per-tensor
4-bit) on some patches; so the same is measured on phase-shifted grids (same step, same
error distribution, bins moved by a random fraction per channel), and the statistic is the
gain *beyond* theirs for the same group and class — a QCB is bound to the exact grid — or the
excess of the clean-input flip rate over theirs (accuracy-collapse attacks), whichever is
larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qcb_guard.quant import broadcast
from qcb_guard.slots import WeightSlot


@dataclass
class Response:
    """How quantized outputs differ from float ones over probe groups."""

    gain: Tensor  # [groups, classes] mean probability gain of each class in each group
    flips: Tensor  # [groups] share of changed predictions in each group

    @property
    def shift(self) -> float:
        return float(self.gain.max())

    @property
    def where(self) -> tuple[int, int]:
        """(group, class) of the largest gain."""
        return divmod(int(self.gain.argmax()), self.gain.shape[1])

    @property
    def clean_flip_rate(self) -> float:
        return float(self.flips[0])


def nearest_weights(slot: WeightSlot) -> Tensor:
    """The float weight the framework computes with after nearest rounding."""
    return slot.dequantize(slot.nearest())


def shifted_weights(slot: WeightSlot, generator: torch.Generator) -> Tensor:
    """Rounding on a grid of the same step moved by a random phase per output channel:
    the same error distribution as nearest rounding, different decisions."""
    s = broadcast(slot.scale, slot.weight, slot.axis)
    channels = slot.weight.shape[0] if slot.axis is not None else 1
    phase = torch.rand(channels, generator=generator)
    phase = phase.reshape(-1, *([1] * (slot.weight.dim() - 1))) if slot.axis is not None else phase
    return s * (torch.round(slot.weight / s - phase) + phase)


def group_means(values: Tensor, group: Tensor, groups: int) -> Tensor:
    """Mean of ``values`` rows per group: ``[groups, ...]``."""
    sums = torch.zeros(groups, *values.shape[1:]).index_add_(0, group, values)
    counts = torch.bincount(group, minlength=groups).clamp(min=1).to(values.dtype)
    return sums / counts.reshape(-1, *([1] * (values.dim() - 1)))


def response(p_fp: Tensor, p_q: Tensor, group: Tensor, groups: int) -> Response:
    """Per-group class gains and flip rates of ``p_q`` over ``p_fp``."""
    flips = (p_q.argmax(1) != p_fp.argmax(1)).float()
    return Response(group_means(p_q - p_fp, group, groups), group_means(flips, group, groups))


def grid_specific(exact: Response, nulls: list[Response]) -> tuple[float, int, int, float]:
    """What nearest rounding does beyond equally coarse shifted grids: the largest excess of
    a class gain over the nulls' mean gain (clamped at 0) for the same group and class, its
    (group, class), and the excess of the clean flip rate over the nulls' mean."""
    if not nulls:
        g, c = exact.where
        return exact.shift, g, c, exact.clean_flip_rate
    null_gain = torch.stack([n.gain for n in nulls]).mean(0).clamp(min=0)
    excess = exact.gain - null_gain
    g, c = divmod(int(excess.argmax()), excess.shape[1])
    null_clean = sum(n.clean_flip_rate for n in nulls) / len(nulls)
    return float(excess.max()), g, c, exact.clean_flip_rate - null_clean


def flip_matrix(p_fp: Tensor, p_q: Tensor) -> list[list[int]]:
    """Counts of (float prediction, quantized prediction) pairs: the per-class flip matrix."""
    classes = p_fp.shape[1]
    idx = p_fp.argmax(1) * classes + p_q.argmax(1)
    return torch.bincount(idx, minlength=classes * classes).reshape(classes, classes).tolist()
