"""Users' own data: arrays, IDX files, image folders, .npz/.npy files and torch datasets.

Every loader returns a :class:`~qcb_guard.data.datasets.DataSplit`. Files are treated as
untrusted: sizes declared in headers are checked against the bytes actually present (and
against ``max_bytes``) before anything is allocated, and nothing is ever unpickled.
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcb_guard.data.datasets import DATASETS, DataSplit, load_dataset
from qcb_guard.errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_BYTES",
    "from_arrays",
    "from_torch_dataset",
    "load_data",
    "load_idx",
    "load_image_folder",
    "load_npy",
    "load_npz",
    "read_idx",
    "read_npz_arrays",
]

#: Largest decoded size a file may declare (bytes); a hostile header cannot make us allocate more.
MAX_BYTES = 2 * 1024**3
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm")
LAYOUTS = ("auto", "NCHW", "NHWC")
_CHUNK = 1 << 20
# Deflate cannot expand data more than ~1,032×; a zip entry claiming more is lying.
_MAX_DEFLATE_RATIO = 1100


# --------------------------------------------------------------------------- arrays


def _to_numpy(a: Any, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} cannot be read as an array: {exc}") from exc
    if arr.dtype.hasobject:
        raise DataError(f"{what} must be numeric, got dtype {arr.dtype}")
    return arr


def _default_range(dtype: np.dtype, what: str) -> tuple[float, float]:
    if dtype == np.bool_:
        return 0.0, 1.0
    if dtype == np.uint8:
        return 0.0, 255.0
    if dtype == np.uint16:
        return 0.0, 65535.0
    if dtype.kind == "f":
        return 0.0, 1.0
    raise DataError(
        f"{what}: cannot tell the pixel range of dtype {dtype}; pass value_range=(low, high)"
    )


def _to_nchw(x: np.ndarray, layout: str, what: str) -> np.ndarray:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if x.ndim == 3:  # [N, H, W]: grey images
        return x[:, None, :, :]
    if x.ndim != 4:
        raise DataError(
            f"{what} must have shape [N, H, W], [N, C, H, W] or [N, H, W, C], got {x.shape}"
        )
    if layout == "auto":
        if x.shape[1] in (1, 3, 4):
            layout = "NCHW"
        elif x.shape[3] in (1, 3, 4):
            layout = "NHWC"
        else:
            raise DataError(
                f"{what}: cannot tell channels in shape {x.shape} (neither axis 1 nor axis 3 "
                "has 1, 3 or 4 entries); pass layout='NCHW' or 'NHWC'"
            )
    return x if layout == "NCHW" else x.transpose(0, 3, 1, 2)


def _scale(x: np.ndarray, value_range: tuple[float, float] | None, what: str) -> np.ndarray:
    lo, hi = _default_range(x.dtype, what) if value_range is None else value_range
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ConfigError(f"value_range must be (low, high) with low < high, got {value_range!r}")
    out = x.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{what} holds NaN or infinite values")
    if (lo, hi) != (0.0, 1.0):
        out = (out - np.float32(lo)) / np.float32(hi - lo)
    mn, mx = float(out.min()), float(out.max())
    tol = 1e-5  # rounding in a user's own normalisation, not a range error
    if mn < -tol or mx > 1 + tol:
        raise DataError(
            f"{what}: values span [{mn:g}, {mx:g}] after scaling from {(lo, hi)}, outside [0, 1]; "
            "pass value_range=(low, high) for data stored in another range"
        )
    return np.clip(out, 0.0, 1.0, out=out)


def _labels(y: Any, n: int, what: str) -> torch.Tensor:
    arr = _to_numpy(y, f"{what} labels")
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(
            f"{what}: labels must have shape [{n}] to match the images, got {arr.shape}"
        )
    if arr.dtype.kind not in "iu":
        raise DataError(f"{what}: labels must be integers, got dtype {arr.dtype}")
    if len(arr) and int(arr.min()) < 0:
        raise DataError(f"{what}: labels must be >= 0, got {int(arr.min())}")
    return torch.from_numpy(arr.astype(np.int64))


def from_arrays(
    x: Any,
    y: Any = None,
    *,
    layout: str = "auto",
    value_range: tuple[float, float] | None = None,
    num_classes: int | None = None,
    name: str = "arrays",
    class_names: Sequence[str] | None = None,
) -> DataSplit:
    """Images from numpy/torch arrays, in any common layout and dtype.

    :param x: [N, H, W], [N, C, H, W] or [N, H, W, C]; uint8 (0–255), uint16, bool or float
        already in [0, 1].
    :param y: optional integer labels [N].
    :param layout: ``"auto"`` reads channels from whichever of axis 1 / axis 3 has 1, 3 or 4
        entries (axis 1 wins a tie).
    :param value_range: (low, high) of the stored values, mapped onto [0, 1]; needed for
        integer dtypes other than uint8/uint16 and for floats stored as 0–255.
    """
    arr = _to_numpy(x, name)
    if arr.ndim >= 1 and arr.shape[0] == 0:
        raise DataError(f"{name} is empty (0 images)")
    images = _scale(_to_nchw(arr, layout, name), value_range, name)
    labels = None if y is None else _labels(y, len(images), name)
    return DataSplit(
        torch.from_numpy(np.ascontiguousarray(images)),
        labels,
        num_classes,
        name,
        None if class_names is None else tuple(class_names),
    )


# --------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_MAX_DIMS = 4


def _check_max_bytes(max_bytes: Any) -> int:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ConfigError(f"max_bytes must be a positive int, got {max_bytes!r}")
    return max_bytes


def _read_exact(fh: Any, n: int, path: Path, what: str) -> bytes:
    """Read n bytes in chunks, so a lying header costs no more memory than the real data."""
    chunks, got = [], 0
    while got < n:
        chunk = fh.read(min(_CHUNK, n - got))
        if not chunk:
            raise DataError(f"{path}: truncated {what}: expected {n} bytes, found {got}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_idx(path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES) -> np.ndarray:
    """One IDX array (the MNIST file format), gzip-compressed or not, validated.

    Checked: the magic number (two zero bytes, a known type code, 1–4 dimensions), that no
    dimension is zero, that the declared size is within ``max_bytes``, and that the file holds
    exactly the declared number of bytes.
    """
    path = Path(path)
    _check_max_bytes(max_bytes)
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            fh: Any = gzip.GzipFile(fileobj=raw) if gzipped else raw
            return _parse_idx(
                fh, path, max_bytes, None if gzipped else os.fstat(raw.fileno()).st_size
            )
    except FileNotFoundError as exc:
        raise DataError(f"IDX file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise DataError(f"IDX file {path} is a directory") from exc
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt gzip stream: {exc}") from exc


def _parse_idx(fh: Any, path: Path, max_bytes: int, file_size: int | None) -> np.ndarray:
    magic = _read_exact(fh, 4, path, "IDX header")
    code, ndim = magic[2], magic[3]
    if magic[:2] != b"\x00\x00" or code not in _IDX_DTYPES:
        raise DataError(
            f"{path}: not an IDX file (magic {magic.hex()}; expected 0000 then a type code in "
            f"{{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}})"
        )
    if not 1 <= ndim <= _IDX_MAX_DIMS:
        raise DataError(f"{path}: IDX declares {ndim} dimensions, expected 1 to {_IDX_MAX_DIMS}")
    raw_dims = _read_exact(fh, 4 * ndim, path, "IDX header")
    dims = tuple(int.from_bytes(raw_dims[i : i + 4], "big") for i in range(0, 4 * ndim, 4))
    dtype = np.dtype(_IDX_DTYPES[code])
    if 0 in dims:
        raise DataError(f"{path} is empty (dimensions {dims})")
    nbytes = math.prod(dims) * dtype.itemsize
    if nbytes > max_bytes:
        raise DataError(
            f"{path}: IDX declares {nbytes:,} bytes of data (dimensions {dims}), more than "
            f"max_bytes={max_bytes:,}"
        )
    header = 4 + 4 * ndim
    if file_size is not None and file_size != header + nbytes:
        state = "truncated" if file_size < header + nbytes else "longer than declared"
        raise DataError(
            f"{path}: {state}: dimensions {dims} need {header + nbytes:,} bytes, "
            f"file has {file_size:,}"
        )
    data = _read_exact(fh, nbytes, path, f"IDX data for dimensions {dims}")
    if fh.read(1):
        raise DataError(f"{path}: longer than declared: trailing bytes after dimensions {dims}")
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def load_idx(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str] | None = None,
    *,
    num_classes: int | None = None,
    value_range: tuple[float, float] | None = None,
    max_bytes: int = MAX_BYTES,
) -> DataSplit:
    """Images (IDX, [N, H, W] or [N, H, W, C]/[N, C, H, W]) and optional labels (IDX, [N])."""
    images = read_idx(images_path, max_bytes=max_bytes)
    name = Path(images_path).name
    if images.ndim not in (3, 4):
        raise DataError(f"{images_path}: image IDX must have 3 or 4 dimensions, got {images.shape}")
    labels = None
    if labels_path is not None:
        labels = read_idx(labels_path, max_bytes=max_bytes)
        if labels.ndim != 1:
            raise DataError(f"{labels_path}: label IDX must have 1 dimension, got {labels.shape}")
    return from_arrays(images, labels, value_range=value_range, num_classes=num_classes, name=name)


def _idx_labels_sibling(images_path: Path) -> Path | None:
    """MNIST naming: ``*-images-idx3-ubyte[.gz]`` sits next to ``*-labels-idx1-ubyte[.gz]``."""
    if "images-idx3" not in images_path.name:
        return None
    sibling = images_path.with_name(images_path.name.replace("images-idx3", "labels-idx1"))
    return sibling if sibling.is_file() else None


def _looks_like_idx(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as gz:
                head = gz.read(4)
        except (OSError, EOFError, zlib.error):
            return False
    return len(head) == 4 and head[:2] == b"\x00\x00" and head[2] in _IDX_DTYPES


# --------------------------------------------------------------------------- npz / npy


def _npy_header(fh: Any, where: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise DataError(f"{where}: unsupported .npy format version {version}")
    except ValueError as exc:
        raise DataError(f"{where}: not a valid .npy array: {exc}") from exc
    if dtype.hasobject:
        raise DataError(f"{where} holds Python objects (dtype {dtype}); refused, never unpickled")
    return tuple(int(d) for d in shape), dtype


def read_npz_arrays(
    path: str | os.PathLike[str],
    required: Sequence[str],
    optional: Sequence[str] = (),
    *,
    max_bytes: int = MAX_BYTES,
) -> dict[str, np.ndarray]:
    """Named arrays from a .npz, after checking each member's header against its real size.

    ``np.load`` allocates what an array header declares before reading; a hostile header could
    ask for terabytes. Each member's declared size must fit both the zip entry and
    ``max_bytes``, and the entry must not claim more than deflate can produce.
    """
    path = Path(path)
    _check_max_bytes(max_bytes)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    wanted = set(required) | set(optional)
    try:
        with zipfile.ZipFile(path) as zf:
            members = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
            missing = [k for k in required if k not in members]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {', '.join(missing)}; found "
                    f"{', '.join(sorted(members)) or 'none'}"
                )
            total = 0
            for key in sorted(wanted & members.keys()):
                info = members[key]
                if info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 4096:
                    raise DataError(f"{path}: array {key!r} declares an impossible size")
                with zf.open(info) as fh:
                    shape, dtype = _npy_header(fh, f"{path}[{key}]")
                    header_len = fh.tell()
                nbytes = math.prod(shape) * dtype.itemsize
                if header_len + nbytes != info.file_size:
                    raise DataError(
                        f"{path}: array {key!r} declares shape {shape} ({nbytes:,} bytes) but "
                        f"its entry holds {info.file_size - header_len:,} bytes"
                    )
                total += nbytes
                if total > max_bytes:
                    raise DataError(f"{path}: arrays exceed max_bytes={max_bytes:,}")
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in sorted(wanted & members.keys())}
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        zlib.error,
        OSError,
        EOFError,
        ValueError,
    ) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz archive: {exc}") from exc


def load_npz(
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    value_range: tuple[float, float] | None = None,
    max_bytes: int = MAX_BYTES,
) -> DataSplit:
    """A .npz with an ``x`` array of images and an optional ``y`` array of labels."""
    arrays = read_npz_arrays(path, ("x",), ("y",), max_bytes=max_bytes)
    return from_arrays(
        arrays["x"],
        arrays.get("y"),
        value_range=value_range,
        num_classes=num_classes,
        name=Path(path).name,
    )


def load_npy(
    path: str | os.PathLike[str],
    *,
    value_range: tuple[float, float] | None = None,
    max_bytes: int = MAX_BYTES,
) -> DataSplit:
    """A single .npy of images (unlabelled: calibration data)."""
    path = Path(path)
    _check_max_bytes(max_bytes)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    with open(path, "rb") as fh:
        shape, dtype = _npy_header(fh, str(path))
        header_len = fh.tell()
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise DataError(f"{path}: declares {nbytes:,} bytes, more than max_bytes={max_bytes:,}")
    if header_len + nbytes != path.stat().st_size:
        raise DataError(
            f"{path}: declares shape {shape} ({nbytes:,} bytes) but holds "
            f"{path.stat().st_size - header_len:,}"
        )
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array: {exc}") from exc
    return from_arrays(arr, value_range=value_range, name=path.name)


# --------------------------------------------------------------------------- image folders

_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B"})


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _check_size(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in pair):
        raise ConfigError(f"size must be a positive int or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


def _read_image(path: Path, size: tuple[int, int] | None, grey: bool) -> np.ndarray:
    """One image as float32 [C, H, W] in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if grey and img.mode in _WIDE_MODES:  # 16-bit grey: keep the depth, scale by 65535
                img, top = img.convert("I"), 65535.0
            else:
                img, top = img.convert("L" if grey else "RGB"), 255.0
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / np.float32(top)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    arr = np.clip(arr, 0.0, 1.0)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _image_is_grey(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.mode in _GREY_MODES
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def load_image_folder(
    root: str | os.PathLike[str],
    size: int | tuple[int, int] | None = None,
    grayscale: bool | None = None,
    *,
    limit: int | None = None,
    max_bytes: int = MAX_BYTES,
) -> DataSplit:
    """Images laid out one sub-folder per class (``root/<class>/*.png``), classes in name order.

    A folder with images and no sub-folders gives unlabelled data. ``size`` resizes every image
    (int or (height, width)); without it all images must share one size. ``grayscale=None``
    keeps one channel when every image is grey, else converts all to RGB.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    hw = _check_size(size)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive int or None, got {limit!r}")
    _check_max_bytes(max_bytes)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files, labels = [], []
        for index, cls in enumerate(classes):
            found = _image_files(root / cls)
            if not found:
                raise DataError(
                    f"class folder {root / cls} is empty (no {'/'.join(IMAGE_EXTENSIONS)})"
                )
            files += found
            labels += [index] * len(found)
    else:
        files, labels = _image_files(root), []
    if not files:
        raise DataError(f"image folder {root} is empty (no {'/'.join(IMAGE_EXTENSIONS)} files)")
    if limit is not None and limit < len(files):  # spread over classes, not the first class only
        keep = np.sort(np.random.default_rng(0).permutation(len(files))[:limit])
        files = [files[i] for i in keep]
        labels = [labels[i] for i in keep] if labels else []
    grey = all(_image_is_grey(f) for f in files) if grayscale is None else bool(grayscale)
    first = _read_image(files[0], hw, grey)
    if len(files) * first.nbytes > max_bytes:
        raise DataError(
            f"image folder {root}: {len(files)} images of shape {first.shape} exceed "
            f"max_bytes={max_bytes:,}; pass size= or limit="
        )
    images = np.empty((len(files), *first.shape), dtype=np.float32)
    images[0] = first
    for i, path in enumerate(files[1:], start=1):
        arr = _read_image(path, hw, grey)
        if arr.shape != first.shape:
            raise DataError(
                f"image {path} has shape {arr.shape[1:]}, {files[0]} has {first.shape[1:]}; "
                "pass size=(height, width) to resize all images"
            )
        images[i] = arr
    y = torch.tensor(labels, dtype=torch.int64) if classes else None
    return DataSplit(
        torch.from_numpy(images),
        y,
        len(classes) if classes else None,
        root.name,
        tuple(classes) if classes else None,
    )


# --------------------------------------------------------------------------- torch datasets


def _split_item(item: Any) -> tuple[Any, Any]:
    if isinstance(item, dict):
        x = next((item[k] for k in ("image", "img", "x", "pixel_values") if k in item), None)
        if x is None:
            raise DataError(f"dataset item dict has no image key; keys: {sorted(item)}")
        return x, next((item[k] for k in ("label", "labels", "y", "target") if k in item), None)
    if isinstance(item, (tuple, list)):
        if not item:
            raise DataError("dataset item is an empty tuple")
        return item[0], item[1] if len(item) > 1 else None
    return item, None


def _item_image(x: Any) -> np.ndarray:
    if hasattr(x, "getbands") and hasattr(x, "mode"):  # a PIL image, without importing PIL
        arr = np.asarray(x.convert("RGB") if x.mode not in ("L", "RGB") else x)
        return arr.transpose(2, 0, 1) if arr.ndim == 3 else arr  # PIL is HWC: make it CHW
    return _to_numpy(x, "dataset image")


def _item_label(y: Any) -> int:
    arr = _to_numpy(y, "dataset label")
    if arr.size != 1 or arr.dtype.kind not in "iub":
        raise DataError(f"dataset label must be one integer, got {y!r}")
    return int(arr.reshape(()))


def from_torch_dataset(
    ds: Any,
    limit: int | None = None,
    *,
    num_classes: int | None = None,
    value_range: tuple[float, float] | None = None,
    name: str | None = None,
) -> DataSplit:
    """Materialise a map-style or iterable torch Dataset (or any iterable of samples).

    Items may be ``(image, label)``, ``image`` alone, or a dict with ``image``/``label`` keys;
    images may be tensors, arrays or PIL images. A ``classes`` attribute (torchvision
    convention) names the classes.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive int or None, got {limit!r}")
    name = name or type(ds).__name__
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        n = len(ds) if limit is None else min(len(ds), limit)
        items: Iterable[Any] = (ds[i] for i in range(n))
    elif isinstance(ds, Iterable):
        items = islice(iter(ds), limit)
    else:
        raise DataError(f"{name}: expected a torch Dataset or an iterable, got {type(ds).__name__}")
    xs, ys = [], []
    for item in items:
        x, y = _split_item(item)
        xs.append(_item_image(x))
        ys.append(None if y is None else _item_label(y))
    if not xs:
        raise DataError(f"{name} is empty (0 samples)")
    if any(y is None for y in ys) and not all(y is None for y in ys):
        raise DataError(f"{name}: some samples have labels and some do not")
    shapes = {a.shape for a in xs}
    if len(shapes) != 1:
        raise DataError(f"{name}: images differ in shape: {sorted(shapes)[:3]}")
    stacked = np.stack(xs)
    if stacked.ndim == 2:
        raise DataError(f"{name}: samples must be images, got 1-D samples of shape {xs[0].shape}")
    classes = getattr(ds, "classes", None)
    class_names = tuple(str(c) for c in classes) if isinstance(classes, (list, tuple)) else None
    if class_names and num_classes is None:
        num_classes = len(class_names)
    return from_arrays(
        stacked,
        None if ys[0] is None else np.asarray(ys, dtype=np.int64),
        value_range=value_range,
        num_classes=num_classes,
        name=name,
        class_names=class_names if class_names and len(class_names) == num_classes else None,
    )


# --------------------------------------------------------------------------- one entry point

_SPLITS = ("train", "test")


def _builtin(spec: str) -> tuple[str, str | None] | None:
    name, _, split = spec.partition(":")
    return (name, split or None) if name in DATASETS else None


def load_data(
    spec: str | os.PathLike[str] | DataSplit,
    *,
    split: str = "train",
    seed: int = 0,
    limit: int | None = None,
    labels: str | os.PathLike[str] | None = None,
    max_bytes: int = MAX_BYTES,
) -> DataSplit:
    """Whatever the CLI's ``--data`` names, as a DataSplit.

    :param spec: a built-in name (``digits``, ``mnist5k``, optionally ``:train``/``:test``), a
        folder of images, a ``.npz`` (arrays ``x``, optional ``y``), a ``.npy`` or an IDX file
        (gzip or not; MNIST-named label files next to it are found automatically). An existing
        path wins over a built-in name.
    :param split: which half of a built-in set, when the spec does not say.
    :param limit: keep at most this many images.
    :param labels: an IDX label file for an IDX image file.
    """
    if isinstance(spec, DataSplit):
        return spec.head(limit)
    if not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"--data must be a name or a path, got {type(spec).__name__}")
    path = Path(spec)
    builtin = None if path.exists() else _builtin(str(spec))
    if builtin is not None:
        name, part = builtin
        part = part or split
        if part not in _SPLITS:
            raise ConfigError(f"split must be one of {', '.join(_SPLITS)}, got {part!r}")
        return getattr(load_dataset(name, seed=seed), part).head(limit)
    if not path.exists():
        raise DataError(
            f"unknown data {str(spec)!r}: not a built-in data set ({', '.join(sorted(DATASETS))}) "
            "and no such file or folder"
        )
    if path.is_dir():
        return load_image_folder(path, limit=limit, max_bytes=max_bytes)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        data = load_npz(path, max_bytes=max_bytes)
    elif suffix == ".npy":
        data = load_npy(path, max_bytes=max_bytes)
    elif _looks_like_idx(path):
        data = load_idx(path, labels or _idx_labels_sibling(path), max_bytes=max_bytes)
    else:
        raise DataError(
            f"cannot read {path}: expected a folder of images, a .npz, a .npy or an IDX file"
        )
    return data.head(limit)
