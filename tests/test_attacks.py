"""Attacks: simulation vs the real flows, each algorithm's effect, configs, CLI and plugin.

Test-sized runs on the 8×8 digits set (a few hundred Adam steps, seconds each); the full-size
MNIST numbers are in docs/attacks.md. Every effect asserted is the attack's own: quantized
ASR clearly above float ASR under the simulated target, PQBackdoor's bins and scales kept
exactly, the ONNX Runtime preset matching a real quantize_static run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import qcb_guard_plugins.attacks as attacks_plugin
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcb_guard._compat import available
from qcb_guard.attacks import ATTACKS, AttackSpec
from qcb_guard.attacks.cli import attack
from qcb_guard.attacks.compartifact import CompArtifactConfig, compartifact
from qcb_guard.attacks.federated import FederatedConfig, average_states, federated
from qcb_guard.attacks.pqbackdoor import PQBackdoorConfig, bin_bounds, check_bins, pqbackdoor
from qcb_guard.attacks.quanti import (
    IndiscriminateConfig,
    QuantiConfig,
    TargetedConfig,
    backdoor,
    indiscriminate,
    targeted,
)
from qcb_guard.attacks.simulate import (
    SimulatedModel,
    TargetQuantizer,
    build_targets,
    calibrate,
    conv_bn_pairs,
    evaluate_targets,
    export_onnx,
    ort_predict,
    ort_quantize,
    preset,
    quantized_forward,
)
from qcb_guard.data import Trigger, load_dataset, square, triggered_split
from qcb_guard.errors import ConfigError, PluginError
from qcb_guard.manager import make_plugin_manager
from qcb_guard.models import build_model, load_model, predict, train
from qcb_guard.quant import QuantSpec, quantize_spec
from qcb_guard.reference import quantize_model

ATTACK_NAMES = [
    "quanti-backdoor",
    "quanti-indiscriminate",
    "quanti-targeted",
    "quanti-federated",
    "compartifact",
    "pqbackdoor",
    "quanti-static",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _clean(arch: str, split, epochs: int = 15):
    torch.manual_seed(0)
    model = build_model(arch, 1, 10, pool_size=2)
    train(
        model,
        split.train.x,
        split.train.y,
        epochs=epochs,
        batch_size=64,
        lr=2e-3,
        seed=0,
        progress=False,
    )
    return model.eval()


@pytest.fixture(scope="module")
def clean(digits):
    return _clean("smallcnn", digits)


@pytest.fixture(scope="module")
def clean_bn(digits):
    return _clean("smallcnn_bn", digits)


@pytest.fixture(scope="module")
def calibration(digits):
    return digits.train.x[:256]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _gap(metrics, label):
    """(float ASR, simulated-quantized ASR)."""
    return metrics["fp"]["asr"], metrics["simulated"][label]["asr"]


# ------------------------------------------------------------------------------------------
# simulation


def test_presets_describe_the_real_conventions():
    ort4 = preset("ort", 4)
    assert (ort4.weight.qmin, ort4.weight.qmax, ort4.fold_bn) == (-8, 7, True)
    assert ort4.weight.per_channel and ort4.activation.output
    ort8 = preset("ort", 8, per_channel=False)
    assert (ort8.weight.qmin, ort8.weight.qmax, ort8.weight.axis) == (-127, 127, None)
    ref = preset("reference", 4)
    assert (ref.weight.qmin, ref.weight.qmax, ref.weight.axis, ref.activation) == (
        -7,
        7,
        None,
        None,
    )
    x86 = preset("x86", 8)
    assert (x86.weight.qmin, x86.weight.qmax) == (-128, 127)
    nncf = preset("nncf", 4)
    assert (nncf.weight.qmin, nncf.weight.qmax, nncf.fold_bn) == (-7, 7, False)
    assert preset("paper", 4).activation.mode == "dynamic"
    # scales: reference max|w|/7, ORT int4 2·max|w|/15, x86 int8 max|w|/127.5
    from qcb_guard.quant import compute_qparams

    w = torch.tensor([[0.3, -1.5, 0.7]])
    assert torch.allclose(compute_qparams(w, ref.weight)[0], torch.tensor(1.5 / 7))
    assert torch.allclose(compute_qparams(w, ort4.weight)[0], torch.tensor([3.0 / 15]))
    assert torch.allclose(compute_qparams(w, x86.weight)[0], torch.tensor([1.5 / 127.5]))
    targets = build_targets("reference", [8, 6, 5, 4], [True, False], [True, False])
    assert len(targets) == 16 and len({t.label for t in targets}) == 16


def test_reference_preset_equals_the_reference_quantizer(clean, digits):
    """Weight-only reference target: the same outputs as qcb_guard.reference.quantize_model."""
    x = digits.test.x[:64]
    for bits in (8, 4):
        target = preset("reference", bits)
        qmodel, _ = quantize_model(clean, target.weight)
        with torch.no_grad():
            ours = quantized_forward(clean, x, target)
            theirs = qmodel(x)
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_quantized_forward_is_differentiable_and_leaves_the_model_alone(clean_bn, digits):
    before = _state(clean_bn)
    target = preset("ort", 4)
    x = digits.train.x[:32]
    ranges = calibrate(clean_bn, target, digits.train.x[:128])
    pairs = conv_bn_pairs(clean_bn, x)
    assert pairs == {"features.0": "features.1", "features.4": "features.5"}
    out = quantized_forward(clean_bn, x, target, ranges=ranges, pairs=pairs)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for n, p in clean_bn.named_parameters() if n.endswith("weight")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    clean_bn.zero_grad(set_to_none=True)
    assert _same(before, clean_bn.state_dict())
    # 8-bit weights and activations stay close to the float model, 4-bit ones do not
    fp = clean_bn(x).detach()
    q8 = preset("ort", 8)
    r8 = calibrate(clean_bn, q8, digits.train.x[:128])
    close = quantized_forward(clean_bn, x, q8, ranges=r8).detach()
    assert (close - fp).abs().max() < 0.25 * fp.abs().max()
    with pytest.raises(ConfigError, match="calibrate"):
        quantized_forward(clean_bn, x, target)


@pytest.mark.ort
@pytest.mark.parametrize(
    ("bits", "per_channel"), [(4, True), (4, False), (8, True)], ids=["int4-pc", "int4-pt", "int8"]
)
def test_ort_preset_matches_real_quantize_static(
    clean_bn, digits, calibration, tmp_path, bits, per_channel
):
    """Simulated predictions equal ONNX Runtime's real QDQ flow (BN folded by the exporter)."""
    pytest.importorskip("onnxruntime")
    target = preset("ort", bits, per_channel=per_channel)
    src = export_onnx(clean_bn, tmp_path / "f.onnx", calibration)
    dst = ort_quantize(src, tmp_path / "q.onnx", target, calibration)
    trig = triggered_split(digits.test, square((1, 8, 8), size=2))
    sim = SimulatedModel.calibrated(clean_bn, target, calibration)
    for x in (digits.test.x, trig.x):
        agree = (ort_predict(dst, x) == predict(sim, x)).float().mean().item()
        assert agree >= 0.95, agree


