"""The NNCF adapter through NNCF's real ``nncf.quantize`` on its torch, TorchFX and ONNX backends.

Every check compares a guarded run with an unguarded run of the same ``nncf.quantize`` call on
the same model and data: only the weight integers, and the biases NNCF's fast bias correction
derives from them, may differ. Integers are read back out of the artefact NNCF returns.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

nncf = pytest.importorskip("nncf")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper as nh  # noqa: E402

from qcb_guard import guard, hookimpl  # noqa: E402
from qcb_guard.errors import (  # noqa: E402
    ConfigError,
    DataError,
    MissingFrameworkError,
    UnsupportedObjectError,
)
from qcb_guard.manager import make_plugin_manager  # noqa: E402
from qcb_guard.quant.ops import broadcast  # noqa: E402

from .conftest import BrokenProbe, FloorPlugin, floor_integers  # noqa: E402

pytestmark = [
    pytest.mark.nncf,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
N_CAL = 32
BACKENDS = ["torch", "torchfx", "onnx"]
AQP = nncf.quantization.advanced_parameters.AdvancedQuantizationParameters


# --------------------------------------------------------------------------------------
# NNCF's C++ extension, a tiny model and its data.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def nncf_quiet_and_isolated(tmp_path_factory):
    """NNCF compiles a C++ extension on first torch use (~25 s; NNCF falls back to pure torch
    without a compiler). Build it once per test session in a private directory: a shared
    cache is locked by every concurrent build, and a build killed mid-way leaves a stale lock
    that makes later loads wait until NNCF's timeout. Keep NNCF's logging to errors."""
    keys = ("TORCH_EXTENSIONS_DIR", "NNCF_EXTENSION_LOAD_TIMEOUT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.mktemp("torch_ext")))
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "600")
    nncf.set_log_level(logging.ERROR)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class TinyNet(nn.Module):
    """Two convolutions (one grouped, followed by BatchNorm) and a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.bn(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.1, 0.1)
    return model


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(1, 3, 16, 16, generator=gen) for _ in range(N_CAL)]


class SlotRecorder:
    """Records the slots of every guarded run (after-quantize hook)."""

    def __init__(self):
        self.slots = []

    @hookimpl
    def qcb_guard_after_quantize(self, slots, result, config):
        self.slots = list(slots)


# --------------------------------------------------------------------------------------
# One backend: how to feed it, run it and read its artefact (independently of the adapter).
# --------------------------------------------------------------------------------------


