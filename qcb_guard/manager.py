"""The plugin manager: one factory, no import-time side effects.

Loading order (as in pytest and tox): every entry point of the ``qcb_guard`` group, the
built-ins first (they are entry points of the ``qcb-guard`` distribution itself, declared in
``pyproject.toml`` like any third party's), then third-party ones. Then ``check_pending()``
so that a misspelled hook fails loudly.

Environment variables (for reproducible runs and debugging):

``QCB_GUARD_DISABLE_PLUGIN_AUTOLOAD=1``
    load no third-party entry point (built-ins still load).
``QCB_GUARD_PLUGINS=a,b``
    allow-list: load only these third-party entry points.
``QCB_GUARD_BLOCK=a,b``
    block plugins by entry-point name, built-in or not.
``QCB_GUARD_TRACE=1``
    print every hook call and result to stderr.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import pluggy

from qcb_guard import hookspecs
from qcb_guard.errors import PluginError
from qcb_guard.registry import Registry, check_adapter, check_callable

ENTRY_POINT_GROUP = "qcb_guard"
DISTRIBUTION = "qcb-guard"

#: Built-in plugins, entry-point name → module. ``pyproject.toml`` declares the same
#: entry points; this tuple is the fallback when running from an uninstalled source tree,
#: and a test keeps both in sync.
BUILTIN_PLUGINS: dict[str, str] = {
    "nearest": "qcb_guard_plugins.nearest",
    "efrap": "qcb_guard_plugins.efrap",
    "flows": "qcb_guard_plugins.flows",
    "attacks": "qcb_guard_plugins.attacks",
    "robustness": "qcb_guard_plugins.robustness",
    "ort": "qcb_guard_plugins.adapter_ort",
    "nncf": "qcb_guard_plugins.adapter_nncf",
    "pt2e": "qcb_guard_plugins.adapter_pt2e",
    "torch-ao": "qcb_guard_plugins.adapter_torch_ao",
    "range-probe": "qcb_guard_plugins.range_probe",
    "scan": "qcb_guard_plugins.scan",
    "lac": "qcb_guard_plugins.lac",
    "qvec": "qcb_guard_plugins.qvec",
}


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class PluginManager(pluggy.PluginManager):
    """A ``pluggy.PluginManager`` with qcb_guard's registries attached."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.plugin_sources: dict[str, str] = {}  # plugin name → "builtin" | dist name + version
        self._registries: dict[str, Registry] = {}

    # -- loading ------------------------------------------------------------------------
    def load_plugin(self, name: str, module: str, source: str) -> None:
        if self.is_blocked(name) or self.has_plugin(name):
            return
        try:
            plugin = importlib.import_module(module)
        except ImportError as exc:
            raise PluginError(f"plugin {name!r} ({module}) failed to import: {exc}") from exc
        self.register(plugin, name=name)
        self.plugin_sources[name] = source
        self._registries.clear()

    def load_entrypoints(
        self, *, autoload: bool = True, allow: Iterable[str] | None = None
    ) -> None:
        """Load built-ins, then (if ``autoload``) the third-party entry points in ``allow``
        (all when ``None``)."""
        allow_set = set(allow) if allow is not None else None
        builtins_seen: set[str] = set()
        third_party: list[metadata.EntryPoint] = []
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else ""
            if dist == DISTRIBUTION and ep.name in BUILTIN_PLUGINS:
                self.load_plugin(ep.name, ep.value, "builtin")
                builtins_seen.add(ep.name)
            else:
                third_party.append(ep)
        for name, module in BUILTIN_PLUGINS.items():  # uninstalled source tree
            if name not in builtins_seen:
                self.load_plugin(name, module, "builtin")
        if not autoload:
            return
        for ep in sorted(third_party, key=lambda e: e.name):
            if allow_set is not None and ep.name not in allow_set:
                continue
            version = ep.dist.version if ep.dist is not None else "?"
            dist = ep.dist.name if ep.dist is not None else "?"
            self.load_plugin(ep.name, ep.value, f"{dist} {version}")

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        result = super().register(plugin, name)
        self._registries.clear()
        return result

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        result = super().unregister(plugin, name)
        self._registries.clear()
        return result

    # -- registries ----------------------------------------------------------------------
    def _registry(self, kind: str, hook_name: str, check: Any) -> Registry:
        if kind not in self._registries:
            registry = Registry(kind, check)
            hook = getattr(self.hook, hook_name)
            trace = self.trace.root.get("registry")
            # Called one implementation at a time (in pluggy's call order) so that each gets
            # a ``register`` bound to its own plugin name for error messages and listings.
            for impl in reversed(hook.get_hookimpls()):
                if impl.hookwrapper or impl.wrapper:
                    continue
                plugin_name = self.get_name(impl.plugin) or repr(impl.plugin)
                trace(hook_name, plugin_name)
                impl.function(register=registry.register_from(plugin_name))
            self._registries[kind] = registry
        return self._registries[kind]

    @property
    def defenses(self) -> Registry:
        return self._registry("defense", "qcb_guard_register_defenses", check_callable)

    @property
    def activation_defenses(self) -> Registry:
        return self._registry(
            "activation defense", "qcb_guard_register_activation_defenses", check_callable
        )

    @property
    def training_defenses(self) -> Registry:
        return self._registry(
            "training defense", "qcb_guard_register_training_defenses", check_callable
        )

    @property
    def attacks(self) -> Registry:
        return self._registry("attack", "qcb_guard_register_attacks", check_callable)

    @property
    def flows(self) -> Registry:
        return self._registry("flow", "qcb_guard_register_flows", check_callable)

    @property
    def adapters(self) -> Registry:
        return self._registry("adapter", "qcb_guard_register_adapters", check_adapter)

    # -- introspection -------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """Name, source/version and implemented hooks of every registered plugin."""
        rows = []
        for name, plugin in sorted(self.list_name_plugin(), key=lambda item: item[0]):
            if plugin is None:  # pluggy keeps blocked names with a None plugin
                continue
            hooks = sorted(caller.name for caller in (self.get_hookcallers(plugin) or []))
            rows.append(
                {
                    "name": name,
                    "source": self.plugin_sources.get(name, "registered in code"),
                    "module": getattr(plugin, "__name__", type(plugin).__name__),
                    "hooks": hooks,
                }
            )
        return rows


def make_plugin_manager(
    *,
    autoload: bool | None = None,
    allow: Iterable[str] | None = None,
    block: Iterable[str] | None = None,
    plugins: Iterable[Any] = (),
    trace: bool | None = None,
) -> PluginManager:
    """Build a fresh plugin manager.

    Arguments default to the environment variables described in the module docstring.
    ``plugins`` are extra plugin objects registered in code (tests, notebooks).
    """
    pm = PluginManager()
    for name in list(block) if block is not None else (_env_list("QCB_GUARD_BLOCK") or []):
        pm.set_blocked(name)
    if autoload is None:
        autoload = not _truthy("QCB_GUARD_DISABLE_PLUGIN_AUTOLOAD")
    if allow is None:
        allow = _env_list("QCB_GUARD_PLUGINS")
    pm.load_entrypoints(autoload=autoload, allow=allow)
    for plugin in plugins:
        pm.register(plugin)
    pm.check_pending()
    if trace if trace is not None else _truthy("QCB_GUARD_TRACE"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm


@functools.cache
def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, built on first use from the environment."""
    return make_plugin_manager()