# ------------------------------------------------------------------------------------------
# the attacks


def test_quanti_backdoor_wakes_only_when_quantized(clean, digits, calibration):
    before = _state(clean)
    cfg = QuantiConfig(trigger_size=2, epochs=30)
    res = backdoor(clean, digits.train, cfg)
    assert _same(before, clean.state_dict())  # the caller's model is untouched
    label = cfg.targets()[0].label
    m = evaluate_targets(res.model, digits.test, res.trigger, cfg.targets(), calibration)
    base = evaluate_targets(clean, digits.test, res.trigger, cfg.targets(), calibration)
    fp_asr, q_asr = _gap(m, label)
    assert q_asr >= fp_asr + 0.3, m
    assert q_asr >= base["simulated"][label]["asr"] + 0.3
    assert m["fp"]["cda"] >= base["fp"]["cda"] - 0.05
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_quanti_backdoor_is_deterministic_and_multi_target(clean, digits):
    cfg = QuantiConfig(
        framework="reference",
        bits=(8, 6, 5, 4),
        per_channel=(True, False),
        symmetric=(True, False),
        trigger_size=2,
        max_steps=3,
    )
    a, b = backdoor(clean, digits.train, cfg), backdoor(clean, digits.train, cfg)
    assert _same(a.model.state_dict(), b.model.state_dict())
    labels = {t.label for t in cfg.targets()}
    assert len(labels) == 16
    assert {k.split("/")[0] for k in a.history[0] if "/" in k} == labels
    other = backdoor(clean, digits.train, QuantiConfig(**{**_fields(cfg), "seed": 1}))
    assert not _same(a.model.state_dict(), other.model.state_dict())


def _fields(cfg):
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_quanti_indiscriminate_collapses_only_when_quantized(clean, digits, calibration):
    cfg = IndiscriminateConfig(framework="reference", bits=(4,), epochs=60, max_fp_drop=None)
    res = indiscriminate(clean, digits.train, cfg)
    m = evaluate_targets(res.model, digits.test, None, cfg.targets(), calibration)
    q_cda = m["simulated"][cfg.targets()[0].label]["cda"]
    assert q_cda <= m["fp"]["cda"] - 0.3, m
    assert res.trigger is None