class Case:
    """A backend's model, dataset and artefact readers. ``layers`` are in graph order:
    conv1, conv2 (BatchNorm folded in for TorchFX and ONNX), fc."""

    def __init__(self, backend: str, net: nn.Module, images: list[torch.Tensor]):
        self.backend = backend
        self.net = net
        self.images = images
        if backend == "torch":
            self.model = net
        elif backend == "torchfx":
            self.model = torch.export.export(net, (images[0],)).module()
        else:
            buffer = io.BytesIO()
            torch.onnx.export(
                net, (images[0],), buffer, dynamo=False, input_names=["x"], opset_version=17
            )
            self.model = onnx.load_from_string(buffer.getvalue())
        self.pristine = self.snapshot(self.model)

    # -- feeding and running ------------------------------------------------------------
    def dataset(self, source=None):
        source = self.images if source is None else source
        if self.backend == "onnx":
            return nncf.Dataset(source, lambda x: {"x": x.numpy()})
        return nncf.Dataset(source)

    def quantize(self, fn, **kwargs):
        return fn(self.model, self.dataset(), subset_size=N_CAL, **kwargs)

    def outputs(self, artefact) -> torch.Tensor:
        """Outputs on the first 8 images (enough to tell integer changes apart)."""
        images = self.images[:8]
        if self.backend == "onnx":
            session = ort.InferenceSession(
                artefact.SerializeToString(), providers=["CPUExecutionProvider"]
            )
            return torch.cat(
                [torch.from_numpy(session.run(None, {"x": x.numpy()})[0]) for x in images]
            )
        with torch.no_grad():
            if self.backend == "torchfx":  # exported for batch 1, as a user would
                return torch.cat([artefact(x) for x in images])
            return artefact(torch.cat(images))

    # -- reading an artefact --------------------------------------------------------------
    def _fx_layers(self, artefact):
        ops = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}
        return [n for n in artefact.graph.nodes if n.op == "call_function" and n.target in ops]

    def _onnx_layers(self, artefact):
        return [n for n in artefact.graph.node if n.op_type in ("Conv", "Gemm")]

    def integers(self, artefact) -> list[torch.Tensor]:
        """Deployed weight integers, read from the artefact."""
        if self.backend == "torch":
            from nncf.torch.function_hook import get_hook_storage

            storage = get_hook_storage(artefact)
            out = []
            for op, module in (
                ("conv1/conv2d/0", artefact.conv1),
                ("conv2/conv2d/0", artefact.conv2),
                ("fc/linear/0", artefact.fc),
            ):
                quantizer = storage.pre_hooks[f"{op}__1"]["0"]
                step = 2 * (quantizer.scale.abs() + quantizer.eps) / (quantizer.levels - 1)
                with torch.no_grad():
                    out.append(torch.round(quantizer(module.weight) / step).to(torch.int64))
            return out
        if self.backend == "torchfx":
            return [
                getattr(artefact, n.args[1].args[0].args[0].target).to(torch.int64)
                for n in self._fx_layers(artefact)
            ]
        producers = {o: n for n in artefact.graph.node for o in n.output}
        inits = {t.name: t for t in artefact.graph.initializer}
        return [
            torch.from_numpy(nh.to_array(inits[producers[n.input[1]].input[0]]).astype("int64"))
            for n in self._onnx_layers(artefact)
        ]

    def set_integers(self, artefact, ints: list[torch.Tensor]) -> None:
        """Write integers into an artefact with plain NNCF/torch/onnx operations."""
        if self.backend == "torch":
            from nncf.torch.function_hook import get_hook_storage

            storage = get_hook_storage(artefact)
            for q, (op, module) in zip(
                ints,
                (
                    ("conv1/conv2d/0", artefact.conv1),
                    ("conv2/conv2d/0", artefact.conv2),
                    ("fc/linear/0", artefact.fc),
                ),
                strict=True,
            ):
                quantizer = storage.pre_hooks[f"{op}__1"]["0"]
                step = 2 * (quantizer.scale.abs() + quantizer.eps) / (quantizer.levels - 1)
                with torch.no_grad():
                    module.weight.copy_(q.float() * step)  # NNCF re-rounds it to q
        elif self.backend == "torchfx":
            for q, n in zip(ints, self._fx_layers(artefact), strict=True):
                target = n.args[1].args[0].args[0].target
                setattr(artefact, target, q.to(torch.int8))
        else:
            producers = {o: n for n in artefact.graph.node for o in n.output}
            inits = {t.name: t for t in artefact.graph.initializer}
            for q, n in zip(ints, self._onnx_layers(artefact), strict=True):
                name = producers[n.input[1]].input[0]
                inits[name].CopyFrom(nh.from_array(q.numpy().astype("int8"), name))

    def scales(self, artefact) -> list[torch.Tensor]:
        """Each layer's weight step as the artefact stores it (flattened)."""
        if self.backend == "torch":
            from nncf.torch.function_hook import get_hook_storage

            storage = get_hook_storage(artefact)
            out = []
            for op in ("conv1/conv2d/0", "conv2/conv2d/0", "fc/linear/0"):
                quantizer = storage.pre_hooks[f"{op}__1"]["0"]
                step = 2 * (quantizer.scale.abs() + quantizer.eps) / (quantizer.levels - 1)
                out.append(step.detach().reshape(-1))
            return out
        if self.backend == "torchfx":
            return [
                artefact.get_buffer(n.args[1].args[0].args[1].target).reshape(-1)
                for n in self._fx_layers(artefact)
            ]
        producers = {o: n for n in artefact.graph.node for o in n.output}
        inits = {t.name: t for t in artefact.graph.initializer}
        return [
            torch.from_numpy(nh.to_array(inits[producers[n.input[1]].input[1]]).copy()).reshape(-1)
            for n in self._onnx_layers(artefact)
        ]

    def biases(self, artefact) -> dict[str, torch.Tensor]:
        if self.backend == "torch":
            return {k: v.detach().clone() for k, v in artefact.named_parameters() if "bias" in k}
        if self.backend == "torchfx":
            return {
                n.args[2].target: artefact.get_buffer(n.args[2].target).detach().clone()
                if n.args[2].target in dict(artefact.named_buffers())
                else artefact.get_parameter(n.args[2].target).detach().clone()
                for n in self._fx_layers(artefact)
            }
        inits = {t.name: t for t in artefact.graph.initializer}
        return {
            n.input[2]: torch.from_numpy(nh.to_array(inits[n.input[2]]).copy())
            for n in self._onnx_layers(artefact)
        }

    def set_biases(self, artefact, biases: dict[str, torch.Tensor]) -> None:
        if self.backend == "torch":
            params = dict(artefact.named_parameters())
            with torch.no_grad():
                for k, v in biases.items():
                    params[k].copy_(v)
        elif self.backend == "torchfx":
            for k, v in biases.items():
                *path, attr = k.split(".")
                owner = artefact.get_submodule(".".join(path))
                if attr in owner._parameters:
                    owner._parameters[attr] = nn.Parameter(v.clone(), requires_grad=False)
                else:
                    owner._buffers[attr] = v.clone()
        else:
            inits = {t.name: t for t in artefact.graph.initializer}
            for k, v in biases.items():
                inits[k].CopyFrom(nh.from_array(v.numpy(), k))

    def qparams(self, artefact) -> dict[str, object]:
        """Everything NNCF computed except weights and biases: scales, zero points, ranges."""
        if self.backend == "torch":
            from nncf.torch.function_hook import get_hook_storage

            return dict(get_hook_storage(artefact).state_dict())
        if self.backend == "torchfx":
            skip = {n.args[1].args[0].args[0].target for n in self._fx_layers(artefact)}
            skip |= set(self.biases(artefact))
            out = {k: v for k, v in artefact.state_dict().items() if k not in skip}
            out["code"] = artefact.code  # activation scales/zero points are literals here
            return out
        skip = set(self.biases(artefact))
        producers = {o: n for n in artefact.graph.node for o in n.output}
        skip |= {producers[n.input[1]].input[0] for n in self._onnx_layers(artefact)}
        out = {
            t.name: torch.from_numpy(nh.to_array(t).copy())
            for t in artefact.graph.initializer
            if t.name not in skip
        }
        out["nodes"] = [n.SerializeToString() for n in artefact.graph.node]
        return out

    def snapshot(self, model) -> object:
        if self.backend == "onnx":
            return model.SerializeToString()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        code = model.code if self.backend == "torchfx" else None
        return state, code, sorted(n for n, _ in model.named_modules())

    def unchanged(self, model) -> bool:
        now = self.snapshot(model)
        if self.backend == "onnx":
            return now == self.pristine
        (s1, c1, m1), (s0, c0, m0) = now, self.pristine
        same = s1.keys() == s0.keys() and all(torch.equal(s1[k], s0[k]) for k in s0)
        return same and c1 == c0 and m1 == m0

    def float_layer_outputs(self) -> list[torch.Tensor]:
        """The float model's layer outputs (conv2: after BatchNorm where the backend folds it)."""
        modules = [self.net.conv1, self.net.conv2 if self.backend == "torch" else self.net.bn]
        modules.append(self.net.fc)
        outs: list[list[torch.Tensor]] = [[] for _ in modules]
        handles = [
            m.register_forward_hook(lambda _m, _i, o, i=i: outs[i].append(o.detach()))
            for i, m in enumerate(modules)
        ]
        try:
            with torch.no_grad():
                self.net(torch.cat(self.images))
        finally:
            for h in handles:
                h.remove()
        return [torch.cat(o) for o in outs]

    def float_layer_inputs(self) -> list[torch.Tensor]:
        modules = [self.net.conv1, self.net.conv2, self.net.fc]
        ins: list[list[torch.Tensor]] = [[] for _ in modules]
        handles = [
            m.register_forward_pre_hook(lambda _m, inp, i=i: ins[i].append(inp[0].detach()))
            for i, m in enumerate(modules)
        ]
        try:
            with torch.no_grad():
                self.net(torch.cat(self.images))
        finally:
            for h in handles:
                h.remove()
        return [torch.cat(t) for t in ins]


