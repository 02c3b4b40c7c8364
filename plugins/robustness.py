"""Built-in plugin ``robustness``: evasion, patch and extraction attacks on quantized models
(``fgsm``, ``pgd``, ``patch``, ``knockoff``) and the training-time defenses
``defensive-quantization`` and ``divqat``.

Registered exactly as a third-party package would (``QCB_GUARD_BLOCK=robustness`` removes
them all). Algorithms are imported on first use, so loading the plugin stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from qcb_guard import hookimpl


class _Lazy:
    """A registry entry that imports ``qcb_guard.robustness.<module>:<attr>`` when used."""

    def __init__(self, ref: str, kind: str | None = None) -> None:
        self.ref = ref
        self.kind = kind

    def load(self) -> Any:
        module, _, attr = self.ref.partition(":")
        obj = getattr(importlib.import_module(f"qcb_guard.robustness.{module}"), attr)
        return obj() if isinstance(obj, type) else obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # asr / spatial of the patch attack
        if name.startswith("_") or name in ("ref", "kind"):
            raise AttributeError(name)
        return getattr(self.load(), name)

    @property
    def __signature__(self) -> Any:
        import inspect

        return inspect.signature(self.load())


@hookimpl
def qcb_guard_register_attacks(register):
    from qcb_guard.robustness import ATTACKS

    for name, (ref, kind, description) in ATTACKS.items():
        register(name, _Lazy(ref, kind), description=description, kind=kind)


@hookimpl
def qcb_guard_register_training_defenses(register):
    from qcb_guard.robustness import TRAINING_DEFENSES

    for name, (ref, description) in TRAINING_DEFENSES.items():
        register(name, _Lazy(ref), description=description)
