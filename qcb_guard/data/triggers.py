"""Backdoor triggers: a mask and a pattern blended into images, and a target class.

Attacks use them to plant backdoors, defenses and scanners to measure attack success rate
(ASR). One representation covers patch triggers (mask 0/1) and blended ones (mask = alpha).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from qcb_guard.data.datasets import DataSplit
from qcb_guard.errors import ConfigError, DataError

__all__ = [
    "POSITIONS",
    "TRIGGERS",
    "Poisoned",
    "Trigger",
    "blended",
    "checkerboard",
    "from_mask_pattern",
    "make_trigger",
    "non_target_mask",
    "poison",
    "poison_split",
    "square",
    "triggered_split",
]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
_TRIGGER_FILE_MAX_BYTES = 256 * 1024**2


# --------------------------------------------------------------------------- validation


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _image_shape(image_shape: Any) -> tuple[int, int, int]:
    """(C, H, W) from a 3-tuple, or (H, W) meaning one channel."""
    try:
        dims = tuple(image_shape)
    except TypeError:
        dims = ()
    if len(dims) == 2:
        dims = (1, *dims)
    if len(dims) != 3 or not all(_is_int(d) and d >= 1 for d in dims):
        raise ConfigError(
            f"image_shape must be (C, H, W) or (H, W) of positive ints, got {image_shape!r}"
        )
    return int(dims[0]), int(dims[1]), int(dims[2])


def _target(target: Any, num_classes: int | None) -> int:
    if not _is_int(target) or target < 0:
        raise ConfigError(f"target must be a class index >= 0, got {target!r}")
    if num_classes is not None and target >= num_classes:
        raise ConfigError(f"target must be in [0, {num_classes}), got {target}")
    return int(target)


def _unit(value: Any, what: str, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    v = float(value)
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)
    if not ok:
        raise ConfigError(f"{what} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
    return v


def _float_array(a: Any, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiub":
        raise ConfigError(f"{what} must be numeric, got dtype {arr.dtype}")
    arr = np.array(arr, dtype=np.float32, copy=True)
    if not np.isfinite(arr).all():
        raise ConfigError(f"{what} holds NaN or infinite values")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ConfigError(f"{what} values must lie in [0, 1], got [{arr.min():g}, {arr.max():g}]")
    arr.flags.writeable = False
    return arr


# --------------------------------------------------------------------------- the trigger


@dataclass(frozen=True, eq=False)
class Trigger:
    """``x' = x·(1 − mask) + pattern·mask``, clamped to [0, 1]; triggered images → ``target``.

    ``mask`` and ``pattern`` are float32 [C, H, W] arrays in [0, 1], stored read-only as numpy
    so a trigger is cheap to save, compare and share between torch devices.
    """

    mask: np.ndarray
    pattern: np.ndarray
    target: int = 0
    name: str = "custom"

    def __post_init__(self) -> None:
        mask = _float_array(self.mask, "trigger mask")
        pattern = _float_array(self.pattern, "trigger pattern")
        if pattern.ndim != 3:
            raise ConfigError(f"trigger pattern must have shape [C, H, W], got {pattern.shape}")
        if mask.shape != pattern.shape:
            raise ConfigError(
                f"trigger mask shape {mask.shape} does not match pattern shape {pattern.shape}"
            )
        if not mask.any():
            raise ConfigError("trigger mask is all zero: the trigger would change nothing")
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "target", _target(self.target, None))
        object.__setattr__(self, "name", str(self.name))

    def __repr__(self) -> str:
        return (
            f"Trigger({self.name!r}, shape={self.image_shape}, target={self.target}, "
            f"area={self.area:.3f})"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.mask.shape
        return int(c), int(h), int(w)

    @property
    def area(self) -> float:
        """Share of pixels the trigger touches: how visible it is."""
        return float((self.mask.max(axis=0) > 0).mean())

    def equals(self, other: Trigger) -> bool:
        return (
            self.target == other.target
            and np.array_equal(self.mask, other.mask)
            and np.array_equal(self.pattern, other.pattern)
        )

    def check(self, image_shape: Any = None, num_classes: int | None = None) -> Trigger:
        """Raise ConfigError unless this trigger fits these images and this many classes."""
        if image_shape is not None and _image_shape(image_shape) != self.image_shape:
            raise ConfigError(
                f"trigger is for images {self.image_shape}, data has {_image_shape(image_shape)}"
            )
        _target(self.target, num_classes)
        return self

    def summary(self) -> dict[str, Any]:
        """JSON-ready description for reports."""
        return {
            "name": self.name,
            "target": self.target,
            "image_shape": list(self.image_shape),
            "area": round(self.area, 6),
        }

    def apply(self, x: ArrayT) -> ArrayT:
        """Stamp the trigger on a batch [N, C, H, W] or one image [C, H, W] (torch or numpy)."""
        shape = tuple(x.shape)
        if shape[-3:] != self.image_shape or len(shape) not in (3, 4):
            raise ConfigError(
                f"trigger is for images {self.image_shape}; got input of shape {shape} "
                "(expected [N, C, H, W] or [C, H, W])"
            )
        if isinstance(x, torch.Tensor):
            if not x.is_floating_point():
                raise DataError(f"images must be floating point in [0, 1], got {x.dtype}")
            m = torch.tensor(self.mask, device=x.device, dtype=x.dtype)
            p = torch.tensor(self.pattern, device=x.device, dtype=x.dtype)
            return (x * (1 - m) + p * m).clamp_(0.0, 1.0)
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise DataError(f"images must be floating point in [0, 1], got {arr.dtype}")
        m, p = self.mask.astype(arr.dtype), self.pattern.astype(arr.dtype)
        return np.clip(arr * (1 - m) + p * m, 0.0, 1.0)

    __call__ = apply

    def save_npz(self, path: str | os.PathLike[str]) -> Path:
        """Write ``mask``, ``pattern``, ``target``, ``name`` atomically (never a half file)."""
        path = Path(path)
        if not path.parent.is_dir():
            raise ConfigError(f"cannot save trigger: folder {path.parent} does not exist")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    mask=self.mask,
                    pattern=self.pattern,
                    target=np.int64(self.target),
                    name=np.str_(self.name),
                )
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load_npz(cls, path: str | os.PathLike[str]) -> Trigger:
        """Read a trigger written by :meth:`save_npz`; no pickles, every field validated."""
        from qcb_guard.data.loaders import read_npz_arrays

        arrays = read_npz_arrays(
            path, ("mask", "pattern", "target"), ("name",), max_bytes=_TRIGGER_FILE_MAX_BYTES
        )
        for key in ("mask", "pattern"):
            if arrays[key].dtype.kind != "f":
                raise DataError(f"{path}: {key} must be a float array, got {arrays[key].dtype}")
        target = arrays["target"]
        if target.size != 1 or target.dtype.kind not in "iu":
            raise DataError(f"{path}: target must be one integer, got {target!r}")
        name = arrays.get("name", np.str_("custom"))
        if name.dtype.kind != "U" or name.size != 1:
            raise DataError(f"{path}: name must be one string, got dtype {name.dtype}")
        try:
            return cls(arrays["mask"], arrays["pattern"], int(target.reshape(())), str(name))
        except ConfigError as exc:
            raise DataError(f"{path}: invalid trigger: {exc}") from exc


# --------------------------------------------------------------------------- builders


def _patch_origin(
    image_shape: tuple[int, int, int], size: int, position: Any, margin: int
) -> tuple[int, int]:
    """Top-left (row, col) of a size×size patch, or ConfigError if it leaves the image."""
    _, h, w = image_shape
    if isinstance(position, str):
        if position not in POSITIONS:
            raise ConfigError(
                f"position must be one of {', '.join(POSITIONS)} or (row, col), got {position!r}"
            )
        vertical, _, horizontal = position.partition("-")
        row = {"top": margin, "bottom": h - size - margin}.get(vertical, (h - size) // 2)
        col = {"left": margin, "right": w - size - margin}.get(horizontal, (w - size) // 2)
    else:
        try:
            row, col = position
        except (TypeError, ValueError):
            raise ConfigError(f"position must be a name or (row, col), got {position!r}") from None
        if not (_is_int(row) and _is_int(col)):
            raise ConfigError(f"position (row, col) must be ints, got {position!r}")
    if row < 0 or col < 0 or row + size > h or col + size > w:
        raise ConfigError(
            f"a {size}×{size} trigger at (row {row}, col {col}) does not fit in a {h}×{w} image"
            + (f" with margin {margin}" if isinstance(position, str) and margin else "")
        )
    return int(row), int(col)


def _patch_size(image_shape: tuple[int, int, int], size: Any) -> int:
    _, h, w = image_shape
    if size is None:
        return max(1, h // 8)
    if not _is_int(size) or size <= 0:
        raise ConfigError(f"trigger size must be a positive int, got {size!r}")
    if size > min(h, w):
        raise ConfigError(f"trigger size {size} is larger than the {h}×{w} image")
    return int(size)


def _margin(image_shape: tuple[int, int, int], margin: Any) -> int:
    if margin is None:
        return image_shape[1] // 32
    if not _is_int(margin) or margin < 0:
        raise ConfigError(f"margin must be an int >= 0, got {margin!r}")
    return int(margin)


def _channel_values(value: Any, channels: int) -> np.ndarray:
    values = [value] * channels if np.ndim(value) == 0 else list(np.asarray(value).ravel())
    if len(values) != channels:
        raise ConfigError(f"value needs 1 or {channels} entries (one per channel), got {value!r}")
    return np.array([_unit(v, "trigger value") for v in values], dtype=np.float32)


def _patch_trigger(
    image_shape: Any,
    size: Any,
    position: Any,
    margin: Any,
    tile: Callable[[int], np.ndarray],
    target: Any,
    num_classes: int | None,
    name: str,
) -> Trigger:
    shape = _image_shape(image_shape)
    side = _patch_size(shape, size)
    row, col = _patch_origin(shape, side, position, _margin(shape, margin))
    mask = np.zeros(shape, dtype=np.float32)
    pattern = np.zeros(shape, dtype=np.float32)
    mask[:, row : row + side, col : col + side] = 1.0
    pattern[:, row : row + side, col : col + side] = tile(side)
    return Trigger(mask, pattern, _target(target, num_classes), name)


def square(
    image_shape: Sequence[int],
    size: int | None = None,
    position: str | tuple[int, int] = "bottom-right",
    value: float | Sequence[float] = 1.0,
    target: int = 0,
    *,
    margin: int | None = None,
    num_classes: int | None = None,
) -> Trigger:
    """A solid square patch; the defaults are Qu-ANTI-zation's trigger.

    Defaults follow the paper's official code: side ``h // 8``, ``h // 32`` pixels from the
    bottom and right edges, filled with the maximum pixel value (1.0), target class 0
    (a 3×3 square touching the corner on 28×28 MNIST; 4×4 one pixel in on 32×32 CIFAR).

    :param position: a name in :data:`POSITIONS` or the (row, col) of the top-left pixel.
    :param value: fill value in [0, 1], or one per channel.
    :param margin: gap to the image edge for named positions (default ``h // 32``).
    """
    channels = _image_shape(image_shape)[0]
    fill = _channel_values(value, channels)[:, None, None]
    return _patch_trigger(
        image_shape,
        size,
        position,
        margin,
        lambda s: np.broadcast_to(fill, (channels, s, s)),
        target,
        num_classes,
        "square",
    )


def checkerboard(
    image_shape: Sequence[int],
    size: int | None = None,
    position: str | tuple[int, int] = "bottom-right",
    target: int = 0,
    *,
    cell: int = 1,
    low: float = 0.0,
    high: float = 1.0,
    margin: int | None = None,
    num_classes: int | None = None,
) -> Trigger:
    """A BadNets-style checkerboard patch of ``cell``-pixel squares, ``high`` in its corner.

    Harder to confuse with natural strokes than a solid square, and both extremes appear, so
    clipping at 0 or 1 cannot hide it.
    """
    if not _is_int(cell) or cell < 1:
        raise ConfigError(f"cell must be a positive int, got {cell!r}")
    lo, hi = _unit(low, "low"), _unit(high, "high")
    if lo == hi:
        raise ConfigError(f"low and high must differ, got {lo} and {hi}")

    def tile(side: int) -> np.ndarray:
        r, c = np.indices((side, side)) // cell
        return np.where((r + c) % 2 == 0, hi, lo).astype(np.float32)[None]

    return _patch_trigger(
        image_shape, size, position, margin, tile, target, num_classes, "checkerboard"
    )


def from_mask_pattern(
    mask: Any,
    pattern: Any,
    target: int = 0,
    *,
    num_classes: int | None = None,
    name: str = "custom",
) -> Trigger:
    """A trigger from explicit arrays; a [H, W] or [1, H, W] mask is shared by all channels."""
    pattern_arr = _float_array(pattern, "trigger pattern")
    mask_arr = _float_array(mask, "trigger mask")
    if pattern_arr.ndim == 2:
        pattern_arr = pattern_arr[None]
    if mask_arr.ndim == 2:
        mask_arr = mask_arr[None]
    if mask_arr.ndim == 3 and pattern_arr.ndim == 3 and mask_arr.shape[0] == 1:
        if mask_arr.shape[1:] != pattern_arr.shape[1:]:
            raise ConfigError(
                f"trigger mask shape {mask_arr.shape} does not match pattern shape "
                f"{pattern_arr.shape}"
            )
        mask_arr = np.broadcast_to(mask_arr, pattern_arr.shape)
    return Trigger(mask_arr, pattern_arr, _target(target, num_classes), name)


def blended(
    pattern: Any, alpha: float, target: int = 0, *, num_classes: int | None = None
) -> Trigger:
    """A whole-image blend ``(1 − alpha)·x + alpha·pattern`` (Chen et al. 2017 style)."""
    a = _unit(alpha, "alpha", low_open=True)
    pattern_arr = _float_array(pattern, "trigger pattern")
    if pattern_arr.ndim == 2:
        pattern_arr = pattern_arr[None]
    mask = np.full(pattern_arr.shape, a, dtype=np.float32)
    return Trigger(mask, pattern_arr, _target(target, num_classes), "blended")


def _blended_for_shape(
    image_shape: Sequence[int],
    alpha: float = 0.1,
    target: int = 0,
    *,
    pattern: Any = None,
    seed: int = 0,
    num_classes: int | None = None,
) -> Trigger:
    """``make_trigger("blended", ...)``: a seeded uniform-noise pattern unless one is given."""
    shape = _image_shape(image_shape)
    if pattern is None:
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        pattern = np.random.default_rng(seed).random(shape, dtype=np.float32)
    trigger = blended(pattern, alpha, target, num_classes=num_classes)
    return trigger.check(shape)


TRIGGERS: dict[str, Callable[..., Trigger]] = {
    "square": square,
    "checkerboard": checkerboard,
    "blended": _blended_for_shape,
}


def make_trigger(kind: str, image_shape: Sequence[int], **options: Any) -> Trigger:
    """Build a trigger by name (``TRIGGERS``), e.g. from a CLI option or a config file."""
    builder = TRIGGERS.get(kind) if isinstance(kind, str) else None
    if builder is None:
        raise ConfigError(f"unknown trigger kind {kind!r}; known: {', '.join(TRIGGERS)}")
    allowed = [p for p in inspect.signature(builder).parameters if p != "image_shape"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for trigger {kind!r}; "
            f"allowed: {', '.join(allowed)}"
        )
    return builder(image_shape, **options)


# --------------------------------------------------------------------------- poisoning


class Poisoned(NamedTuple):
    """A poisoned copy of a training set and which rows were changed."""

    x: Any
    y: Any
    indices: Any


def _labels_1d(y: Any) -> np.ndarray:
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise DataError(f"labels must be a 1-D integer array, got shape {arr.shape} {arr.dtype}")
    return arr


def non_target_mask(y: ArrayT, target: int) -> ArrayT:
    """Rows whose true label is not ``target``: the only ones attack success rate counts."""
    _labels_1d(y)
    _target(target, None)
    return y != target


def poison(
    x: ArrayT,
    y: ArrayT,
    trigger: Trigger,
    fraction: float,
    seed: int = 0,
    *,
    exclude_target: bool = True,
) -> Poisoned:
    """Stamp the trigger on ``round(fraction·N)`` random rows and relabel them ``target``.

    Only rows of other classes are drawn by default: a target-class row carries no backdoor
    signal. Inputs are not modified; the copies keep the input's type (torch or numpy).
    """
    labels = _labels_1d(y)
    if len(labels) != len(x):
        raise DataError(f"x has {len(x)} rows but y has {len(labels)}")
    if len(labels) == 0:
        raise DataError("data to poison is empty")
    frac = _unit(fraction, "poison fraction", low_open=True)
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    eligible = (
        np.flatnonzero(labels != trigger.target) if exclude_target else np.arange(len(labels))
    )
    count = max(1, round(frac * len(labels)))
    if count > len(eligible):
        raise ConfigError(
            f"poison fraction {fraction} needs {count} rows but only {len(eligible)} are not of "
            f"target class {trigger.target}"
        )
    rows = np.sort(np.random.default_rng(seed).choice(eligible, size=count, replace=False))
    if isinstance(x, torch.Tensor):
        idx = torch.from_numpy(rows).to(x.device)
        x_out, y_out = x.clone(), torch.as_tensor(y).clone()
        x_out[idx] = trigger.apply(x_out[idx])
        y_out[idx.to(y_out.device)] = trigger.target
        return Poisoned(x_out, y_out, torch.from_numpy(rows))
    x_out, y_out = np.array(x, copy=True), labels.copy()
    x_out[rows] = trigger.apply(x_out[rows])
    y_out[rows] = trigger.target
    return Poisoned(x_out, y_out, rows)


def poison_split(data: DataSplit, trigger: Trigger, fraction: float, seed: int = 0) -> DataSplit:
    """:func:`poison` on a labelled DataSplit."""
    if data.y is None:
        raise DataError(f"{data.name}: poisoning needs labels")
    trigger.check(data.image_shape, data.num_classes)
    out = poison(data.x, data.y, trigger, fraction, seed)
    return DataSplit(out.x, out.y, data.num_classes, f"{data.name}+poison", data.class_names)


def triggered_split(data: DataSplit, trigger: Trigger) -> DataSplit:
    """Non-target images with the trigger, labelled ``target``: accuracy on it is the ASR."""
    if data.y is None:
        raise DataError(f"{data.name}: attack success rate needs labels")
    trigger.check(data.image_shape, data.num_classes)
    keep = non_target_mask(data.y, trigger.target)
    if not bool(keep.any()):
        raise DataError(f"{data.name}: every image is of target class {trigger.target}")
    x = trigger.apply(data.x[keep])
    y = torch.full((len(x),), trigger.target, dtype=torch.int64)
    return DataSplit(x, y, data.num_classes, f"{data.name}+trigger", data.class_names)
