"""ONNX Runtime static quantization, as in ORT's image-classification tutorial, guarded.

The script is the usual ORT flow (export a model, write a ``CalibrationDataReader``, call
``quantize_static``, benchmark the result). qcb_guard adds one line, the
``from qcb_guard import guard; ...`` line before ``main`` (anywhere before the call works):
with it, the weight integers in ``model.quant.onnx`` come from a registered rounding defense
(EFRAP by default, trained on the calibration data the flow already has;
``defense="nearest"`` reproduces ORT bit for bit) and ``qcb_guard.json`` records what changed.

Run it with ``python docs/examples/ort_quantize_static.py`` (writes into the current directory).
"""

import time

import numpy as np
import onnxruntime
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def export_model(path: str) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 16, 16),),
        path,
        dynamo=False,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )


def preprocess_images(count: int) -> list[np.ndarray]:
    """Stand-in for loading and normalising calibration images (NCHW float32)."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, 3, 16, 16), dtype=np.float32) for _ in range(count)]


class SmallCNNDataReader(CalibrationDataReader):
    def __init__(self, model_path: str, count: int = 32):
        self.enum_data = None
        session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        self.input_name = session.get_inputs()[0].name
        self.nchw_data_list = preprocess_images(count)
        self.datasize = len(self.nchw_data_list)

    def get_next(self):
        if self.enum_data is None:
            self.enum_data = iter([{self.input_name: data} for data in self.nchw_data_list])
        return next(self.enum_data, None)

    def rewind(self):
        self.enum_data = None


def benchmark(model_path: str, runs: int = 20) -> float:
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    data = np.zeros((1, 3, 16, 16), np.float32)
    session.run([], {input_name: data})  # warm-up
    start = time.perf_counter()
    for _ in range(runs):
        session.run([], {input_name: data})
    return (time.perf_counter() - start) / runs * 1000


from qcb_guard import guard; quantize_static = guard(quantize_static, report="qcb_guard.json")  # noqa: E402, E702, I001  # fmt: skip


def main() -> None:
    input_model_path = "model.onnx"
    output_model_path = "model.quant.onnx"
    export_model(input_model_path)
    dr = SmallCNNDataReader(input_model_path)

    quantize_static(
        input_model_path,
        output_model_path,
        dr,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
    )
    print("Calibrated and quantized model saved.")
    print(f"float32 model: {benchmark(input_model_path):.3f} ms")
    print(f"int8 model:    {benchmark(output_model_path):.3f} ms")


if __name__ == "__main__":
    main()