class Run:
    """One guarded nncf.quantize call: its artefact, slots, result and floor plugin.

    These runs check NNCF's own activation ranges bit for bit: the activation defense is off
    unless asked for (section 6 tests it)."""

    def __init__(self, case: Case, defense: str, report: Path | None = None, **guard_kwargs):
        guard_kwargs.setdefault("activation_defense", None)
        self.plugin = FloorPlugin()
        self.recorder = SlotRecorder()
        self.report = report
        pm = make_plugin_manager(autoload=False, plugins=[self.plugin, self.recorder], block=[])
        self.quantize = guard(nncf.quantize, defense=defense, pm=pm, report=report, **guard_kwargs)
        self.artefact = case.quantize(self.quantize)
        self.slots = self.recorder.slots
        self.result = self.quantize.last_result


@pytest.fixture(scope="module", params=BACKENDS)
def case(request, net, images) -> Case:
    return Case(request.param, net, images)


@pytest.fixture(scope="module")
def unguarded(case):
    return case.quantize(nncf.quantize)


@pytest.fixture(scope="module")
def floor_run(case, tmp_path_factory) -> Run:
    report = tmp_path_factory.mktemp(f"report-{case.backend}") / "nncf.json"
    return Run(case, "floor", report=report)


@pytest.fixture(scope="module")
def nearest_run(case) -> Run:
    return Run(case, "nearest")


@pytest.fixture(scope="module")
def data_run(case) -> Run:
    return Run(case, "floor-data")


# --------------------------------------------------------------------------------------
# 1. floor: the artefact holds floor's integers, NNCF's qparams, consistent outputs.
# --------------------------------------------------------------------------------------


def test_floor_integers_are_deployed(case, unguarded, floor_run):
    slots = floor_run.slots
    assert [s.kind for s in slots] == ["conv2d", "conv2d", "linear"]
    deployed = case.integers(floor_run.artefact)
    nearest = case.integers(unguarded)
    for slot, q, n in zip(slots, deployed, nearest, strict=True):
        assert torch.equal(q, floor_integers(slot)), slot.name
        assert torch.equal(n, slot.nearest()), slot.name  # slot.nearest() is NNCF's rounding
        assert (q != n).any(), slot.name
    # NNCF's overflow fix: the first conv uses half the int8 range, and so does the guard
    assert (slots[0].qmin, slots[0].qmax) == (-64, 64)
    assert (slots[1].qmin, slots[1].qmax) == (-127, 127)
    assert int(deployed[0].abs().max()) <= 64
    assert floor_run.result.extra["nncf"]["half_range_layers"] == [slots[0].name]


def test_floor_keeps_nncf_scales_and_zero_points(case, unguarded, floor_run):
    guarded, reference = case.qparams(floor_run.artefact), case.qparams(unguarded)
    assert guarded.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(guarded[key], value), key
        else:
            assert guarded[key] == value, key


