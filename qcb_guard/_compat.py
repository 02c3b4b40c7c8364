"""Optional-framework imports with an error that names the extra to install."""

from __future__ import annotations

import importlib
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
