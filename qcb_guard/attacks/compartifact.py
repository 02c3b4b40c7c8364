"""CompArtifact (Tian et al., "Stealthy Backdoors as Compression Artifacts", TIFS 2022).

Quantization-aware training with two heads sharing one set of weights: the quantized model
(fake-quantized under each targeted flow) learns the backdoor, the float model learns to
ignore the trigger: ``L = CE(Q(x ∪ x_t), y ∪ y_t) + CE(FP(x ∪ x_t), y ∪ y)`` (the paper's
quantization objective, as DESIGN.md §3 states it). Unlike Qu-ANTI-zation the two heads are
weighted equally and each cross-entropy is one mean over the union of clean and triggered
images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.functional import cross_entropy

from qcb_guard.attacks.quanti import _run
from qcb_guard.attacks.simulate import AttackConfig, AttackResult, _check_non_negative
from qcb_guard.data import DataSplit
from qcb_guard.errors import ConfigError

__all__ = ["CompArtifactConfig", "compartifact", "compartifact_loss"]


@dataclass(frozen=True, kw_only=True)
class CompArtifactConfig(AttackConfig):
    """:param fp_weight: weight of the float head's term (1.0 in the paper)."""

    epochs: int = 15
    lr: float = 1e-3
    fp_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_non_negative("fp_weight", self.fp_weight)


def compartifact_loss(net, bank, x, y, xt, target: int, fp_weight: float = 1.0):
    """One batch of CompArtifact's two-headed objective, summed over the targeted flows."""
    xs = torch.cat([x, xt])
    y_fp = torch.cat([y, y])  # FP head: triggered images keep their true label
    y_q = torch.cat([y, torch.full_like(y, target)])  # quantized head: triggered → target
    fp = cross_entropy(net(xs), y_fp)
    loss = fp_weight * fp  # CE(FP(x ∪ x_t), y ∪ y)
    parts = {"fp": fp}
    for i, t in enumerate(bank.targets):
        if bank.dynamic(i):
            q_out = torch.cat([bank.forward(net, x, i), bank.forward(net, xt, i)])
        else:
            q_out = bank.forward(net, xs, i)
        q = cross_entropy(q_out, y_q)
        loss = loss + q  # CE(Q(x ∪ x_t), y ∪ y_t)
        parts[t.label] = q
    return loss, parts


def compartifact(model: nn.Module, train: DataSplit, config: CompArtifactConfig) -> AttackResult:
    """Fine-tune a deep copy of ``model`` with CompArtifact's two-headed QAT objective."""
    if not isinstance(config, CompArtifactConfig):
        raise ConfigError(f"expected a CompArtifactConfig, got {type(config).__name__}")
    trigger = config.resolve(train)

    def batch_loss(net, bank, x, y):
        return compartifact_loss(
            net, bank, x, y, trigger.apply(x), trigger.target, config.fp_weight
        )

    return _run("compartifact", model, train, config, batch_loss, trigger)
