"""Architectures, deterministic training and the CDA/ASR metrics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qcb_guard.errors import ConfigError, DataError
from qcb_guard.models import (
    ARCHITECTURES,
    SmallCNN,
    TrainResult,
    accuracy,
    attack_success_rate,
    build_model,
    count_parameters,
    evaluate,
    predict,
    resnet18,
    train,
)

# (arch, channels, size) -> expected weight count range (in_channels, 10 classes).
PARAM_BALLPARK = {
    ("smallcnn", 1, 28): (100_000, 120_000),
    ("smallcnn_bn", 1, 28): (100_000, 120_000),
    ("widecnn", 1, 28): (350_000, 450_000),
    ("resnet18", 3, 32): (11_000_000, 11_300_000),
    ("vgg11", 3, 32): (9_100_000, 9_400_000),
    ("vgg16", 3, 32): (14_500_000, 15_000_000),
    ("mobilenet_v2", 3, 32): (2_100_000, 2_400_000),
}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1,797 8x8 digits as float [N, 1, 8, 8] in [0, 1], shuffled once."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


class LabelReader(nn.Module):
    """'Predicts' the class written in pixel (0, 0): makes ASR arithmetic exact."""

    num_classes = 4
    in_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = x[:, 0, 0, 0].round().long().clamp(0, self.num_classes - 1)
        return nn.functional.one_hot(label, self.num_classes).float() * self.scale


def labelled_images(labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.tensor(labels)
    x = torch.zeros(len(labels), 1, 4, 4)
    x[:, 0, 0, 0] = y.float()
    return x, y


# ---------------------------------------------------------------------------------------------
# architectures


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_on_small_inputs(arch: str, channels: int) -> None:
    model = build_model(arch, channels, 10).eval()
    with torch.no_grad():
        for size in (8, 28, 32):
            out = model(torch.rand(2, channels, size, size))
            assert out.shape == (2, 10), (arch, channels, size)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize(("key", "bounds"), list(PARAM_BALLPARK.items()))
def test_parameter_counts(key: tuple[str, int, int], bounds: tuple[int, int]) -> None:
    arch, channels, _ = key
    n = count_parameters(build_model(arch, channels, 10))
    assert bounds[0] <= n <= bounds[1], f"{arch}: {n}"


def test_width_multiplier_shrinks_models() -> None:
    assert count_parameters(resnet18(3, 10, width=0.25)) < count_parameters(resnet18(3, 10)) / 10
    assert count_parameters(build_model("widecnn", 1, 10, width=2.0)) > 1_000_000


def test_build_model_records_arch_and_config() -> None:
    model = build_model("SmallCNN", 1, 10, hidden=32)
    assert model.qcb_arch == "smallcnn" and model.qcb_config == {"hidden": 32}
    assert isinstance(model, SmallCNN) and model.classifier[1].out_features == 32


def test_unknown_arch_lists_known_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown architecture 'alexnet'.*resnet18"):
        build_model("alexnet", 3, 10)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"in_channels": 0}, "in_channels"),
        ({"num_classes": 1}, "num_classes"),
        ({"width": -1.0}, "width"),
        ({"bogus": 1}, "bogus"),
        ({"pool_size": 2.5}, "pool_size must be an int"),
    ],
)
def test_bad_construction_arguments(kw: dict, match: str) -> None:
    args = {"in_channels": 1, "num_classes": 10} | kw
    with pytest.raises(ConfigError, match=match):
        build_model("smallcnn", args.pop("in_channels"), args.pop("num_classes"), **args)


def test_relus_are_separate_modules_for_fusion_and_hooks() -> None:
    model = build_model("resnet18", 3, 10, width=0.25)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len({id(m) for m in relus}) == len(relus) > 10
    assert not any(m.inplace for m in relus)


@pytest.mark.parametrize(("arch", "kw"), [("smallcnn_bn", {}), ("resnet18", {"width": 0.125})])
def test_traceable_by_fx_and_torch_export(arch: str, kw: dict) -> None:
    """The quantization flows trace models: FX (torch.ao) and torch.export (PT2E, ONNX)."""
    model = build_model(arch, 1, 10, **kw).eval()
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(torch.fx.symbolic_trace(model)(x), model(x))
    assert torch.allclose(torch.export.export(model, (x,)).module()(x), model(x))


@pytest.mark.ort
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_smallcnn_exports_with_legacy_onnx_exporter_at_28(tmp_path) -> None:
    pytest.importorskip("onnx")
    model = build_model("smallcnn", 1, 10).eval()
    torch.onnx.export(model, (torch.rand(1, 1, 28, 28),), tmp_path / "m.onnx", dynamo=False)
    assert (tmp_path / "m.onnx").stat().st_size > 100_000


# ---------------------------------------------------------------------------------------------
# training


def test_train_reaches_high_accuracy_on_digits(digits) -> None:
    x, y = digits
    torch.manual_seed(0)
    model = SmallCNN(1, 10)
    result = train(
        model, x[:500], y[:500], epochs=10, batch_size=32, lr=3e-3, seed=0, progress=False
    )
    assert isinstance(result, TrainResult)
    assert len(result.losses) == 10 and result.losses[-1] < result.losses[0]
    assert result.steps == 10 * 16 and result.seconds > 0
    assert accuracy(model, x[500:900], y[500:900]) > 0.85


def test_same_seed_gives_identical_weights(digits) -> None:
    x, y = digits[0][:200], digits[1][:200]
    torch.manual_seed(1)
    start = SmallCNN(1, 10, batchnorm=True)
    runs = []
    for seed in (5, 5, 6):
        model = copy.deepcopy(start)
        train(model, x, y, epochs=2, batch_size=16, lr=1e-3, seed=seed, progress=False)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_train_sgd_and_restores_module_modes(digits) -> None:
    x, y = digits[0][:65], digits[1][:65]  # 65 = 2 batches of 32 + a dropped batch of 1
    model = SmallCNN(1, 10, batchnorm=True)
    model.features[1].eval()  # a frozen BatchNorm must stay frozen after training
    kw = {"optimizer": "sgd", "weight_decay": 1e-4, "progress": False}
    result = train(model, x, y, epochs=1, batch_size=32, lr=0.01, seed=0, **kw)
    assert result.steps == 2
    assert model.training and not model.features[1].training


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of adam, adamw, sgd"),
        ({"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_train_rejects_bad_config(digits, kw: dict, match: str) -> None:
    args = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "seed": 0, "progress": False} | kw
    with pytest.raises(ConfigError, match=match):
        train(SmallCNN(), digits[0][:8], digits[1][:8], **args)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), "empty"),
        (torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), "one per image: 4 images"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), "floating"),
        (torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.long), r"\[N, C, H, W\]"),
        (torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), "3 channels.*expects 1"),
        (torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 10]), r"\[0, 10\).*\[0, 10\]"),
        (torch.zeros(4, 1, 8, 8), torch.tensor([0, -1, 2, 3]), r"\[0, 10\)"),
        (torch.zeros(4, 1, 8, 8), torch.zeros(4), "integer"),
    ],
)
def test_data_validation(x: torch.Tensor, y: torch.Tensor, match: str) -> None:
    model = SmallCNN(1, 10)
    with pytest.raises(DataError, match=match):
        accuracy(model, x, y)
    with pytest.raises(DataError, match=match):
        train(model, x, y, epochs=1, batch_size=2, lr=1e-3, seed=0, progress=False)


# ---------------------------------------------------------------------------------------------
# metrics


def test_asr_counts_only_non_target_images() -> None:
    # Half the images already belong to the target class 0 and a no-op trigger leaves every
    # prediction alone: counting them would report 50% ASR for a model with no backdoor.
    x, y = labelled_images([0, 0, 0, 0, 1, 2, 3, 1])
    model = LabelReader()
    assert attack_success_rate(model, x, y, lambda b: b, target=0) == 0.0

    def to_target_if_label_is_1(batch: torch.Tensor) -> torch.Tensor:
        out = batch.clone()
        out[out[:, 0, 0, 0] == 1, 0, 0, 0] = 0.0
        return out

    # non-target images: labels 1, 2, 3, 1 -> the two 1s flip: exactly 2/4.
    assert attack_success_rate(model, x, y, to_target_if_label_is_1, target=0) == 0.5


def test_metrics_leave_model_and_data_untouched() -> None:
    x, y = labelled_images([0, 1, 2, 3])
    model = LabelReader().train()
    before = x.clone()

    def in_place_trigger(batch: torch.Tensor) -> torch.Tensor:
        batch[:, 0, 0, 0] = 0.0
        return batch

    result = evaluate(model, x, y, trigger=(in_place_trigger, 0))
    assert result == {"cda": 1.0, "asr": 1.0}
    assert torch.equal(x, before) and model.training
    assert model.scale.item() == 1.0


def test_evaluate_accepts_trigger_objects_and_none() -> None:
    class Trigger:
        target = 2

        def apply(self, batch: torch.Tensor) -> torch.Tensor:
            return torch.full_like(batch, 2.0)

    x, y = labelled_images([0, 1, 2, 3, 3])
    model = LabelReader()
    assert evaluate(model, x, y) == {"cda": 1.0, "asr": None}
    assert evaluate(model, x, y, trigger=Trigger())["asr"] == 1.0
    assert predict(model, x).tolist() == [0, 1, 2, 3, 3]
    with pytest.raises(ConfigError, match="trigger must be"):
        evaluate(model, x, y, trigger=object())


def test_asr_rejects_bad_target_and_trigger_output() -> None:
    x, y = labelled_images([0, 1, 2])
    model = LabelReader()
    assert attack_success_rate(model, x, y, lambda b: b, target=torch.tensor(0)) == 0.0
    with pytest.raises(ConfigError, match="target 7"):
        attack_success_rate(model, x, y, lambda b: b, target=7)
    with pytest.raises(DataError, match="shape"):
        attack_success_rate(model, x, y, lambda b: b[:1], target=0)
    with pytest.raises(DataError, match="no images with a label other than the target 1"):
        attack_success_rate(model, *labelled_images([1, 1]), lambda b: b, target=1)
