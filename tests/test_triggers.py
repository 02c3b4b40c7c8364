"""Backdoor triggers, poisoning and trigger files (qcb_guard.data.triggers)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcb_guard.data import (
    POSITIONS,
    TRIGGERS,
    DataSplit,
    Trigger,
    blended,
    checkerboard,
    from_mask_pattern,
    make_trigger,
    non_target_mask,
    poison,
    poison_split,
    square,
    triggered_split,
)
from qcb_guard.errors import ConfigError, DataError


def box(trigger: Trigger) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) inclusive bounds of the trigger's mask."""
    rows, cols = np.nonzero(trigger.mask.max(axis=0))
    return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((1, 8, 8), (7, 7, 7, 7)),  # side 8//8 = 1, margin 8//32 = 0
        ((1, 28, 28), (25, 25, 27, 27)),  # side 3, margin 0
        ((3, 32, 32), (27, 27, 30, 30)),  # side 4, margin 1 (Qu-ANTI-zation's CIFAR trigger)
    ],
)
def test_square_defaults_match_qu_anti_zation(shape, expected) -> None:
    t = square(shape)
    assert box(t) == expected
    assert t.target == 0 and t.name == "square"
    assert np.all(t.pattern[t.mask > 0] == 1.0) and set(np.unique(t.mask)) == {0.0, 1.0}
    assert t.mask.shape == shape and t.mask.dtype == np.float32


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        ("top-left", (0, 0, 2, 2)),
        ("top-right", (0, 7, 2, 9)),
        ("bottom-left", (5, 0, 7, 2)),
        ("bottom-right", (5, 7, 7, 9)),
        ("center", (2, 3, 4, 5)),
        ((1, 4), (1, 4, 3, 6)),
    ],
)
def test_square_positions(position, expected) -> None:
    assert box(square((1, 8, 10), size=3, position=position, margin=0)) == expected


def test_square_margin_and_colour() -> None:
    t = square((3, 16, 16), size=2, position="top-left", margin=2, value=(1.0, 0.5, 0.0))
    assert box(t) == (2, 2, 3, 3)
    assert t.pattern[:, 2, 2].tolist() == [1.0, 0.5, 0.0]
    assert square((10, 12), size=2).image_shape == (1, 10, 12)


