"""``python -m qcb_guard`` is the ``qcb-guard`` command."""

from qcb_guard.cli import main

if __name__ == "__main__":
    main()
