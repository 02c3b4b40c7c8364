"""DivQAT: quantization-aware training with a model-extraction defense built in.

Only the abstract of DivQAT (Khaled, Gohring de Magalhães, Nicolescu, arXiv 2512.23948) is
public, so the objective below is this project's design (rationale in docs/robustness.md):

    L = CE(Q_b f(x), y)  +  λ · CE(Q_b f(x̃), σ(argmax f_ref(x̃)))

* ``x, y``: the owner's labelled training data; the first term is ordinary QAT, so the
  deployed integer model keeps its top-1 answers on the task distribution.
* ``x̃``: *proxy* off-distribution queries synthesised from the owner's own training images
  (tile shuffles, magnified crops, smooth noise) — the owner never sees the attacker's
  transfer set.
* ``f_ref``: the frozen float model before QAT (the honest function); ``σ``: a seeded
  derangement of the classes (no class maps to itself).

Extraction attacks learn the victim's function from its answers on queries that are not
from the training distribution (KnockoffNets' transfer sets). The second term makes the
deployed model's answers there *diverge* from the honest function in a consistent way, so
a knock-off fits a wrong mapping and then disagrees with the victim on real inputs — the
misinformation idea of Kariyappa & Qureshi (2020), but learnt by QAT inside the quantized
model instead of bolted on as a detector at serving time. Because only the quantized
forward is trained on it, it costs the edge device nothing at inference, and it composes
with output perturbations (reverse sigmoid) that attack soft-label extraction.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qcb_guard.config import config_from
from qcb_guard.errors import ConfigError
from qcb_guard.robustness.qat import QATConfig, QATResult, qat

__all__ = ["PROXIES", "DivQATConfig", "derangement", "divqat", "proxy_queries", "train_divqat"]

PROXIES = ("shuffle", "zoom", "smooth-noise")


def derangement(num_classes: int, seed: int) -> Tensor:
    """A seeded permutation of the classes with no fixed point (σ(c) ≠ c for every c)."""
    if num_classes < 2:
        raise ConfigError(f"a derangement needs >= 2 classes, got {num_classes}")
    generator = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(1, num_classes, (1,), generator=generator))
    order = torch.randperm(num_classes, generator=generator)
    perm = torch.empty(num_classes, dtype=torch.long)
    perm[order] = order.roll(-shift)  # a cyclic shift on a random ordering: no fixed point
    return perm


def _shuffle_tiles(x: Tensor, generator: torch.Generator) -> Tensor:
    _, _, h, w = x.shape
    k = int(torch.randint(2, 5, (1,), generator=generator))
    th, tw = math.ceil(h / k), math.ceil(w / k)
    padded = F.pad(x, (0, tw * k - w, 0, th * k - h))
    n, c = x.shape[:2]
    tiles = (
        padded.reshape(n, c, k, th, k, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, k * k, c, th, tw)
    )
    order = torch.argsort(torch.rand((n, k * k), generator=generator), dim=1)
    tiles = tiles[torch.arange(n)[:, None], order]
    out = tiles.reshape(n, k, k, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, k * th, k * tw)
    return out[:, :, :h, :w]


def _zoom(x: Tensor, generator: torch.Generator) -> Tensor:
    _, _, h, w = x.shape
    side = max(2, int(h * float(torch.empty(1).uniform_(0.3, 0.55, generator=generator))))
    r = int(torch.randint(0, h - side + 1, (1,), generator=generator))
    c = int(torch.randint(0, w - side + 1, (1,), generator=generator))
    return F.interpolate(x[:, :, r : r + side, c : c + side], size=(h, w), mode="bilinear")


def _smooth_noise(x: Tensor, generator: torch.Generator) -> Tensor:
    n, c, h, w = x.shape
    low = int(torch.randint(2, max(3, h // 3), (1,), generator=generator))
    noise = torch.rand((n, c, low, low), generator=generator)
    return F.interpolate(noise, size=(h, w), mode="bilinear")


def proxy_queries(x: Tensor, generator: torch.Generator) -> Tensor:
    """Off-distribution stand-ins synthesised from training images ``x``: a third each of
    tile shuffles, magnified crops and smooth noise."""
    parts = x.chunk(3)
    makers = (_shuffle_tiles, _zoom, _smooth_noise)
    out = [make(p, generator) for make, p in zip(makers, parts, strict=False)]
    return torch.cat(out).clamp(0, 1).detach()


@dataclass(frozen=True, kw_only=True)
class DivQATConfig(QATConfig):
    """QAT budget plus the divergence weight ``lam`` (λ) and the derangement's seed offset."""

    lam: float = 1.0
    permutation_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.lam, bool) or not isinstance(self.lam, int | float):
            raise ConfigError(f"lam must be a number >= 0, got {self.lam!r}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if isinstance(self.permutation_seed, bool) or not isinstance(self.permutation_seed, int):
            raise ConfigError(f"permutation_seed must be an int, got {self.permutation_seed!r}")


def train_divqat(
    model: nn.Module, train: Any, *, bits: int, seed: int, config: DivQATConfig
) -> QATResult:
    """DivQAT at ``bits``: QAT plus the divergence term on proxy queries (module docstring)."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    num_classes = int(train.num_classes or int(train.y.max()) + 1)
    perm = derangement(num_classes, seed + config.permutation_seed)
    generator = torch.Generator().manual_seed(seed + 1)
    lam = float(config.lam)

    def extra(_student: nn.Module, qmodel: nn.Module, xb: Tensor, *_: Any) -> Tensor:
        proxies = proxy_queries(xb, generator)
        with torch.no_grad():
            deceptive = perm[reference(proxies).argmax(1)]
        return lam * F.cross_entropy(qmodel(proxies), deceptive)

    return qat(model, train, bits=bits, seed=seed, config=config, extra=extra, desc="divqat")


def divqat(model: nn.Module, train: Any, *, bits: int, seed: int, **options: Any) -> nn.Module:
    """Training-defense entry point (``qcb_guard_register_training_defenses``): a new float
    module QAT-trained at ``bits`` with DivQAT's objective; ``model`` is untouched."""
    config = config_from(DivQATConfig, options)
    return train_divqat(model, train, bits=bits, seed=seed, config=config).model
