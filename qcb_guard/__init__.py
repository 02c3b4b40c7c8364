"""qcb_guard: guard post-training quantization against quantization-conditioned backdoors.

``from qcb_guard import guard; guard(quantizer)`` — see the README.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qcb_guard.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = [
    "GuardConfig",
    "QuantSpec",
    "SlotCalibration",
    "WeightSlot",
    "__version__",
    "get_plugin_manager",
    "guard",
    "hookimpl",
    "hookspec",
    "make_plugin_manager",
    "scan",
]

if TYPE_CHECKING:  # pragma: no cover
    from qcb_guard.config import GuardConfig
    from qcb_guard.guarding import guard
    from qcb_guard.manager import get_plugin_manager, make_plugin_manager
    from qcb_guard.quant.spec import QuantSpec
    from qcb_guard.scanner import scan
    from qcb_guard.slots import SlotCalibration, WeightSlot

_LAZY = {
    "GuardConfig": "qcb_guard.config",
    "guard": "qcb_guard.guarding",
    "get_plugin_manager": "qcb_guard.manager",
    "make_plugin_manager": "qcb_guard.manager",
    "scan": "qcb_guard.scanner",
    "QuantSpec": "qcb_guard.quant.spec",
    "SlotCalibration": "qcb_guard.slots",
    "WeightSlot": "qcb_guard.slots",
}


def __getattr__(name: str) -> Any:
    # Lazy so that ``import qcb_guard`` (and a plugin's ``from qcb_guard import hookimpl``)
    # does not import torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qcb_guard' has no attribute {name!r}")
