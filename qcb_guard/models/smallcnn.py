"""Small CNNs for MNIST-sized inputs: the workhorses of the fast experiments and tests.

Both are built only from ``Conv2d``/``BatchNorm2d``/``ReLU``/pooling/``Flatten``/``Linear`` held in
two ``nn.Sequential`` blocks (``features`` and ``classifier``), so torch.ao (eager and FX), PT2E,
NNCF and ONNX export all see standard modules, and ReLUs are separate non-inplace modules so that
fusion works and forward hooks see each layer's own output.
"""

from __future__ import annotations

from torch import Tensor, nn

from qcb_guard.errors import ConfigError


def check_dims(in_channels: int, num_classes: int) -> None:
    """Reject impossible channel/class counts at construction, not at the first forward."""
    for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")


def check_positive(name: str, value: float) -> None:
    """Width multipliers and layer sizes must be positive numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def check_count(name: str, value: int) -> None:
    """Layer sizes must be whole and positive."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier, never below 1."""
    return max(1, round(channels * width))


def conv_block(cin: int, cout: int, batchnorm: bool) -> list[nn.Module]:
    """3x3 'same' convolution, optional BatchNorm, ReLU (bias only when there is no BN)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU())
    return layers


class SmallCNN(nn.Module):
    """conv(16)-pool-conv(32)-pool-adaptive pool-fc(64)-fc: ~106k weights on 1x28x28.

    Padded convolutions keep 8x8 digits alive through both pools. The adaptive pool makes the
    classifier size independent of the input; its default ``pool_size=7`` is the identity at
    28x28, which keeps the legacy ONNX exporter happy (it only exports adaptive pools whose
    output divides the input). Pass ``pool_size=2`` for 8x8 or ``8`` for 32x32 inputs when the
    legacy exporter matters; the dynamo exporter handles any size.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        batchnorm: bool = False,
        width: float = 1.0,
        hidden: int = 64,
        pool_size: int = 7,
    ) -> None:
        super().__init__()
        check_dims(in_channels, num_classes)
        check_positive("width", width)
        check_count("hidden", hidden)
        check_count("pool_size", pool_size)
        self.in_channels, self.num_classes = in_channels, num_classes
        c1, c2 = scaled(16, width), scaled(32, width)
        self.features = nn.Sequential(
            *conv_block(in_channels, c1, batchnorm),
            nn.MaxPool2d(2, ceil_mode=True),
            *conv_block(c1, c2, batchnorm),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(pool_size),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * pool_size**2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class WideCNN(nn.Module):
    """Three conv-conv-pool stages (32/64/128 x ``width``), global pool, fc(hidden), fc.

    ~393k weights at width 1 on 1x28x28: enough capacity for QCBs that need spare units (e.g.
    the activation-range suppressors of DESIGN §3). Global pooling keeps it size-agnostic and
    exportable by every ONNX exporter at any input size.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        width: float = 1.0,
        batchnorm: bool = False,
        hidden: int = 768,
    ) -> None:
        super().__init__()
        check_dims(in_channels, num_classes)
        check_positive("width", width)
        check_count("hidden", hidden)
        self.in_channels, self.num_classes = in_channels, num_classes
        layers: list[nn.Module] = []
        cin = in_channels
        for base in (32, 64, 128):
            cout = scaled(base, width)
            layers += conv_block(cin, cout, batchnorm) + conv_block(cout, cout, batchnorm)
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            cin = cout
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
