"""qcb_guard's built-in plugins (installed as the package ``qcb_guard_plugins``).

Each module is a plain plugin of ``@hookimpl`` functions, declared as an entry point of the
``qcb_guard`` group in ``pyproject.toml`` — the same way a third-party package takes part —
so each can be blocked by name (``QCB_GUARD_BLOCK=name``).
"""
