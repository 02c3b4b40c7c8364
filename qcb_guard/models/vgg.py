"""VGG-11/16 with BatchNorm, CIFAR style (one linear classifier after a global pool).

Max-pools use ``ceil_mode`` so that the five halvings never reach a zero-sized map on 8x8 or
28x28 inputs (1x1 stays 1x1); the global pool then exports with every ONNX exporter.
"""

from __future__ import annotations

from torch import Tensor, nn

from qcb_guard.models.smallcnn import check_dims, check_positive, scaled

# "M" is a 2x2 max-pool; integers are conv widths (Simonyan & Zisserman, configs A and D).
# fmt: off
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
        512, 512, 512, "M", 512, 512, 512, "M",
    ),
}
# fmt: on


class VGG(nn.Module):
    """VGG feature stack (conv-BN-ReLU, pools), global average pool, one linear layer."""

    def __init__(
        self,
        config: tuple[int | str, ...],
        in_channels: int = 3,
        num_classes: int = 10,
        *,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        check_dims(in_channels, num_classes)
        check_positive("width", width)
        self.in_channels, self.num_classes = in_channels, num_classes
        layers: list[nn.Module] = []
        cin = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            cout = scaled(int(item), width)
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
            layers.append(nn.ReLU())
            cin = cout
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def vgg11(in_channels: int = 3, num_classes: int = 10, *, width: float = 1.0) -> VGG:
    """VGG-11-BN: ~9.2M weights at width 1 on CIFAR-10."""
    return VGG(VGG_CONFIGS["vgg11"], in_channels, num_classes, width=width)


def vgg16(in_channels: int = 3, num_classes: int = 10, *, width: float = 1.0) -> VGG:
    """VGG-16-BN: ~14.7M weights at width 1 on CIFAR-10."""
    return VGG(VGG_CONFIGS["vgg16"], in_channels, num_classes, width=width)
