"""Deterministic training and the two metrics every QCB result is reported in (CDA, ASR).

Everything works on in-memory tensors (float ``[N, C, H, W]`` images, integer labels): the data
sets in this project are small, and tensors keep shuffling reproducible under one seed.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qcb_guard.errors import ConfigError, DataError

Trigger = Callable[[Tensor], Tensor]
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class TrainResult:
    """What ``train`` did: mean loss per epoch, optimizer steps, wall-clock seconds."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


# ---------------------------------------------------------------------------------------------
# validation


def model_num_classes(model: nn.Module) -> int | None:
    """Class count from the model's ``num_classes`` or its last Linear layer, if any."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def check_images(x: Any, model: nn.Module | None = None) -> None:
    """Images must be a non-empty floating [N, C, H, W] tensor matching the model's channels."""
    if not isinstance(x, Tensor):
        raise DataError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise DataError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DataError("images are empty (N = 0)")
    if not x.is_floating_point():
        raise DataError(f"images must be floating point (e.g. float32 in [0, 1]), got {x.dtype}")
    expected = getattr(model, "in_channels", None)
    if isinstance(expected, int) and x.shape[1] != expected:
        raise DataError(f"images have {x.shape[1]} channels but the model expects {expected}")


def check_labels(y: Any, n: int, num_classes: int | None) -> None:
    """Labels must be n integers in [0, num_classes)."""
    if not isinstance(y, Tensor):
        raise DataError(f"labels must be a torch.Tensor, got {type(y).__name__}")
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"labels must be 1-D, one per image: {n} images, shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"labels must be an integer tensor (int64), got {y.dtype}")
    low, high = int(y.min()), int(y.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else "[0, inf)"
        raise DataError(f"labels must be in {bound}, found values in [{low}, {high}]")


def check_data(model: nn.Module, x: Any, y: Any) -> None:
    check_images(x, model)
    check_labels(y, x.shape[0], model_num_classes(model))


def check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")


def check_train_config(epochs: Any, batch_size: Any, lr: Any, weight_decay: Any, opt: Any) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an int >= 1, got {epochs!r}")
    check_batch_size(batch_size)
    if not isinstance(lr, int | float) or not lr > 0:
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if not isinstance(weight_decay, int | float) or weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if opt not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {opt!r}")


# ---------------------------------------------------------------------------------------------
# training


@contextmanager
def preserved_modes(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Switch to train/eval mode and restore every submodule's own flag afterwards.

    Per-module restore matters: callers freeze BatchNorm (eval) inside a training model.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Shuffled index batches; a trailing batch of one is dropped (BatchNorm cannot train on it)."""
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    progress: bool = True,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place with mini-batches; same seed and same start give the same weights.

    The seed drives both torch's global RNG (dropout-like layers) and a private generator for
    shuffling, so unrelated RNG use elsewhere does not change the batch order.
    """
    check_train_config(epochs, batch_size, lr, weight_decay, optimizer)
    check_data(model, x, y)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = loss_fn or nn.functional.cross_entropy
    device = model_device(model)
    opt = make_optimizer(optimizer, model.parameters(), lr, weight_decay)
    result = TrainResult()
    start = time.perf_counter()
    with preserved_modes(model, training=True):
        bar = tqdm(range(epochs), desc="train", disable=not progress, leave=False)
        for _ in bar:
            total, count = 0.0, 0
            for idx in epoch_batches(x.shape[0], batch_size, generator):
                xb, yb = x[idx].to(device), y[idx].to(device=device, dtype=torch.long)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
                result.steps += 1
            result.losses.append(total / max(count, 1))
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------
# evaluation


def train_clean(
    model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, seed: int, progress: bool = True
) -> TrainResult:
    """The project's recipe for a clean model (Adam, lr 2e-3, batches of 64): what attacks,
    the demo, the robustness study and the benchmarks start from."""
    return train(model, x, y, epochs=epochs, batch_size=64, lr=2e-3, seed=seed, progress=progress)


def logits(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Model outputs for every image, in eval mode without gradients, on the CPU."""
    check_images(x, model)
    check_batch_size(batch_size)
    device = model_device(model)
    with preserved_modes(model, training=False), torch.no_grad():
        outs = [model(xb.to(device)).cpu() for xb in x.split(batch_size)]
    return torch.cat(outs)


def predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Predicted class per image (int64), in eval mode without gradients."""
    return logits(model, x, batch_size).argmax(dim=1)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Clean data accuracy (CDA): the fraction of images classified as their label."""
    check_data(model, x, y)
    return float((predict(model, x, batch_size) == y.cpu()).double().mean())


def attack_success_rate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    apply_trigger: Trigger,
    target: int,
    batch_size: int = 256,
) -> float:
    """ASR: the fraction of triggered images classified as ``target``.

    Only images whose true label is not ``target`` count: those already of the target class
    would inflate the rate without the backdoor doing anything.
    """
    check_data(model, x, y)
    num_classes = model_num_classes(model)
    try:
        target = operator.index(target)  # ints, numpy ints, 0-d integer tensors
    except TypeError:
        raise ConfigError(f"target must be an integer class index, got {target!r}") from None
    if target < 0:
        raise ConfigError(f"target must be a class index >= 0, got {target}")
    if num_classes is not None and target >= num_classes:
        raise ConfigError(f"target {target} is not a class of a {num_classes}-class model")
    keep = y.cpu() != target
    if not bool(keep.any()):
        raise DataError(f"no images with a label other than the target {target}: ASR undefined")
    clean = x[keep.to(x.device)]  # boolean indexing copies: the trigger cannot touch x
    triggered = apply_trigger(clean)
    if not isinstance(triggered, Tensor) or triggered.shape != clean.shape:
        got = tuple(triggered.shape) if isinstance(triggered, Tensor) else type(triggered).__name__
        want = tuple(clean.shape)
        raise DataError(f"apply_trigger must return a tensor of shape {want}, got {got}")
    return float((predict(model, triggered, batch_size) == target).double().mean())


def split_trigger(trigger: Any) -> tuple[Trigger, int]:
    """Accept ``(apply, target)`` or an object with ``target`` and ``apply``/``__call__``."""
    if isinstance(trigger, tuple) and len(trigger) == 2:
        return trigger[0], trigger[1]
    apply = getattr(trigger, "apply", None) or (trigger if callable(trigger) else None)
    target = getattr(trigger, "target", None)
    if apply is None or target is None:
        raise ConfigError(
            "trigger must be (apply_trigger, target) or have .target and .apply/__call__, "
            f"got {type(trigger).__name__}"
        )
    return apply, target


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, trigger: Any = None, batch_size: int = 256
) -> dict[str, float | None]:
    """``{"cda": ..., "asr": ...}``; ``asr`` is None without a trigger."""
    result: dict[str, float | None] = {"cda": accuracy(model, x, y, batch_size), "asr": None}
    if trigger is not None:
        apply, target = split_trigger(trigger)
        result["asr"] = attack_success_rate(model, x, y, apply, target, batch_size)
    return result
