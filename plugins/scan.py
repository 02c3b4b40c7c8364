"""Built-in scan plugin: the scanner's validated signals as ``qcb_guard_scan`` findings.

Weight statistics (bin position, truncation-error outliers) work on any slots, including
the flow's own inside ``guard(..., scan=True)``. Rounding sensitivity needs to run the
model: it answers only when :func:`qcb_guard.scanner.scan` hands the hook a model view and
probes. Activation reach (opt-in: ``signals=(..., "activation_reach")``) needs the float
model and calibration data; it does not depend on the weight grid, so it runs and reports
once per scan.
"""

from __future__ import annotations

from typing import Any

from qcb_guard import hookimpl


def _thresholds(config: Any) -> Any:
    from qcb_guard.scanner import THRESHOLDS, ScanContext

    if isinstance(config, ScanContext):
        return config.config.threshold, config.config.wants, config.convention.name
    return (lambda s: THRESHOLDS[s]), (lambda s: True), None


def _finite(v: float) -> float | None:
    import math

    return round(v, 4) if math.isfinite(v) else None


def bin_position_finding(slots: list, residuals: list, name: str, threshold: float) -> Any:
    from qcb_guard.scanner import Finding
    from qcb_guard.scanner.bin_position import EDGE_BAND, edge_pileup, histogram

    layers = []
    for slot, (r, inside) in zip(slots, residuals, strict=True):
        z, ratio, n = edge_pileup(r, inside)
        layers.append(
            {"layer": slot.name, "n": n, "edge_z": round(z, 3), "edge_ratio": round(ratio, 3),
             "histogram": histogram(r, inside)}
        )  # fmt: skip
    worst = max(layers, key=lambda d: d["edge_z"])
    return Finding(
        signal="bin_position",
        convention=name,
        statistic=worst["edge_z"],
        threshold=threshold,
        explanation=(
            f"{worst['layer']}: {worst['edge_ratio']:.2f}x the uniform share of weights within "
            f"{EDGE_BAND} of a bin edge (z = {worst['edge_z']:.1f}); weights parked at bin edges "
            "flip with the slightest float change, which is how bin-projected QCBs hide"
        ),
        layers=layers,
        details={"band": EDGE_BAND, "worst_layer": worst["layer"]},
    )


def truncation_finding(slots: list, residuals: list, name: str, threshold: float) -> Any:
    from qcb_guard.scanner import Finding
    from qcb_guard.scanner.truncation_error import error_ratio, neuron_error_z, top_neurons

    layers = []
    for slot, (r, inside) in zip(slots, residuals, strict=True):
        z = neuron_error_z(r, inside)
        top = top_neurons(z)
        layers.append(
            {"layer": slot.name, "neurons": int(z.numel()), "max_z": top[0][1],
             "top_neurons": top, "error_ratio": _finite(error_ratio(r, inside))}
        )  # fmt: skip
    worst = max(layers, key=lambda d: d["max_z"])
    neuron = worst["top_neurons"][0][0]
    return Finding(
        signal="truncation_error",
        convention=name,
        statistic=worst["max_z"],
        threshold=threshold,
        explanation=(
            f"{worst['layer']} neuron {neuron}: squared rounding error z = {worst['max_z']:.1f} "
            "against the s²/12 a uniform bin position gives"
        ),
        layers=layers,
        details={"worst_layer": worst["layer"], "neuron": neuron},
    )


def behaviour_findings(slots: list, context: Any, threshold: Any) -> list:
    """Rounding sensitivity: the model with nearest-rounded weights against the float model,
    and phase-shifted grids of the same step as the null."""
    import torch

    from qcb_guard.scanner.rounding_sensitivity import nearest_weights, response, shifted_weights

    conv, probes, view = context.convention, context.probes, context.view
    p_fp, groups = context.fp_probs, len(probes.names)

    def run(weights: dict) -> tuple[Any, Any]:
        p_q = view.forward(probes.x, weights, conv.fold_bn).softmax(1)
        return p_q, response(p_fp, p_q, probes.group, groups)

    p_q, exact = run({s.name: nearest_weights(s) for s in slots})
    # Null grids only where the answer could matter: below half the threshold the nearest
    # response itself bounds the statistic.
    strong = max(exact.shift, exact.clean_flip_rate) >= threshold("rounding_sensitivity") / 2
    generator = torch.Generator().manual_seed(context.config.seed + 7919)
    nulls = [
        run({s.name: shifted_weights(s, generator) for s in slots})[1]
        for _ in range(context.config.null_grids if strong else 0)
    ]
    return [rounding_finding(p_fp, p_q, exact, nulls, probes, conv.name, threshold)]