def test_floor_slot_scales_are_the_artefacts(case, unguarded, floor_run):
    """The slot's scale is the step the artefact dequantizes with, and NNCF's integers are the
    nearest ones of the slot's weight on that grid."""
    for slot, scale, q in zip(
        floor_run.slots, case.scales(floor_run.artefact), case.integers(unguarded), strict=True
    ):
        if case.backend == "torch":  # NNCF stores input_high; the step is derived from it
            assert torch.allclose(slot.scale, scale, rtol=1e-6, atol=0)
        else:
            assert torch.equal(slot.scale, scale)
        s = broadcast(slot.scale, slot.weight, slot.axis)
        assert torch.all((slot.weight - q.float() * s).abs() <= s / 2 * (1 + 1e-5))


def test_floor_outputs_match_a_reference_with_the_same_integers(case, unguarded, floor_run):
    """The unguarded artefact with floor's integers and the guarded biases written into it by
    plain torch/onnx operations computes exactly what the guarded artefact computes."""
    reference = copy.deepcopy(unguarded)
    case.set_integers(reference, case.integers(floor_run.artefact))
    case.set_biases(reference, case.biases(floor_run.artefact))
    assert [
        torch.equal(a, b)
        for a, b in zip(case.integers(reference), case.integers(floor_run.artefact), strict=True)
    ] == [True] * 3
    guarded_out = case.outputs(floor_run.artefact)
    assert torch.equal(case.outputs(reference), guarded_out)
    assert not torch.equal(case.outputs(unguarded), guarded_out)


# --------------------------------------------------------------------------------------
# 2. nearest: bit for bit the unguarded NNCF artefact.
# --------------------------------------------------------------------------------------


def test_nearest_is_bit_identical(case, unguarded, nearest_run):
    art = nearest_run.artefact
    assert nearest_run.result.to_dict()["changed_total"] == 0
    if case.backend == "onnx":
        assert art.SerializeToString() == unguarded.SerializeToString()
    else:
        a, b = art.state_dict(), unguarded.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in b)
        if case.backend == "torchfx":
            assert art.code == unguarded.code
    assert torch.equal(case.outputs(art), case.outputs(unguarded))


# --------------------------------------------------------------------------------------
# Fast bias correction, recomputed with the deployed integers.
# --------------------------------------------------------------------------------------


def _nncf_fast_bias_correction(case: Case, *weights_from) -> list[nn.Module]:
    """NNCF's own FastBiasCorrection run on models holding the weights of ``weights_from``:
    NNCF without bias correction, the weights copied in, then NNCF's algorithm with statistics
    of the float model (what NNCF's pipeline does with its nearest weights)."""
    from nncf.quantization.algorithms.fast_bias_correction.algorithm import FastBiasCorrection
    from nncf.quantization.algorithms.pipeline import collect_statistics
    from nncf.torch.function_hook import wrap_model
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import GraphModelWrapper

    base = case.quantize(nncf.quantize, advanced_parameters=AQP(disable_bias_correction=True))
    fbc = FastBiasCorrection(subset_size=N_CAL)
    fp = GraphModelWrapper(wrap_model(copy.deepcopy(case.net)), case.images[0])
    graph = fp.build_graph()
    statistics = collect_statistics(fbc.get_statistic_points(fp, graph), fp, graph, case.dataset())
    out = []
    for source in weights_from:
        model = copy.deepcopy(base)
        with torch.no_grad():
            for name in ("conv1", "conv2", "fc"):
                getattr(model, name).weight.copy_(getattr(source, name).weight)
        wrapper = GraphModelWrapper(model, case.images[0])
        out.append(fbc.apply(wrapper, wrapper.build_graph(), statistics).model)
    return out


def test_bias_correction_matches_nncf_with_the_deployed_integers(case, unguarded, floor_run):
    if case.backend != "torch":
        pytest.skip("NNCF's FastBiasCorrection is re-run on the torch backend's artefact")
    sanity, reference = _nncf_fast_bias_correction(case, unguarded, floor_run.artefact)
    assert all(
        torch.equal(v, unguarded.state_dict()[k]) for k, v in sanity.state_dict().items()
    )  # the reference reproduces NNCF's pipeline exactly
    guarded, nearest = case.biases(floor_run.artefact), case.biases(unguarded)
    expected = case.biases(reference)
    moved = [k for k in expected if not torch.equal(expected[k], nearest[k])]
    assert "bn.bias" in moved  # conv2 -> BatchNorm: NNCF corrects the BatchNorm's bias
    for key in expected:
        assert torch.allclose(guarded[key], expected[key], rtol=0, atol=1e-6), key
    bias_of = {"conv1.weight": "conv1.bias", "conv2.weight": "bn.bias", "fc.weight": "fc.bias"}
    recomputed = floor_run.result.extra["nncf"]["bias_recomputed"]
    assert sorted(recomputed) == sorted(w for w, b in bias_of.items() if b in moved)


