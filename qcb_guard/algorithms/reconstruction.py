"""Layer-wise rounding reconstruction shared by AdaRound and EFRAP.

Both learn, per weight, whether to round down or up (``floor(w/s) + h``) by minimising the
layer-output error on calibration data with Adam on a continuous variable ``V``; they differ
in the soft rounding function ``h(V)`` and the regularisers. The framework's scale and zero
point never change: only the integers do.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from qcb_guard.errors import ConfigError, DataError
from qcb_guard.quant.ops import broadcast
from qcb_guard.slots import SlotCalibration, WeightSlot

#: Smallest calibration set a reconstruction accepts: fewer samples over-fit one layer.
MIN_SAMPLES = 8


@dataclass(frozen=True)
class ReconstructionConfig:
    """Optimisation schedule of one layer.

    :param iters: maximum Adam steps per layer (the official code runs 10,000).
    :param lr: Adam learning rate on ``V`` (official: 1e-3).
    :param batch_size: calibration samples per step (official: 32).
    :param max_samples: calibration samples kept per layer (official: 1,024); a seeded subset.
    :param check_every: steps between checks of the hard decisions ``V >= 0``.
    :param patience: consecutive checks without any changed decision before stopping early.
    :param min_iters: never stop before this many steps.
    :param tol: share of a layer's decisions that may still change between two checks while
        the layer counts as settled: on layers of millions of weights a few decisions near
        ``V = 0`` keep flapping long after the rounding has converged.
    :param threads: intra-op threads while optimising; ``None`` picks 1 for small layers,
        where thread start-up costs more than the arithmetic (measured 10× slower with 2
        threads on a 8×4×3×3 conv), and torch's default otherwise.
    """

    iters: int = 2000
    lr: float = 1e-3
    batch_size: int = 32
    max_samples: int = 1024
    check_every: int = 100
    patience: int = 3
    min_iters: int = 400
    tol: float = 1e-4
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size", "max_samples", "check_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.min_iters, int) or self.min_iters < 0:
            raise ConfigError(f"min_iters must be a non-negative int, got {self.min_iters!r}")
        if not (isinstance(self.tol, (int, float)) and 0 <= self.tol < 1):
            raise ConfigError(f"tol must be in [0, 1), got {self.tol!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr!r}")


def defense_config(cls: type, name: str, options: dict[str, Any]) -> Any:
    """``cls`` built from ``guard(..., defense=name, **options)``: its own fields and, when it
    has a ``schedule``, the :class:`ReconstructionConfig` fields too; unknown names are a
    ``ConfigError`` that lists the known ones (before any work)."""
    own = {f.name for f in fields(cls)}
    nested = {f.name for f in fields(ReconstructionConfig)} if "schedule" in own else set()
    own -= {"schedule"}
    unknown = set(options) - own - nested
    if unknown:
        raise ConfigError(
            f"defense {name!r}: unknown option(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(own | nested))}"
        )
    kwargs = {k: v for k, v in options.items() if k in own}
    if nested:
        kwargs["schedule"] = ReconstructionConfig(
            **{k: v for k, v in options.items() if k in nested}
        )
    return cls(**kwargs)


@dataclass
class ReconstructionStats:
    """What one layer's optimisation did."""

    steps: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # total loss at each check


def grid(slot: WeightSlot) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``floor(w/s)``, the fraction ``w/s - floor(w/s)``, broadcast scale and zero point."""
    s = broadcast(slot.scale, slot.weight, slot.axis)
    zp = broadcast(slot.zero_point.to(torch.float32), slot.weight, slot.axis)
    ws = slot.weight / s
    low = torch.floor(ws)
    return low, ws - low, s, zp


def soft_weight(
    low: torch.Tensor, h: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``W~ = s·(clamp(floor(W/s) + h + zp, qmin, qmax) − zp)`` (EFRAP Eq. 3, AdaRound Eq. 22)."""
    return s * (torch.clamp(low + h + zp, qmin, qmax) - zp)


