"""Model extraction (KnockoffNets, Orekondy et al. CVPR 2019) against a deployed quantized
model, and the reverse-sigmoid output perturbation (Lee et al. 2019) as a post-hoc defense.

The attacker has only query access to the victim (any callable from a batch to logits, e.g.
a framework's real int8 model) and a *transfer set* of natural images from another
distribution (KnockoffNets' "random" sampling strategy). It trains a surrogate on the
victim's answers: soft probabilities (KnockoffNets §4, cross-entropy to the posterior) or
hard top-1 labels. Success is measured on the victim's own test distribution: surrogate
accuracy and *fidelity*, the share of test images on which surrogate and victim agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from qcb_guard.errors import ConfigError, DataError
from qcb_guard.models.train import epoch_batches

__all__ = [
    "LABELS",
    "TRANSFER_SETS",
    "KnockoffConfig",
    "KnockoffResult",
    "agreement",
    "knockoff",
    "query",
    "reverse_sigmoid",
    "transfer_set",
]

Predictor = Callable[[Tensor], Tensor]
LABELS = ("soft", "hard")
#: Transfer sets the attacker can draw queries from (none is the victim's training data).
TRANSFER_SETS = {
    "natural": "random crops of scikit-learn's natural photographs, grey, resized",
    "cross": "the other built-in digit set, resized (mnist5k <-> digits): a closer domain",
    "noise": "uniform noise images",
}


def reverse_sigmoid(probs: Tensor, beta: float = 1.0, gamma: float = 0.1) -> Tensor:
    """Reverse sigmoid (Lee et al. 2019, §4; ART's ``ReverseSigmoid``):
    ``ŷ = α·(y − β·(σ(γ·σ⁻¹(y)) − ½))`` clipped to [0, 1], ``α`` renormalising.

    Non-invertible and it flattens and reorders the low probabilities, so a surrogate fit to
    ``ŷ`` learns a distorted posterior; it is not guaranteed to keep the top-1 class (the
    study measures how often it does)."""
    if not (math.isfinite(beta) and beta >= 0 and math.isfinite(gamma) and gamma > 0):
        raise ConfigError(f"reverse sigmoid needs beta >= 0 and gamma > 0, got {beta}, {gamma}")
    eps = 1e-7
    y = probs.clamp(eps, 1 - eps)
    r = beta * (torch.sigmoid(gamma * torch.log(y / (1 - y))) - 0.5)
    perturbed = (probs - r).clamp(0, 1)
    total = perturbed.sum(1, keepdim=True)
    uniform = torch.full_like(perturbed, 1.0 / perturbed.shape[1])
    return torch.where(total > 0, perturbed / total.clamp_min(1e-12), uniform)


@dataclass(frozen=True, kw_only=True)
class KnockoffConfig:
    """Attacker's budget: ``queries`` transfer images, surrogate trained ``epochs`` with Adam.

    :param labels: ``soft`` (victim's probabilities) or ``hard`` (its top-1 class).
    """

    queries: int = 2000
    labels: str = "soft"
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    progress: bool = False

    def __post_init__(self) -> None:
        if self.labels not in LABELS:
            raise ConfigError(f"labels must be one of {', '.join(LABELS)}, got {self.labels!r}")
        for name, low in (("queries", 1), ("epochs", 1), ("batch_size", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not self.lr > 0:
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")


@dataclass
class KnockoffResult:
    surrogate: nn.Module
    config: KnockoffConfig
    victim_labels: Tensor  # the answers it was trained on (probabilities)
    history: list[float] = field(default_factory=list)


def _resize(x: Tensor, image_shape: tuple[int, int, int]) -> Tensor:
    c, h, w = image_shape
    if x.shape[1] != c:
        x = x.mean(1, keepdim=True).expand(-1, c, -1, -1) if c != 3 else x.expand(-1, 3, -1, -1)
    return F.interpolate(x, size=(h, w), mode="area" if x.shape[-1] >= w else "bilinear")


def _natural(n: int, image_shape: tuple[int, int, int], generator: torch.Generator) -> Tensor:
    from sklearn.datasets import load_sample_images

    photos = [
        torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        for img in load_sample_images().images
    ]
    out = []
    for _ in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        _, ph, pw = photo.shape
        side = int(torch.randint(16, min(ph, pw) // 2, (1,), generator=generator))
        r = int(torch.randint(0, ph - side + 1, (1,), generator=generator))
        c = int(torch.randint(0, pw - side + 1, (1,), generator=generator))
        crop = photo[:, r : r + side, c : c + side].unsqueeze(0)
        out.append(_resize(crop, image_shape))
    return torch.cat(out).clamp(0, 1)


def transfer_set(
    kind: str, n: int, image_shape: tuple[int, int, int], *, data: str | None = None, seed: int = 0
) -> Tensor:
    """``n`` attacker queries of shape ``image_shape`` from a transfer set (TRANSFER_SETS);
    ``cross`` needs ``data``, the victim's built-in data set, to pick the other one."""
    if kind not in TRANSFER_SETS:
        raise ConfigError(f"unknown transfer set {kind!r}; known: {', '.join(TRANSFER_SETS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of queries must be an int >= 1, got {n!r}")
    generator = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return torch.rand((n, *image_shape), generator=generator)
    if kind == "natural":
        return _natural(n, image_shape, generator)
    from qcb_guard.data import DATASETS

    other = {"mnist5k": "digits", "digits": "mnist5k"}.get(data or "")
    if other is None:
        raise ConfigError(f"transfer set 'cross' needs data mnist5k or digits, got {data!r}")
    xs, _ = DATASETS[other].arrays()
    idx = torch.randperm(len(xs), generator=generator)[:n]
    return _resize(torch.from_numpy(np.array(xs[idx.numpy()])), image_shape).clamp(0, 1)


def query(
    victim: Predictor | nn.Module,
    x: Tensor,
    *,
    perturb: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 500,
) -> Tensor:
    """The probabilities the deployed victim releases for ``x`` (after ``perturb``, the
    output-perturbation defense, when one is deployed)."""
    flags = [(m, m.training) for m in victim.modules()] if isinstance(victim, nn.Module) else []
    if isinstance(victim, nn.Module):
        victim.eval()
    try:
        with torch.no_grad():
            probs = torch.cat(
                [
                    torch.as_tensor(victim(x[i : i + batch_size])).float().softmax(1)
                    for i in range(0, len(x), batch_size)
                ]
            )
    finally:
        for m, flag in flags:
            m.training = flag
    return perturb(probs) if perturb is not None else probs


def knockoff(
    victim: Predictor | nn.Module,
    transfer: Tensor,
    surrogate: nn.Module,
    config: KnockoffConfig,
    *,
    seed: int = 0,
    perturb: Callable[[Tensor], Tensor] | None = None,
) -> KnockoffResult:
    """Query ``victim`` with the first ``config.queries`` transfer images and train
    ``surrogate`` (a fresh model, trained in place) on its answers."""
    if len(transfer) < config.queries:
        raise DataError(f"transfer set has {len(transfer)} images, budget is {config.queries}")
    x = transfer[: config.queries]
    answers = query(victim, x, perturb=perturb)
    targets = answers if config.labels == "soft" else answers.argmax(1)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(surrogate.parameters(), lr=config.lr)
    history = []
    surrogate.train()
    for _ in tqdm(range(config.epochs), desc="knockoff", disable=not config.progress, leave=False):
        total = 0.0
        batches = epoch_batches(len(x), config.batch_size, generator)
        for idx in batches:
            out = surrogate(x[idx])
            if config.labels == "soft":  # KnockoffNets: CE to the victim's posterior
                loss = -(targets[idx] * F.log_softmax(out, 1)).sum(1).mean()
            else:
                loss = F.cross_entropy(out, targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        history.append(total / max(1, len(batches)))
    surrogate.eval()
    return KnockoffResult(surrogate, config, answers, history)


def agreement(a: Predictor | nn.Module, b: Predictor | nn.Module, x: Tensor) -> float:
    """Fidelity: share of ``x`` on which two models predict the same class."""
    if len(x) == 0:
        raise DataError("fidelity needs at least one image")
    pa, pb = query(a, x).argmax(1), query(b, x).argmax(1)
    return float((pa == pb).float().mean())


def top1_kept(probs: Tensor, perturbed: Tensor) -> float:
    """Share of answers whose top-1 class an output perturbation left unchanged."""
    return float((probs.argmax(1) == perturbed.argmax(1)).float().mean())


def describe(config: KnockoffConfig) -> dict[str, Any]:
    return {
        "queries": config.queries,
        "labels": config.labels,
        "epochs": config.epochs,
        "lr": config.lr,
        "batch_size": config.batch_size,
    }


class KnockoffAttack:
    """What the ``knockoff`` attack registers: ``attack(victim, transfer, surrogate, *, seed,
    perturb=None, **KnockoffConfig fields) -> KnockoffResult``."""

    kind = "extraction"

    def __call__(
        self,
        victim: Any,
        transfer: Tensor,
        surrogate: nn.Module,
        *,
        seed: int = 0,
        perturb: Callable[[Tensor], Tensor] | None = None,
        **options: Any,
    ) -> KnockoffResult:
        from qcb_guard.config import config_from

        config = config_from(KnockoffConfig, options)
        return knockoff(victim, transfer, surrogate, config, seed=seed, perturb=perturb)