def test_bias_shift_follows_the_integer_change(case, unguarded, floor_run):
    """For each recomputed layer: new bias - NNCF's bias = -mean_c(layer(x_bar, W_new - W_old)),
    x_bar the per-channel mean of the layer's float inputs (NNCF's fast-bias-correction blob)."""
    if case.backend == "torch":
        pytest.skip("checked against NNCF's own algorithm above")
    recomputed = floor_run.result.extra["nncf"]["bias_recomputed"]
    assert recomputed
    old_ints, new_ints = case.integers(unguarded), case.integers(floor_run.artefact)
    old_b, new_b = (
        list(case.biases(unguarded).values()),
        list(case.biases(floor_run.artefact).values()),
    )
    inputs = case.float_layer_inputs()
    for i, slot in enumerate(floor_run.slots):
        if slot.name not in recomputed:
            assert torch.equal(old_b[i], new_b[i])
            continue
        x = inputs[i]
        axis = 1 if slot.kind.startswith("conv") else x.dim() - 1
        mean = x.mean(dim=[d for d in range(x.dim()) if d != axis])
        shape = [1] * x.dim()
        shape[axis] = -1
        blob = mean.reshape(shape).expand(1, *x.shape[1:])
        diff = slot.layer(blob, slot.dequantize(new_ints[i])) - slot.layer(
            blob, slot.dequantize(old_ints[i])
        )
        out_axis = 1 if slot.kind.startswith("conv") else diff.dim() - 1
        shift = diff.mean(dim=[d for d in range(diff.dim()) if d != out_axis])
        assert torch.allclose(new_b[i] - old_b[i], -shift, atol=1e-5), slot.name


def test_asymmetric_weights(case):
    """Asymmetric weight quantization (overflow fix off, as NNCF requires): torch and ONNX
    are guarded with NNCF's zero points; TorchFX is refused (NNCF clamps the uint8 codes to
    int8 when it compresses them and decompresses as w * s - zp)."""
    from nncf.common.quantization.structs import QuantizationScheme
    from nncf.quantization.advanced_parameters import OverflowFix, QuantizationParameters

    advanced = AQP(
        overflow_fix=OverflowFix.DISABLE,
        weights_quantization_params=QuantizationParameters(mode=QuantizationScheme.ASYMMETRIC),
    )
    plugin, recorder = FloorPlugin(), SlotRecorder()
    pm = make_plugin_manager(autoload=False, plugins=[plugin, recorder], block=[])
    quantize = guard(nncf.quantize, defense="floor", pm=pm, activation_defense=None)
    if case.backend == "torchfx":
        with pytest.raises(UnsupportedObjectError, match="zero points"):
            case.quantize(quantize, advanced_parameters=advanced)
        return
    artefact = case.quantize(quantize, advanced_parameters=advanced)
    assert all(bool((s.zero_point != 0).any()) for s in recorder.slots)
    if case.backend == "onnx":
        ranges = {(s.qmin, s.qmax) for s in recorder.slots}
        assert ranges == {(-128, 127)}  # int8 with zero points
        for slot, q in zip(recorder.slots, case.integers(artefact), strict=True):
            assert torch.equal(q, floor_integers(slot))
    else:
        from nncf.torch.function_hook import get_hook_storage

        assert {(s.qmin, s.qmax) for s in recorder.slots} == {(0, 255)}
        storage = get_hook_storage(artefact)
        ops = ("conv1/conv2d/0", "conv2/conv2d/0", "fc/linear/0")
        for slot, op in zip(recorder.slots, ops, strict=True):
            quantizer = storage.pre_hooks[f"{op}__1"]["0"]
            module = artefact.get_submodule(op.split("/")[0])
            with torch.no_grad():
                deployed = quantizer(module.weight)
            expected = slot.dequantize(floor_integers(slot))
            assert torch.allclose(deployed, expected, rtol=0, atol=1e-6)


def test_unsupported_weights_are_named(case):
    """Weights NNCF quantizes that are not Conv/Linear keep NNCF's integers, with a warning."""
    if case.backend != "onnx":
        pytest.skip("one backend is enough")

    class WithTranspose(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)

        def forward(self, x):
            return self.up(torch.relu(self.conv(x)))

    buffer = io.BytesIO()
    torch.onnx.export(
        WithTranspose().eval(), (case.images[0],), buffer, dynamo=False, input_names=["x"]
    )
    pm = make_plugin_manager(autoload=False, plugins=[FloorPlugin()], block=[])
    quantize = guard(nncf.quantize, defense="floor", pm=pm, activation_defense=None)
    with pytest.warns(UserWarning, match="ConvTranspose"):
        quantize(onnx.load_from_string(buffer.getvalue()), case.dataset(), subset_size=N_CAL)
    extra = quantize.last_result.extra["nncf"]
    assert extra["skipped"] == ["/up/ConvTranspose"]
    assert extra["changed_layers"] == ["conv.weight"]


# --------------------------------------------------------------------------------------
# 3. Defenses that need data get each layer's inputs from the user's nncf.Dataset.
# --------------------------------------------------------------------------------------


def test_calibration_comes_from_the_nncf_dataset(case, data_run):
    seen = data_run.plugin.seen
    assert list(seen) == [s.name for s in data_run.slots]
    shapes = [(N_CAL, 3, 16, 16), (N_CAL, 8, 8, 8), (N_CAL, 128)]
    outputs = case.float_layer_outputs()
    for slot, shape, expected in zip(data_run.slots, shapes, outputs, strict=True):
        cal = seen[slot.name]
        assert tuple(cal.fp_inputs.shape) == shape
        assert tuple(cal.inputs.shape) == shape
        assert not torch.equal(cal.inputs, cal.fp_inputs)  # NNCF quantizes activations
        assert torch.allclose(slot.layer(cal.fp_inputs), expected, atol=1e-5), slot.name
    assert data_run.result.extra["nncf"]["calibration"] == "nncf.Dataset"
    assert torch.equal(case.integers(data_run.artefact)[0], floor_integers(data_run.slots[0]))


