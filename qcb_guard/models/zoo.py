"""Architecture registry: one name per model so files and configs can rebuild it.

``build_model`` records the name and keyword arguments on the module (``qcb_arch``,
``qcb_config``), which is how :func:`qcb_guard.models.io.save_model` knows what to write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from qcb_guard.errors import ConfigError
from qcb_guard.models.mobilenet import mobilenet_v2
from qcb_guard.models.resnet import resnet18
from qcb_guard.models.smallcnn import SmallCNN, WideCNN
from qcb_guard.models.vgg import vgg11, vgg16

Builder = Callable[..., nn.Module]


def smallcnn_bn(in_channels: int = 1, num_classes: int = 10, **kw: Any) -> SmallCNN:
    """SmallCNN with BatchNorm after each conv (exporters fold it into the conv weights)."""
    return SmallCNN(in_channels, num_classes, batchnorm=True, **kw)


ARCHITECTURES: dict[str, Builder] = {
    "smallcnn": SmallCNN,
    "smallcnn_bn": smallcnn_bn,
    "widecnn": WideCNN,
    "resnet18": resnet18,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "mobilenet_v2": mobilenet_v2,
}


def canonical_arch(arch: str) -> str:
    """Registry key for a user-typed name: case-insensitive, '-' and '_' alike."""
    return str(arch).lower().replace("-", "_")


def build_model(arch: str, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    """Build a registered architecture; unknown names or keywords raise ConfigError."""
    key = canonical_arch(arch)
    if key not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"unknown architecture {arch!r}; known: {known}")
    try:
        model = ARCHITECTURES[key](in_channels, num_classes, **kw)
    except TypeError as exc:  # an unexpected keyword, named by Python's message
        raise ConfigError(f"bad arguments for architecture {key!r}: {exc}") from exc
    model.qcb_arch = key
    model.qcb_config = dict(kw)
    return model
