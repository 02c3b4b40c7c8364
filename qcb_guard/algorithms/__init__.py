"""Quantization-time algorithms over :class:`~qcb_guard.slots.WeightSlot` (no framework)."""
