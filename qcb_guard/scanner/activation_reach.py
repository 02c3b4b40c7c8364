"""Activation reach: static-activation QCBs hide units that reach far beyond the rest of
their layer.

A static int8 flow fixes each activation tensor's range from clean calibration data. The
``quanti-static`` attack (DESIGN.md §3, docs/activation-defenses.md) plants *suppressor*
units that fire far above the clean range on the trigger; the deployed range clips them and
the backdoor wakes. ``range-probe`` (:func:`qcb_guard.algorithms.range_probe.range_probe`)
finds, per unit, an input that drives it as high as it goes. This module turns that evidence
into a scan statistic.

Per site (an activation's output tensor, calibrated clean maximum ``hi``), the *bulk* is the
median clean peak of its live units — those whose clean peak exceeds ``floor · hi`` (1% of
the range, ~2.5 uint8 steps; below that a unit is dead in the int8 model): where the layer's
typical unit lives on clean data. Per unit (dead ones included):

``dominance_u = reach_u / bulk``

its reachable peak in multiples of the bulk. The model's statistic is the largest dominance
over units and sites. A suppressor must get far past the range the rest of its layer needs:
either it stays quiet on clean data and the probe drives it past ``hi`` (the range clips
it), or it also fires on clean data and drags ``hi`` far above the bulk. Either way it
towers over the bulk, while benign units that the probes push past ``hi`` are the layer's
busiest ones, which the bulk follows. Neither the model-wide ``reach / hi`` nor a unit's
reach over its *own* clean peak separates them (a suppressor that fires on clean data sets
``hi`` itself). Measurements and the threshold: docs/scanner.md, "Activation reach".
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from qcb_guard.algorithms.range_probe import RangeProbeConfig, Site, find_sites, range_probe
from qcb_guard.errors import ConfigError, DataError

__all__ = [
    "ReachConfig",
    "ReachResult",
    "SiteReach",
    "activation_reach",
    "bulk",
    "dominance",
    "reach_from_peaks",
    "site_reach",
]


@dataclass(frozen=True)
class ReachConfig:
    """How activation reach is measured.

    :param quantile: which quantile of the live units' clean peaks is a site's bulk (0.5,
        the median: suppressors would have to be half the live units to move it).
    :param floor: a unit whose clean peak stays at or below this share of the site's
        calibrated maximum is dead (left out of the bulk); also the bulk of a site with no
        live unit.
    :param top: units listed per site in the report.
    :param probe: options of the underlying ``range-probe`` search (fields of
        :class:`~qcb_guard.algorithms.range_probe.RangeProbeConfig`; ``keep`` is forced to
        ``"all"`` so that every unit's probe is measured, and probes are returned once).
    """

    quantile: float = 0.5
    floor: float = 0.01
    top: int = 5
    probe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("quantile", "floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
        if isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 1:
            raise ConfigError(f"top must be an int >= 1, got {self.top!r}")
        if not isinstance(self.probe, dict):
            raise ConfigError(f"probe options must be a dict, got {type(self.probe).__name__}")
        object.__setattr__(self, "probe", dict(self.probe))
        self.probe_config()  # validates the options now, with the probe's own messages

    def probe_config(self) -> RangeProbeConfig:
        known = {f.name for f in fields(RangeProbeConfig)}
        unknown = sorted(set(self.probe) - known)
        if unknown:
            raise ConfigError(
                f"activation_reach: unknown probe option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        forced: dict[str, Any] = {"keep": "all"}  # every unit's own probe is measured
        if "tail_mass" in known:  # each probe once: repeats add histogram mass, not reach
            forced["tail_mass"] = 0.0
        return RangeProbeConfig(**{**self.probe, **forced})


@dataclass
class SiteReach:
    """One probed tensor in one direction: per-unit clean and reachable peaks of the
    activation's *output* (direction-signed: ``-min`` for the downward direction) and the
    bound the static flow calibrates on clean data."""

    site: str
    op: str
    direction: int
    calibrated: float
    clean: Tensor
    reach: Tensor


@dataclass
class ReachResult:
    """The statistic, per-site evidence, and what the probing cost."""

    statistic: float
    sites: list[SiteReach]
    layers: list[dict[str, Any]]
    seconds: float
    units_probed: int
    units_total: int
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> dict[str, Any] | None:
        return max(self.layers, key=lambda d: d["max_dominance"], default=None)


def bulk(clean: Tensor, calibrated: float, quantile: float, floor: float) -> float:
    """Where a site's typical live unit peaks on clean data: the ``quantile`` (lower value,
    never interpolated towards the top unit) of the clean peaks above ``floor`` × the
    calibrated maximum; that floor when no unit is live."""
    cut = floor * max(float(calibrated), 0.0)
    live = clean.double()[clean.double() > cut]
    typical = float(torch.quantile(live, quantile, interpolation="lower")) if live.numel() else 0
    return max(typical, cut, 1e-12)


def dominance(site: SiteReach, config: ReachConfig) -> Tensor:
    """Per unit: reachable peak over the site's bulk (module docstring)."""
    return site.reach.double() / bulk(site.clean, site.calibrated, config.quantile, config.floor)


