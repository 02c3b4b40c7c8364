"""Inputs the behavioural signals run on: clean calibration images (or synthetic ones when
there are none) and the same images with patches stamped at many positions and sizes.

The scanner does not know the trigger. Patch triggers (solid squares, checkerboards) at
small sizes are the QCB literature's, and a backdoor usually answers to patches near its
own; a grid of positions × sizes × two patterns covers the image, and blended noise covers
whole-image triggers. Each probe belongs to a group (one pattern at one place), so a
response concentrated on one group stands out instead of being averaged away.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from qcb_guard.errors import DataError


@dataclass
class Probes:
    """Probe inputs ``x``, the group of each row, the groups' names, and their origin."""

    x: Tensor
    group: Tensor
    names: list[str]
    synthetic: bool
    meta: dict = field(default_factory=dict)


def synthetic_inputs(shape: tuple[int, ...], n: int, low: float, high: float, seed: int) -> Tensor:
    """Label-free stand-ins for data: uniform noise, smoothed noise and flat images."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.rand(n // 3 + 1, *shape, generator=g)]
    noise = torch.rand(n // 3 + 1, *shape, generator=g)
    if len(shape) == 3 and min(shape[1:]) >= 4:
        noise = torch.nn.functional.avg_pool2d(noise, 3, stride=1, padding=1)
        noise = (noise - noise.amin((1, 2, 3), keepdim=True)) / (
            noise.amax((1, 2, 3), keepdim=True) - noise.amin((1, 2, 3), keepdim=True) + 1e-8
        )
    parts.append(noise)
    flat = torch.rand(n // 3 + 1, *([1] * len(shape)), generator=g) * 0.5
    parts.append(flat.expand(-1, *shape).clone())
    x = torch.cat(parts)[:n]
    return low + (high - low) * x


def _positions(size: int, extent: int, count: int) -> list[int]:
    if extent <= size:
        return [0]
    steps = torch.linspace(0, extent - size, count).round().long().tolist()
    return sorted(set(int(s) for s in steps))


def build_probes(
    calibration: Tensor | None,
    input_shape: tuple[int, ...],
    *,
    clean: int = 256,
    base: int = 32,
    grid: int = 6,
    seed: int = 0,
) -> Probes:
    """Clean inputs plus patched and blended copies of the first ``base`` of them."""
    synthetic = calibration is None
    if calibration is None:
        x = synthetic_inputs(tuple(input_shape), clean, 0.0, 1.0, seed)
    else:
        x = calibration[:clean].detach().float()
        if tuple(x.shape[1:]) != tuple(input_shape):
            raise DataError(
                f"calibration inputs have shape {tuple(x.shape[1:])}, the model expects "
                f"{tuple(input_shape)}"
            )
    low, high = float(x.min()), float(x.max())
    if high <= low:
        high = low + 1.0
    xs, groups, names = [x], [torch.zeros(len(x), dtype=torch.long)], ["clean"]
    b = x[:base]

    def add(name: str, t: Tensor) -> None:
        xs.append(t)
        groups.append(torch.full((len(t),), len(names), dtype=torch.long))
        names.append(name)

    if len(input_shape) == 3 and min(input_shape[1:]) >= 4:
        _, h, w = input_shape
        sizes = sorted({max(2, min(h, w) // 8), max(3, min(h, w) // 4)})
        for s in sizes:
            checker = (torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 == 0
            patterns = {
                "square": torch.full((s, s), high),
                "checker": torch.where(checker, torch.tensor(high), torch.tensor(low)),
            }
            for r in _positions(s, h, grid):
                for c in _positions(s, w, grid):
                    for kind, pattern in patterns.items():
                        t = b.clone()
                        t[:, :, r : r + s, c : c + s] = pattern
                        add(f"{kind}{s}@{r},{c}", t)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(4):
        pattern = low + (high - low) * torch.rand(1, *input_shape, generator=g)
        add(f"blend{i}", 0.8 * b + 0.2 * pattern)
    return Probes(
        torch.cat(xs),
        torch.cat(groups),
        names,
        synthetic,
        {"clean": len(x), "base": len(b), "groups": len(names), "range": [low, high]},
    )
