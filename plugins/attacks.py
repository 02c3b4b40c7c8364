"""Built-in plugin ``attacks``: registers every red-team attack of :mod:`qcb_guard.attacks`.

Registered exactly as a third-party package would, so ``QCB_GUARD_BLOCK=attacks`` removes
them all; each entry is an :class:`~qcb_guard.attacks.AttackSpec` (callable, lazily imports
its algorithm).
"""

from __future__ import annotations

from qcb_guard import hookimpl


@hookimpl
def qcb_guard_register_attacks(register):
    from qcb_guard.attacks import ATTACKS

    for spec in ATTACKS:
        register(spec.name, spec, description=spec.description, kind=spec.kind)