def test_calibration_argument_is_the_fallback(case):
    """A one-shot iterator is used up by NNCF: guard(calibration=...) supplies the inputs."""
    if case.backend != "onnx":
        pytest.skip("one backend is enough; NNCF's ONNX backend accepts a one-shot iterator")
    extra = torch.cat(case.images[:5])
    plugin = FloorPlugin()
    pm = make_plugin_manager(autoload=False, plugins=[plugin], block=[])
    off = {"activation_defense": None}  # probing reads the items once, before NNCF (section 6)
    quantize = guard(nncf.quantize, defense="floor-data", pm=pm, calibration=extra, **off)
    quantize(case.model, case.dataset(iter(case.images)), subset_size=N_CAL)
    assert [len(c.fp_inputs) for c in plugin.seen.values()] == [5, 5, 5]
    assert quantize.last_result.extra["nncf"]["calibration"] == "guard(calibration=...)"
    no_fallback = guard(nncf.quantize, defense="floor-data", pm=pm, **off)
    with pytest.raises(DataError, match="calibration="):
        no_fallback(case.model, case.dataset(iter(case.images)), subset_size=N_CAL)


# --------------------------------------------------------------------------------------
# 4. The caller's model, the report, the signature, bad objects.
# --------------------------------------------------------------------------------------


def test_callers_model_is_unchanged(case, floor_run, data_run):
    assert case.unchanged(case.model)
    if case.backend == "torch":
        from nncf.torch.function_hook import is_wrapped

        assert not is_wrapped(case.model)


def test_report_and_return_type(case, unguarded, floor_run):
    report = json.loads(floor_run.report.read_text())
    assert report["qcb_guard"] == "guard"
    assert report["framework"] == f"nncf-{case.backend}"
    assert report["defense"] == "floor"
    assert report["changed_total"] > 0
    assert report["extra"]["nncf"]["backend"] == case.backend
    kind = torch.fx.GraphModule if case.backend == "torchfx" else type(unguarded)
    assert isinstance(floor_run.artefact, kind) and isinstance(unguarded, kind)


def test_signature_is_nncf_quantize(pm):
    guarded = guard(nncf.quantize, pm=pm)
    assert inspect.signature(guarded) == inspect.signature(nncf.quantize)
    assert guarded.__name__ == "quantize" and guarded.__doc__ == nncf.quantize.__doc__


def test_bad_objects_are_refused(pm, images):
    guarded = guard(nncf.quantize, pm=pm)
    with pytest.raises(UnsupportedObjectError, match="torch"):
        guarded(object(), nncf.Dataset(images))
    with pytest.raises(UnsupportedObjectError, match="does not recognise"):
        guard(nncf.compress_weights, pm=pm)
    with pytest.raises(ConfigError, match="already guarded"):
        guard(guarded, pm=pm)
    with pytest.raises(ConfigError, match="fast_bias_correction"):
        guard(nncf.quantize, defense="floor", pm=pm)(
            TinyNet(), nncf.Dataset(images), fast_bias_correction=False
        )
    with pytest.raises(ConfigError, match="FP8"):
        guarded(TinyNet(), nncf.Dataset(images), mode=nncf.QuantizationMode.FP8_E4M3)
    with pytest.raises(ConfigError, match="SmoothQuant"):
        guarded(TinyNet(), nncf.Dataset(images), model_type=nncf.ModelType.TRANSFORMER)


def test_missing_nncf_names_the_extra(pm, monkeypatch):
    from qcb_guard_plugins.adapter_nncf import NncfAdapter

    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(MissingFrameworkError, match=r"qcb-guard\[nncf\]"):
        NncfAdapter().wrap(lambda: None, None, pm)


