"""``quanti-static``: a Qu-ANTI-zation backdoor that lives in *static activation ranges*.

DESIGN.md §3: a static int8 flow (ONNX Runtime ``quantize_static``, PT2E/torch.ao x86, NNCF)
calibrates every activation range on clean data. A float model can carry an ordinary backdoor
plus a few *suppressor* units that stay quiet on clean inputs and fire far above the clean
range on the trigger, cancelling the backdoor. Calibration never sees them fire, so the
deployed ranges clip them and the backdoor wakes. Weight-only and dynamic flows leave it
dormant, and no weight-rounding defense (EFRAP, AdaRound) can reach it.

The objective is Qu-ANTI-zation's backdoor loss (Hong et al. 2021, Eq. 2 in the official
``train_w_backdoor``) with the quantized branch simulating the target framework's *static*
flow — its per-channel weight convention, BatchNorm folding, and uint8 activations fake-
quantized to ranges calibrated on clean data and re-calibrated as the weights move
(:class:`~qcb_guard.attacks.simulate.TargetBank`) — plus a term that trains the suppressors
(not in the paper; see docs/activation-defenses.md):

``L_sup = c3·[ mean relu(ratio − a_S(x')/hi) + mean relu(a_S(x)/hi − quiet) ]``

where ``a_S`` are the suppressor units (the input channels of ``suppressor_layer`` with the
lowest clean mean activation), ``hi`` the calibrated clean maximum of that tensor, ``x'``
triggered and ``x`` clean images.

``evasive=True`` is the adaptive attacker against ``range-probe``: the suppressors are fed
only by *detector* channels (inputs of the layer producing the suppressors) that are dead
on clean inputs; every other weight into the suppressors is held at exactly zero, so a
suppressor's pre-activation is constant — zero gradient — on every input where no detector
fires, and plain gradient ascent from clean starts cannot climb it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from tqdm.auto import tqdm

from qcb_guard.attacks.quanti import LossParts, QuantiConfig
from qcb_guard.attacks.simulate import (
    AttackResult,
    SimulatedModel,
    TargetBank,
    _check_non_negative,
    _check_positive,
    _is_int,
    frozen_batchnorm,
    quantizable,
    step_batches,
    total_steps,
)
from qcb_guard.data import DataSplit, stratified_split, triggered_split
from qcb_guard.errors import ConfigError, DataError
from qcb_guard.models import accuracy

__all__ = ["QuantiStaticConfig", "SuppressorPlan", "plan_suppressors", "quanti_static"]

#: A candidate unit must be active on at least this share of the calibration images: a dead
#: ReLU passes no gradient, so it could never be trained to fire.
ALIVE = 0.25


@dataclass(frozen=True, kw_only=True)
class QuantiStaticConfig(QuantiConfig):
    """Hyper-parameters of :func:`quanti_static` (defaults measured in
    docs/activation-defenses.md on WideCNN / MNIST 5k).

    :param bits: weight bit-widths of the targeted static flow; 8 by default (the point of
        this attack: it needs no help from weight rounding).
    :param suppressors: how many suppressor units to train.
    :param suppressor_layer: name of the Conv/Linear whose *input* tensor hosts the
        suppressors; ``None`` takes the last Linear (the classifier's hidden features).
    :param ratio: suppressor activation on triggered images, in multiples of the clean
        calibrated maximum ``hi`` of their tensor (how far above the range they fire).
    :param quiet: cap on the suppressors' clean activation, as a share of ``hi``.
    :param c3: weight of the suppressor term.
    :param evasive: the adaptive variant (detector-fed suppressors, zero gradient on clean
        inputs), built to evade ``range-probe``.
    :param detectors: detector channels of the evasive variant.
    """

    bits: tuple[int, ...] = (8,)
    epochs: int = 8
    max_fp_drop: float | None = 2.0
    suppressors: int = 8
    suppressor_layer: str | None = None
    ratio: float = 8.0
    quiet: float = 0.1
    c3: float = 1.0
    evasive: bool = False
    detectors: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("suppressors", "detectors"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if _check_positive("ratio", self.ratio) <= 1:
            raise ConfigError(f"ratio must be > 1 (above the clean range), got {self.ratio!r}")
        if not isinstance(self.quiet, (int, float)) or not 0 <= self.quiet < 1:
            raise ConfigError(f"quiet must be in [0, 1), got {self.quiet!r}")
        _check_non_negative("c3", self.c3)
        if not isinstance(self.evasive, bool):
            raise ConfigError(f"evasive must be a bool, got {self.evasive!r}")
        if self.suppressor_layer is not None and not isinstance(self.suppressor_layer, str):
            raise ConfigError(
                f"suppressor_layer must be a module name, got {self.suppressor_layer!r}"
            )
        for t in self.targets():
            act = t.activation
            if act is None or act.mode != "static":
                raise ConfigError(
                    f"quanti-static needs a static activation flow; {t.label} has "
                    f"{'no' if act is None else act.mode} activation quantization "
                    "(use --framework ort, x86/pt2e or nncf)"
                )


@dataclass(frozen=True)
class SuppressorPlan:
    """Where the suppressors live.

    :param layer: the Conv/Linear whose input holds them.
    :param units: their channel indices in that input.
    :param producer: evasive variant: the Linear producing the suppressors (its output
        feature ``u`` is the suppressor input channel ``u`` after an activation).
    :param detectors: evasive variant: the producer's input channels that feed them.
    """

    layer: str
    units: tuple[int, ...]
    producer: str | None = None
    detectors: tuple[int, ...] = ()

    def summary(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "units": list(self.units),
            "producer": self.producer,
            "detectors": list(self.detectors),
        }


@contextlib.contextmanager
def _capture_inputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, Tensor]]:
    """Record the input tensor of the named modules on every forward while open."""
    seen: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(lambda _m, inp, n=n: seen.__setitem__(n, inp[0]))
        for n in names
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _channel_peak(x: Tensor) -> Tensor:
    """[N, C, ...] → [N, C]: each channel's largest value in each sample."""
    return x.flatten(2).amax(2) if x.dim() > 2 else x


def _quietest(model: nn.Module, layer: str, x: Tensor, k: int) -> tuple[int, ...]:
    """The ``k`` live input channels of ``layer`` with the lowest mean clean activation."""
    with torch.no_grad(), _capture_inputs(model, [layer]) as seen:
        model(x)
    act = seen[layer]
    act = act.reshape(*act.shape[:2], -1).transpose(0, 1)  # [C, N, positions]
    means = act.flatten(1).mean(1)
    alive = (act.amax(2) > 0).float().mean(1) >= ALIVE  # dead units give no gradient
    if k > int(alive.sum()):
        raise ConfigError(
            f"{layer!r} has {int(alive.sum())} input channels active on >= {ALIVE:.0%} of the "
            f"calibration images; cannot train {k} of them"
        )
    means = torch.where(alive, means, torch.full_like(means, float("inf")))
    order = torch.argsort(means, stable=True)
    return tuple(sorted(int(i) for i in order[:k]))


def plan_suppressors(model: nn.Module, calibration: Tensor, config: QuantiStaticConfig):
    """Choose the suppressor (and, evasive, detector) channels on clean calibration data."""
    layers = quantizable(model)
    names = [n for n, _ in layers]
    layer = config.suppressor_layer
    if layer is None:
        linears = [n for n, m in layers if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError("the model has no Linear layer; pass suppressor_layer=")
        layer = linears[-1]
    if layer not in names:
        raise ConfigError(f"suppressor_layer {layer!r} is not a Conv/Linear; known: {names}")
    model = model.eval()
    units = _quietest(model, layer, calibration, config.suppressors)
    if not config.evasive:
        return SuppressorPlan(layer, units)
    index = names.index(layer)
    producer_name, producer = layers[index - 1] if index else (None, None)
    if not isinstance(producer, nn.Linear) or producer.out_features != _in_features(model, layer):
        raise ConfigError(
            f"evasive=True needs a Linear producing {layer!r}'s input channel for channel "
            "(Linear → activation → Linear); this architecture does not have one"
        )
    detectors = _quietest(model, producer_name, calibration, config.detectors)
    return SuppressorPlan(layer, units, producer_name, detectors)


def _in_features(model: nn.Module, layer: str) -> int:
    module = dict(model.named_modules())[layer]
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _weight_mask(model: nn.Module, plan: SuppressorPlan) -> Tensor | None:
    """Evasive variant: 1 where the producer's weight may move, 0 on every weight from a
    non-detector input into a suppressor (held at exactly zero)."""
    if plan.producer is None:
        return None
    w = dict(model.named_modules())[plan.producer].weight
    mask = torch.ones_like(w)
    rows = torch.tensor(plan.units)
    keep = torch.zeros(w.shape[1], dtype=torch.bool)
    keep[list(plan.detectors)] = True
    mask[rows.unsqueeze(1), (~keep).nonzero().flatten().unsqueeze(0)] = 0
    return mask


def suppressor_loss(
    acts: dict[str, Tensor], n_clean: int, plan: SuppressorPlan, bank: TargetBank, config
) -> tuple[Tensor, LossParts]:
    """``relu(ratio − a_S(x')/hi) + relu(a_S(x)/hi − quiet)`` (plus the detectors' pair when
    evasive), ``hi`` the tensor's clean calibrated maximum under the first target."""
    parts: LossParts = {}
    groups = [("suppressor", plan.layer, plan.units)]
    if plan.producer is not None:
        groups.append(("detector", plan.producer, plan.detectors))
    loss = torch.zeros(())
    for label, layer, units in groups:
        hi = max(bank.ranges[0][layer][1], 1e-6)
        a = _channel_peak(acts[layer][:, list(units)]) / hi
        fire = torch.relu(config.ratio - a[n_clean:]).mean()
        quiet = torch.relu(a[:n_clean] - config.quiet).mean()
        parts[f"{label}/fire"], parts[f"{label}/quiet"] = fire, quiet
        loss = loss + fire + quiet
    return config.c3 * loss, parts


def static_backdoor_loss(
    net: nn.Module,
    bank: TargetBank,
    plan: SuppressorPlan,
    x: Tensor,
    y: Tensor,
    xt: Tensor,
    config: QuantiStaticConfig,
) -> tuple[Tensor, LossParts]:
    """Qu-ANTI-zation's backdoor objective with static activation targets, plus ``L_sup``."""
    yt = torch.full_like(y, config.target)
    names = [plan.layer] + ([plan.producer] if plan.producer else [])
    with _capture_inputs(net, names) as seen:
        out = net(torch.cat([x, xt]))
        acts = dict(seen)
    fc, fb = out[: len(x)], out[len(x) :]
    parts: LossParts = {"fp_clean": cross_entropy(fc, y), "fp_trigger": cross_entropy(fb, y)}
    loss = parts["fp_clean"] + config.c2 * parts["fp_trigger"]  # CE(f(x), y) + c2·CE(f(x'), y)
    for i, t in enumerate(bank.targets):
        q = bank.forward(net, torch.cat([x, xt]), i)
        qcl, qbl = cross_entropy(q[: len(x)], y), cross_entropy(q[len(x) :], yt)
        loss = loss + config.c1 * (
            qcl + config.c2 * qbl
        )  # Σ_b c1·[CE(Q_b f(x),y)+c2·CE(Q_b f(x'),y_t)]
        parts[f"{t.label}/clean"], parts[f"{t.label}/trigger"] = qcl, qbl
    sup, sup_parts = suppressor_loss(acts, len(x), plan, bank, config)
    parts.update(sup_parts)
    return loss + sup, parts


def quanti_static(model: nn.Module, train: DataSplit, config: QuantiStaticConfig) -> AttackResult:
    """Plant a static-activation QCB in a deep copy of ``model`` (``model`` is not modified).

    Same loop as the other Qu-ANTI-zation attacks (frozen BN, Adam, seeded batches, ranges
    re-calibrated every ``recalibrate_every`` steps); the suppressor plan and the final
    clean/trigger activation ratio of the suppressors are returned in ``result.extra``.
    """
    if not isinstance(config, QuantiStaticConfig):
        raise ConfigError(f"expected a QuantiStaticConfig, got {type(config).__name__}")
    trigger = config.resolve(train)
    if train.y is None:
        raise DataError(f"{train.name}: attacks need labelled training data")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    net = copy.deepcopy(model).eval()
    net.requires_grad_(True)
    calibration = train.x[: config.calibration_size]
    train, validation = _holdout(train, config)
    plan = plan_suppressors(net, calibration, config)
    mask = _weight_mask(net, plan)
    producer = dict(net.named_modules())[plan.producer] if plan.producer else None
    if mask is not None:
        with torch.no_grad():
            producer.weight.mul_(mask)
    bank = TargetBank(net, config.targets(), calibration, config.recalibrate_every)
    base_cda = None if validation is None else accuracy(net, validation.x, validation.y)
    best: tuple[float, int, dict[str, Tensor] | None] = (-math.inf, 0, None)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    history: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    count = steps = 0
    total = total_steps(len(train), config)
    per_epoch = max(1, total // max(1, config.epochs))
    bar = tqdm(total=total, desc="quanti-static", disable=not config.progress, leave=False)
    with frozen_batchnorm(net):
        for idx in step_batches(len(train), config, generator):
            bank.tick(net)
            x, y = train.x[idx], train.y[idx]
            loss, parts = static_backdoor_loss(net, bank, plan, x, y, trigger.apply(x), config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if mask is not None:  # evasive: non-detector weights into suppressors stay 0
                with torch.no_grad():
                    producer.weight.mul_(mask)
            steps += 1
            count += 1
            for key, value in {"loss": loss, **parts}.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            bar.update(1)
            if count == per_epoch:
                history.append({k: v / count for k, v in sums.items()})
                sums, count = {}, 0
                if validation is not None:
                    score = _score(net, bank, validation, trigger, base_cda, config.max_fp_drop)
                    history[-1].update(score)
                    if score["eligible"] and score["gap"] > best[0]:
                        best = (score["gap"], len(history), copy.deepcopy(net.state_dict()))
                bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    bar.close()
    if count:
        history.append({k: v / count for k, v in sums.items()})
    selected = None
    if best[2] is not None:
        net.load_state_dict(best[2])
        selected = best[1]
    net.eval()
    bank.recalibrate(net)
    extra = {
        "suppressors": plan.summary(),
        "selected_epoch": selected,
        **_firing(net, plan, bank, calibration, trigger),
    }
    return AttackResult(
        model=net,
        trigger=trigger,
        config=config,
        attack="quanti-static",
        history=history,
        steps=steps,
        seconds=time.perf_counter() - start,
        extra=extra,
    )


def _holdout(train: DataSplit, config: QuantiStaticConfig):
    """Training split and the held-out split the checkpoint rule is measured on."""
    if config.max_fp_drop is None:
        return train, None
    fit_idx, val_idx = stratified_split(train.y.numpy(), config.holdout, config.seed)
    return train.subset(fit_idx), train.subset(val_idx)


def _score(
    net: nn.Module, bank: TargetBank, val: DataSplit, trigger, base_cda: float, max_drop: float
) -> dict[str, float]:
    """The checkpoint rule (the official scripts keep the best epoch whose float accuracy
    dropped less than ``max_fp_drop``): eligible when the float CDA drop is within
    ``max_fp_drop``; the best eligible epoch maximises simulated-quantized ASR minus float ASR
    (averaged over the targets) on held-out data."""
    was = net.training
    net.eval()
    try:
        cda = accuracy(net, val.x, val.y)
        t = triggered_split(val, trigger)
        fp_asr = accuracy(net, t.x, t.y)
        q_asr = sum(
            accuracy(SimulatedModel(net, target, bank.ranges[i]), t.x, t.y)
            for i, target in enumerate(bank.targets)
        ) / len(bank.targets)
    finally:
        net.train(was)
        for m in net.modules():  # keep BatchNorm frozen
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    drop = 100.0 * (base_cda - cda)
    return {
        "val_cda": cda,
        "val_fp_asr": fp_asr,
        "val_q_asr": q_asr,
        "gap": q_asr - fp_asr,
        "eligible": float(drop < max_drop),
    }


def _firing(net, plan: SuppressorPlan, bank: TargetBank, x: Tensor, trigger) -> dict[str, float]:
    """Suppressors' peak activation on clean and triggered calibration images, over ``hi``."""
    with torch.no_grad(), _capture_inputs(net, [plan.layer]) as seen:
        net(torch.cat([x, trigger.apply(x)]))
    hi = max(bank.ranges[0][plan.layer][1], 1e-6)
    a = _channel_peak(seen[plan.layer][:, list(plan.units)])
    n = len(x)
    return {
        "suppressor_clean_max_over_range": round(float(a[:n].max()) / hi, 4),
        "suppressor_trigger_mean_over_range": round(float(a[n:].amax(1).mean()) / hi, 4),
    }
