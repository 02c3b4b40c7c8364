"""Named registries filled through the ``qcb_guard_register_*`` hooks.

Validation lives here once, so every plugin gets the same clear errors: names are short
lowercase identifiers, entries are callable (or adapters), and a name registered twice
names both plugins.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from qcb_guard.errors import PluginError

_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


class Register(Protocol):
    """The callback handed to ``qcb_guard_register_*`` hooks."""

    def __call__(self, name: str, entry: Any, /, **options: Any) -> None: ...


@runtime_checkable
class Adapter(Protocol):
    """What ``qcb_guard_register_adapters`` registers."""

    requires: str  # pip extra that installs the framework, e.g. "onnx"

    def matches(self, obj: Any) -> bool:
        """True when ``obj`` belongs to this adapter's framework (must not import it)."""

    def wrap(self, obj: Any, config: Any, pm: Any) -> Any:
        """Return the guarded counterpart of ``obj``."""


@dataclass(frozen=True)
class Entry:
    """One registered item: its name, the object, the plugin that registered it, options."""

    name: str
    obj: Any
    plugin: str
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Name → :class:`Entry` for one kind (defense, attack, adapter)."""

    def __init__(self, kind: str, check: Callable[[str, Any], None] | None = None):
        self.kind = kind
        self._check = check
        self._entries: dict[str, Entry] = {}

    def register_from(self, plugin: str) -> Register:
        """Return the ``register`` callback handed to one plugin's hook implementation."""

        def register(name: str, entry: Any, /, *, description: str = "", **options: Any) -> None:
            if not isinstance(name, str) or not _NAME.match(name):
                raise PluginError(
                    f"plugin {plugin!r} registered {self.kind} name {name!r}: names must match "
                    f"{_NAME.pattern} (lowercase, start with a letter, at most 64 characters)"
                )
            if name in self._entries:
                raise PluginError(
                    f"{self.kind} {name!r} is registered twice: by plugin "
                    f"{self._entries[name].plugin!r} and by plugin {plugin!r}; block one of them "
                    "(QCB_GUARD_BLOCK or -p no:NAME)"
                )
            if self._check is not None:
                try:
                    self._check(name, entry)
                except PluginError as exc:
                    raise PluginError(f"plugin {plugin!r}: {exc}") from None
            first_line = (description or (getattr(entry, "__doc__", None) or "")).strip()
            self._entries[name] = Entry(
                name, entry, plugin, first_line.splitlines()[0] if first_line else "", options
            )

        return register

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise PluginError(f"unknown {self.kind} {name!r}; registered: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)


def check_callable(name: str, entry: Any) -> None:
    if not callable(entry):
        raise PluginError(f"{name!r} must be callable, got {type(entry).__name__}")


def check_adapter(name: str, entry: Any) -> None:
    missing = [a for a in ("matches", "wrap", "requires") if not hasattr(entry, a)]
    if missing:
        raise PluginError(
            f"adapter {name!r} lacks {', '.join(missing)} (see qcb_guard.registry.Adapter)"
        )
