"""Safe persistence: exact round trips, atomic writes, and refusal of unsafe or broken files."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qcb_guard import __version__
from qcb_guard.errors import ConfigError, ModelFileError, UnsafeFileError
from qcb_guard.models import (
    SmallCNN,
    build_model,
    count_parameters,
    load_model,
    load_state,
    save_model,
)
from qcb_guard.models import io as model_io


def trained_like(arch: str, channels: int = 1, **kw) -> torch.nn.Module:
    """A model whose BN statistics and counters are not at their defaults."""
    torch.manual_seed(0)
    model = build_model(arch, channels, 10, **kw)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, channels, 8, 8))
    return model.eval()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


class Payload:
    """Unpickling this runs code that creates ``marker``: the attack a model file can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize(
    ("arch", "kw"), [("smallcnn_bn", {}), ("resnet18", {"width": 0.125}), ("mobilenet_v2", {})]
)
def test_round_trip_is_bit_exact(tmp_path: Path, arch: str, kw: dict) -> None:
    model = trained_like(arch, **kw)
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert_same_state(model, loaded)
    assert type(loaded) is type(model) and not loaded.training
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    _, meta = load_state(path)
    assert meta["arch"] == arch and meta["config"] == kw
    assert (meta["in_channels"], meta["num_classes"]) == (1, 10)
    assert meta["qcb_guard_version"] == __version__
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
    assert path.stat().st_mode & 0o777 == 0o644


def test_plain_model_needs_arch_at_save_or_load(tmp_path: Path) -> None:
    model = SmallCNN(1, 10, hidden=32)
    bare = save_model(model, tmp_path / "bare.safetensors")
    with pytest.raises(ModelFileError, match="records no architecture: pass arch="):
        load_model(bare)
    assert_same_state(model, load_model(bare, arch="smallcnn", hidden=32))
    named = save_model(
        model, tmp_path / "named.safetensors", arch="smallcnn", config={"hidden": 32}
    )
    assert_same_state(model, load_model(named))


def test_overwrite_is_atomic_and_failed_save_keeps_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "sub" / "m.safetensors"
    first = trained_like("smallcnn")
    save_model(first, path)
    save_model(first, path)  # overwriting works

    def crash(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(build_model("smallcnn", 1, 10), path)
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]
    assert_same_state(first, load_model(path))


