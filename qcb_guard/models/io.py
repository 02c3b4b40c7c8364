"""Safe model persistence: safetensors out; safetensors or weights-only zip checkpoints in.

Model files are attack surface in this project (a QCB arrives as a downloaded checkpoint), so
reading never runs a pickle: raw/legacy pickles are refused by their magic bytes before torch
sees them, zip checkpoints go through ``torch.load(weights_only=True)``, and every tensor is
checked (dtype, finite values, declared sizes) before a model is built from it.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcb_guard.errors import ConfigError, ModelFileError, UnsafeFileError
from qcb_guard.models.zoo import build_model, canonical_arch

FORMAT = "qcb_guard.model/1"
META_KEY = "qcb_guard"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
# bytes per element for each safetensors dtype tag (F4/F6 pack two elements per byte).
# fmt: off
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
# fmt: on
State = dict[str, Tensor]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of weights (parameter elements), optionally only those that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------
# tensor checks shared by saving and loading


def tensor_problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be a stored weight, or None if it can."""
    if not isinstance(value, Tensor):
        return f"{name!r} is a {type(value).__name__}, not a tensor"
    if value.is_quantized:
        return f"{name!r} is a quantized tensor ({value.dtype}); store the float model"
    if not (value.is_floating_point() or value.dtype == torch.bool or is_integer(value)):
        return f"{name!r} has unsupported dtype {value.dtype} (need floating or integer)"
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        return f"{name!r} has {bad} non-finite value(s) (NaN or inf)"
    return None


