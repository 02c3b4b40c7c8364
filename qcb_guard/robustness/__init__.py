"""Threats to quantized models beyond backdoors, and their defenses.

==========================  =============================================  ====================
name (registry, kind)       algorithm                                      module
==========================  =============================================  ====================
``fgsm`` (evasion)          Fast Gradient Sign (Goodfellow et al. 2015)    ``adversarial``
``pgd`` (evasion)           Projected Gradient Descent (Madry et al. 2018) ``adversarial``
``patch`` (patch)           universal adversarial patch (Brown et al.)     ``patch``
``knockoff`` (extraction)   KnockoffNets (Orekondy et al. 2019)            ``extraction``
defensive-quantization      Defensive Quantization (Lin, Gan, Han 2019)    ``defensive_quant…``
divqat                      DivQAT (this project's design)                 ``divqat``
==========================  =============================================  ====================

Shared pieces: weight + activation fake quantization with STE (``fakequant``), the QAT loop
(``qat``), reverse-sigmoid output perturbation (``extraction``), the study run by
``qcb-guard robustness`` (``study``) and its report (``report``). Importing this package
imports nothing heavy; the modules import torch.
"""

from __future__ import annotations

__all__ = ["ATTACKS", "TRAINING_DEFENSES"]

#: name → (``module:attribute``, kind, description), registered by the ``robustness`` plugin.
ATTACKS: dict[str, tuple[str, str, str]] = {
    "fgsm": ("adversarial:fgsm", "evasion", "FGSM evasion (L-inf), white-box via STE or transfer"),
    "pgd": ("adversarial:pgd", "evasion", "PGD evasion (L-inf, random start), via STE or transfer"),
    "patch": ("patch:PatchAttack", "patch", "universal adversarial patch, random placement"),
    "knockoff": ("extraction:KnockoffAttack", "extraction", "KnockoffNets model extraction"),
}
TRAINING_DEFENSES: dict[str, tuple[str, str]] = {
    "defensive-quantization": (
        "defensive_quantization:defensive_quantization",
        "Defensive Quantization: QAT with the orthogonality (Lipschitz) penalty",
    ),
    "divqat": ("divqat:divqat", "DivQAT: QAT that misleads extraction off-distribution"),
}
