"""FGSM and PGD evasion attacks (L∞), white-box through any differentiable model — a float
model or a :class:`~qcb_guard.robustness.fakequant.FakeQuantModel`, whose rounding passes
gradients straight through (STE) — and their accuracy under attack.

Transfer attacks craft on the float model and evaluate anywhere, including a framework's
really quantized model (any callable from a batch to logits).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from qcb_guard.errors import ConfigError, DataError

__all__ = ["accuracy_of", "check_eps", "craft", "fgsm", "pgd"]

Predictor = Callable[[Tensor], Tensor]


def check_eps(eps: Any) -> float:
    """ε must be a finite number in [0, 1] (images live in [0, 1])."""
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps):
        raise ConfigError(f"eps must be a number in [0, 1], got {eps!r}")
    if not 0.0 <= eps <= 1.0:
        raise ConfigError(f"eps must be in [0, 1] (images are in [0, 1]), got {eps}")
    return float(eps)


def _input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float) -> Tensor:
    """FGSM (Goodfellow et al. 2015, eq. 3): ``x + ε·sign(∇ₓ CE(f(x), y))``, clipped to [0, 1]."""
    eps = check_eps(eps)
    if eps == 0:
        return x.detach().clone()
    return (x + eps * _input_grad(model, x, y).sign()).clamp(0, 1).detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 20,
    alpha: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD (Madry et al. 2018, eq. 2): ``x ← Π_{B∞(x₀,ε) ∩ [0,1]}(x + α·sign ∇ₓ CE)``.

    Starts from a uniform point of the ε-ball (the paper's random restart, one restart);
    ``alpha`` defaults to ``2.5·ε/steps`` so the walk can cross the ball.
    """
    eps = check_eps(eps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    if eps == 0:
        return x.detach().clone()
    alpha = 2.5 * eps / steps if alpha is None else float(alpha)
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha!r}")
    x0 = x.detach()
    adv = x0.clone()
    if random_start:
        noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype) * 2 - 1
        adv = (x0 + eps * noise).clamp(0, 1)
    for _ in range(steps):
        adv = adv + alpha * _input_grad(model, adv, y).sign()
        adv = torch.minimum(torch.maximum(adv, x0 - eps), x0 + eps).clamp(0, 1).detach()
    return adv


def craft(
    attack: Callable[..., Tensor],
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    batch_size: int = 250,
    seed: int = 0,
    progress: bool = False,
    desc: str = "attack",
    **options: Any,
) -> Tensor:
    """Adversarial examples for all of ``x`` in batches, the model in eval mode (restored).

    ``attack(model, x, y, *, eps, **options)`` is FGSM, PGD or any registered evasion attack;
    a seeded generator is handed to attacks that take one, so results repeat under a seed.
    """
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"need matching, non-empty x and y, got {len(x)} and {len(y)}")
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # gradients w.r.t. the input only
    generator = torch.Generator().manual_seed(seed)
    try:
        takes_generator = "generator" in inspect.signature(attack).parameters
    except (TypeError, ValueError):
        takes_generator = False
    out = []
    try:
        for start in tqdm(
            range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False
        ):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            kwargs = dict(options)
            if takes_generator:
                kwargs.setdefault("generator", generator)
            out.append(attack(model, xb, yb, eps=eps, **kwargs))
    finally:
        for p in params:
            p.requires_grad_(True)
        for m, flag in flags:
            m.training = flag
    return torch.cat(out)


def accuracy_of(predict: Predictor | nn.Module, x: Tensor, y: Tensor, batch_size: int = 500):
    """Top-1 accuracy of a model or of any predictor (e.g. a real quantized flow)."""
    if isinstance(predict, nn.Module):
        flags = [(m, m.training) for m in predict.modules()]
        predict.eval()
    else:
        flags = []
    try:
        with torch.no_grad():
            hits = sum(
                int(
                    (
                        torch.as_tensor(predict(x[i : i + batch_size])).argmax(1)
                        == y[i : i + batch_size]
                    ).sum()
                )
                for i in range(0, len(x), batch_size)
            )
    finally:
        for m, flag in flags:
            m.training = flag
    return hits / len(x)
