"""Built-in activation defense ``range-probe``: calibrated ranges that cover every reachable
activation, so static-activation QCBs (``quanti-static``) stay dormant once quantized.

Thin registration: the algorithm is :func:`qcb_guard.algorithms.range_probe.range_probe`;
options are the fields of :class:`~qcb_guard.algorithms.range_probe.RangeProbeConfig`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from qcb_guard import hookimpl
from qcb_guard.activation import ActivationDefenseResult
from qcb_guard.errors import ConfigError

NAME = "range-probe"


def range_probe(
    model: Any, calibration: torch.Tensor, *, seed: int = 0, **options: Any
) -> ActivationDefenseResult:
    """Probe every activation unit of ``model`` (a float torch module, or an ONNX model /
    path, converted with :func:`qcb_guard.onnx_torch.onnx_to_torch`) and return the probes
    to append to the flow's calibration data."""
    from qcb_guard.algorithms.range_probe import RangeProbeConfig
    from qcb_guard.algorithms.range_probe import range_probe as probe

    known = {f.name for f in fields(RangeProbeConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"activation defense {NAME!r}: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    if not isinstance(model, torch.nn.Module):
        from qcb_guard.onnx_torch import onnx_to_torch

        model = onnx_to_torch(model)
    result = probe(model, calibration, RangeProbeConfig(**options), seed=seed)
    result.check(calibration, NAME)
    return result


@hookimpl
def qcb_guard_register_activation_defenses(register):
    register(
        NAME,
        range_probe,
        description="probe each unit's reachable range; append the probes to calibration",
    )
