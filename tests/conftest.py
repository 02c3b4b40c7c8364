"""Shared fixtures: fresh plugin managers and throwaway third-party defenses."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from qcb_guard import hookimpl
from qcb_guard.manager import make_plugin_manager
from qcb_guard.quant import QuantSpec, compute_qparams
from qcb_guard.quant.ops import broadcast
from qcb_guard.slots import SlotCalibration, WeightSlot

# NNCF compiles a C++ extension on first use (~25 s) under a lock in the shared torch
# extensions cache, with a 60 s load timeout: a build killed by that timeout under load
# leaves a stale lock that hangs every later run. Build in a private directory per test
# session with a generous timeout instead.
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    _ext_dir = tempfile.mkdtemp(prefix="qcb_guard_torch_ext_")
    atexit.register(shutil.rmtree, _ext_dir, ignore_errors=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = _ext_dir
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "600")


def floor_integers(slot, calibration=None):
    """A deliberately non-nearest defense: floor(w / s) + zp, clamped to the slot's range."""
    s = broadcast(slot.scale, slot.weight, slot.axis)
    zp = broadcast(slot.zero_point.float(), slot.weight, slot.axis)
    return (torch.floor(slot.weight / s) + zp).clamp(slot.qmin, slot.qmax).to(torch.int64)


class FloorPlugin:
    """Third-party style plugin registering ``floor`` (no data) and ``floor-data`` (needs data,
    and records every calibration it receives in ``seen``)."""

    def __init__(self):
        self.seen = {}

    @hookimpl
    def qcb_guard_register_defenses(self, register):
        register("floor", floor_integers, description="floor rounding (tests only)")

        def floor_data(slot, calibration):
            assert calibration is not None, "floor-data needs calibration"
            self.seen[slot.name] = calibration
            return floor_integers(slot)

        register("floor-data", floor_data, needs_calibration=True, description="floor + data")


@pytest.fixture
def floor_plugin():
    return FloorPlugin()


@pytest.fixture
def pm(floor_plugin):
    """A fresh plugin manager: built-ins + the floor plugin, no third-party autoload."""
    return make_plugin_manager(autoload=False, plugins=[floor_plugin], block=[])


def conv_slot(seed: int = 0, bits: int = 4, **attrs) -> tuple[WeightSlot, SlotCalibration]:
    """A seeded 4→8 channel 3×3 conv slot on its symmetric grid, with 64 calibration inputs
    (extra keywords go into ``slot.attrs``)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(8, 4, 3, 3, generator=gen) * 0.2
    spec = QuantSpec(bits=bits)
    scale, zp = compute_qparams(weight, spec)
    slot = WeightSlot(
        "conv", "conv2d", weight, scale, zp, 0, spec.qmin, spec.qmax,
        bias=torch.zeros(8), attrs={"padding": 1, **attrs},
    )  # fmt: skip
    x = torch.rand(64, 4, 6, 6, generator=gen)
    return slot, SlotCalibration(x)


@pytest.fixture(scope="module")
def one_thread():
    """The CI box has 2 shared cores: one thread per test process is faster and steadier
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class BrokenProbe:
    """An activation defense that fails (e.g. a model it cannot differentiate)."""

    @hookimpl
    def qcb_guard_register_activation_defenses(self, register):
        def broken(model, calibration, *, seed=0):
            raise RuntimeError("model is not differentiable")

        register("broken", broken)
