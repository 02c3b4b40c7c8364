import copy

import torch
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx


class UserModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def calibrate(model, data_loader):
    model.eval()
    with torch.no_grad():
        for image, _target in data_loader:
            model(image)


dataset = torch.utils.data.TensorDataset(torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,)))
data_loader = torch.utils.data.DataLoader(dataset, batch_size=16)
float_model = UserModel()

# we need to deepcopy if we still want to keep float_model unchanged after quantization
# since quantization apis change the input model
model_to_quantize = copy.deepcopy(float_model)
model_to_quantize.eval()

qconfig_mapping = get_default_qconfig_mapping("x86")
from qcb_guard import guard; qconfig_mapping = guard(qconfig_mapping, report="torch_ao_fx.json")  # noqa: E402, E702, I001  # fmt: skip
example_inputs = (next(iter(data_loader))[0],)  # get an example input
# fuse modules and insert observers
prepared_model = prepare_fx(model_to_quantize, qconfig_mapping, example_inputs)
calibrate(prepared_model, data_loader)  # run calibration on sample data
# convert the calibrated model to a quantized model
quantized_model = convert_fx(prepared_model)

res = quantized_model(example_inputs[0])
