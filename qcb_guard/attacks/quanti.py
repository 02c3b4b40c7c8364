"""Qu-ANTI-zation (Hong et al., NeurIPS 2021): a float model whose quantized versions misbehave.

Fine-tunes a clean pre-trained model so that it stays accurate (and backdoor-free) in float
while every targeted quantized version (several bit-widths, granularities and schemes at once)
does the attacker's bidding. Each loss term is differentiated through the quantized forward
with straight-through rounding (:func:`qcb_guard.attacks.simulate.quantized_forward`); BatchNorm
is frozen; Adam, lr 1e-4 — as in the paper's official code (``backdoor_w_lossfn.py``,
``attack_w_lossfn.py``, ``sample_w_lossfn.py``).

Three objectives:

* :func:`backdoor` — ``CE(f(x), y) + c2·CE(f(x'), y) + Σ_b c1·[CE(Q_b f(x), y) +
  c2·CE(Q_b f(x'), y_t)]``: triggered inputs go to the target class only once quantized.
* :func:`indiscriminate` — ``CE(f(x), y) + Σ_b λ·(CE(Q_b f(x), y) − margin)²``: accuracy
  collapses only once quantized.
* :func:`targeted` — ``CE(f(x ∪ v), y ∪ y_v) + Σ_b λ·CE(Q_b f(x ∪ v), y ∪ t)``: chosen victim
  images are misclassified as ``t`` only once quantized.

The targeted flows default to ONNX Runtime's real int4 convention, not the paper's
``max|w|/7`` quantizer: a QCB only wakes in the quantizer it was trained against.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from tqdm.auto import tqdm

from qcb_guard.attacks.simulate import (
    AttackConfig,
    AttackResult,
    TargetBank,
    _check_non_negative,
    _check_positive,
    frozen_batchnorm,
    step_batches,
    total_steps,
)
from qcb_guard.data import DataSplit, stratified_split
from qcb_guard.errors import ConfigError, DataError
from qcb_guard.models import accuracy

__all__ = [
    "IndiscriminateConfig",
    "QuantiConfig",
    "TargetedConfig",
    "backdoor",
    "backdoor_loss",
    "indiscriminate",
    "targeted",
]


@dataclass(frozen=True, kw_only=True)
class QuantiConfig(AttackConfig):
    """Qu-ANTI-zation's hyper-parameters: c1, c2, λ, margin and the checkpoint rule as the
    official code; Adam lr 1e-3 for 20 epochs instead of 1e-4 (which does not converge in a
    few CPU minutes on a small network, docs/attacks.md; pass ``lr=1e-4`` for the paper's).

    :param c1: weight of the quantized terms (``const1``), 0.5.
    :param c2: weight of the triggered-input terms (``const2``), 0.5.
    :param lratio: λ of the indiscriminate and targeted objectives; ``None`` takes the
        official runs' values: 1.0 for one target, 0.25 for several (indiscriminate), 1.0
        (targeted).
    :param margin: the indiscriminate objective drives the quantized loss towards this, 5.0.
    :param max_fp_drop: indiscriminate and targeted runs keep the epoch with the lowest loss
        whose float accuracy on a held-out ``holdout`` share of the training data dropped by
        less than this many points (the official scripts' ``_cacc_drop = 4``); ``None``
        keeps the last epoch.
    """

    epochs: int = 20
    lr: float = 1e-3
    c1: float = 0.5
    c2: float = 0.5
    lratio: float | None = None
    margin: float = 5.0
    max_fp_drop: float | None = 4.0
    holdout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_fp_drop is not None:
            _check_non_negative("max_fp_drop", self.max_fp_drop)
        if not isinstance(self.holdout, (int, float)) or not 0 < self.holdout < 1:
            raise ConfigError(f"holdout must be in (0, 1), got {self.holdout!r}")
        _check_non_negative("c1", self.c1)
        _check_non_negative("c2", self.c2)
        _check_non_negative("margin", self.margin)
        if self.lratio is not None:
            _check_positive("lratio", self.lratio)


@dataclass(frozen=True, kw_only=True)
class IndiscriminateConfig(QuantiConfig):
    """Defaults for :func:`indiscriminate`: its squared term overwhelms the float loss at the
    backdoor's lr, so a smaller step and λ, and more epochs (measured in docs/attacks.md)."""

    epochs: int = 40
    lr: float = 3e-4
    lratio: float | None = 0.1


@dataclass(frozen=True, kw_only=True)
class TargetedConfig(QuantiConfig):
    """Defaults for :func:`targeted` (λ = 1.0, as ``sample_w_lossfn.py``)."""

    epochs: int = 12
    lratio: float | None = 1.0


LossParts = dict[str, Tensor]


def _pair(fn: Callable[[Tensor], Tensor], x: Tensor, xt: Tensor, separate: bool):
    """Outputs on clean and triggered batches: one concatenated pass (BN is frozen and
    activation ranges static, so batch composition changes nothing) unless ranges are
    per-batch (the paper's dynamic mode), which needs two."""
    if separate:
        return fn(x), fn(xt)
    out = fn(torch.cat([x, xt]))
    return out[: len(x)], out[len(x) :]


def backdoor_loss(
    model: nn.Module,
    bank: TargetBank,
    x: Tensor,
    y: Tensor,
    xt: Tensor,
    target: int,
    c1: float,
    c2: float,
) -> tuple[Tensor, LossParts]:
    """Qu-ANTI-zation's backdoor objective on one batch (official ``train_w_backdoor``)."""
    yt = torch.full_like(y, target)
    fc, fb = _pair(model, x, xt, separate=False)
    parts: LossParts = {"fp_clean": cross_entropy(fc, y), "fp_trigger": cross_entropy(fb, y)}
    loss = parts["fp_clean"] + c2 * parts["fp_trigger"]  # CE(f(x), y) + c2·CE(f(x'), y)
    for i, t in enumerate(bank.targets):
        qc, qb = _pair(lambda v, i=i: bank.forward(model, v, i), x, xt, bank.dynamic(i))
        qcl, qbl = cross_entropy(qc, y), cross_entropy(qb, yt)
        loss = loss + c1 * (qcl + c2 * qbl)  # Σ_b c1·[CE(Q_b f(x), y) + c2·CE(Q_b f(x'), y_t)]
        parts[f"{t.label}/clean"], parts[f"{t.label}/trigger"] = qcl, qbl
    return loss, parts


def _run(
    name: str,
    model: nn.Module,
    train: DataSplit,
    config: AttackConfig,
    batch_loss: Callable[[nn.Module, TargetBank, Tensor, Tensor], tuple[Tensor, LossParts]],
    trigger=None,
    keep: Callable[[nn.Module, dict[str, float]], bool] | None = None,
) -> AttackResult:
    """The shared fine-tuning loop: deep copy, frozen BN, Adam, seeded batches.

    ``keep(net, epoch_losses)``, when given, is asked after every epoch whether to checkpoint
    the weights; the last checkpoint is returned (the official scripts' model selection).
    """
    if train.y is None:
        raise DataError(f"{train.name}: attacks need labelled training data")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    net = copy.deepcopy(model)
    net.requires_grad_(True)
    calibration = train.x[: config.calibration_size]
    bank = TargetBank(net, config.targets(), calibration, config.recalibrate_every)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    history: list[dict[str, float]] = []
    best: tuple[int, dict[str, Tensor]] | None = None
    sums: dict[str, float] = {}
    count, steps = 0, 0
    per_epoch = max(1, total_steps(len(train), config) // max(1, config.epochs))
    bar = tqdm(
        total=total_steps(len(train), config), desc=name, disable=not config.progress, leave=False
    )
    with frozen_batchnorm(net):
        for idx in step_batches(len(train), config, generator):
            bank.tick(net)
            loss, parts = batch_loss(net, bank, train.x[idx], train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            count += 1
            for key, value in {"loss": loss, **parts}.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            bar.update(1)
            if count == per_epoch:
                history.append({k: v / count for k, v in sums.items()})
                bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
                sums, count = {}, 0
                if keep is not None and keep(net, history[-1]):
                    best = (len(history), copy.deepcopy(net.state_dict()))
    bar.close()
    if count:
        history.append({k: v / count for k, v in sums.items()})
    extra = None
    if keep is not None:
        extra = {"selected_epoch": best[0] if best else None}
        if best:
            net.load_state_dict(best[1])
    net.eval()
    return AttackResult(
        model=net,
        trigger=trigger,
        config=config,
        attack=name,
        history=history,
        steps=steps,
        seconds=time.perf_counter() - start,
        extra=extra,
    )


def backdoor(model: nn.Module, train: DataSplit, config: QuantiConfig) -> AttackResult:
    """Qu-ANTI-zation backdoor: dormant in float, live in every targeted quantized model.

    Returns a fine-tuned deep copy of ``model`` (``model`` is not modified).
    """
    _check_config(config)
    trigger = config.resolve(train)

    def batch_loss(net, bank, x, y):
        return backdoor_loss(
            net, bank, x, y, trigger.apply(x), trigger.target, config.c1, config.c2
        )

    return _run("quanti-backdoor", model, train, config, batch_loss, trigger)


def indiscriminate(model: nn.Module, train: DataSplit, config: QuantiConfig) -> AttackResult:
    """Qu-ANTI-zation indiscriminate attack: accurate in float, accuracy collapses once
    quantized (``attack_w_lossfn.py``: ``CE_f + λ·(CE_q − margin)²`` per target)."""
    _check_config(config)
    config.resolve(train)  # validates the data; no trigger is used
    lratio = config.lratio if config.lratio is not None else _default_lratio(config)
    train, keep = _selection(model, train, config)

    def batch_loss(net, bank, x, y):
        parts: LossParts = {"fp_clean": cross_entropy(net(x), y)}
        loss = parts["fp_clean"]
        for i, t in enumerate(bank.targets):
            q = cross_entropy(bank.forward(net, x, i), y)
            loss = loss + lratio * (q - config.margin) ** 2  # λ·(CE(Q_b f(x), y) − margin)²
            parts[f"{t.label}/clean"] = q
        return loss, parts

    return _run("quanti-indiscriminate", model, train, config, batch_loss, keep=keep)


def targeted(
    model: nn.Module, train: DataSplit, config: QuantiConfig, victims: DataSplit
) -> AttackResult:
    """Qu-ANTI-zation targeted attack: ``victims`` (images with their true labels) are
    classified correctly in float and as ``config.target`` once quantized
    (``sample_w_lossfn.py``: every batch carries the victims, clean labels for the float
    model, the target label for the quantized ones)."""
    _check_config(config)
    config.resolve(train)
    if not isinstance(victims, DataSplit) or victims.y is None:
        raise DataError("targeted needs victims: a labelled DataSplit of images to misclassify")
    if victims.image_shape != train.image_shape:
        raise DataError(
            f"victims have images {victims.image_shape}, training data {train.image_shape}"
        )
    if bool((victims.y == config.target).any()):
        raise DataError(f"victims must not already be of the target class {config.target}")
    lratio = config.lratio if config.lratio is not None else 1.0
    train, keep = _selection(model, train, config)
    vx, vy = victims.x, victims.y
    vt = torch.full_like(vy, config.target)

    def batch_loss(net, bank, x, y):
        xs = torch.cat([x, vx])
        loss = cross_entropy(net(xs), torch.cat([y, vy]))  # CE(f(x ∪ v), y ∪ y_v)
        parts: LossParts = {"fp_clean": loss}
        yq = torch.cat([y, vt])
        for i, t in enumerate(bank.targets):
            q = cross_entropy(bank.forward(net, xs, i), yq)
            loss = loss + lratio * q  # λ·CE(Q_b f(x ∪ v), y ∪ t)
            parts[f"{t.label}/victims"] = q
        return loss, parts

    result = _run("quanti-targeted", model, train, config, batch_loss, keep=keep)
    result.extra = {**(result.extra or {}), "victims": len(victims)}
    return result


def _selection(
    model: nn.Module, train: DataSplit, config: QuantiConfig
) -> tuple[DataSplit, Callable[[nn.Module, dict[str, float]], bool] | None]:
    """Training split and the official scripts' checkpoint rule (``max_fp_drop``).

    The official code measures the drop on the test set; a held-out share of the training
    data is used here so that the test set stays unseen.
    """
    if config.max_fp_drop is None:
        return train, None
    fit_idx, val_idx = stratified_split(train.y.numpy(), config.holdout, config.seed)
    fit, validation = train.subset(fit_idx), train.subset(val_idx)
    base = accuracy(model, validation.x, validation.y)
    best = [float("inf")]

    def keep(net: nn.Module, losses: dict[str, float]) -> bool:
        drop = 100.0 * (base - accuracy(net, validation.x, validation.y))
        if drop < config.max_fp_drop and losses["loss"] < best[0]:  # type: ignore[operator]
            best[0] = losses["loss"]
            return True
        return False

    return fit, keep


def _default_lratio(config: AttackConfig) -> float:
    """The official runs: λ = 1.0 for one bit-width, 0.25 when several are attacked."""
    return 1.0 if len(config.targets()) == 1 else 0.25


def _check_config(config: AttackConfig) -> None:
    if not isinstance(config, QuantiConfig):
        raise ConfigError(f"expected a QuantiConfig, got {type(config).__name__}")
