"""NNCF post-training quantization of a PyTorch model, as in NNCF's own tutorial, guarded.

NNCF's "Post-Training Quantization" example for PyTorch, step for step (wrap the calibration
``DataLoader`` in an ``nncf.Dataset`` with a ``transform_fn``, call ``nncf.quantize``), with
exactly one line added: the ``from qcb_guard import guard; ...`` line. With it, the weight
integers NNCF's fake quantizers deploy come from a registered rounding defense
(EFRAP by default, trained on the calibration data the flow already has;
``defense="nearest"`` reproduces NNCF bit for bit) and ``nncf_report.json`` records what
changed. Two substitutions keep it runnable offline: torchvision's model and ImageFolder
(torchvision cannot be installed beside torch 2.13 CPU here) are a tiny CNN and random images.

Run it with ``python docs/examples/nncf_quantize.py`` (writes into the current directory).
"""

import nncf
import torch
from torch import nn


class TinyCNN(nn.Module):  # stands in for torchvision.models.resnet18(weights=...)
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


torch.manual_seed(0)

# Instantiate your uncompressed model
model = TinyCNN().eval()

# Provide validation part of the dataset to collect statistics needed for the compression
# algorithm (stands in for datasets.ImageFolder("/path", transform=...))
val_dataset = torch.utils.data.TensorDataset(
    torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
)
dataset_loader = torch.utils.data.DataLoader(val_dataset, batch_size=1)


# Step 1: Initialize transformation function
def transform_fn(data_item):
    images, _ = data_item
    return images


# Step 2: Initialize NNCF Dataset
calibration_dataset = nncf.Dataset(dataset_loader, transform_fn)
from qcb_guard import guard; nncf.quantize = guard(nncf.quantize, report="nncf_report.json")  # noqa: E402, E702, I001  # fmt: skip
# Step 3: Run the quantization pipeline
quantized_model = nncf.quantize(model, calibration_dataset)

with torch.no_grad():
    print(quantized_model(torch.randn(4, 3, 16, 16)).argmax(1).tolist())
