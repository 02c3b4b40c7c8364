"""Fuzz the scanner's file loading: malformed, truncated and mutated model files must end in
a clear qcb_guard error (CLI exit status 2) or a scan result, never a crash."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcb_guard.errors import QcbGuardError
from qcb_guard.scanner import ScanConfig, scan

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def onnx_bytes(tmp_path_factory):
    from qcb_guard.attacks.simulate import export_onnx
    from qcb_guard.models import build_model

    torch.manual_seed(0)
    model = build_model("smallcnn", 1, 10, pool_size=2, width=0.25).eval()
    path = tmp_path_factory.mktemp("fuzz") / "seed.onnx"
    export_onnx(model, path, torch.zeros(1, 1, 8, 8))
    return path.read_bytes()


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory):
    from qcb_guard.models import build_model, save_model

    torch.manual_seed(0)
    model = build_model("smallcnn", 1, 10, pool_size=2, width=0.25)
    path = tmp_path_factory.mktemp("fuzz") / "seed.safetensors"
    save_model(model, path)
    return path.read_bytes()


CONFIG = ScanConfig(behaviour=False, input_shape=(1, 8, 8), bits=(4,), frameworks=("ort",))


def _mutate(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data[: max(1, cut)])
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


def _scan_file(tmp_path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    try:
        scan(path, config=CONFIG)
    except QcbGuardError:
        pass  # a clear, named error is the expected outcome for most mutants


FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(
    cut=st.integers(min_value=0, max_value=10_000),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
)
def test_mutated_onnx_files_never_crash(tmp_path, onnx_bytes, cut, flips):
    _scan_file(tmp_path, "m.onnx", _mutate(onnx_bytes, len(onnx_bytes) - cut % 2000, flips))


@FUZZ
@given(
    cut=st.integers(min_value=0, max_value=10_000),
    flips=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=6),
)
def test_mutated_safetensors_files_never_crash(tmp_path, safetensors_bytes, cut, flips):
    data = _mutate(safetensors_bytes, len(safetensors_bytes) - cut % 3000, flips)
    _scan_file(tmp_path, "m.safetensors", data)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".onnx", ".safetensors", ".pt"]))
def test_random_bytes_never_crash(tmp_path_factory, data, suffix):
    _scan_file(tmp_path_factory.mktemp("rand"), f"m{suffix}", data)
