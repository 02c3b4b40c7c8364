"""Exceptions raised by qcb_guard.

Every error a user can cause derives from :class:`QcbGuardError`, so the CLI can print a
one-line message instead of a traceback from deep inside torch.
"""

from __future__ import annotations


class QcbGuardError(Exception):
    """Base class for every error qcb_guard raises on purpose."""


class ConfigError(QcbGuardError, ValueError):
    """A configuration value is out of range or inconsistent; the message names it."""


class DataError(QcbGuardError, ValueError):
    """A data set or calibration set is empty, mis-shaped or of the wrong dtype."""


class UnsafeFileError(QcbGuardError):
    """A model file would need unsafe deserialisation (e.g. a pickle) and was refused."""


class ModelFileError(QcbGuardError, ValueError):
    """A model file is malformed, truncated or does not match the expected architecture."""


class PluginError(QcbGuardError):
    """A plugin registered something invalid, or a requested plugin entry does not exist."""


class DefenseError(QcbGuardError):
    """A defense returned integers that cannot be deployed (wrong shape, dtype or range)."""


class MissingFrameworkError(QcbGuardError, ImportError):
    """An optional framework is needed but not installed; the message names the extra."""


class UnsupportedObjectError(QcbGuardError, TypeError):
    """``guard()`` got an object no registered adapter recognises."""