def test_checkerboard_pattern() -> None:
    t = checkerboard((1, 8, 8), size=4, position="top-left", margin=0)
    assert t.pattern[0, :4, :4].tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]] * 2
    t2 = checkerboard((1, 8, 8), size=4, position="top-left", margin=0, cell=2, low=0.2)
    assert np.allclose(t2.pattern[0, 0, :4], [1, 1, 0.2, 0.2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 9}, r"size 9 is larger than the 8×8 image"),
        ({"size": 0}, "size must be a positive int"),
        ({"size": -2}, "size must be a positive int"),
        ({"size": 2.5}, "size must be a positive int"),
        ({"size": 3, "position": (6, 0)}, r"does not fit in a 8×8 image"),
        ({"size": 3, "position": (-1, 0)}, "does not fit"),
        ({"size": 3, "position": "middle"}, "position must be one of"),
        ({"size": 3, "position": (1,)}, r"\(row, col\)"),
        ({"size": 6, "margin": 3}, "with margin 3"),
        ({"margin": -1}, "margin must be an int >= 0"),
        ({"value": 1.5}, r"trigger value must be in \[0, 1\]"),
        ({"value": (1.0, 0.0)}, "1 or 1 entries"),
        ({"target": 10, "num_classes": 10}, r"target must be in \[0, 10\), got 10"),
        ({"target": -1}, "target must be a class index >= 0"),
    ],
)
def test_square_validation(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        square((1, 8, 8), **kwargs)


@pytest.mark.parametrize("shape", [(8,), (0, 8, 8), (1, 8, 8, 8), "abc", None, (1.0, 8, 8)])
def test_bad_image_shape(shape) -> None:
    with pytest.raises(ConfigError, match="image_shape must be"):
        square(shape)


def test_checkerboard_validation() -> None:
    with pytest.raises(ConfigError, match="cell must be a positive int"):
        checkerboard((1, 8, 8), cell=0)
    with pytest.raises(ConfigError, match="low and high must differ"):
        checkerboard((1, 8, 8), low=0.5, high=0.5)


# --------------------------------------------------------------------------- custom triggers


def test_from_mask_pattern_broadcasts_mask() -> None:
    mask = np.zeros((4, 4), np.float32)
    mask[0, 0] = 1.0
    t = from_mask_pattern(mask, np.full((3, 4, 4), 0.5, np.float32), target=2, num_classes=3)
    assert t.mask.shape == (3, 4, 4) and t.mask[:, 0, 0].tolist() == [1.0] * 3
    assert from_mask_pattern(torch.ones(1, 4, 4), torch.zeros(1, 4, 4)).image_shape == (1, 4, 4)


@pytest.mark.parametrize(
    ("mask", "pattern", "match"),
    [
        (np.ones((1, 4, 4)), np.ones((1, 5, 5)), "does not match pattern shape"),
        (np.ones((2, 4, 4)), np.ones((3, 4, 4)), "does not match pattern shape"),
        (np.ones((1, 4, 4)) * 2, np.ones((1, 4, 4)), r"mask values must lie in \[0, 1\]"),
        (np.ones((1, 4, 4)), -np.ones((1, 4, 4)), r"pattern values must lie in \[0, 1\]"),
        (np.zeros((1, 4, 4)), np.ones((1, 4, 4)), "all zero"),
        (np.full((1, 4, 4), np.nan), np.ones((1, 4, 4)), "NaN"),
        (np.ones(4), np.ones(4), r"shape \[C, H, W\]"),
    ],
)
def test_from_mask_pattern_validation(mask, pattern, match) -> None:
    with pytest.raises(ConfigError, match=match):
        from_mask_pattern(mask, pattern)


def test_blended() -> None:
    pattern = np.random.default_rng(0).random((1, 4, 4)).astype(np.float32)
    t = blended(pattern, 0.25, target=1)
    x = torch.rand(2, 1, 4, 4)
    expected = 0.75 * x + 0.25 * torch.from_numpy(pattern)
    assert torch.allclose(t.apply(x), expected, atol=1e-6)
    for alpha in (0.0, -0.1, 1.5, "0.5"):
        with pytest.raises(ConfigError, match="alpha"):
            blended(pattern, alpha)


def test_make_trigger_dispatch() -> None:
    assert set(TRIGGERS) == {"square", "checkerboard", "blended"}
    assert box(make_trigger("square", (1, 28, 28))) == box(square((1, 28, 28)))
    assert make_trigger("checkerboard", (1, 8, 8), size=2).name == "checkerboard"
    a = make_trigger("blended", (3, 4, 4), alpha=0.1, seed=3)
    b = make_trigger("blended", (3, 4, 4), alpha=0.1, seed=3)
    assert a.equals(b) and not a.equals(make_trigger("blended", (3, 4, 4), seed=4))
    with pytest.raises(ConfigError, match="unknown trigger kind 'star'; known: square"):
        make_trigger("star", (1, 8, 8))
    with pytest.raises(ConfigError, match=r"unknown option.*sise.*allowed: size"):
        make_trigger("square", (1, 8, 8), sise=2)
    with pytest.raises(ConfigError, match="trigger is for images"):
        make_trigger("blended", (1, 4, 4), pattern=np.zeros((1, 5, 5)))


# --------------------------------------------------------------------------- apply


def test_apply_batch_single_numpy_torch() -> None:
    t = square((1, 8, 8), size=2)
    x = torch.rand(3, 1, 8, 8) * 0.5
    out = t.apply(x)
    assert torch.all(out[:, :, 6:, 6:] == 1.0)
    assert torch.equal(out[:, :, :6], x[:, :, :6]) and torch.equal(x, x.clone())
    assert torch.equal(t(x[0]), out[0])
    np_out = t.apply(x.numpy())
    assert isinstance(np_out, np.ndarray) and np.allclose(np_out, out.numpy())
    assert t.apply(x.double()).dtype == torch.float64


def test_apply_errors() -> None:
    t = square((1, 8, 8))
    with pytest.raises(ConfigError, match=r"trigger is for images \(1, 8, 8\)"):
        t.apply(torch.rand(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="trigger is for images"):
        t.apply(torch.rand(2, 2, 1, 8, 8))
    with pytest.raises(DataError, match="floating point"):
        t.apply(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ConfigError, match=r"data has \(3, 8, 8\)"):
        t.check((3, 8, 8))
    with pytest.raises(ConfigError, match=r"target must be in \[0, 1\)"):
        square((1, 8, 8), target=1).check(num_classes=1)


@settings(max_examples=30, deadline=None)
@given(
    alpha=st.floats(0.01, 1.0),
    size=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_apply_stays_in_range_and_leaves_unmasked_pixels(alpha, size, seed) -> None:
    rng = np.random.default_rng(seed)
    mask = np.zeros((2, 6, 6), np.float32)
    mask[:, :size, :size] = alpha
    t = from_mask_pattern(mask, rng.random((2, 6, 6)).astype(np.float32))
    x = rng.random((4, 2, 6, 6)).astype(np.float32)
    out = t.apply(x)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.array_equal(out[:, :, size:, :], x[:, :, size:, :])


# --------------------------------------------------------------------------- files


def test_npz_round_trip(tmp_path: Path) -> None:
    t = checkerboard((3, 8, 8), size=3, target=4)
    path = t.save_npz(tmp_path / "trig.npz")
    loaded = Trigger.load_npz(path)
    assert loaded.equals(t) and loaded.name == "checkerboard" and loaded.target == 4
    square((3, 8, 8)).save_npz(path)  # overwrite in place
    assert Trigger.load_npz(path).name == "square"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trig.npz"]  # no temp files left
    with pytest.raises(ConfigError, match="does not exist"):
        t.save_npz(tmp_path / "missing" / "t.npz")


def test_npz_load_validates(tmp_path: Path) -> None:
    ok = {"mask": np.ones((1, 2, 2), np.float32), "pattern": np.ones((1, 2, 2), np.float32)}
    cases = {
        "range": (
            {**ok, "mask": np.full((1, 2, 2), 2.0, np.float32), "target": 0},
            "in \\[0, 1\\]",
        ),
        "shape": ({**ok, "pattern": np.ones((1, 3, 3), np.float32), "target": 0}, "does not match"),
        "dtype": ({**ok, "mask": np.ones((1, 2, 2), np.uint8), "target": 0}, "float array"),
        "target": ({**ok, "target": np.array([1, 2])}, "target must be one integer"),
        "negative": ({**ok, "target": -3}, "target must be a class index"),
        "missing": (ok, "missing array.*target"),
        "pickle": ({**ok, "target": np.array([None], dtype=object)}, "never unpickled"),
    }
    for name, (arrays, match) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(DataError, match=match):
            Trigger.load_npz(path)
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(DataError, match="missing array"):
        Trigger.load_npz(tmp_path / "empty.npz")


# --------------------------------------------------------------------------- poisoning


def test_poison_torch() -> None:
    x, y = torch.rand(100, 1, 8, 8) * 0.5, torch.arange(100) % 10
    t = square((1, 8, 8), target=3)
    out = poison(x, y, t, 0.1, seed=1)
    assert len(out.indices) == 10 and out.indices.dtype == torch.int64
    assert torch.all(y[out.indices] != 3) and torch.all(out.y[out.indices] == 3)
    assert torch.all(out.x[out.indices, :, 7, 7] == 1.0)
    changed = torch.zeros(100, dtype=torch.bool)
    changed[out.indices] = True
    assert torch.equal(out.x[~changed], x[~changed]) and torch.equal(out.y[~changed], y[~changed])
    assert float(x[:, :, 7, 7].max()) <= 0.5  # input untouched
    again = poison(x, y, t, 0.1, seed=1)
    assert torch.equal(again.indices, out.indices)
    assert not torch.equal(poison(x, y, t, 0.1, seed=2).indices, out.indices)


def test_poison_numpy_and_errors() -> None:
    x, y = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32), np.arange(20) % 2
    t = square((1, 8, 8), target=0)
    out = poison(x, y, t, 0.25)
    assert (
        isinstance(out.x, np.ndarray) and len(out.indices) == 5 and np.all(out.y[out.indices] == 0)
    )
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"poison fraction must be in \(0, 1\]"):
            poison(x, y, t, fraction)
    with pytest.raises(ConfigError, match="only 10 are not of target class 0"):
        poison(x, y, t, 0.75)
    assert len(poison(x, y, t, 0.75, exclude_target=False).indices) == 15
    with pytest.raises(DataError, match="20 rows but y has 3"):
        poison(x, y[:3], t, 0.1)
    with pytest.raises(DataError, match="1-D integer"):
        poison(x, y.astype(float), t, 0.1)


def test_non_target_mask_and_splits() -> None:
    y = torch.tensor([0, 1, 2, 0])
    assert non_target_mask(y, 0).tolist() == [False, True, True, False]
    assert non_target_mask(np.array([1, 1]), 1).tolist() == [False, False]
    data = DataSplit(torch.rand(40, 1, 8, 8), torch.arange(40) % 4, 4, "toy")
    t = square((1, 8, 8), target=1)
    trig = triggered_split(data, t)
    assert len(trig) == 30 and torch.all(trig.y == 1) and torch.all(trig.x[:, :, 7, 7] == 1.0)
    pois = poison_split(data, t, 0.1)
    assert pois.name == "toy+poison" and int((pois.y != data.y).sum()) == 4
    with pytest.raises(ConfigError, match=r"target must be in \[0, 4\)"):
        triggered_split(data, square((1, 8, 8), target=4))
    with pytest.raises(DataError, match="needs labels"):
        poison_split(DataSplit(data.x), t, 0.1)
    with pytest.raises(DataError, match="every image is of target class"):
        triggered_split(DataSplit(data.x[:1], torch.tensor([1]), 4), t)


def test_positions_constant() -> None:
    for position in POSITIONS:
        square((1, 8, 8), size=2, position=position)
