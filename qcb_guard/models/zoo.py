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


def build_model_for(
    arch: str, image_shape: tuple[int, int, int], num_classes: int, **kw: Any
) -> nn.Module:
    """:func:`build_model` for images of ``image_shape`` (C, H, W).

    SmallCNN's adaptive pool must divide its feature map exactly for the legacy ONNX
    exporter (used by the ONNX Runtime flow), so its ``pool_size`` defaults to ``H // 4``.
    """
    channels, height = image_shape[0], image_shape[1]
    if canonical_arch(arch).startswith("smallcnn"):
        kw.setdefault("pool_size", max(1, height // 4))
    return build_model(arch, channels, num_classes, **kw)
