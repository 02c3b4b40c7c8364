"""The output directory of an attack: model, ONNX export, trigger and a card of measurements.

``DIR/model.safetensors`` (:func:`qcb_guard.models.save_model`), ``DIR/model.onnx`` (input
``input`` [N, C, H, W] float32 in [0, 1]), ``DIR/trigger.npz`` (mask, pattern, target) and
``DIR/card.json``: the attack, its parameters and seed, and what was measured — float and
simulated-quantized CDA/ASR per targeted flow, real ONNX Runtime numbers for ``ort`` targets,
and the same for the clean model with the same trigger (the baseline a defense is judged
against). Every file is written atomically.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcb_guard._compat import available
from qcb_guard.attacks.simulate import (
    AttackResult,
    SimulatedModel,
    TargetQuantizer,
    export_onnx,
    ort_predict,
    ort_quantize,
)
from qcb_guard.data import DataSplit, Trigger, triggered_split
from qcb_guard.errors import ConfigError
from qcb_guard.fileio import write_json_atomic
from qcb_guard.models import predict, save_model

__all__ = ["measure", "ort_measure", "write_artifacts"]


def _rate(pred: Tensor, labels: Tensor) -> float:
    return round(float((pred == labels).double().mean()), 6)


def _sets(test: DataSplit, trigger: Trigger | None) -> dict[str, tuple[Tensor, Tensor]]:
    """The evaluation sets: clean test images (CDA) and triggered non-target test images
    labelled with the target (ASR)."""
    sets = {"cda": (test.x, test.y)}
    if trigger is not None:
        t = triggered_split(test, trigger)
        sets["asr"] = (t.x, t.y)
    return sets


def _predict_all(fn, sets: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    return {k: fn(x) for k, (x, _) in sets.items()}


def measure(
    model: nn.Module,
    test: DataSplit,
    targets: Sequence[TargetQuantizer],
    calibration: Tensor,
    *,
    trigger: Trigger | None = None,
    victims: DataSplit | None = None,
    victim_target: int | None = None,
    ort: bool = True,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """CDA (and ASR / victim rate) of ``model`` in float, under each simulated target and,
    for ``ort`` targets when onnxruntime is installed and ``ort``, through ONNX Runtime's
    real ``quantize_static`` flow (with the simulation's agreement with it)."""
    sets = _sets(test, trigger)
    if victims is not None:
        vt = torch.full_like(victims.y, victim_target if victim_target is not None else 0)
        sets["victims"] = (victims.x, vt)
    out: dict[str, Any] = {}
    fp = _predict_all(lambda x: predict(model, x), sets)
    out["fp"] = {k: _rate(p, sets[k][1]) for k, p in fp.items()}
    out["simulated"] = {}
    sim_preds: dict[str, dict[str, Tensor]] = {}
    for t in targets:
        sim = SimulatedModel.calibrated(model, t, calibration)
        sim_preds[t.label] = _predict_all(lambda x, sim=sim: predict(sim, x), sets)
        out["simulated"][t.label] = {k: _rate(p, sets[k][1]) for k, p in sim_preds[t.label].items()}
    ort_targets = [t for t in targets if t.name == "ort"]
    if ort and ort_targets and available("onnxruntime"):
        out["ort"] = ort_measure(model, ort_targets, calibration, sets, sim_preds, workdir)
    return out


def ort_measure(
    model: nn.Module,
    targets: Sequence[TargetQuantizer],
    calibration: Tensor,
    sets: dict[str, tuple[Tensor, Tensor]],
    sim_preds: dict[str, dict[str, Tensor]] | None = None,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Export ``model``, quantize it with ONNX Runtime per target, and score every set."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src = export_onnx(model, Path(tmp) / "float.onnx", calibration[:1])
        for t in targets:
            start = time.perf_counter()
            dst = ort_quantize(src, Path(tmp) / f"{t.label}.onnx", t, calibration)
            preds = _predict_all(lambda x, dst=dst: ort_predict(dst, x), sets)
            row: dict[str, Any] = {k: _rate(p, sets[k][1]) for k, p in preds.items()}
            if sim_preds is not None and t.label in sim_preds:
                row["agreement_with_simulation"] = {
                    k: round(float((p == sim_preds[t.label][k]).double().mean()), 6)
                    for k, p in preds.items()
                }
            row["seconds"] = round(time.perf_counter() - start, 3)
            out[t.label] = row
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not isinstance(v, nn.Module)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def write_artifacts(
    out: str | Path,
    result: AttackResult,
    *,
    metrics: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write model.safetensors, model.onnx, trigger.npz (when the attack has a trigger) and
    card.json to ``out``; returns the card."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = ["model.safetensors", "card.json"]
    notes = []
    save_model(result.model, out / "model.safetensors")
    if available("onnx"):
        c, h, w = _input_shape(result.model, info)
        export_onnx(result.model, out / "model.onnx", torch.zeros(1, c, h, w))
        files.insert(1, "model.onnx")
    else:  # the model and trigger are still worth having; say what is missing and why
        notes.append(
            "model.onnx not written: onnx is not installed (pip install 'qcb-guard[onnx]')"
        )
        warnings.warn(notes[-1], stacklevel=2)
    if result.trigger is not None:
        result.trigger.save_npz(out / "trigger.npz")
        files.insert(2, "trigger.npz")
    from qcb_guard import __version__

    card = {
        "attack": result.attack,
        "qcb_guard_version": __version__,
        "seed": result.config.seed,
        "parameters": result.config.parameters(),
        **(info or {}),
        "trigger": None if result.trigger is None else result.trigger.summary(),
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "history": result.history,
        "extra": result.extra or {},
        "metrics": metrics or {},
        "files": files,
        "notes": notes,
    }
    card = _jsonable(card)
    write_json_atomic(out / "card.json", card)
    for name in files:  # temporary files are created 0600; artefacts are for sharing
        os.chmod(out / name, 0o644)
    return card


def _input_shape(model: nn.Module, info: dict[str, Any] | None) -> tuple[int, int, int]:
    shape = (info or {}).get("image_shape")
    if shape is None:
        raise ConfigError("info['image_shape'] (C, H, W) is needed to export the model")
    c, h, w = (int(v) for v in shape)
    return c, h, w
