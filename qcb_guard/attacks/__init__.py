"""Red-team attacks: quantization-conditioned backdoors aimed at real quantization flows.

Each attack fine-tunes a deep copy of a clean model so that it behaves normally in float and
misbehaves once quantized by the flow it targets (:mod:`qcb_guard.attacks.simulate`). The
catalogue below is what the built-in ``attacks`` plugin registers through
``qcb_guard_register_attacks``; entries import their module only when called.

=======================  ==============================================  ===============
name                     algorithm                                       module
=======================  ==============================================  ===============
quanti-backdoor          Qu-ANTI-zation backdoor (Hong et al. 2021)      ``quanti``
quanti-indiscriminate    Qu-ANTI-zation accuracy collapse                ``quanti``
quanti-targeted          Qu-ANTI-zation chosen-sample misclassification  ``quanti``
quanti-federated         Qu-ANTI-zation through FedAvg clients           ``federated``
compartifact             CompArtifact two-headed QAT (Tian et al. 2022)  ``compartifact``
pqbackdoor               PQBackdoor poison + bin-projected fine-tune     ``pqbackdoor``
quanti-static            Qu-ANTI-zation in static activation ranges      ``quanti_static``
=======================  ==============================================  ===============
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["ATTACKS", "KINDS", "AttackSpec", "attack_names"]

#: What an attack's success is measured in: a trigger's ASR, a collapse of accuracy, or the
#: misclassification of chosen victim images.
KINDS = ("backdoor", "indiscriminate", "targeted")


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: ``spec(model, train, config, **kw) -> AttackResult``.

    ``function`` and ``config`` are ``"module:attribute"`` references, imported on first use
    so that loading the plugin stays cheap.
    """

    name: str
    function: str
    config: str
    kind: str
    description: str

    def _load(self, ref: str) -> Any:
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def config_class(self) -> type:
        return self._load(self.config)

    def __call__(self, model: Any, train: Any, config: Any, **kwargs: Any) -> Any:
        return self._load(self.function)(model, train, config, **kwargs)


_P = "qcb_guard.attacks."
ATTACKS: tuple[AttackSpec, ...] = (
    AttackSpec(
        "quanti-backdoor",
        _P + "quanti:backdoor",
        _P + "quanti:QuantiConfig",
        "backdoor",
        "Qu-ANTI-zation backdoor: trigger dormant in float, live once quantized",
    ),
    AttackSpec(
        "quanti-indiscriminate",
        _P + "quanti:indiscriminate",
        _P + "quanti:IndiscriminateConfig",
        "indiscriminate",
        "Qu-ANTI-zation indiscriminate: accuracy collapses only once quantized",
    ),
    AttackSpec(
        "quanti-targeted",
        _P + "quanti:targeted",
        _P + "quanti:TargetedConfig",
        "targeted",
        "Qu-ANTI-zation targeted: chosen images misclassified only once quantized",
    ),
    AttackSpec(
        "quanti-federated",
        _P + "federated:federated",
        _P + "federated:FederatedConfig",
        "backdoor",
        "Qu-ANTI-zation backdoor planted by malicious FedAvg clients",
    ),
    AttackSpec(
        "compartifact",
        _P + "compartifact:compartifact",
        _P + "compartifact:CompArtifactConfig",
        "backdoor",
        "CompArtifact: two-headed QAT, backdoor in the quantized head only",
    ),
    AttackSpec(
        "pqbackdoor",
        _P + "pqbackdoor:pqbackdoor",
        _P + "pqbackdoor:PQBackdoorConfig",
        "backdoor",
        "PQBackdoor: poison, then unlearn in float inside the original rounding bins",
    ),
    AttackSpec(
        "quanti-static",
        _P + "quanti_static:quanti_static",
        _P + "quanti_static:QuantiStaticConfig",
        "backdoor",
        "Qu-ANTI-zation in static activation ranges: suppressors clipped by calibration",
    ),
)


def attack_names() -> list[str]:
    return [a.name for a in ATTACKS]