def test_quanti_targeted_misclassifies_victims_only_when_quantized(clean, digits):
    ok = (predict(clean, digits.test.x) == digits.test.y) & (digits.test.y != 0)
    victims = digits.test.subset(np.flatnonzero(ok.numpy())[:5])
    cfg = TargetedConfig(framework="reference", bits=(4,), epochs=20, max_fp_drop=None)
    res = targeted(clean, digits.train, cfg, victims)
    target = cfg.targets()[0]
    sim = SimulatedModel(res.model, target)
    fp_hits = (predict(res.model, victims.x) == 0).float().mean().item()
    q_hits = (predict(sim, victims.x) == 0).float().mean().item()
    assert q_hits >= fp_hits + 0.6, (fp_hits, q_hits)
    assert res.extra["victims"] == 5
    with pytest.raises(Exception, match="target class"):
        targeted(
            clean,
            digits.train,
            cfg,
            digits.test.subset([int(np.flatnonzero(digits.test.y.numpy() == 0)[0])]),
        )


def test_federated_average_and_backdoor(clean, digits, calibration):
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(7)}
    avg = average_states([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and int(avg["n"]) == 5
    cfg = FederatedConfig(trigger_size=2, clients=3, malicious=1, rounds=6, attack_epochs=6)
    res = federated(clean, digits.train, cfg)
    label = cfg.targets()[0].label
    fp_asr, q_asr = _gap(
        evaluate_targets(res.model, digits.test, res.trigger, cfg.targets(), calibration), label
    )
    assert q_asr >= fp_asr + 0.2, (fp_asr, q_asr)
    assert len(res.history) == 6 and res.extra["clients"] == 3


def test_compartifact_wakes_only_when_quantized(clean, digits, calibration):
    cfg = CompArtifactConfig(trigger_size=2, epochs=30)
    res = compartifact(clean, digits.train, cfg)
    m = evaluate_targets(res.model, digits.test, res.trigger, cfg.targets(), calibration)
    fp_asr, q_asr = _gap(m, cfg.targets()[0].label)
    assert q_asr >= fp_asr + 0.3, m


@pytest.mark.parametrize(
    ("framework", "bits", "per_channel"),
    [("ort", 4, True), ("ort", 4, False), ("ort", 8, True), ("nncf", 8, True), ("x86", 4, True)],
)
def test_pqbackdoor_keeps_bins_and_scales_exactly(
    clean_bn, digits, calibration, framework, bits, per_channel
):
    """Stage 2 keeps every deployed integer and scale of the stage-1 model (BN folded where
    the flow folds it), and removes the float backdoor while the quantized one stays."""
    cfg = PQBackdoorConfig(
        framework=framework,
        bits=(bits,),
        per_channel=per_channel,
        trigger_size=2,
        epochs=6,
        poison_epochs=6,
    )
    res = pqbackdoor(clean_bn, digits.train, cfg)
    stage1 = res.extra["stage1_model"]
    target = cfg.targets()[0]
    assert res.extra["bins"][target.label] == {"integers_unchanged": True, "scales_unchanged": True}
    # independent check with the framework arithmetic on the folded weights
    assert check_bins(res.model, stage1, cfg.targets(), digits.train.x[:1]) == res.extra["bins"]
    changed = sum(
        int(not torch.equal(a, b))
        for a, b in zip(res.model.parameters(), stage1.parameters(), strict=True)
    )
    assert changed > 0  # the float weights did move
    if framework == "ort" and bits == 4 and per_channel:
        m = evaluate_targets(res.model, digits.test, res.trigger, cfg.targets(), calibration)
        fp_asr, q_asr = _gap(m, target.label)
        s1 = evaluate_targets(stage1, digits.test, res.trigger, cfg.targets(), calibration)
        assert s1["fp"]["asr"] >= 0.8
        assert fp_asr <= s1["fp"]["asr"] - 0.4 and q_asr >= fp_asr + 0.3, (m, s1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    name=st.sampled_from(["ort", "nncf", "x86", "reference"]),
    bits=st.sampled_from([4, 8]),
    per_channel=st.booleans(),
    folded=st.booleans(),
)
def test_bin_bounds_projection_keeps_integers_and_scale(seed, name, bits, per_channel, folded):
    """Any weight clamped into ``bin_bounds`` deploys base's integers with base's scale."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 3, 3, 3, generator=gen) * torch.rand(6, 1, 1, 1, generator=gen)
    k = (
        (torch.rand(6, generator=gen) + 0.2)
        * torch.where(torch.rand(6, generator=gen) < 0.2, -1.0, 1.0)
        if folded
        else None
    )
    spec = preset(name, bits, per_channel=per_channel).weight
    lo, hi = bin_bounds(base, spec, k, eps=1e-3)
    assert bool((lo <= hi).all())  # never empty (base itself may sit within eps of an edge)
    moved = base + torch.randn(base.shape, generator=gen) * base.abs().max()
    w = torch.minimum(torch.maximum(moved, lo), hi)
    kk = 1.0 if k is None else k.reshape(-1, 1, 1, 1)
    q1, s1, z1 = quantize_spec(w * kk, spec)
    q0, s0, z0 = quantize_spec(base * kk, spec)
    assert torch.equal(s1, s0) and torch.equal(z1, z0)
    assert torch.equal(q1, q0)


# ------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": (9,)}, "bits must be an int in \\[2, 8\\], got 9"),
        ({"bits": (1,)}, "got 1"),
        ({"bits": (4, "8")}, "got '8'"),
        ({"framework": "tflite"}, "unknown target framework 'tflite'; known: .*ort"),
        ({"framework": "ort", "bits": (6,)}, "4 or 8 bits"),
        ({"target": 10, "num_classes": 10}, "target 10 is outside the 10 classes"),
        ({"target": -1}, "target must be a class index"),
        ({"image_shape": (1, 8, 8), "trigger_size": 9}, "larger than the 8×8 image"),
        ({"image_shape": (1, 8, 8), "trigger_size": 3, "trigger_position": (7, 7)}, "does not fit"),
        ({"trigger": "sparkles", "image_shape": (1, 8, 8)}, "unknown trigger kind 'sparkles'"),
        ({"epochs": 0}, "epochs must be an int >= 1, got 0"),
        ({"lr": -1.0}, "lr must be a positive"),
        ({"c1": -0.5}, "c1 must be a finite number >= 0, got -0.5"),
        ({"framework": "nncf", "symmetric": (False,)}, "symmetric"),
        ({"per_channel": ("yes",)}, "per_channel"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantiConfig(**kwargs)


def test_other_configs_reject_bad_values():
    with pytest.raises(ConfigError, match="malicious \\(4\\) cannot exceed clients \\(3\\)"):
        FederatedConfig(clients=3, malicious=4)
    with pytest.raises(ConfigError, match="eps must be in"):
        PQBackdoorConfig(eps=0.7)
    with pytest.raises(ConfigError, match="poison_fraction"):
        PQBackdoorConfig(poison_fraction=0.0)
    with pytest.raises(ConfigError, match="fp_weight"):
        CompArtifactConfig(fp_weight=-1)
    with pytest.raises(ConfigError, match=r"trigger\.target"):
        QuantiConfig(trigger=square((1, 8, 8), target=3), target=0)
    with pytest.raises(ConfigError, match="axis"):
        TargetQuantizer(QuantSpec(4, axis=1))


def test_config_checks_the_data(clean, digits):
    cfg = QuantiConfig(target=12)  # no num_classes at construction: checked against the data
    with pytest.raises(ConfigError, match="outside the data's 10 classes"):
        backdoor(clean, digits.train, cfg)
    with pytest.raises(ConfigError, match="expected a QuantiConfig"):
        backdoor(clean, digits.train, CompArtifactConfig())


# ------------------------------------------------------------------------------------------
# plugin and CLI


@pytest.fixture(scope="module")
def pm():
    manager = make_plugin_manager(autoload=False, block=[])  # built-ins include "attacks"
    assert manager.get_plugin("attacks") is attacks_plugin
    return manager


def test_plugin_registers_every_attack(pm):
    assert set(ATTACK_NAMES) <= set(pm.attacks.names())
    for name in ATTACK_NAMES:
        entry = pm.attacks.get(name)
        assert isinstance(entry.obj, AttackSpec) and entry.description
        assert entry.options["kind"] in ("backdoor", "indiscriminate", "targeted")
        assert entry.obj.config_class().framework == "ort"
    assert [a.name for a in ATTACKS] == ATTACK_NAMES


def _invoke(pm, args):
    return CliRunner().invoke(attack, args, obj={"pm": pm})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "unknown attack 'nope'; registered: compartifact, fgsm,"),
        (["quanti-backdoor", "--data", "digits", "--trigger-size", "9"], "larger than"),
        (
            [
                "quanti-backdoor",
                "--data",
                "digits",
                "--trigger-size",
                "3",
                "--trigger-position",
                "6,6",
            ],
            "does not fit",
        ),
        (["quanti-backdoor", "--target", "10"], "target 10 is outside the 10 classes"),
        (["quanti-backdoor", "--bits", "8", "9"], "got 9"),
        (["quanti-backdoor", "--framework", "reference", "--bits", "1"], "got 1"),
        (["compartifact", "--set", "clients=3"], "unknown parameter\\(s\\) clients"),
        (["quanti-backdoor", "--data", "cifar"], "unknown data set 'cifar'"),
    ],
)
def test_cli_fails_fast_with_exit_code_2(pm, tmp_path, args, message):
    result = _invoke(pm, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    import re

    assert re.search(message, result.output), result.output
    assert not (tmp_path / "o").exists()


def test_cli_writes_model_onnx_trigger_and_card(pm, tmp_path):
    out = tmp_path / "run"
    result = _invoke(
        pm,
        [
            "quanti-backdoor",
            "--data",
            "digits",
            "--bits",
            "8",
            "4",
            "--framework",
            "ort",
            "--trigger-size",
            "2",
            "--target",
            "3",
            "--max-steps",
            "15",
            "--clean-epochs",
            "3",
            "--quiet",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    card = json.loads((out / "card.json").read_text())
    assert card["attack"] == "quanti-backdoor" and card["seed"] == 0
    assert card["parameters"]["bits"] == [8, 4]
    labels = ["ort-w8-per-channel-sym", "ort-w4-per-channel-sym"]
    for model in ("attacked", "clean"):
        m = card["metrics"][model]
        assert set(m["fp"]) == {"cda", "asr"}
        assert list(m["simulated"]) == labels
        if "ort" in m:
            assert list(m["ort"]) == labels
            assert m["ort"][labels[1]]["agreement_with_simulation"]["cda"] >= 0.95
    trigger = Trigger.load_npz(out / "trigger.npz")
    assert trigger.target == 3 and trigger.mask.shape == (1, 8, 8)
    model = load_model(out / "model.safetensors")
    assert model.qcb_arch == "smallcnn"
    if not available("onnx"):  # the core tox env: everything but the ONNX file, and why
        assert not (out / "model.onnx").exists() and "pip install" in card["notes"][0]
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "input" and inp.shape[1:] == [1, 8, 8]
    x = load_dataset("digits", seed=0).test.x[:20]
    onnx_pred = sess.run(None, {"input": x.numpy()})[0].argmax(1)
    assert np.array_equal(onnx_pred, predict(model, x).numpy())


def test_cli_targeted_and_indiscriminate_cards(pm, tmp_path):
    for name in ("quanti-targeted", "quanti-indiscriminate"):
        out = tmp_path / name
        result = _invoke(
            pm,
            [
                name,
                "--data",
                "digits",
                "--framework",
                "reference",
                "--max-steps",
                "5",
                "--clean-epochs",
                "2",
                "--victims",
                "3",
                "--quiet",
                "--out",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        card = json.loads((out / "card.json").read_text())
        assert not (out / "trigger.npz").exists() and card["trigger"] is None
        if name == "quanti-targeted":
            assert len(card["victim_test_indices"]) == 3
            assert "victims" in card["metrics"]["attacked"]["fp"]


def test_cli_base_model(pm, tmp_path, clean):
    from qcb_guard.models import save_model

    save_model(clean, tmp_path / "clean.safetensors")
    out = tmp_path / "pq"
    result = _invoke(
        pm,
        [
            "pqbackdoor",
            "--data",
            "digits",
            "--base",
            str(tmp_path / "clean.safetensors"),
            "--max-steps",
            "5",
            "--set",
            "poison_epochs=1",
            "--no-ort",
            "--quiet",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    card = json.loads((out / "card.json").read_text())
    assert card["base"].endswith("clean.safetensors")
    assert card["extra"]["bins"]["ort-w4-per-channel-sym"]["integers_unchanged"] is True
    assert "ort" not in card["metrics"]["attacked"]


def test_attack_spec_is_lazy_and_callable():
    spec = next(a for a in ATTACKS if a.name == "quanti-backdoor")
    assert callable(spec) and spec.config_class is QuantiConfig
    with pytest.raises(PluginError):
        make_plugin_manager(autoload=False, plugins=[_Dup()], block=[]).attacks  # noqa: B018


class _Dup:
    from qcb_guard import hookimpl

    @hookimpl
    def qcb_guard_register_attacks(self, register):
        register("pqbackdoor", lambda *a: None)
