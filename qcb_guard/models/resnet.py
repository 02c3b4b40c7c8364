"""ResNet-18, CIFAR layout (3x3 stride-1 stem, no max-pool), the QCB papers' main model.

Residual sums are a plain ``+`` followed by a separate ``nn.ReLU`` module, which torch.export
(PT2E), NNCF and ONNX export trace as an ordinary add; eager torch.ao users swap it for
``FloatFunctional`` themselves.
"""

from __future__ import annotations

from torch import Tensor, nn

from qcb_guard.errors import ConfigError
from qcb_guard.models.smallcnn import check_dims, check_positive, scaled


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def make_stage(cin: int, cout: int, count: int, stride: int) -> nn.Sequential:
    """``count`` BasicBlocks; only the first changes resolution and width."""
    blocks = [BasicBlock(cin, cout, stride)]
    blocks += [BasicBlock(cout, cout, 1) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


class ResNet(nn.Module):
    """CIFAR ResNet: four stages of BasicBlocks, widths (64, 128, 256, 512) x ``width``."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        *,
        blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        width: float = 1.0,
    ) -> None:
        super().__init__()
        check_dims(in_channels, num_classes)
        check_positive("width", width)
        blocks = tuple(blocks)
        if len(blocks) != 4 or not all(isinstance(b, int) and b >= 1 for b in blocks):
            raise ConfigError(f"blocks must be four ints >= 1, got {blocks!r}")
        self.in_channels, self.num_classes = in_channels, num_classes
        w = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU()
        self.layer1 = make_stage(w[0], w[0], blocks[0], 1)
        self.layer2 = make_stage(w[0], w[1], blocks[1], 2)
        self.layer3 = make_stage(w[1], w[2], blocks[2], 2)
        self.layer4 = make_stage(w[2], w[3], blocks[3], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


def resnet18(in_channels: int = 3, num_classes: int = 10, *, width: float = 1.0) -> ResNet:
    """ResNet-18 (blocks 2-2-2-2): ~11.2M weights at width 1 on CIFAR-10."""
    return ResNet(in_channels, num_classes, blocks=(2, 2, 2, 2), width=width)
