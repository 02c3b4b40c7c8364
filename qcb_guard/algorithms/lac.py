"""LAC: layer-wise activation correction with poisoned distribution approximation (PDA).

Li et al., "Purifying Quantization-conditioned Backdoors via Layer-wise Activation Correction
with Distribution Approximation", ICML 2024. A QCB makes the quantized model's activations
drift from the float model's, on benign inputs too; LAC re-learns each layer's quantized
weights so that its output on the deployed model's inputs matches the float layer's output.
PDA first nudges those inputs, inside a tiny L∞ ball, towards the activation statistics the
float model was trained with (its BatchNorm statistics, which saw the poisoned training
data), where the drift is larger. Unlike EFRAP's up/down choice, LAC learns a free offset on
each weight through a straight-through estimator, so an integer may move by several steps.
Deviations from the official code are listed in ``docs/lac.md``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from qcb_guard.algorithms.reconstruction import (
    ReconstructionConfig,
    ReconstructionStats,
    defense_config,
    layer_threads,
    output_error,
    prepare_calibration,
    torch_threads,
)
from qcb_guard.errors import ConfigError, DataError
from qcb_guard.quant.ops import broadcast, fake_quantize, grid_position
from qcb_guard.slots import SlotCalibration, WeightSlot

#: Iterations at which the official PDA halves its step size.
PDA_MILESTONES = (250, 500, 1000, 2000, 3000, 4000)
#: Added to variances before the square root (official PDA).
STD_EPS = 1e-6
#: ``slot.attrs`` keys an adapter may fill with the float model's per-channel statistics of
#: this layer's output (BN running statistics); see ``docs/lac.md``.
STATS_KEYS = ("output_mean", "output_std")
#: Samples per PDA forward pass (the result does not depend on it: the loss is per sample).
PDA_CHUNK = 256

OFFSET_UNITS = ("weight", "step")
LR_SCHEDULES = ("cosine", "constant")
PDA_STATS = ("auto", "calibration", "attrs")


@dataclass(frozen=True)
class LACConfig:
    """LAC's settings and schedule.

    :param offset_unit: unit of the learned weight offset ``α``: ``"weight"`` (the official
        code: ``W~ = Q(W + α)``, Adam's ``lr`` in weight units) or ``"step"``
        (``W~ = Q(W + s·α)``, scale-free).
    :param lr_schedule: ``"cosine"`` (Adam's ``lr`` annealed to 0 over the layer's steps, so
        that the straight-through rounding settles; default) or ``"constant"`` (the official
        code, whose rounding keeps flipping: measured worse than nearest on some layers).
    :param pda: run the poisoned distribution approximation before each layer's correction.
    :param pda_stats: where PDA's target statistics come from: ``"attrs"`` (only layers whose
        adapter put the float model's BN statistics in ``slot.attrs``, the official behaviour:
        no BN, no PDA), ``"calibration"`` (per-channel mean/std of the float layer's output
        over the calibration data, the estimate BN's running statistics are), or ``"auto"``
        (``attrs`` where present, ``calibration`` elsewhere; default).
    :param pda_steps: PDA sign-gradient steps per layer (official: 500; the distance was
        measured no lower after 500 than after 50, at ten times the cost).
    :param pda_step_size: PDA's initial step size, halved at ``PDA_MILESTONES`` (official 1e-3).
    :param pda_eps: L∞ radius of PDA's perturbation of the layer's inputs (official: 1e-3).
    :param schedule: the layer-wise optimisation schedule (official: 10,000 Adam steps at
        lr 1e-3, batches of 32, 1,024 samples, no early stop).
    """

    offset_unit: str = "weight"
    lr_schedule: str = "cosine"
    pda: bool = True
    pda_stats: str = "auto"
    pda_steps: int = 50
    pda_step_size: float = 1e-3
    pda_eps: float = 1e-3
    schedule: ReconstructionConfig = field(default_factory=ReconstructionConfig)

    def __post_init__(self) -> None:
        if self.offset_unit not in OFFSET_UNITS:
            raise ConfigError(
                f"offset_unit must be one of {OFFSET_UNITS}, got {self.offset_unit!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if self.pda_stats not in PDA_STATS:
            raise ConfigError(f"pda_stats must be one of {PDA_STATS}, got {self.pda_stats!r}")
        if not isinstance(self.pda, bool):
            raise ConfigError(f"pda must be True or False, got {self.pda!r}")
        steps = self.pda_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"pda_steps must be a positive int, got {steps!r}")
        for name in ("pda_step_size", "pda_eps"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (ok and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")

    @classmethod
    def official(cls, **schedule: Any) -> LACConfig:
        """The official settings: 10,000 steps per layer at a constant lr, no early stop, PDA
        on every layer with BN statistics only."""
        base = {"iters": 10_000, "patience": 10**9, "min_iters": 10_000}
        return cls(
            lr_schedule="constant",
            pda_stats="attrs",
            pda_steps=500,
            schedule=ReconstructionConfig(**{**base, **schedule}),
        )


def lac_config(options: dict[str, Any]) -> LACConfig:
    """``LACConfig`` from ``guard(..., defense="lac", **options)``; unknown names are refused."""
    return defense_config(LACConfig, "lac", options)


@dataclass
class LACStats(ReconstructionStats):
    """What LAC did on one layer; ``pda_distance`` is the BN-statistics distance of the
    deployed layer's outputs before and after PDA (``None`` when PDA did not run)."""

    pda_source: str | None = None
    pda_distance: tuple[float, float] | None = None
    changed: int = 0


# -- poisoned distribution approximation ----------------------------------------------------


def sample_stats(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over the spatial positions of ``[N, C, ...]``."""
    flat = out.flatten(2)
    return flat.mean(2), torch.sqrt(flat.var(2) + STD_EPS)


def population_stats(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over samples and positions: what BN's running statistics
    estimate on the data they saw."""
    flat = out.transpose(0, 1).flatten(1)
    return flat.mean(1), torch.sqrt(flat.var(1) + STD_EPS)


def stats_distance(out: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """PDA's loss: ``Σ_b ‖μ − μ_b‖² / B + Σ_b ‖σ − σ_b‖² / B`` between the target per-channel
    statistics and each sample's (official ``own_loss`` on mean and std)."""
    m, s = sample_stats(out)
    n = out.shape[0]
    return (m - mean).pow(2).sum() / n + (s - std).pow(2).sum() / n


def attrs_stats(slot: WeightSlot) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The float model's output statistics an adapter stored in ``slot.attrs``, checked."""
    if not all(key in slot.attrs for key in STATS_KEYS):
        return None
    channels = slot.weight.shape[0]
    mean, std = (
        torch.as_tensor(slot.attrs[k], dtype=torch.float32).reshape(-1) for k in STATS_KEYS
    )
    if mean.numel() != channels or std.numel() != channels:
        raise DataError(
            f"slot {slot.name!r}: attrs output_mean/output_std need {channels} values, got "
            f"{mean.numel()}/{std.numel()}"
        )
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise DataError(f"slot {slot.name!r}: attrs output_mean/output_std must be finite, std > 0")
    return mean, std


def pda_targets(
    slot: WeightSlot, fp_inputs: torch.Tensor, config: LACConfig
) -> tuple[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """PDA's target statistics and their source, or ``None`` where PDA does not apply (off,
    a layer without spatial output, or ``pda_stats="attrs"`` and none stored)."""
    if not config.pda or slot.kind == "linear":
        return None  # per-sample statistics need spatial positions (official: BatchNorm2d only)
    with torch.no_grad():
        out = slot.layer(fp_inputs, slot.weight)
    if out[0, 0].numel() < 2:
        return None  # one position: a per-sample std does not exist
    stored = attrs_stats(slot) if config.pda_stats != "calibration" else None
    if stored is not None:
        return "attrs", stored
    if config.pda_stats == "attrs":
        return None
    return "calibration", population_stats(out)


def approximate_poisoned(
    slot: WeightSlot,
    inputs: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    config: LACConfig,
) -> tuple[torch.Tensor, float, float]:
    """PDA: sign-gradient steps on the layer's inputs, inside ``‖δ‖∞ ≤ ε``, that bring each
    sample's output statistics towards ``(mean, std)``; returns the inputs and the distance
    before and after."""
    out, before, after = [], 0.0, 0.0
    for start in range(0, inputs.shape[0], PDA_CHUNK):
        x0 = inputs[start : start + PDA_CHUNK]
        x, step = x0.clone(), config.pda_step_size
        for i in range(config.pda_steps):
            x.requires_grad_(True)
            loss = stats_distance(slot.layer(x, weight), mean, std)
            (grad,) = torch.autograd.grad(loss, x)
            if i == 0:
                before += float(loss.detach()) * x0.shape[0]
            if i in PDA_MILESTONES:
                step /= 2
            # x ← x0 + clip(x − α·sign(∇) − x0, −ε, ε): descend the statistics distance
            x = x0 + (x.detach() - step * grad.sign() - x0).clamp(-config.pda_eps, config.pda_eps)
        with torch.no_grad():
            after += float(stats_distance(slot.layer(x, weight), mean, std)) * x0.shape[0]
        out.append(x.detach())
    n = inputs.shape[0]
    return torch.cat(out), before / n, after / n


# -- layer-wise activation correction -------------------------------------------------------


def lac_integers(
    slot: WeightSlot,
    calibration: SlotCalibration | None,
    config: LACConfig | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, LACStats]:
    """LAC's integers for one slot: ``min_α ‖layer(x~, Q(W + α)) − layer(x_fp, W)‖²`` with
    ``x~`` the deployed model's inputs after PDA and ``Q`` the framework's grid (STE)."""
    config = config or LACConfig()
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    inputs, fp_inputs = prepare_calibration(calibration, config.schedule, generator)
    if not (torch.isfinite(inputs).all() and torch.isfinite(fp_inputs).all()):
        raise DataError(f"slot {slot.name!r}: calibration inputs contain NaN/inf values")
    stats = LACStats()
    with torch_threads(layer_threads(slot, inputs, config.schedule)):
        targets = pda_targets(slot, fp_inputs, config)
        if targets is not None:
            stats.pda_source, (mean, std) = targets
            nearest = slot.dequantize(slot.nearest())
            inputs, before, after = approximate_poisoned(slot, inputs, nearest, mean, std, config)
            stats.pda_distance = (before, after)
        integers = _correct(slot, inputs, fp_inputs, config, generator, stats)
    stats.changed = int((integers != slot.nearest()).sum())
    stats.seconds = time.perf_counter() - start
    return integers, stats


def _correct(
    slot: WeightSlot,
    inputs: torch.Tensor,
    fp_inputs: torch.Tensor,
    config: LACConfig,
    generator: torch.Generator,
    stats: LACStats,
) -> torch.Tensor:
    schedule = config.schedule
    s = broadcast(slot.scale, slot.weight, slot.axis)
    unit = s if config.offset_unit == "step" else torch.ones_like(s)
    position = grid_position(slot.weight, slot.scale, slot.axis, _rounding(slot))
    with torch.no_grad():
        targets = slot.layer(fp_inputs, slot.weight)
    alpha = torch.zeros_like(slot.weight, requires_grad=True)  # official init: α = 0 (nearest)
    optimizer = torch.optim.Adam([alpha], lr=schedule.lr)
    cosine = config.lr_schedule == "cosine"
    annealing = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, schedule.iters) if cosine else None
    )
    decisions = torch.round(position)
    settled = int(schedule.tol * decisions.numel())  # changes per check still counted as quiet
    quiet, n = 0, inputs.shape[0]
    for step in range(1, schedule.iters + 1):
        idx = torch.randint(0, n, (min(schedule.batch_size, n),), generator=generator)
        w = fake_quantize(
            slot.weight + unit * alpha, slot.scale, slot.zero_point, slot.axis, slot.qmin, slot.qmax
        )  # W~ = s·(clamp(round_STE((W + α)/s) + z, qmin, qmax) − z)
        loss = output_error(slot.layer(inputs[idx], w), targets[idx])  # layer-wise ‖·‖² (lp_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if annealing is not None:
            annealing.step()
        stats.steps = step
        if step % schedule.check_every == 0:
            stats.losses.append(float(loss.detach()))
            now = torch.round(position + alpha.detach() * unit / s)
            quiet = quiet + 1 if int((now != decisions).sum()) <= settled else 0
            decisions = now
            # Early stop never cuts the annealing short: rounding only settles as lr → 0.
            done = quiet >= schedule.patience and step >= schedule.min_iters and not cosine
            if done:
                stats.stopped_early = step < schedule.iters
                break
    if not torch.isfinite(alpha).all():
        raise DataError(f"slot {slot.name!r}: activation correction diverged (non-finite offset)")
    # Integers relative to the framework's own nearest rounding, so that an untouched weight
    # keeps exactly the integer the framework deploys (ties, zero-point arithmetic).
    moved = torch.round(position + alpha.detach() * unit / s) - torch.round(position)
    return torch.clamp(slot.nearest() + moved.to(torch.int64), slot.qmin, slot.qmax)


def _rounding(slot: WeightSlot) -> str:
    """The framework's ``w / s`` arithmetic; NNCF's own quantizer divides."""
    return "divide" if slot.rounding == "nncf" else slot.rounding