def is_integer(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def check_state(state: Mapping[str, Any], error: type[Exception], where: str) -> None:
    """Raise ``error`` naming the first tensor that is not a finite float/int weight."""
    for name, value in state.items():
        if not isinstance(name, str):
            raise error(f"{where}: state key {name!r} is not a string")
        problem = tensor_problem(name, value)
        if problem:
            raise error(f"{where}: {problem}")


# ---------------------------------------------------------------------------------------------
# saving


def infer_dims(state: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
    """(in_channels, num_classes) from the first conv kernel and the last matrix, if any."""
    convs = [t for t in state.values() if t.ndim == 4]
    mats = [t for t in state.values() if t.ndim == 2]
    return (int(convs[0].shape[1]) if convs else None, int(mats[-1].shape[0]) if mats else None)


def build_metadata(
    model: nn.Module, state: State, arch: str | None, config: Mapping[str, Any] | None
) -> dict[str, str]:
    """The JSON record that lets ``load_model`` rebuild the architecture."""
    from qcb_guard import __version__

    guess_in, guess_classes = infer_dims(state)
    record = {
        "format": FORMAT,
        "arch": arch if arch is not None else getattr(model, "qcb_arch", None),
        "in_channels": getattr(model, "in_channels", guess_in),
        "num_classes": getattr(model, "num_classes", guess_classes),
        "config": dict(config if config is not None else getattr(model, "qcb_config", {})),
        "qcb_guard_version": __version__,
    }
    try:
        return {META_KEY: json.dumps(record, sort_keys=True)}
    except TypeError as exc:
        raise ConfigError(f"model config must be JSON-serialisable: {exc}") from exc


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the state dict and a rebuild record to ``path`` (.safetensors), atomically.

    The file appears complete or not at all (temp file in the same folder, then
    ``os.replace``), so an interrupted save never leaves a truncated model behind.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"save_model writes safetensors: use a .safetensors path, got {path}")
    raw = model.state_dict()
    check_state(raw, ConfigError, f"cannot save {path.name}")
    # Clones drop shared storage (safetensors refuses aliased tensors) and views' strides.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in raw.items()}
    metadata = build_metadata(model, state, arch, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        # mkstemp makes the file 0600; keep an overwritten file's mode, else the usual 0644.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------
# reading safetensors


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and bounds-check the header so that a lying file fails before any allocation."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ModelFileError(f"{path}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ModelFileError(
                f"{path}: header claims {n} bytes but the file has {size - 8} after the prefix "
                "(truncated or corrupt)"
            )
        blob = fh.read(n)
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    check_declared_sizes(path, header, size - 8 - n)
    return header, metadata


def check_declared_sizes(path: Path, header: Mapping[str, Any], data_len: int) -> None:
    """Every tensor's dtype, shape and byte range must agree with each other and the file."""
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape_ok = all(isinstance(d, int) and d >= 0 for d in shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: malformed header entry for {name!r}") from exc
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise ModelFileError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not shape_ok or not (isinstance(begin, int) and isinstance(end, int)):
            raise ModelFileError(f"{path}: tensor {name!r} has a malformed shape or offsets")
        numel = 1
        for d in shape:
            numel *= d
        need = numel * SAFETENSORS_ITEMSIZE[dtype]
        if not 0 <= begin <= end <= data_len or end - begin != need:
            raise ModelFileError(
                f"{path}: tensor {name!r} declares shape {tuple(shape)} {dtype} ({need} bytes at "
                f"[{begin}, {end})) but the file holds {data_len} data bytes (truncated or corrupt)"
            )


def parse_metadata(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """Our JSON record if present, else the file's raw string metadata."""
    if META_KEY not in metadata:
        return dict(metadata)
    try:
        record = json.loads(metadata[META_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: qcb_guard metadata is not valid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise ModelFileError(f"{path}: qcb_guard metadata is not a JSON object")
    return record


def load_safetensors(path: Path) -> tuple[State, dict[str, Any]]:
    from safetensors.torch import load_file

    _, metadata = read_safetensors_header(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(f"{path}: cannot read safetensors file: {exc}") from exc
    return state, parse_metadata(path, metadata)


# ---------------------------------------------------------------------------------------------
# reading torch checkpoints


def extract_state(path: Path, obj: Any) -> State:
    """The state dict inside a checkpoint: the object itself or a common wrapper key."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return extract_state(path, obj[key])
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            state = dict(obj)
            if all(isinstance(k, str) and k.startswith("module.") for k in state):
                state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel
            return state
        keys = ", ".join(map(repr, list(obj)[:8]))
        raise ModelFileError(f"{path}: no state dict of tensors in checkpoint (keys: {keys})")
    raise ModelFileError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state dict")


def load_torch_checkpoint(path: Path) -> State:
    """A zip-format checkpoint through the weights-only unpickler; anything else is refused."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if len(magic) < 4:
        raise ModelFileError(f"{path}: file is empty or truncated ({len(magic)} bytes)")
    if magic != ZIP_MAGIC:
        kind = "a raw or legacy pickle" if magic[0] == PICKLE_PROTO else "not a zip checkpoint"
        raise UnsafeFileError(
            f"refusing to unpickle {path}: {kind}, which can run arbitrary code when loaded; "
            "only zip-format torch checkpoints (read weights-only) and .safetensors are accepted"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"refusing to unpickle {path}: it needs objects beyond plain tensors and containers "
            f"({str(exc).splitlines()[0]})"
        ) from exc
    except Exception as exc:
        raise ModelFileError(f"{path}: cannot read torch checkpoint: {exc}") from exc
    return extract_state(path, obj)


# ---------------------------------------------------------------------------------------------
# public loading API


def load_state(path: str | os.PathLike[str]) -> tuple[State, dict[str, Any]]:
    """Read and validate a model file: (state_dict, metadata); never runs a pickle.

    Metadata is the record ``save_model`` wrote (arch, in_channels, num_classes, config,
    version), a foreign safetensors file's own string metadata, or ``{}`` for checkpoints.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state, metadata = load_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        state, metadata = load_torch_checkpoint(path), {}
    else:
        known = ", ".join((".safetensors", *TORCH_SUFFIXES))
        raise ModelFileError(f"{path}: unsupported model file type {suffix!r} (known: {known})")
    check_state(state, ModelFileError, str(path))
    return state, metadata


def few(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def mismatch_message(path: Path, arch: str, expected: State, found: State) -> str | None:
    """Name missing/unexpected keys and shape mismatches between model and file, or None."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k!r} has shape {tuple(found[k].shape)} in the file but {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = shapes[:5]
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    return f"{path} does not match architecture {arch!r}: " + "; ".join(parts)


def load_model(path: str | os.PathLike[str], arch: str | None = None, **kw: Any) -> nn.Module:
    """Rebuild a model from a file (eval mode); ``arch`` and ``kw`` override the metadata.

    ``kw`` may hold ``in_channels``, ``num_classes`` and constructor keywords; missing
    dimensions are inferred from the weights (first conv, last linear layer).
    """
    path = Path(path)
    state, meta = load_state(path)
    recorded = meta.get("arch")
    arch = arch or recorded
    if not arch:
        raise ModelFileError(f"{path} records no architecture: pass arch=... to load_model")
    guess_in, guess_classes = infer_dims(state)
    in_channels = kw.pop("in_channels", None) or meta.get("in_channels") or guess_in
    num_classes = kw.pop("num_classes", None) or meta.get("num_classes") or guess_classes
    if in_channels is None or num_classes is None:
        raise ModelFileError(f"{path}: cannot tell in_channels/num_classes; pass them explicitly")
    same_arch = recorded is not None and canonical_arch(arch) == canonical_arch(recorded)
    config = dict(meta.get("config") or {}) if same_arch else {}
    config.update(kw)
    model = build_model(arch, int(in_channels), int(num_classes), **config)
    problem = mismatch_message(path, arch, model.state_dict(), state)
    if problem:
        raise ModelFileError(problem)
    model.load_state_dict(state, strict=True)
    return model.eval()
