"""PQBackdoor (Ma et al., "Quantization Backdoors to Deep Learning Commercial Frameworks").

Two stages, as in the official code (``train_backdoor.py`` then ``fine_tuning.py``):

1. ordinary poisoning: the model learns the backdoor (BadNets-style poisoned training set);
2. fine-tuning on clean and triggered images, both with their *correct* labels, so the float
   model forgets the backdoor — while after every step each Conv/Linear weight is projected
   back into the rounding bin it had after stage 1 (``|w/s − round(w₁/s)| ≤ 0.5 − ε``) and
   every channel's max|w| is pinned, so the scale ``s`` and every deployed integer stay those
   of the backdoored stage-1 model. Biases and BatchNorm are held at their stage-1 values.

The bins are the targeted framework's own (``framework``: ``ort`` amax/7.5 int4 and amax/127
int8 narrow range, ``nncf`` amax/(2^(b-1)-1) narrow, ``x86`` amax/((qmax-qmin)/2) full
range), computed on the BatchNorm-folded weight when the flow folds BN.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from tqdm.auto import tqdm

from qcb_guard.attacks.simulate import (
    AttackConfig,
    AttackResult,
    TargetQuantizer,
    _bn_factor,
    _check_positive,
    _is_int,
    conv_bn_pairs,
    frozen_batchnorm,
    quantizable,
    step_batches,
    total_steps,
)
from qcb_guard.data import DataSplit, poison_split
from qcb_guard.errors import ConfigError
from qcb_guard.models import train as train_model
from qcb_guard.quant import QuantSpec, broadcast, compute_qparams, quantize_spec

__all__ = ["PQBackdoorConfig", "bin_bounds", "check_bins", "pqbackdoor"]

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True, kw_only=True)
class PQBackdoorConfig(AttackConfig):
    """Both stages' budgets.

    :param poison_fraction: share of training images stamped and relabelled in stage 1.
    :param poison_epochs: stage-1 epochs (Adam, ``poison_lr``), from the clean model.
    :param epochs: stage-2 epochs (``optimizer`` at ``lr``, cosine schedule as the official
        code; SGD momentum 0.9, weight decay 5e-4).
    :param eps: margin kept from each bin edge (the official 1e-3).
    """

    epochs: int = 10
    lr: float = 1e-2
    optimizer: str = "sgd"
    poison_fraction: float = 0.1
    poison_epochs: int = 4
    poison_lr: float = 1e-3
    eps: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.poison_fraction, (int, float)) or not (
            0 < self.poison_fraction <= 1
        ):
            raise ConfigError(f"poison_fraction must be in (0, 1], got {self.poison_fraction!r}")
        if not _is_int(self.poison_epochs) or self.poison_epochs < 1:
            raise ConfigError(f"poison_epochs must be an int >= 1, got {self.poison_epochs!r}")
        _check_positive("poison_lr", self.poison_lr)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not isinstance(self.eps, (int, float)) or not 0 < self.eps < 0.5:
            raise ConfigError(f"eps must be in (0, 0.5), got {self.eps!r}")


def _reduce_dims(w: Tensor, axis: int | None) -> tuple[int, ...]:
    return tuple(d for d in range(w.dim()) if axis is None or d != axis)


def bin_bounds(
    base: Tensor, spec: QuantSpec, k: Tensor | None = None, eps: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """Element-wise ``[low, high]`` for a weight that must keep ``base``'s deployed integers
    and scale under ``spec`` (``fine_tuning.py``'s ``keep_scale`` + bin clip).

    ``k`` is the per-output-channel BatchNorm factor when the flow quantizes ``base·k``. The
    elements holding each channel's (or the tensor's) extreme values are pinned (low = high
    = base), every other element stays within the extremes, so min/max — hence the scale and
    zero-point — cannot move; and within ``0.5 − eps`` steps of its stage-1 integer.
    """
    kk = torch.ones(()) if k is None else k.reshape(-1, *([1] * (base.dim() - 1)))
    folded = base.detach().float() * kk
    dims = _reduce_dims(folded, spec.axis)
    scale, zero_point = compute_qparams(folded, spec)
    s = broadcast(scale, folded, spec.axis)
    zp = broadcast(zero_point.to(torch.float32), folded, spec.axis)
    q, _, _ = quantize_spec(folded, spec)
    r = q.to(torch.float32) - zp  # the stage-1 integer, relative to the zero point
    low, high = (r - 0.5 + eps) * s, (r + 0.5 - eps) * s  # |w/s − round(w₁/s)| ≤ 0.5 − ε
    if spec.symmetric:
        amax = folded.abs().amax(dim=dims, keepdim=True)
        pinned = folded.abs() >= amax
        lo_ext, hi_ext = -amax, amax
    else:
        lo_ext = folded.amin(dim=dims, keepdim=True)
        hi_ext = folded.amax(dim=dims, keepdim=True)
        pinned = (folded <= lo_ext) | (folded >= hi_ext)
    low = torch.maximum(low, lo_ext)  # keep_scale: nothing may exceed the pinned extremes
    high = torch.minimum(high, hi_ext)
    low = torch.where(pinned, folded, low)
    high = torch.where(pinned, folded, high)
    # back to the module's weight space (a negative BN factor swaps the ends)
    a, b = low / kk, high / kk
    return torch.minimum(a, b), torch.maximum(a, b)


def _layer_factors(
    model: nn.Module, target: TargetQuantizer, pairs: dict[str, str]
) -> dict[str, Tensor | None]:
    modules = dict(model.named_modules())
    out: dict[str, Tensor | None] = {}
    for name, _ in quantizable(model):
        bn = pairs.get(name) if target.fold_bn else None
        out[name] = None if bn is None else _bn_factor(modules[bn]).detach()
    return out


def _all_bounds(
    model: nn.Module, targets: tuple[TargetQuantizer, ...], pairs: dict[str, str], eps: float
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer, the intersection of every target's bounds (empty intersections: pinned)."""
    bounds: dict[str, tuple[Tensor, Tensor]] = {}
    for t in targets:
        factors = _layer_factors(model, t, pairs)
        for name, module in quantizable(model):
            lo, hi = bin_bounds(module.weight.detach(), t.weight, factors[name], eps)
            if name in bounds:
                lo, hi = torch.maximum(lo, bounds[name][0]), torch.minimum(hi, bounds[name][1])
            bounds[name] = (lo, hi)
    for name, module in quantizable(model):
        lo, hi = bounds[name]
        w = module.weight.detach()
        empty = lo > hi
        bounds[name] = (torch.where(empty, w, lo), torch.where(empty, w, hi))
    return bounds


