"""Optional frameworks: imports with an error that names the extra to install, and quieting
the advice they log on every call."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType

from qcb_guard.errors import MissingFrameworkError


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingFrameworkError` naming ``qcb-guard[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingFrameworkError(
            f"{module} is not installed (needed here): pip install 'qcb-guard[{extra}]' "
            f"-c constraints.txt ({exc})"
        ) from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice ("consider pre-processing ...") at WARNING on the
    root logger on every call; evaluations and attacks call it dozens of times."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
