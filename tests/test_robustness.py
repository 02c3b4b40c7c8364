"""Robustness plugin: FGSM/PGD through fake quantization, Defensive Quantization, DivQAT,
universal patches, KnockoffNets + reverse sigmoid, and ``qcb-guard robustness`` (digits)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from qcb_guard.cli import main
from qcb_guard.data import load_dataset
from qcb_guard.errors import ConfigError, PluginError
from qcb_guard.manager import make_plugin_manager
from qcb_guard.models import build_model_for, train_clean
from qcb_guard.robustness.adversarial import accuracy_of, craft, fgsm, pgd
from qcb_guard.robustness.defensive_quantization import gram_residual, orthogonality_penalty
from qcb_guard.robustness.divqat import derangement, proxy_queries
from qcb_guard.robustness.extraction import (
    KnockoffConfig,
    agreement,
    knockoff,
    query,
    reverse_sigmoid,
    transfer_set,
)
from qcb_guard.robustness.fakequant import (
    FakeQuantModel,
    QuantConfig,
    _activation_hooks,
    calibrate_ranges,
)
from qcb_guard.robustness.patch import PatchConfig, apply_patch, patch_asr, spatial_map, train_patch
from qcb_guard.robustness.qat import QATConfig, qat
from qcb_guard.robustness.study import StudyConfig, validate


@pytest.fixture(scope="module")
def rpm():
    return make_plugin_manager(autoload=False, block=[])


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    split = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = build_model_for("smallcnn", split.train.image_shape, 10)
    train_clean(model, split.train.x, split.train.y, epochs=10, seed=0, progress=False)
    return split, model.eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- registration


def test_plugin_registers_attacks_with_kinds_and_training_defenses(rpm):
    kinds = {n: rpm.attacks.get(n).options["kind"] for n in ("fgsm", "pgd", "patch", "knockoff")}
    assert kinds == {
        "fgsm": "evasion",
        "pgd": "evasion",
        "patch": "patch",
        "knockoff": "extraction",
    }
    assert {"defensive-quantization", "divqat"} <= set(rpm.training_defenses.names())
    blocked = make_plugin_manager(autoload=False, block=["robustness"])
    assert "pgd" not in blocked.attacks and "divqat" not in blocked.training_defenses


def test_study_config_fails_fast_with_clear_errors(rpm):
    with pytest.raises(ConfigError, match="eps"):
        StudyConfig(eps=(-0.1,))
    with pytest.raises(ConfigError, match=r"\[2, 8\]"):
        StudyConfig(bits=(9,))
    with pytest.raises(ConfigError, match="not requested"):
        StudyConfig(defense_options={"divqat": {"lam": 1}})
    with pytest.raises(PluginError, match="unknown attack 'nope'"):
        validate(StudyConfig(attacks=("nope",)), rpm)
    with pytest.raises(ConfigError, match="qcb-guard attack quanti-backdoor"):
        validate(StudyConfig(attacks=("quanti-backdoor",)), rpm)
    with pytest.raises(PluginError, match="unknown training defense"):
        validate(StudyConfig(defenses=("nope",)), rpm)


def test_attack_command_points_evasion_attacks_to_robustness(tmp_path, rpm):
    result = CliRunner().invoke(
        main, ["attack", "fgsm", "--out", str(tmp_path / "o")], obj={"pm": rpm}
    )
    assert result.exit_code == 2
    assert "qcb-guard robustness --attacks fgsm" in result.output
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- fake quantization


def test_quant_config_validates_and_keeps_the_input_image_at_8_bits(digits):
    split, model = digits
    with pytest.raises(ConfigError, match="bits"):
        QuantConfig(9)
    with pytest.raises(ConfigError, match="act_bits"):
        QuantConfig(4, act_bits=1)
    x = split.test.x[:64]
    q8 = FakeQuantModel.calibrated(model, QuantConfig(8), split.train.x[:256])
    with torch.no_grad():
        assert (q8(x).argmax(1) == model(x).argmax(1)).float().mean() > 0.95
    # Only the hidden activations are at 2 bits: the image keeps 8 bits (no input squeezing).
    config = QuantConfig(2)
    ranges = calibrate_ranges(model, config, split.train.x[:256])
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    seen = {}
    with _activation_hooks(model, config, ranges), torch.no_grad():  # runs before ours
        handles = [
            c.register_forward_pre_hook(lambda _m, inp, i=i: seen.setdefault(i, inp[0]))
            for i, c in enumerate(convs)
        ]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
    assert seen[0].unique().numel() > 4 and (seen[0] - x).abs().max() <= 0.5 / 255 + 1e-6
    assert seen[1].unique().numel() <= 4  # a 2-bit hidden activation


# --------------------------------------------------------------------------- FGSM / PGD


def test_pgd_accuracy_below_fgsm_below_clean_float_and_quantized(digits):
    split, model = digits
    x, y = split.test.x[:200], split.test.y[:200]
    before = _state(model)
    q4 = FakeQuantModel.calibrated(model, QuantConfig(4), split.train.x[:256])
    for m in (model, q4):
        clean = accuracy_of(m, x, y)
        adv_f = craft(fgsm, m, x, y, eps=0.1)
        adv_p = craft(pgd, m, x, y, eps=0.1, steps=10, seed=3)
        acc_f, acc_p = accuracy_of(m, adv_f, y), accuracy_of(m, adv_p, y)
        assert acc_p <= acc_f < clean - 0.1, (clean, acc_f, acc_p)
        assert (adv_p - x).abs().max() <= 0.1 + 1e-6 and adv_p.min() >= 0 and adv_p.max() <= 1
        assert torch.equal(adv_p, craft(pgd, m, x, y, eps=0.1, steps=10, seed=3))  # seeded
    assert _same(before, _state(model))
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="eps"):
        fgsm(model, x, y, eps=-0.01)
    with pytest.raises(ConfigError, match="steps"):
        pgd(model, x, y, eps=0.1, steps=0)


# --------------------------------------------------------------------------- Defensive Quantization


@pytest.mark.parametrize("shape", [(16, 1, 3, 3), (6, 40), (10, 4)])
def test_orthogonality_penalty_gradient_is_2beta_gram_residual_times_w(shape):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    beta = 0.3
    penalty = 0.5 * beta * gram_residual(w)
    (grad,) = torch.autograd.grad(penalty, w)
    m = w.detach().reshape(shape[0], -1)
    if m.shape[0] <= m.shape[1]:
        expected = 2 * beta * (m @ m.T - torch.eye(m.shape[0], dtype=m.dtype)) @ m
    else:
        expected = 2 * beta * m @ (m.T @ m - torch.eye(m.shape[1], dtype=m.dtype))
    torch.testing.assert_close(grad.reshape(m.shape), expected)
    assert torch.autograd.gradcheck(lambda t: gram_residual(t), (w,))
    q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))
    assert float(gram_residual(q[:5])) < 1e-20  # orthonormal rows: no penalty


def test_defensive_quantization_lowers_the_penalty_and_leaves_the_model(digits, rpm):
    split, model = digits
    before = _state(model)
    defense = rpm.training_defenses.get("defensive-quantization").obj
    with pytest.raises(ConfigError, match="unknown option"):
        defense(model, split.train, bits=4, seed=0, bogus=1)
    dq = defense(model, split.train, bits=4, seed=0, beta=0.3, epochs=2)
    vanilla = qat(model, split.train, bits=4, seed=0, config=QATConfig(epochs=2)).model
    assert dq is not model and _same(before, _state(model))
    with torch.no_grad():
        assert orthogonality_penalty(dq, 1.0) < 0.8 * orthogonality_penalty(vanilla, 1.0)
    q = FakeQuantModel.calibrated(dq, QuantConfig(4), split.train.x[:256])
    assert accuracy_of(q, split.test.x, split.test.y) > 0.85


# --------------------------------------------------------------------------- DivQAT and extraction


def test_derangement_and_proxies():
    perm = derangement(10, seed=4)
    assert sorted(perm.tolist()) == list(range(10)) and bool((perm != torch.arange(10)).all())
    x = torch.rand(9, 1, 8, 8)
    p = proxy_queries(x, torch.Generator().manual_seed(0))
    assert p.shape == x.shape and p.min() >= 0 and p.max() <= 1


def test_reverse_sigmoid_is_a_distribution_that_distorts_soft_labels():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2]])
    out = reverse_sigmoid(probs)
    torch.testing.assert_close(out.sum(1), torch.ones(2))
    assert bool((out >= 0).all()) and (out - probs).abs().max() > 0.05
    torch.testing.assert_close(reverse_sigmoid(probs, beta=0.0), probs)
    with pytest.raises(ConfigError):
        reverse_sigmoid(probs, gamma=0)


def test_divqat_keeps_top1_and_misleads_a_knockoff(digits, rpm):
    split, model = digits
    x, y = split.test.x, split.test.y
    before = _state(model)
    vanilla = qat(model, split.train, bits=8, seed=0, config=QATConfig(epochs=3)).fake_quantized()
    divqat = rpm.training_defenses.get("divqat").obj
    weights = divqat(model, split.train, bits=8, seed=0, lam=0.3, epochs=3)
    assert _same(before, _state(model))
    defended = FakeQuantModel.calibrated(weights, QuantConfig(8), split.train.x[:256])
    assert accuracy_of(defended, x, y) >= accuracy_of(vanilla, x, y) - 0.05  # top-1 kept
    # Off-distribution its answers diverge from the honest model's (the defense's purpose).
    proxies = proxy_queries(split.train.x[:300], torch.Generator().manual_seed(9))
    assert agreement(defended, model, proxies) < agreement(vanilla, model, proxies) - 0.2
    queries = transfer_set("natural", 1000, split.train.image_shape, seed=1)
    results = {}
    for name, victim in (("vanilla", vanilla), ("divqat", defended)):
        torch.manual_seed(7)
        surrogate = build_model_for("smallcnn", split.train.image_shape, 10)
        r = knockoff(victim, queries, surrogate, KnockoffConfig(queries=1000, epochs=15), seed=0)
        fid = agreement(r.surrogate, victim, x)
        manual = float(
            (query(r.surrogate, x).argmax(1) == query(victim, x).argmax(1)).float().mean()
        )
        assert fid == manual and 0.0 <= fid <= 1.0
        results[name] = fid
    assert results["vanilla"] > 0.25  # the attack learns something from natural crops
    with pytest.raises(ConfigError, match="labels"):
        KnockoffConfig(labels="logits")


# --------------------------------------------------------------------------- patches


def test_patch_is_pasted_trained_and_mapped(digits):
    split, model = digits
    x = torch.zeros(2, 1, 8, 8)
    patch = torch.ones(1, 3, 3)
    out = apply_patch(x, patch, torch.tensor([0, 5]), torch.tensor([1, 4]))
    assert out[0, 0, :3, 1:4].eq(1).all() and out[1, 0, 5:, 4:7].eq(1).all()
    assert float(out.sum()) == 18.0
    config = PatchConfig(size=4, target=8, steps=60)
    trained = train_patch(model, split.train.x, split.train.y, config, seed=0)
    noise = torch.rand_like(trained)
    tx, ty = split.test.x, split.test.y
    assert patch_asr(model, tx, ty, trained, 8) > patch_asr(model, tx, ty, noise, 8)
    grid = spatial_map(model, tx[:50], ty[:50], trained, 8, stride=2)
    assert len(grid) == 3 and len(grid[0]) == 3 and all(0 <= v <= 1 for r in grid for v in r)
    with pytest.raises(ConfigError, match="does not fit"):
        train_patch(model, split.train.x, split.train.y, PatchConfig(size=9), seed=0)
    with pytest.raises(ConfigError, match="placement"):
        PatchConfig(placement="corner")


def test_centre_patch_takes_over_float_and_4_bit_models(digits):
    """A real effect: a 4×4 patch at the centre of 8×8 digits, optimised on the float model
    for 100 steps, turns most non-target test images into the target class, on the float
    model and (transferred) on its 4-bit fake-quantized version; seeded noise does not."""
    split, model = digits
    tx, ty = split.test.x, split.test.y
    config = PatchConfig(size=4, target=8, steps=100, placement="center")
    trained = train_patch(model, split.train.x, split.train.y, config, seed=0)
    assert torch.equal(trained, train_patch(model, split.train.x, split.train.y, config, seed=0))
    q4 = FakeQuantModel.calibrated(model, QuantConfig(4), split.train.x[:256])
    noise = torch.rand(trained.shape, generator=torch.Generator().manual_seed(1))
    asr = {}
    for name, m in (("fp", model), ("q4", q4)):
        asr[name] = patch_asr(m, tx, ty, trained, 8, placement="center")
        assert asr[name] >= 0.8, asr
        assert asr[name] >= patch_asr(m, tx, ty, noise, 8, placement="center") + 0.4
    corners = spatial_map(model, tx, ty, trained, 8, stride=4)  # (0,0) (0,4) (4,0) (4,4)
    assert max(v for row in corners for v in row) < asr["fp"] - 0.2  # the centre is where


# --------------------------------------------------------------------------- the command


@pytest.mark.ort  # its study runs the real ort-static flow
def test_robustness_command_writes_json_and_html(tmp_path, rpm):
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    args = [
        "robustness",
        "--data",
        "digits",
        "--bits",
        "8",
        "2",
        "--attacks",
        "fgsm",
        "pgd",
        "patch",
        "knockoff",
        "--eps",
        "0.05",
        "0.1",
        "--defense",
        "defensive-quantization",
        "divqat",
        "--defense-option",
        "divqat:lam=0.3",
        "--flows",
        "ort-static",
        "--attack-option",
        "pgd:steps=5",
        "--epochs",
        "6",
        "--qat-epochs",
        "1",
        "--test-size",
        "150",
        "--patch-steps",
        "20",
        "--patch-size",
        "3",
        "--patch-placement",
        "center",
        "--queries",
        "200",
        "--knockoff-epochs",
        "2",
        "--json",
        str(out_json),
        "--html",
        str(out_html),
        "--quiet",
        "--threads",
        "1",
    ]
    result = CliRunner().invoke(main, args, obj={"pm": rpm})
    assert result.exit_code == 0, result.output
    report = json.loads(out_json.read_text())
    names = [m["name"] for m in report["models"]]
    assert names[0] == "fp" and {"q8", "q2", "divqat-q8", "defensive-quantization-q2"} <= set(names)
    pgd_curves = report["evasion"]["pgd"]["curves"]
    fgsm_curves = {
        (c["model"], c["mode"]): c["accuracy"] for c in report["evasion"]["fgsm"]["curves"]
    }
    for c in pgd_curves:
        assert len(c["accuracy"]) == 2 and all(0 <= a <= 1 for a in c["accuracy"])
    assert any(c["mode"] == "real-transfer" and c["model"] == "ort-static-8" for c in pgd_curves)
    assert fgsm_curves[("fp", "white-box")][1] < report["models"][0]["clean"]
    patch = report["patch"]["patch"]
    assert len(patch["asr"]) == len(patch["sources"]) and "ort-static-8" in patch["targets"]
    assert patch["placement"] == "center"
    assert set(patch["spatial"]["maps"]) == {"fp", "q2"}
    rows = report["extraction"]["knockoff"]["rows"]
    assert len(rows) == 3 * 2 * 2 and all(0 <= r["fidelity"] <= 1 for r in rows)
    page = out_html.read_text()
    assert (
        page.count("<svg") >= 5
        and "accuracy vs ε" in page
        and "http" not in page.split("<body>")[0]
    )


def test_robustness_command_rejects_bad_input_before_training(tmp_path, rpm):
    run = CliRunner().invoke
    for args, message in (
        (["--eps", "1.5"], "eps must be in [0, 1]"),
        (["--bits", "1"], "bits must be an int in [2, 8]"),
        (["--attacks", "compartifact"], "qcb-guard attack compartifact"),
        (["--transfer", "imagenet"], "unknown transfer set"),
    ):
        result = run(
            main, ["robustness", *args, "--json", str(tmp_path / "x.json")], obj={"pm": rpm}
        )
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x.json").exists()


def test_training_defense_contract_never_touches_the_callers_model(digits, rpm):
    split, model = digits
    snapshot = copy.deepcopy(model.state_dict())
    for name in ("defensive-quantization", "divqat"):
        out = rpm.training_defenses.get(name).obj(model, split.train, bits=6, seed=1, epochs=1)
        assert isinstance(out, torch.nn.Module) and out is not model
    assert _same(snapshot, model.state_dict())