def test_save_rejects_bad_path_and_bad_tensors(tmp_path: Path) -> None:
    model = build_model("smallcnn", 1, 10)
    with pytest.raises(ConfigError, match=r"\.safetensors path"):
        save_model(model, tmp_path / "m.pt")
    with torch.no_grad():
        model.classifier[1].weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"'classifier.1.weight' has 1 non-finite"):
        save_model(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_zip_checkpoints_load_weights_only(tmp_path: Path) -> None:
    model = trained_like("smallcnn_bn")
    state = model.state_dict()
    variants = {
        "plain.pt": state,
        "wrapped.pth": {"epoch": 3, "state_dict": state},
        "dataparallel.bin": {f"module.{k}": v for k, v in state.items()},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        loaded = load_model(tmp_path / name, arch="smallcnn_bn")
        assert_same_state(model, loaded)
        assert load_state(tmp_path / name)[1] == {}


def test_count_parameters() -> None:
    model = SmallCNN(1, 10)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.features[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 144


# ---------------------------------------------------------------------------------------------
# refusing pickles without running them


def test_payload_is_real(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "pwned"  # so the refusals below prove something


@pytest.mark.parametrize("kind", ["raw", "legacy", "zip"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "ran"
    obj = {"weight": torch.zeros(2), "evil": Payload(marker)}
    path = tmp_path / "model.pt"
    if kind == "raw":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=kind == "zip")
    with pytest.raises(UnsafeFileError, match="refusing to unpickle"):
        load_state(path)
    with pytest.raises(UnsafeFileError, match="refusing to unpickle"):
        load_model(path, arch="smallcnn")
    assert not marker.exists()


def test_legacy_checkpoint_of_plain_tensors_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    torch.save(SmallCNN().state_dict(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError, match="raw or legacy pickle"):
        load_state(path)


# ---------------------------------------------------------------------------------------------
# broken files


def write_header(path: Path, header: dict, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = save_model(trained_like("smallcnn"), tmp_path / "m.safetensors")
    raw = path.read_bytes()
    for cut in (len(raw) - 100, 200, 5):
        path.write_bytes(raw[:cut])
        with pytest.raises(ModelFileError, match="truncated"):
            load_model(path)


def test_absurd_declared_sizes_fail_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    # A header claiming a 4 TB tensor backed by 16 bytes.
    huge = {"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}
    write_header(path, huge, b"\0" * 16)
    with pytest.raises(ModelFileError, match=r"'w' declares shape \(1000000000000,\)"):
        load_state(path)
    # A length prefix claiming an exabyte of header.
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ModelFileError, match="header claims"):
        load_state(path)
    # Shape and byte range that disagree.
    write_header(path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(ModelFileError, match="'w' declares shape"):
        load_state(path)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (struct.pack("<Q", 3) + b"{x}", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (b"", "truncated"),
    ],
)
def test_garbage_headers(tmp_path: Path, payload: bytes, match: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(payload)
    with pytest.raises(ModelFileError, match=match):
        load_state(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_named(tmp_path: Path, bad: float) -> None:
    state = {k: v.clone() for k, v in SmallCNN().state_dict().items()}
    state["features.3.weight"][0, 0, 0, 0] = bad
    save_file(state, tmp_path / "m.safetensors")
    with pytest.raises(ModelFileError, match=r"'features.3.weight' has 1 non-finite"):
        load_model(tmp_path / "m.safetensors", arch="smallcnn")
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match=r"'features\.3\.weight'"):
        load_state(tmp_path / "m.pt")


def test_unsupported_dtype_in_checkpoint(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.pt")
    with pytest.raises(ModelFileError, match=r"'w' has unsupported dtype torch\.complex64"):
        load_state(tmp_path / "c.pt")


def test_wrong_architecture_names_keys_and_shapes(tmp_path: Path) -> None:
    path = save_model(trained_like("smallcnn"), tmp_path / "m.safetensors")
    with pytest.raises(
        ModelFileError, match=r"does not match architecture 'widecnn'.*missing keys"
    ):
        load_model(path, arch="widecnn")
    with pytest.raises(
        ModelFileError,
        match=r"missing keys: features\.1\.weight.*unexpected keys: features\.0\.bias",
    ):
        load_model(path, arch="smallcnn_bn")
    shapes = r"'features.0.weight' has shape \(16, 1, 3, 3\) in the file but \(16, 3, 3, 3\)"
    with pytest.raises(ModelFileError, match=shapes):
        load_model(path, in_channels=3)


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("missing.safetensors", None, ModelFileError, "no such file"),
        ("model.onnx", b"x" * 10, ModelFileError, "unsupported model file type '.onnx'"),
        ("empty.pt", b"", ModelFileError, "empty or truncated"),
        ("junk.pt", b"hello world", UnsafeFileError, "not a zip checkpoint"),
        ("broken.pt", b"PK\x03\x04 not really a zip", ModelFileError, "cannot read torch"),
        ("list.pt", "tensors-in-a-list", ModelFileError, "holds a list"),
        ("no_tensors.pt", "dict-without-tensors", ModelFileError, "no state dict of tensors"),
    ],
)
def test_other_unreadable_files(tmp_path: Path, name, content, error, match) -> None:
    path = tmp_path / name
    if content == "tensors-in-a-list":
        torch.save([torch.zeros(1)], path)
    elif content == "dict-without-tensors":
        torch.save({"epoch": 3}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=match):
        load_state(path)


def test_foreign_safetensors_metadata_is_returned_raw(tmp_path: Path) -> None:
    state = SmallCNN().state_dict()
    save_file(dict(state), tmp_path / "f.safetensors", metadata={"format": "pt"})
    loaded, meta = load_state(tmp_path / "f.safetensors")
    assert meta == {"format": "pt"} and set(loaded) == set(state)
    model = load_model(tmp_path / "f.safetensors", arch="smallcnn")  # dims inferred from weights
    assert (model.in_channels, model.num_classes) == (1, 10)
    assert model_io.infer_dims(state) == (1, 10)