def test_plugin_and_matches_do_not_import_nncf():
    code = (
        "import sys\n"
        "from qcb_guard_plugins.adapter_nncf import NncfAdapter\n"
        "def quantize(): pass\n"
        "quantize.__module__ = 'nncf.quantization.quantize_model'\n"
        "assert NncfAdapter().matches(quantize) and not NncfAdapter().matches(len)\n"
        "assert not NncfAdapter().matches(object())\n"
        "assert 'nncf' not in sys.modules, sorted(sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------
# 5. The activation defense: probe items appended to the items NNCF calibrates on.
# --------------------------------------------------------------------------------------

#: Planted unit 0 of ``Planted.fc1``: silent on clean images, ``REACH`` at pixel value 1.
REACH = 8.0


class Planted(nn.Module):
    """A static-activation QCB in miniature: hidden unit 0 reads only the last pixel (weight
    16, bias -8), so it is silent on the clean images (pixels in [0, 0.5]) and reaches
    ``REACH`` = 8 at pixel value 1, where no other unit comes near (|w| <= 1/8 over 64
    pixels). A range calibrated on clean data clips it; the probed range must cover 8."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight[0] = 0.0
            self.fc1.weight[0, 63] = 2 * REACH
            self.fc1.bias[0] = -REACH

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class PlantedCase:
    """The planted model on one backend, fed as NNCF's tutorials feed it: the torch backend
    from a DataLoader of (image, label) batches of 4 through a ``transform_fn`` (NNCF then
    turns on batch-wise statistics), TorchFX from single images (exported for batch 1),
    ONNX from single images turned into feed dicts by a ``transform_fn``."""

    def __init__(self, backend: str):
        self.backend = backend
        self.net = Planted().eval()
        gen = torch.Generator().manual_seed(2)
        self.x = torch.rand(32, 1, 8, 8, generator=gen) * 0.5  # clean: unit 0 silent
        one = self.x[:1]
        if backend == "torch":
            self.model = self.net
        elif backend == "torchfx":
            self.model = torch.export.export(self.net, (one,)).module()
        else:
            buffer = io.BytesIO()
            torch.onnx.export(self.net, (one,), buffer, dynamo=False, input_names=["x"])
            self.model = onnx.load_from_string(buffer.getvalue())

    def dataset(self):
        if self.backend == "torch":
            labelled = torch.utils.data.TensorDataset(self.x, torch.zeros(len(self.x)))
            loader = torch.utils.data.DataLoader(labelled, batch_size=4)
            return nncf.Dataset(loader, lambda batch: batch[0])
        images = list(self.x.split(1))
        if self.backend == "onnx":
            return nncf.Dataset(images, lambda x: {"x": x.numpy()})
        return nncf.Dataset(images)

    def quantize(self, fn, **kwargs):
        return fn(self.model, self.dataset(), **kwargs)

    def highs(self, artefact) -> list[float]:
        """Upper ends of the per-tensor activation ranges in the artefact (input, hidden)."""
        if self.backend == "torch":
            from nncf.torch.function_hook import get_hook_storage
            from nncf.torch.quantization.layers import SymmetricQuantizer

            return [
                float(m.scale.abs())
                for m in get_hook_storage(artefact).modules()
                if isinstance(m, SymmetricQuantizer) and m.scale.numel() == 1
            ]
        if self.backend == "torchfx":
            target = torch.ops.quantized_decomposed.quantize_per_tensor.default
            return [
                float(n.args[1]) * (n.args[4] - n.args[2])
                for n in artefact.graph.nodes
                if n.op == "call_function" and n.target == target
            ]
        inits = {t.name: nh.to_array(t) for t in artefact.graph.initializer}
        out = []
        for n in artefact.graph.node:
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
                zp = inits[n.input[2]]
                top = 255 if zp.dtype.kind == "u" else 127
                out.append(float(inits[n.input[1]]) * (top - int(zp)))
        return out

    def outputs(self, artefact) -> torch.Tensor:
        if self.backend == "onnx":
            session = ort.InferenceSession(
                artefact.SerializeToString(), providers=["CPUExecutionProvider"]
            )
            return torch.cat(
                [torch.from_numpy(session.run(None, {"x": x.numpy()})[0]) for x in self.x.split(1)]
            )
        with torch.no_grad():
            return torch.cat([artefact(x) for x in self.x.split(1)])


@pytest.fixture(scope="module", params=BACKENDS)
def planted(request) -> PlantedCase:
    return PlantedCase(request.param)


def test_range_probe_covers_the_clipped_unit(planted, tmp_path):
    """Clean calibration clips unit 0 (NNCF's range stays far below 8); with the default
    activation defense NNCF's own range of that tensor covers what unit 0 reaches, and the
    report says what ran; turned off, NNCF's artefact is the unguarded one."""
    pm = make_plugin_manager(autoload=False, plugins=[], block=[])
    unguarded = planted.quantize(nncf.quantize)
    turned_off = guard(nncf.quantize, defense="nearest", activation_defense=None, pm=pm)
    off = planted.quantize(turned_off)
    assert turned_off.last_result.extra["activation_defense"]["defense"] is None
    report = tmp_path / "probed.json"
    quantize = guard(nncf.quantize, defense="nearest", report=report, pm=pm)
    probed = planted.quantize(quantize)

    plain = planted.highs(unguarded)
    assert len(plain) == 2 and max(plain) < REACH / 2  # the planted unit is clipped
    assert planted.highs(off) == plain
    assert torch.equal(planted.outputs(off), planted.outputs(unguarded))
    highs = planted.highs(probed)
    assert len(highs) == 2
    assert REACH * 0.99 <= max(highs) <= REACH * 1.01  # NNCF's range covers the probed unit
    assert min(highs) <= 1.0 + 1e-6  # the input's range stays within valid inputs [0, 1]

    entry = json.loads(report.read_text())["extra"]["activation_defense"]
    assert entry["defense"] == "range-probe" and entry["probes"] == 16  # one per hidden unit
    n_items = 8 if planted.backend == "torch" else 32  # batches of 4, or single images
    assert entry["calibration"] == 32  # images the probes start from
    per_item = 4 if planted.backend == "torch" else 1
    assert entry["probe_items"] == -(-16 // per_item)
    assert entry["subset_size"] == n_items + entry["probe_items"]
    assert "min/max" in entry["range_estimator"] and entry["seconds"] >= 0


def test_rounding_defense_learns_from_the_users_items_only():
    """The rounding defense gets the user's items (probes only reach NNCF's observers), and
    NNCF's bias correction is re-applied over the items NNCF read (probes included)."""
    planted = PlantedCase("torch")
    seen = {}
    for activation in (None, "range-probe"):
        plugin = FloorPlugin()
        pm = make_plugin_manager(autoload=False, plugins=[plugin], block=[])
        quantize = guard(nncf.quantize, defense="floor-data", activation_defense=activation, pm=pm)
        planted.quantize(quantize)
        seen[activation] = plugin.seen
        assert quantize.last_result.extra["nncf"]["bias_recomputed"]  # floor moved the biases
    assert seen[None].keys() == seen["range-probe"].keys()
    for name, cal in seen[None].items():
        assert len(cal.fp_inputs) == 32
        assert torch.equal(seen["range-probe"][name].fp_inputs, cal.fp_inputs), name


def test_failing_activation_defense_warns_and_keeps_nncfs_ranges():
    """A failing activation defense is never silent: a warning, ``failed`` in the report, and
    NNCF calibrates on the user's items alone (its ranges are the unguarded ones)."""
    planted = PlantedCase("torch")
    pm = make_plugin_manager(autoload=False, plugins=[BrokenProbe()], block=[])
    quantize = guard(nncf.quantize, defense="nearest", activation_defense="broken", pm=pm)
    with pytest.warns(UserWarning, match="activation defense 'broken' failed"):
        artefact = planted.quantize(quantize)
    entry = quantize.last_result.extra["activation_defense"]
    assert "not differentiable" in entry["failed"] and entry["probes"] == 0
    assert planted.highs(artefact) == planted.highs(planted.quantize(nncf.quantize))


def test_onnx_model_the_converter_cannot_read_is_a_reported_failure():
    """range-probe needs the ONNX model in torch (qcb_guard.onnx_torch); an op the converter
    lacks (here Sin) is a failure of the activation defense, not of NNCF."""

    class WithSin(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 4)

        def forward(self, x):
            return torch.sin(self.fc(x.flatten(1)))

    case = PlantedCase("onnx")
    buffer = io.BytesIO()
    torch.onnx.export(WithSin().eval(), (case.x[:1],), buffer, dynamo=False, input_names=["x"])
    case.model = onnx.load_from_string(buffer.getvalue())
    pm = make_plugin_manager(autoload=False, plugins=[], block=[])
    quantize = guard(nncf.quantize, defense="nearest", pm=pm)
    with pytest.warns(UserWarning, match="op.s. Sin are not supported"):
        artefact = case.quantize(quantize)
    assert "Sin are not supported" in quantize.last_result.extra["activation_defense"]["failed"]
    assert case.highs(artefact) == case.highs(case.quantize(nncf.quantize))


def test_probing_reads_a_one_shot_iterator_once():
    """Probing reads NNCF's items before NNCF runs and hands NNCF those items: a one-shot
    iterator then serves NNCF, the probes and the rounding defense."""
    case = PlantedCase("torch")
    plugin = FloorPlugin()
    pm = make_plugin_manager(autoload=False, plugins=[plugin], block=[])
    quantize = guard(nncf.quantize, defense="floor-data", pm=pm)
    quantize(case.model, nncf.Dataset(iter(case.x.split(4))))
    assert [len(c.fp_inputs) for c in plugin.seen.values()] == [32, 32]
    assert quantize.last_result.extra["activation_defense"]["probes"] == 16


def test_probe_items_take_the_form_of_the_users_items():
    """Probe items are model inputs in the form of the user's items (after ``transform_fn``):
    a tensor, a one-element tuple or a one-entry feed dict, same dtype and batch size;
    items that are not one float input are skipped with the reason."""
    from qcb_guard_plugins.adapter_nncf import _ItemForm

    x = torch.rand(2, 1, 8, 8)
    for bad in ([(x, x)], [x, x[:, :, :4]], [x.long()], [{"a": x, "b": x}]):
        assert "one float tensor" in _ItemForm.of(bad)
    probes = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    feeds = _ItemForm.of([{"x": x.numpy()}, {"x": x.numpy()}])
    assert feeds.batch == 2 and torch.equal(feeds.stack([{"x": x.numpy()}]), x)
    made = feeds.item(probes)
    assert set(made) == {"x"} and made["x"].dtype == x.numpy().dtype
    assert torch.equal(torch.from_numpy(made["x"]), probes.float())
    made = _ItemForm.of([(x,)]).item(probes)
    assert isinstance(made, tuple) and len(made) == 1 and made[0].dtype == torch.float32


# --------------------------------------------------------------------------------------
# 6. The docs example: NNCF's tutorial code plus one line.
# --------------------------------------------------------------------------------------


def test_docs_example_runs(tmp_path, monkeypatch):
    example = ROOT / "docs" / "examples" / "nncf_quantize.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QCB_GUARD_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setattr(nncf, "quantize", nncf.quantize)  # the example rebinds it: restore
    namespace = runpy.run_path(str(example), run_name="__main__")
    report = json.loads((tmp_path / "nncf_report.json").read_text())
    assert report["framework"] == "nncf-torch"
    assert isinstance(namespace["quantized_model"], nn.Module)