def rounding_finding(p_fp, p_q, exact, nulls, probes, name: str, threshold: Any) -> Any:
    from qcb_guard.scanner import Finding
    from qcb_guard.scanner.rounding_sensitivity import flip_matrix, grid_specific

    excess, g, c, clean_excess = grid_specific(exact, nulls)
    statistic = max(excess, clean_excess)
    where = probes.names[g]
    null_note = (
        f" beyond what {len(nulls)} phase-shifted grid(s) of the same step do"
        if nulls else " (nearest response below half the threshold: no null grid run)"
    )  # fmt: skip
    if clean_excess > excess:
        versus = (
            f", {clean_excess:.1%} more than equally coarse shifted grids" if nulls else null_note
        )
        text = (
            f"nearest rounding changes {exact.clean_flip_rate:.1%} of predictions on clean "
            f"inputs{versus}"
        )
    else:
        text = (
            f"nearest rounding raises class {c}'s probability by {excess:.3f} on average over "
            f"probe group '{where}'{null_note} (clean inputs: {exact.clean_flip_rate:.1%} of "
            f"predictions change)"
        )
    return Finding(
        signal="rounding_sensitivity",
        convention=name,
        statistic=statistic,
        threshold=threshold("rounding_sensitivity"),
        explanation=text,
        details={
            "group": where,
            "class": c,
            "gain": round(float(exact.gain[g, c]), 4),
            "excess_gain": round(excess, 4),
            "clean_flip_rate": round(exact.clean_flip_rate, 4),
            "clean_flip_excess": round(clean_excess, 4),
            "max_flip_rate": round(float(exact.flips.max()), 4),
            "null_grids": len(nulls),
            "null_max_gain": round(max((n.shift for n in nulls), default=0.0), 4),
            "flip_matrix": flip_matrix(p_fp, p_q),
        },
    )


#: The convention an activation-reach finding is filed under: it concerns the activation
#: ranges of any static flow, not one weight grid.
STATIC_ACTIVATIONS = "static-activations"


def _torch_model(view: Any) -> Any:
    """The float model behind a scan view, as a differentiable torch module."""
    model = getattr(view, "model", None)
    if model is not None:
        return model
    from qcb_guard.onnx_torch import onnx_to_torch

    return onnx_to_torch(view.proto)


def activation_reach_findings(calibration: Any, context: Any, threshold: Any) -> list:
    """Activation reach, once per scan (the first grid to ask computes it)."""
    if context.shared.get("activation_reach_done"):
        return []
    context.shared["activation_reach_done"] = True
    from dataclasses import replace

    from qcb_guard.scanner.activation_reach import activation_reach

    scan_config = context.config
    x = calibration[: scan_config.clean]
    reach_config = scan_config.reach_config()
    if scan_config.progress and "progress" not in reach_config.probe:
        reach_config = replace(reach_config, probe={**reach_config.probe, "progress": True})
    result = activation_reach(_torch_model(context.view), x, reach_config, seed=scan_config.seed)
    return [reach_finding(result, threshold("activation_reach"))]


def reach_finding(result: Any, threshold: float) -> Any:
    from qcb_guard.scanner import Finding

    worst = result.worst
    if worst is None:
        text = "no activation function found: nothing a static flow could clip"
    else:
        unit = worst["top_units"][0]
        text = (
            f"{worst['layer']} unit {unit['unit']} can be driven to "
            f"{unit['reach_over_bulk']:.1f}x the clean peak of the layer's typical unit "
            f"({unit['reach_over_range']:.2f}x the clean calibrated range, clean peak "
            f"{unit['clean_over_bulk']:.1f}x); a static int8 flow must clip it or spend its "
            "range on it, which is where activation-range QCBs hide their suppressors"
        )
    return Finding(
        signal="activation_reach",
        convention=STATIC_ACTIVATIONS,
        statistic=result.statistic,
        threshold=threshold,
        explanation=text,
        layers=result.layers,
        details={
            "worst_layer": None if worst is None else worst["layer"],
            "max_ratio": max((r["ratio"] for r in result.layers), default=None),
            "units_probed": result.units_probed,
            "units_total": result.units_total,
            "seconds": round(result.seconds, 3),
            "notes": result.notes,
        },
    )


@hookimpl
def qcb_guard_scan(slots, calibration, config):
    if not slots:
        return None
    threshold, wants, name = _thresholds(config)
    name = name or slots[0].framework
    findings = []
    if wants("bin_position") or wants("truncation_error"):
        from qcb_guard.scanner.bin_position import bin_residuals

        seed = getattr(getattr(config, "config", config), "seed", 0)
        residuals = [bin_residuals(slot, seed + i) for i, slot in enumerate(slots)]
        if wants("bin_position"):
            findings.append(bin_position_finding(slots, residuals, name, threshold("bin_position")))
        if wants("truncation_error"):
            findings.append(
                truncation_finding(slots, residuals, name, threshold("truncation_error"))
            )
    if wants("rounding_sensitivity") and getattr(config, "probes", None) is not None:
        findings.extend(behaviour_findings(slots, config, threshold))
    if (
        wants("activation_reach")
        and getattr(config, "view", None) is not None
        and calibration is not None
        and config.config.behaviour
    ):
        findings.extend(activation_reach_findings(calibration, config, threshold))
    return findings
