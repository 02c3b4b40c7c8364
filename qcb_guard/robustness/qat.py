"""Quantization-aware fine-tuning through :class:`FakeQuantModel`: the loop that vanilla QAT,
Defensive Quantization and DivQAT share (they differ only in an extra loss term).

Starts from a trained float model (a deep copy: the caller's model is never modified),
freezes BatchNorm statistics as QAT fine-tuning usually does, and re-calibrates the static
activation ranges every ``recalibrate_every`` steps because the weights move under them.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from qcb_guard.attacks.simulate import frozen_batchnorm
from qcb_guard.errors import ConfigError, DataError
from qcb_guard.models.train import epoch_batches
from qcb_guard.robustness.fakequant import FakeQuantModel, QuantConfig, calibrate_ranges

__all__ = ["QATConfig", "QATResult", "qat"]

#: ``extra(model, qmodel, x, y, logits) -> loss term`` added to the task loss each step.
ExtraLoss = Callable[[nn.Module, FakeQuantModel, Tensor, Tensor, Tensor], Tensor]


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class QATConfig:
    """Fine-tuning budget and the quantization grid (bits come from the caller).

    :param act_bits: hidden-activation bits (``None``: the weight bits).
    :param input_bits: bits of the input image (``None``: float).
    """

    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 64
    act_bits: int | None = None
    input_bits: int | None = 8
    per_channel: bool = True
    calibration_size: int = 256
    recalibrate_every: int = 25
    progress: bool = False

    def __post_init__(self) -> None:
        _int("epochs", self.epochs, 1)
        _int("batch_size", self.batch_size, 2)
        _int("calibration_size", self.calibration_size, 1)
        _int("recalibrate_every", self.recalibrate_every, 1)
        _positive("lr", self.lr)

    def quant(self, bits: int) -> QuantConfig:
        return QuantConfig(bits, self.act_bits, self.input_bits, self.per_channel)


@dataclass
class QATResult:
    """The fine-tuned copy, its calibrated ranges, and the mean loss terms per epoch."""

    model: nn.Module
    quant: QuantConfig
    ranges: dict[str, tuple[float, float]]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def fake_quantized(self) -> FakeQuantModel:
        return FakeQuantModel(self.model, self.quant, self.ranges)


def check_train(train: Any) -> None:
    if not hasattr(train, "x") or getattr(train, "y", None) is None:
        raise DataError("training defenses need a labelled DataSplit (x and y)")


def qat(
    model: nn.Module,
    train: Any,
    *,
    bits: int,
    seed: int,
    config: QATConfig | None = None,
    extra: ExtraLoss | None = None,
    desc: str = "qat",
) -> QATResult:
    """Fine-tune a copy of ``model`` on ``CE(Q_b f(x), y) (+ extra)`` through fake quantization."""
    config = config or QATConfig()
    quant = config.quant(bits)
    check_train(train)
    _int("seed", seed, 0)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    student = copy.deepcopy(model)
    x, y = train.x, train.y
    calibration = x[: config.calibration_size]
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=config.lr)
    ranges = calibrate_ranges(student, quant, calibration)
    history: list[dict[str, float]] = []
    start, step = time.perf_counter(), 0
    with frozen_batchnorm(student):
        bar = tqdm(range(config.epochs), desc=desc, disable=not config.progress, leave=False)
        for _ in bar:
            sums: dict[str, float] = {}
            batches = epoch_batches(len(x), config.batch_size, generator)
            for idx in batches:
                if step and step % config.recalibrate_every == 0:
                    ranges = calibrate_ranges(student, quant, calibration)
                step += 1
                qmodel = FakeQuantModel(student, quant, ranges)
                xb, yb = x[idx], y[idx]
                out = qmodel(xb)
                task = F.cross_entropy(out, yb)
                term = extra(student, qmodel, xb, yb, out) if extra is not None else None
                loss = task if term is None else task + term
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums["task"] = sums.get("task", 0.0) + float(task.detach())
                if term is not None:
                    sums["extra"] = sums.get("extra", 0.0) + float(term.detach())
            history.append({k: v / max(1, len(batches)) for k, v in sums.items()})
            bar.set_postfix(loss=f"{history[-1]['task']:.4f}")
    student.eval()
    ranges = calibrate_ranges(student, quant, calibration)
    return QATResult(student, quant, ranges, history, time.perf_counter() - start)
