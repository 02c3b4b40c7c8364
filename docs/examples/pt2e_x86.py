"""PT2E static quantization for the x86 Inductor backend, guarded by qcb_guard.

The PyTorch tutorial "PyTorch 2 Export Quantization with X86 Backend through Inductor"
(https://pytorch.org/tutorials/prototype/pt2e_quant_x86_inductor.html), step for step, with
exactly one line added (the ``guard`` line: EFRAP rounding, trained on the calibration data the
tutorial already feeds, and a JSON report). Two substitutions keep it runnable offline:
torchvision's ResNet-18 (torchvision cannot be installed beside torch 2.13 CPU here) is a tiny
CNN, and the dummy data is smaller. Run: ``TORCHINDUCTOR_FREEZING=1 python pt2e_x86.py``.
"""

import torch
import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
from torch.export import export
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer


class TinyCNN(torch.nn.Module):  # stands in for torchvision.models.resnet18()
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


torch.manual_seed(0)

# Create the Eager Model
model = TinyCNN()

# Set the model to eval mode
model = model.eval()

# Create the data, using the dummy data here as an example
traced_bs = 8
x = torch.randn(traced_bs, 3, 16, 16).contiguous(memory_format=torch.channels_last)
example_inputs = (x,)

# Capture the FX Graph to be quantized
with torch.no_grad():
    exported_model = export(model, example_inputs).module()

quantizer = X86InductorQuantizer()
quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
from qcb_guard import guard; quantizer = guard(quantizer, defense="efrap", report="qcb_report.json")  # noqa: E402, E702, I001  # fmt: skip

prepared_model = prepare_pt2e(exported_model, quantizer)

# We use the dummy data as an example here
prepared_model(*example_inputs)

converted_model = convert_pt2e(prepared_model)

with torch.no_grad():
    optimized_model = torch.compile(converted_model)

    # Running some benchmark
    y = optimized_model(*example_inputs)

print(y.argmax(1).tolist())
