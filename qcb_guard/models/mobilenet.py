"""MobileNetV2, CIFAR variant: stride-1 stem and first stride-2 stage made stride 1.

Depthwise convolutions (``groups``) and ReLU6 exercise the per-channel and clamped-activation
paths of every quantizer; the inverted residual is a plain ``+``.
"""

from __future__ import annotations

from torch import Tensor, nn

from qcb_guard.models.smallcnn import check_dims, check_positive

# (expansion t, output channels c, repeats n, first stride s); the 24-channel stage has stride
# 1 instead of ImageNet's 2, so a 32x32 input ends at 4x4 (8x8 ends at 1x1).
MOBILENET_V2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled width to a multiple of ``divisor`` without losing more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list:
    """Conv (no bias) + BN + ReLU6, the unit MobileNetV2 is built from."""
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU6()]


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; identity shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += conv_bn_relu6(cin, hidden, 1)
        layers += conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images; ``width`` scales every layer (last conv only when > 1)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, *, width: float = 1.0) -> None:
        super().__init__()
        check_dims(in_channels, num_classes)
        check_positive("width", width)
        self.in_channels, self.num_classes = in_channels, num_classes
        cin = make_divisible(32 * width)
        last = make_divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = conv_bn_relu6(in_channels, cin, 3)
        for t, c, n, s in MOBILENET_V2_STAGES:
            cout = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += conv_bn_relu6(cin, last, 1)
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def mobilenet_v2(in_channels: int = 3, num_classes: int = 10, *, width: float = 1.0) -> MobileNetV2:
    """MobileNetV2 (CIFAR variant): ~2.2M weights at width 1 on CIFAR-10."""
    return MobileNetV2(in_channels, num_classes, width=width)