def _output_peaks(site: Site, direction: int, pre: Tensor) -> Tensor:
    """Direction-signed per-unit output peaks from per-unit pre-activation peaks (the
    activations probed are monotone where their peaks lie)."""
    return direction * site.fn(pre.double()).double()


def site_reach(clean_sites: list[Site], reach_sites: list[Site]) -> list[SiteReach]:
    """Pair the clean statistics of every site with those measured over clean data plus
    probes (both from :func:`~qcb_guard.algorithms.range_probe.find_sites`)."""
    if len(clean_sites) != len(reach_sites):
        raise DataError(
            f"the model made {len(clean_sites)} activation calls on clean data and "
            f"{len(reach_sites)} on the probes: it cannot be measured"
        )
    out = []
    for c, r in zip(clean_sites, reach_sites, strict=True):
        for d in c.directions:
            clean_pre = c.clean_max if d == 1 else c.clean_min
            reach_pre = r.clean_max if d == 1 else r.clean_min
            bound = c.out_high if d == 1 else -c.out_low
            clean = _output_peaks(c, d, clean_pre)
            reach = torch.maximum(_output_peaks(c, d, reach_pre), clean)
            out.append(SiteReach(c.label, c.op, d, float(bound), clean, reach))
    return out


def reach_from_peaks(sites: list[SiteReach], config: ReachConfig) -> tuple[float, list[dict]]:
    """The statistic (largest unit dominance) and a JSON-ready row per site."""
    rows = []
    for s in sites:
        level = bulk(s.clean, s.calibrated, config.quantile, config.floor)
        score = dominance(s, config)
        hi = max(s.calibrated, 1e-12)
        order = torch.argsort(-score, stable=True)[: config.top].tolist()
        rows.append(
            {
                "layer": s.site,
                "op": s.op,
                "direction": "up" if s.direction == 1 else "down",
                "units": int(score.numel()),
                "calibrated": round(s.calibrated, 6),
                "bulk": round(level, 6),
                "reachable": round(float(s.reach.max()), 6),
                "ratio": round(float(s.reach.max()) / hi, 4),
                "clipped_units": int((s.reach > hi).sum()),
                "max_dominance": round(float(score.max()), 4),
                "top_units": [
                    {
                        "unit": u,
                        "clean_over_bulk": round(float(s.clean[u]) / level, 4),
                        "reach_over_bulk": round(float(score[u]), 4),
                        "reach_over_range": round(float(s.reach[u]) / hi, 4),
                    }
                    for u in order
                ],
            }
        )
    statistic = max((r["max_dominance"] for r in rows), default=0.0)
    return statistic, rows


def activation_reach(
    model: nn.Module, calibration: Tensor, config: ReachConfig | None = None, *, seed: int = 0
) -> ReachResult:
    """Probe every activation unit of ``model`` (never modified) and measure how far each can
    be driven above the clean peaks of its layer's typical unit (module docstring).

    :param model: a float torch module, differentiable with respect to its input.
    :param calibration: clean inputs ``[N, ...]``; they set the calibrated ranges and start
        the probes. Probes stay inside ``[low, high]`` of the probe options, by default the
        range the calibration data spans.
    :raises DataError: calibration data unusable (``range_probe``'s checks).
    :raises ProbeError: the model cannot be probed.
    """
    config = config or ReachConfig()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"activation_reach needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(calibration, Tensor) or not calibration.is_floating_point():
        raise DataError("activation_reach needs calibration data: a float tensor [N, ...]")
    start = time.perf_counter()
    options = dict(config.probe)
    if "low" not in options and "high" not in options and calibration.numel():
        low, high = float(calibration.min()), float(calibration.max())
        if math.isfinite(low) and math.isfinite(high) and high > low:
            options.update(low=low, high=high)  # probes stay in the data's own value range
    probe_config = replace(config, probe=options).probe_config()
    result = range_probe(model, calibration, probe_config, seed=seed)
    net = copy.deepcopy(model).eval()
    net.requires_grad_(False)
    clean = find_sites(net, calibration.detach(), probe_config)
    reached = find_sites(net, torch.cat([calibration.detach(), result.inputs]), probe_config)
    sites = site_reach(clean, reached)
    statistic, layers = reach_from_peaks(sites, config)
    return ReachResult(
        statistic=statistic,
        sites=sites,
        layers=layers,
        seconds=time.perf_counter() - start,
        units_probed=int(result.details.get("units_probed", 0)),
        units_total=int(result.details.get("units_total", 0)),
        notes=list(result.notes),
    )