def hard_integers(
    low: torch.Tensor, v: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Final integers ``floor(W/s) + 1[V >= 0] + zp``, clamped to the framework's range."""
    return torch.clamp(low + (v >= 0).to(low.dtype) + zp, qmin, qmax).to(torch.int64)


def output_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over everything else."""
    return (pred - target).pow(2).sum(1).mean()


def prepare_calibration(
    calibration: SlotCalibration | None, config: ReconstructionConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the partly quantized model and float inputs, a seeded subset if too many."""
    if calibration is None:
        raise DataError("layer reconstruction needs calibration data (calibration=None)")
    inputs, fp_inputs = calibration.inputs, calibration.targets_inputs
    n = inputs.shape[0]
    if n < MIN_SAMPLES:
        raise DataError(
            f"calibration has {n} samples; layer reconstruction needs at least {MIN_SAMPLES} "
            "(the EFRAP paper uses 1,024)"
        )
    if n > config.max_samples:
        keep = torch.randperm(n, generator=generator)[: config.max_samples]
        inputs, fp_inputs = inputs[keep], fp_inputs[keep]
    return inputs, fp_inputs


#: Multiply-accumulates per step below which one thread is faster than several.
SMALL_LAYER_MACS = 20_000_000


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def step_macs(slot: WeightSlot, inputs: torch.Tensor, batch_size: int) -> int:
    """Multiply-accumulates of one forward step of the layer on a batch."""
    with torch.no_grad():
        out = slot.layer(inputs[:1], slot.weight)
    per_output = slot.weight[0].numel() if slot.weight.dim() > 1 else 1
    return int(out.numel() * per_output * min(batch_size, inputs.shape[0]))


def layer_threads(slot: WeightSlot, inputs: torch.Tensor, config: ReconstructionConfig) -> int:
    """``config.threads``, or by default one thread for small layers (thread start-up costs
    more than it saves there) and all of torch's otherwise."""
    if config.threads is not None:
        return config.threads
    small = step_macs(slot, inputs, config.batch_size) < SMALL_LAYER_MACS
    return 1 if small else torch.get_num_threads()


def reconstruct(
    slot: WeightSlot,
    calibration: SlotCalibration | None,
    *,
    init_v: Callable[[torch.Tensor], torch.Tensor],
    soft: Callable[[torch.Tensor], torch.Tensor],
    regulariser: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    config: ReconstructionConfig,
    seed: int = 0,
) -> tuple[torch.Tensor, ReconstructionStats]:
    """Learn the rounding of one slot; return its integers and statistics.

    :param init_v: fraction ``u`` in [0, 1) → initial ``V`` (so that ``soft(V) ≈ u``).
    :param soft: ``V`` → soft rounding ``h`` in [0, 1].
    :param regulariser: ``(h, V, step)`` → extra loss added to the output error.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    inputs, fp_inputs = prepare_calibration(calibration, config, generator)
    with torch_threads(layer_threads(slot, inputs, config)):
        integers, stats = _optimise(
            slot, inputs, fp_inputs, init_v, soft, regulariser, config, generator
        )
    stats.seconds = time.perf_counter() - start
    return integers, stats


def _optimise(
    slot: WeightSlot,
    inputs: torch.Tensor,
    fp_inputs: torch.Tensor,
    init_v: Callable[[torch.Tensor], torch.Tensor],
    soft: Callable[[torch.Tensor], torch.Tensor],
    regulariser: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    config: ReconstructionConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, ReconstructionStats]:
    low, frac, s, zp = grid(slot)
    with torch.no_grad():
        targets = slot.layer(fp_inputs, slot.weight)
    v = init_v(frac).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=config.lr)
    stats = ReconstructionStats()
    decisions = v.detach() >= 0
    settled = int(config.tol * decisions.numel())  # changes per check still counted as quiet
    quiet = 0
    n = inputs.shape[0]
    for step in range(1, config.iters + 1):
        idx = torch.randint(0, n, (min(config.batch_size, n),), generator=generator)
        h = soft(v)
        pred = slot.layer(inputs[idx], soft_weight(low, h, s, zp, slot.qmin, slot.qmax))
        loss = output_error(pred, targets[idx]) + regulariser(h, v, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats.steps = step
        if step % config.check_every == 0:
            stats.losses.append(float(loss.detach()))
            now = v.detach() >= 0
            quiet = quiet + 1 if int((now != decisions).sum()) <= settled else 0
            decisions = now
            if quiet >= config.patience and step >= config.min_iters:
                stats.stopped_early = step < config.iters
                break
    if not torch.isfinite(v).all():
        raise DataError(f"slot {slot.name!r}: rounding optimisation diverged (non-finite V)")
    return hard_integers(low, v.detach(), zp, slot.qmin, slot.qmax), stats
