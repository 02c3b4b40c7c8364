"""Model architectures, deterministic training, CDA/ASR metrics and safe persistence."""

from qcb_guard.models.io import count_parameters, load_model, load_state, save_model
from qcb_guard.models.mobilenet import MobileNetV2, mobilenet_v2
from qcb_guard.models.resnet import ResNet, resnet18
from qcb_guard.models.smallcnn import SmallCNN, WideCNN
from qcb_guard.models.train import (
    TrainResult,
    accuracy,
    attack_success_rate,
    evaluate,
    logits,
    predict,
    train,
    train_clean,
)
from qcb_guard.models.vgg import VGG, vgg11, vgg16
from qcb_guard.models.zoo import ARCHITECTURES, build_model, build_model_for

__all__ = [
    "ARCHITECTURES",
    "VGG",
    "MobileNetV2",
    "ResNet",
    "SmallCNN",
    "TrainResult",
    "WideCNN",
    "accuracy",
    "attack_success_rate",
    "build_model",
    "build_model_for",
    "count_parameters",
    "evaluate",
    "load_model",
    "load_state",
    "logits",
    "mobilenet_v2",
    "predict",
    "resnet18",
    "save_model",
    "train",
    "train_clean",
    "vgg11",
    "vgg16",
]