def check_bins(
    model: nn.Module,
    base: nn.Module,
    targets: tuple[TargetQuantizer, ...],
    sample: Tensor,
) -> dict[str, dict[str, bool]]:
    """Per target: do all deployed integers and scales of ``model`` equal ``base``'s?

    Uses the framework's exact arithmetic (:func:`qcb_guard.quant.quantize_spec`) on the
    (BN-folded, where the flow folds) weights.
    """
    pairs = conv_bn_pairs(base, sample)
    out: dict[str, dict[str, bool]] = {}
    base_modules = dict(base.named_modules())
    for t in targets:
        factors = _layer_factors(base, t, pairs)
        ints_ok, scales_ok = True, True
        for name, module in quantizable(model):
            k = factors[name]
            kk = 1.0 if k is None else k.reshape(-1, *([1] * (module.weight.dim() - 1)))
            q1, s1, z1 = quantize_spec(module.weight.detach() * kk, t.weight)
            q0, s0, z0 = quantize_spec(base_modules[name].weight.detach() * kk, t.weight)
            ints_ok &= bool(torch.equal(q1, q0))
            scales_ok &= bool(torch.equal(s1, s0)) and bool(torch.equal(z1, z0))
        out[t.label] = {"integers_unchanged": ints_ok, "scales_unchanged": scales_ok}
    return out


def project_(model: nn.Module, bounds: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Clamp every Conv/Linear weight into its bounds, in place (stage 2's projection)."""
    with torch.no_grad():
        for name, module in quantizable(model):
            lo, hi = bounds[name]
            module.weight.copy_(torch.minimum(torch.maximum(module.weight, lo), hi))


def pqbackdoor(model: nn.Module, train: DataSplit, config: PQBackdoorConfig) -> AttackResult:
    """Run both PQBackdoor stages on a deep copy of the clean ``model``."""
    if not isinstance(config, PQBackdoorConfig):
        raise ConfigError(f"expected a PQBackdoorConfig, got {type(config).__name__}")
    trigger = config.resolve(train)
    targets = config.targets()
    start = time.perf_counter()
    # stage 1: ordinary poisoning (train_backdoor.py)
    stage1 = copy.deepcopy(model)
    stage1.requires_grad_(True)
    poisoned = poison_split(train, trigger, config.poison_fraction, seed=config.seed)
    train_model(
        stage1,
        poisoned.x,
        poisoned.y,
        epochs=config.poison_epochs,
        batch_size=config.batch_size,
        lr=config.poison_lr,
        seed=config.seed,
        progress=config.progress,
    )
    stage1.eval()
    stage1_seconds = time.perf_counter() - start
    # stage 2: clean + triggered images with correct labels, projected into stage-1 bins
    net = copy.deepcopy(stage1)
    pairs = conv_bn_pairs(net, train.x[:1])
    bounds = _all_bounds(net, targets, pairs, config.eps)
    project_(net, bounds)  # a no-op up to float rounding; makes the invariant hold at step 0
    weights = [m.weight for _, m in quantizable(net)]
    for p in net.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)  # biases and BN stay at stage 1 (official: reset every step)
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            weights, lr=config.lr, momentum=0.9, weight_decay=5e-4
        )
    else:
        opt = torch.optim.Adam(weights, lr=config.lr)
    n_steps = total_steps(len(train), config)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, n_steps))
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    total, count, steps = 0.0, 0, 0
    bar = tqdm(total=n_steps, desc="pqbackdoor", disable=not config.progress, leave=False)
    with frozen_batchnorm(net):
        for idx in step_batches(len(train), config, generator):
            x, y = train.x[idx], train.y[idx]
            xs, ys = torch.cat([x, trigger.apply(x)]), torch.cat([y, y])
            loss = cross_entropy(net(xs), ys)  # triggered images keep their correct label
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            project_(net, bounds)  # |w/s − round(w₁/s)| ≤ 0.5 − ε, max|w| pinned
            total, count, steps = total + float(loss.detach()), count + 1, steps + 1
            bar.update(1)
            if count * max(1, config.epochs) >= n_steps:
                history.append({"loss": total / count})
                total, count = 0.0, 0
    bar.close()
    if count:
        history.append({"loss": total / count})
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    bins = check_bins(net, stage1, targets, train.x[:1])
    return AttackResult(
        model=net,
        trigger=trigger,
        config=config,
        attack="pqbackdoor",
        history=history,
        steps=steps,
        seconds=time.perf_counter() - start,
        extra={"stage1_seconds": stage1_seconds, "bins": bins, "stage1_model": stage1},
    )
