"""Range probing: make every calibrated activation range cover what the model can reach.

A static flow fixes each activation range from clean calibration data. A static-activation
QCB (``quanti-static``, DESIGN.md §3) hides suppressor units that fire far above that range
only on the trigger; the deployed range clips them and the backdoor wakes. Range probing
searches, per *unit* (a channel of an activation's input), for a valid input (inside
``[low, high]``) that drives the unit as far as it goes, by projected sign-gradient ascent
started from the calibration image that already drives it most. The probes that reach each
activation tensor's extremes are appended to the calibration data, so the framework's own,
unchanged observers calibrate ranges that contain every reachable value — and the quantized
model keeps the float model's behaviour. The ratio reachable / calibrated per tensor is also
a scan signal (DESIGN.md §3: 1.6–4.3 on benign models, 5–12.5 on QCBs).

How units are found: a :class:`~torch.overrides.TorchFunctionMode` sees every activation
function call (``F.relu``, ``nn.GELU``, ``torch.sigmoid``, ``x.relu()`` …) in call order, so
any wiring — residual adds, functional activations — works without tracing. Optionally
(``sites="all"``) the outputs of Conv/Linear/BatchNorm/add that feed no activation (linear
bottlenecks, logits) are probed in both directions.

Cost control: probes of one batch run only up to their deepest site (the forward is cut
there); units are probed in batches; a batch stops early when no probe improves; a wall-clock
``budget_s`` stops probing and says which units were left (probed round-robin across sites so
an exhausted budget leaves every site partly covered); ``max_units_per_site`` keeps, per site,
the units with the highest and the lowest clean peaks, alternately (a cheap priority).

Gradient masking (an adaptive attacker keeps suppressors behind units that are dead on every
clean input): with ``leaky > 0`` the *backward* pass of ReLU-like activations lets a slope
``leaky`` through their flat regions (forward values stay exact, so reached values are real),
a straight-through surrogate in the spirit of BPDA.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from qcb_guard.activation import ActivationDefenseResult
from qcb_guard.errors import ConfigError, DataError, QcbGuardError

__all__ = [
    "ACTIVATIONS",
    "ProbeError",
    "RangeProbeConfig",
    "Site",
    "find_sites",
    "range_probe",
]


class ProbeError(QcbGuardError):
    """The model cannot be probed (not differentiable, non-finite activations ...)."""


# -------------------------------------------------------------------------------------------
# what is probed

#: Activation function → (name, bounded below). Bounded-below activations (ReLU family,
#: GELU, SiLU, Hardswish, Sigmoid ...) are probed upwards only; the others both ways.
ACTIVATIONS: dict[Callable[..., Any], tuple[str, bool]] = {
    F.relu: ("relu", True),
    torch.relu: ("relu", True),
    torch.relu_: ("relu", True),
    Tensor.relu: ("relu", True),
    Tensor.relu_: ("relu", True),
    F.relu6: ("relu6", True),
    F.hardtanh: ("hardtanh", True),
    F.gelu: ("gelu", True),
    F.silu: ("silu", True),
    F.mish: ("mish", True),
    F.hardswish: ("hardswish", True),
    F.hardsigmoid: ("hardsigmoid", True),
    F.softplus: ("softplus", True),
    F.elu: ("elu", True),
    F.selu: ("selu", True),
    F.celu: ("celu", True),
    torch.sigmoid: ("sigmoid", True),
    F.sigmoid: ("sigmoid", True),
    Tensor.sigmoid: ("sigmoid", True),
    torch.tanh: ("tanh", False),
    F.tanh: ("tanh", False),
    Tensor.tanh: ("tanh", False),
    F.leaky_relu: ("leaky_relu", False),
    F.prelu: ("prelu", False),
}
_CLAMPING = {"relu", "relu6", "hardtanh"}  # piecewise flat: the leaky backward applies

#: Linear operations whose outputs are probed with ``sites="all"`` when no activation or
#: other such operation consumes them.
LINEAR_OPS: dict[Callable[..., Any], str] = {
    F.conv1d: "conv",
    F.conv2d: "conv",
    F.conv3d: "conv",
    F.linear: "linear",
    F.batch_norm: "batch_norm",
    Tensor.__add__: "add",
    Tensor.__radd__: "add",
    torch.add: "add",
    Tensor.add: "add",
}
SITE_KINDS = ("activations", "all")

# Exported graphs (torch.export, PT2E) call ATen overloads instead of the Python functions.
_aten = torch.ops.aten
ACTIVATIONS.update(
    {
        _aten.relu.default: ("relu", True),
        _aten.relu_.default: ("relu", True),
        _aten.hardtanh.default: ("hardtanh", True),
        _aten.hardtanh_.default: ("hardtanh", True),
        _aten.gelu.default: ("gelu", True),
        _aten.silu.default: ("silu", True),
        _aten.silu_.default: ("silu", True),
        _aten.mish.default: ("mish", True),
        _aten.hardswish.default: ("hardswish", True),
        _aten.hardswish_.default: ("hardswish", True),
        _aten.hardsigmoid.default: ("hardsigmoid", True),
        _aten.sigmoid.default: ("sigmoid", True),
        _aten.elu.default: ("elu", True),
        _aten.tanh.default: ("tanh", False),
        _aten.leaky_relu.default: ("leaky_relu", False),
    }
)
LINEAR_OPS.update(
    {
        _aten.conv1d.default: "conv",
        _aten.conv2d.default: "conv",
        _aten.conv3d.default: "conv",
        _aten.linear.default: "linear",
        _aten.add.Tensor: "add",
    }
)
#: ATen in-place activations: run on a copy so that the recorded pre-activation survives.
_ATEN_INPLACE = {
    _aten.relu_.default,
    _aten.hardtanh_.default,
    _aten.silu_.default,
    _aten.hardswish_.default,
}


@dataclass(frozen=True)
class RangeProbeConfig:
    """Range probing's search and budget.

    :param steps: most gradient-ascent steps per probe.
    :param step_size: first L∞ step (cosine-decayed to 5% of it), in input units.
    :param batch_size: probes optimised together (one per unit).
    :param patience: a batch stops when no probe improved by more than ``tol`` (relative)
        for this many steps.
    :param tol: relative improvement that counts.
    :param budget_s: wall-clock budget for the probing; ``None`` is unlimited. When it runs
        out, the units not yet probed are reported in ``details`` and ``notes``.
    :param max_units_per_site: probe at most this many units per site (highest priority
        first); ``None`` probes every unit.
    :param leaky: backward slope through the flat parts of ReLU-like activations (0: exact
        gradients).
    :param sites: ``"activations"`` (inputs of activation functions) or ``"all"`` (also the
        unconsumed outputs of Conv/Linear/BatchNorm/add, both directions).
    :param keep: ``"all"`` returns every probe (one per unit: histogram calibrators such as
        PT2E's ``HistogramObserver`` clip a lone outlier); ``"site"`` returns, per site and
        direction, only the probe reaching the extreme (enough for min/max calibration).
    :param tail_mass: repeat the probes that reach far beyond a site's calibrated range
        until, at every site, their values in the far half of the range the probes add make up
        at least this fraction of all the values the site's observer sees (calibration +
        probes). Histogram calibrators (PT2E's and torch.ao's ``HistogramObserver``) always
        drop the outermost 1e-5 of the mass in their range search, so lone probes are clipped
        however far out they lie. ``0`` returns each probe once (enough for min/max
        calibrators).
    :param max_inputs: most inputs returned after repetition (the calibration cost bound);
        when the repeats would exceed it they are scaled down and ``notes`` says so.
    :param low: smallest valid input value. ``None`` (with ``high``): ``[0, 1]`` when the
        calibration data lies in it (images), else the box the calibration data spans
        (normalised inputs; ``notes`` says so: pass the true bounds if a trigger may lie
        outside it).
    :param high: largest valid input value (``None``: as ``low``).
    :param min_calibration: fewest calibration inputs accepted (probes start from them).
    :param progress: tqdm bar.
    """

    steps: int = 40
    step_size: float = 0.05
    batch_size: int = 128
    patience: int = 8
    tol: float = 1e-3
    budget_s: float | None = None
    max_units_per_site: int | None = None
    leaky: float = 0.1
    sites: str = "activations"
    keep: str = "all"
    tail_mass: float = 3e-5
    max_inputs: int = 4096
    low: float | None = None
    high: float | None = None
    min_calibration: int = 8
    progress: bool = False

    def __post_init__(self) -> None:
        for name, low in (
            ("steps", 1), ("batch_size", 1), ("patience", 1), ("min_calibration", 1),
            ("max_inputs", 1),
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        if self.max_units_per_site is not None and (
            isinstance(self.max_units_per_site, bool)
            or not isinstance(self.max_units_per_site, int)
            or self.max_units_per_site < 1
        ):
            raise ConfigError(
                f"max_units_per_site must be None or an int >= 1, got {self.max_units_per_site!r}"
            )
        for name in ("step_size", "tol"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.budget_s is not None and (not _finite(self.budget_s) or self.budget_s <= 0):
            raise ConfigError(f"budget_s must be None or a positive number, got {self.budget_s!r}")
        if not _finite(self.leaky) or not 0 <= self.leaky <= 1:
            raise ConfigError(f"leaky must be in [0, 1], got {self.leaky!r}")
        if self.sites not in SITE_KINDS:
            raise ConfigError(f"sites must be one of {SITE_KINDS}, got {self.sites!r}")
        if not _finite(self.tail_mass) or not 0 <= self.tail_mass < 0.5:
            raise ConfigError(f"tail_mass must be in [0, 0.5), got {self.tail_mass!r}")
        if self.keep not in ("site", "all"):
            raise ConfigError(f"keep must be 'site' or 'all', got {self.keep!r}")
        for name in ("low", "high"):
            if getattr(self, name) is not None and not _finite(getattr(self, name)):
                raise ConfigError(f"{name} must be None or finite, got {getattr(self, name)!r}")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ConfigError(f"need low < high, got low={self.low!r}, high={self.high!r}")
        if not isinstance(self.progress, bool):
            raise ConfigError(f"progress must be a bool, got {self.progress!r}")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Site:
    """One probed tensor: the input of the ``index``-th activation call (or an unconsumed
    linear output) in a forward pass.

    ``clean_*`` are per-channel peaks of the *pre-activation* on the calibration data
    (``clean_max`` [C], ``clean_min`` [C]); ``out_low``/``out_high`` the calibrated range of
    the tensor the flow quantizes (the activation's output).
    """

    index: int
    label: str
    op: str
    directions: tuple[int, ...]
    channels: int
    clean_max: Tensor
    clean_min: Tensor
    out_low: float
    out_high: float
    fn: Callable[[Tensor], Tensor]
    best_start: dict[int, Tensor] = field(default_factory=dict)  # direction → [C] indices
    reached: dict[int, float] = field(default_factory=dict)  # direction → best signed peak


class _Stop(Exception):
    """Raised inside the forward once the deepest site a batch needs is recorded."""


class _Leaky(torch.autograd.Function):
    """Forward: the activation's exact value. Backward: its gradient, or ``slope`` where
    that gradient is zero (flat parts of ReLU/ReLU6/hardtanh)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, grad: Tensor, slope: float) -> Tensor:
        ctx.save_for_backward(grad)
        ctx.slope = slope
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return g * torch.where(grad == 0, ctx.slope, grad), None, None, None


def _clamp_bounds(kind: str, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[float, float]:
    """The flat-region bounds of a ReLU-like activation call."""
    if kind == "relu":
        return 0.0, math.inf
    if kind == "relu6":
        return 0.0, 6.0
    numbers = [a for a in rest if isinstance(a, (int, float)) and not isinstance(a, bool)]
    low = kwargs.get("min_val", numbers[0] if numbers else -1.0)
    high = kwargs.get("max_val", numbers[1] if len(numbers) > 1 else 1.0)
    return float(low), float(high)


class _Recorder(TorchFunctionMode):
    """Sees every activation (and, optionally, linear op) call in a forward; records site
    inputs/outputs, applies the leaky backward and stops after ``stop_at``."""

    def __init__(self, stack: list[str], linear_ops: bool, leaky: float, stop_at: int | None):
        super().__init__()
        self.stack = stack
        self.linear_ops = linear_ops
        self.leaky = leaky
        self.stop_at = stop_at
        self.calls: list[dict[str, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        act = ACTIVATIONS.get(func)
        lin = LINEAR_OPS.get(func) if self.linear_ops else None
        if act is None and lin is None:
            return func(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor):
            return func(*args, **kwargs)
        inplace = (
            kwargs.get("inplace") is True
            or any(a is True for a in args[1:])
            or func in (torch.relu_, Tensor.relu_)
            or func in _ATEN_INPLACE
        )
        rest = args[1:] if args else ()
        # An in-place activation would overwrite the pre-activation the probes need: run it
        # on a copy (same value; the result is what the model goes on with).
        out = func(x.clone() if inplace else x, *rest, **kwargs)
        if act is not None and self.leaky > 0 and act[0] in _CLAMPING and x.requires_grad:
            low, high = _clamp_bounds(act[0], rest, kwargs)
            grad = ((x > low) & (x < high)).to(x.dtype)  # the exact gradient, 0 where flat
            out = _Leaky.apply(x, out, grad, self.leaky)
        owner = (self.stack[-1] if self.stack else "") or "<model>"
        self.calls.append(
            {
                "kind": act[0] if act is not None else lin,
                "activation": act is not None,
                "bounded_below": act[1] if act is not None else False,
                "input": x if act is not None else out,  # the probed tensor
                "output": out,
                "operands": [a for a in args if isinstance(a, Tensor)],
                "owner": owner,
            }
        )
        if self.stop_at is not None and len(self.calls) > self.stop_at:
            raise _Stop
        return out


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[str]]:
    """The names of the modules currently running (innermost last), for site labels."""
    stack: list[str] = []

    def enter(name: str) -> Callable[..., None]:
        return lambda *_a: stack.append(name)

    def leave(*_a: Any) -> None:  # a forward hook returning a value would replace the output
        if stack:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _run(
    model: nn.Module, x: Tensor, *, linear_ops: bool, leaky: float = 0.0, stop_at: int | None = None
) -> list[dict[str, Any]]:
    """Forward ``x`` recording every site call; cut after call ``stop_at`` when given."""
    with _module_stack(model) as stack:
        recorder = _Recorder(stack, linear_ops, leaky, stop_at)
        try:
            with recorder:
                model(x)
        except _Stop:
            pass
    return recorder.calls


def _channel_peaks(t: Tensor) -> tuple[Tensor, Tensor]:
    """[N, C, ...] → per-sample per-channel (max, min) [N, C] ([N, 1] for 1-D tensors)."""
    if t.dim() == 1:
        t = t.unsqueeze(1)
    flat = t.reshape(t.shape[0], t.shape[1], -1)
    return flat.amax(2), flat.amin(2)


def _select_calls(calls: list[dict[str, Any]], sites: str) -> list[int]:
    """Indices of the recorded calls that are probed: every activation; with ``"all"``,
    linear outputs that are no other recorded call's operand."""
    if sites == "activations":
        return [i for i, c in enumerate(calls) if c["activation"]]
    consumed = {id(t) for c in calls for t in c["operands"]}
    return [i for i, c in enumerate(calls) if c["activation"] or id(c["output"]) not in consumed]


def find_sites(model: nn.Module, calibration: Tensor, config: RangeProbeConfig) -> list[Site]:
    """Run the calibration data once; return the probed sites with their clean statistics.

    Raises :class:`ProbeError` for non-finite activations or a model whose sites do not
    depend differentiably on the input.
    """
    linear_ops = config.sites == "all"
    stats: dict[int, dict[str, Any]] = {}
    chosen: list[int] | None = None
    meta: list[dict[str, Any]] = []
    n_calls = 0
    for start in range(0, len(calibration), 256):
        xb = calibration[start : start + 256].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            calls = _run(model, xb, linear_ops=linear_ops)
        if chosen is None:
            chosen = _select_calls(calls, config.sites)
            meta = [calls[i] for i in chosen]
            n_calls = len(calls)
        elif len(calls) != n_calls:
            raise ProbeError(
                f"the model makes {len(calls)} activation calls on one batch and {n_calls} on "
                "another: data-dependent control flow cannot be probed"
            )
        for k, i in enumerate(chosen):
            c = calls[i]
            pre, out = c["input"].detach(), c["output"].detach()
            if not (torch.isfinite(pre).all() and torch.isfinite(out).all()):
                raise ProbeError(
                    f"non-finite activations at {c['owner']} ({c['kind']}) on the calibration "
                    "data: the model cannot be probed or calibrated"
                )
            if start == 0 and not c["input"].requires_grad:
                raise ProbeError(
                    f"the input of {c['owner']} ({c['kind']}) does not depend differentiably on "
                    "the model input (no_grad, integer or quantized ops): it cannot be probed"
                )
            hi, lo = _channel_peaks(pre)
            s = stats.setdefault(k, {"hi": [], "lo": [], "out_lo": math.inf, "out_hi": -math.inf})
            s["hi"].append(hi)
            s["lo"].append(lo)
            s["out_lo"] = min(s["out_lo"], float(out.min()))
            s["out_hi"] = max(s["out_hi"], float(out.max()))
    sites = []
    counts: dict[str, int] = {}
    for k, i in enumerate(chosen or []):
        c, s = meta[k], stats[k]
        hi, lo = torch.cat(s["hi"]), torch.cat(s["lo"])
        label = c["owner"]
        counts[label] = counts.get(label, 0) + 1
        if counts[label] > 1:
            label = f"{label}#{counts[label]}"
        directions = (1,) if c["bounded_below"] else (1, -1)
        sites.append(
            Site(
                index=i,
                label=label,
                op=c["kind"],
                directions=directions,
                channels=hi.shape[1],
                clean_max=hi.amax(0),
                clean_min=lo.amin(0),
                out_low=s["out_lo"],
                out_high=s["out_hi"],
                fn=_output_fn(c),
                best_start={1: hi.argmax(0), -1: lo.argmin(0)},
                reached={1: float(hi.max()), -1: float(-lo.min())},
            )
        )
    return sites


def _output_fn(call: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    """Maps a pre-activation value to the activation's output (to report reached outputs)."""
    table = {
        "relu": F.relu,
        "relu6": F.relu6,
        "hardtanh": F.hardtanh,
        "gelu": F.gelu,
        "silu": F.silu,
        "mish": F.mish,
        "hardswish": F.hardswish,
        "hardsigmoid": F.hardsigmoid,
        "softplus": F.softplus,
        "elu": F.elu,
        "selu": F.selu,
        "celu": F.celu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
    }
    return table.get(call["kind"], lambda t: t)  # leaky_relu/prelu/linear: the pre-activation


# -------------------------------------------------------------------------------------------
# the search


@dataclass
class _Unit:
    site: int  # position in the sites list
    channel: int
    direction: int
    value: float = -math.inf  # best (direction-signed) pre-activation peak reached
    probe: Tensor | None = None


def _units(sites: list[Site], config: RangeProbeConfig) -> list[_Unit]:
    """Every (site, channel, direction), at most ``max_units_per_site`` per site (highest
    and lowest clean peak alternately, :func:`_interleave`), ordered round-robin across
    sites in chunks of a batch, so that each batch stays at one site (its forward is cut
    there) and an exhausted budget leaves every site's first units probed."""
    per_site: list[list[_Unit]] = []
    for s_idx, site in enumerate(sites):
        units: list[_Unit] = []
        for d in site.directions:
            peak = site.clean_max if d == 1 else -site.clean_min
            units += [_Unit(s_idx, c, d) for c in _interleave(peak)]
        if config.max_units_per_site is not None:
            units = units[: config.max_units_per_site]
        per_site.append(units)
    chunk = config.batch_size
    out: list[_Unit] = []
    rounds = max((len(u) for u in per_site), default=0)
    # Rounds of `chunk` units per site keep batches within one site (cheap cut) while an
    # exhausted budget still leaves every site with its top-priority units probed.
    for r in range(0, rounds, chunk):
        for units in per_site:
            out += units[r : r + chunk]
    return out


def _interleave(peak: Tensor) -> list[int]:
    """Channels alternately from the highest and the lowest clean peak: the first usually
    set a benign tensor's range, the second are the quiet units a suppressor hides in."""
    high = torch.argsort(-peak, stable=True).tolist()
    low = torch.argsort(peak, stable=True).tolist()
    seen: set[int] = set()
    out: list[int] = []
    for a, b in zip(high, low, strict=True):
        for c in (a, b):
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out


def _objective(pre: Tensor, units: list[_Unit]) -> Tensor:
    """Per probe: the direction-signed spatial peak of its unit's pre-activation, [B]."""
    if pre.dim() == 1:
        pre = pre.unsqueeze(1)
    flat = pre.reshape(pre.shape[0], pre.shape[1], -1)
    ch = torch.tensor([u.channel for u in units])
    sign = torch.tensor([float(u.direction) for u in units], dtype=flat.dtype)
    picked = flat[torch.arange(len(units)), ch] * sign[:, None]
    return picked.amax(1)


def _probe_batch(
    model: nn.Module,
    sites: list[Site],
    units: list[_Unit],
    calibration: Tensor,
    config: RangeProbeConfig,
    generator: torch.Generator,
) -> int:
    """Optimise one probe per unit (all at one site); returns the probe-steps taken.

    A probe stops when it has not improved by ``tol`` (relative) for ``patience`` steps, or
    when even keeping its recent gain every remaining step would leave it below the site's
    extreme found so far (it cannot set the tensor's range); only live probes are run.
    """
    site = sites[units[0].site]
    direction = units[0].direction
    starts = torch.stack([site.best_start[u.direction][u.channel] for u in units])
    x = calibration[starts].detach().clone()
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    x = (x + 1e-3 * noise).clamp(config.low, config.high)
    n = len(units)
    best = torch.full((n,), -math.inf, dtype=torch.float64)
    best_x = x.clone()
    history: list[Tensor] = []
    stale = torch.zeros(n, dtype=torch.long)
    live = torch.ones(n, dtype=torch.bool)
    site_best = site.reached.get(direction, -math.inf)
    linear_ops = config.sites == "all"
    taken = 0
    chosen = list(units)
    for step in range(config.steps + 1):
        idx = live.nonzero().flatten()
        if len(idx) == 0:
            break
        xs = x[idx].detach().requires_grad_(True)
        with torch.enable_grad():
            calls = _run(model, xs, linear_ops=linear_ops, leaky=config.leaky, stop_at=site.index)
            if site.index >= len(calls):
                raise ProbeError(f"site {site.label} was not reached on a probe batch")
            value = _objective(calls[site.index]["input"], [chosen[i] for i in idx.tolist()])
            finite = torch.isfinite(value)
            last = step == config.steps
            grad = None
            if finite.any() and not last and value.requires_grad:
                grad = torch.autograd.grad(value[finite].sum(), xs)[0]
        taken += len(idx)
        v = torch.full((n,), -math.inf, dtype=torch.float64)
        v[idx] = torch.where(finite, value.detach().double(), -math.inf)
        improved = v > best + config.tol * best.abs().clamp_min(1e-6)
        stale = torch.where(improved, 0, stale + 1)
        better = v > best
        best = torch.where(better, v, best)
        best_x[better] = torch.zeros_like(x[better]) + x[better]
        site_best = max(site_best, float(best.max()))
        history.append(best.clone())
        if grad is None:
            break
        live[idx[~finite]] = False
        live &= stale < config.patience
        if len(history) > config.patience:  # hopeless: cannot catch the site's extreme
            gain = (best - history[-1 - config.patience]) / config.patience
            reach = best + gain.clamp_min(0) * (config.steps - step)
            live &= reach >= site_best
        lr = config.step_size * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
        with torch.no_grad():
            step_dir = torch.zeros_like(x)
            step_dir[idx[finite]] = grad[finite].sign()
            x = (x + lr * step_dir).clamp(config.low, config.high)
    site.reached[direction] = site_best
    for k, u in enumerate(units):
        u.value, u.probe = float(best[k]), best_x[k]
    return taken


def range_probe(
    model: nn.Module, calibration: Tensor, config: RangeProbeConfig | None = None, *, seed: int = 0
) -> ActivationDefenseResult:
    """Probe every unit of ``model`` (never modified) and return the probes to append to the
    calibration data, with the per-site scan signal in ``details``.

    :raises DataError: calibration data empty, too small, non-finite or outside
        ``[low, high]``.
    :raises ProbeError: the model is not differentiable w.r.t. its input, or its clean
        activations are not finite.
    """
    config = config or RangeProbeConfig()
    _check_calibration(calibration, config)
    config, box_note = _input_box(calibration, config)
    start = time.perf_counter()
    net = copy.deepcopy(model).eval()
    net.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    calibration = calibration.detach()
    sites = find_sites(net, calibration, config)
    notes: list[str] = [box_note] if box_note else []
    if not sites:
        notes.append(
            "no activation function found: nothing to probe (sites='all' adds linear outputs)"
        )
        empty = calibration[:0].clone()
        return ActivationDefenseResult(empty, time.perf_counter() - start, notes, {"sites": []})
    units = _units(sites, config)
    total_units = sum(s.channels * len(s.directions) for s in sites)
    done: list[_Unit] = []
    steps = 0
    bar = tqdm(
        total=len(units), desc="range-probe", unit="unit", disable=not config.progress, leave=False
    )
    i = 0
    exhausted = False
    while i < len(units):
        if config.budget_s is not None and time.perf_counter() - start > config.budget_s:
            exhausted = True
            break
        batch = [units[i]]
        j = i + 1
        while j < len(units) and len(batch) < config.batch_size and units[j].site == units[i].site:
            batch.append(units[j])
            j += 1
        steps += _probe_batch(net, sites, batch, calibration, config, generator)
        done += batch
        bar.update(len(batch))
        i = j
    bar.close()
    if exhausted:
        notes.append(
            f"budget_s={config.budget_s} ran out: {len(done)} of {len(units)} scheduled units "
            "probed (ranges of the others may still be too narrow)"
        )
    if len(units) < total_units:
        notes.append(
            f"max_units_per_site={config.max_units_per_site}: {len(units)} of {total_units} "
            "units scheduled"
        )
    bad = [u for u in done if not math.isfinite(u.value)]
    if bad:
        notes.append(f"{len(bad)} probe(s) produced non-finite activations and were dropped")
    done = [u for u in done if math.isfinite(u.value)]
    inputs, details = _collect(net, sites, done, calibration, config)
    if details.get("tail_short_sites"):
        notes.append(
            f"max_inputs={config.max_inputs}: tail_mass={config.tail_mass} not met at "
            f"{len(details['tail_short_sites'])} site(s) (histogram calibrators may clip their "
            "rarest probes): " + ", ".join(details["tail_short_sites"])
        )
    details.update(
        units_total=total_units,
        units_scheduled=len(units),
        units_probed=len(done),
        steps=steps,
        budget_exhausted=exhausted,
    )
    return ActivationDefenseResult(
        inputs=inputs.to(calibration.dtype),
        seconds=time.perf_counter() - start,
        notes=notes,
        details=details,
    )


def _input_box(calibration: Tensor, config: RangeProbeConfig) -> tuple[RangeProbeConfig, str]:
    """Fill unset ``low``/``high``: images in [0, 1] keep that box; other data (normalised
    inputs) keep the box they span, which the returned note names."""
    if config.low is not None and config.high is not None:
        return config, ""
    lo, hi = float(calibration.min()), float(calibration.max())
    if lo >= -1e-6 and hi <= 1 + 1e-6:
        lo, hi, note = 0.0, 1.0, ""
    else:
        note = (
            f"inputs outside [0, 1]: probes kept in the calibration data's range "
            f"[{lo:.4g}, {hi:.4g}] (pass low=/high= for the true input range)"
        )
    low = lo if config.low is None else config.low
    high = hi if config.high is None else config.high
    return replace(config, low=low, high=high), note


def _check_calibration(calibration: Any, config: RangeProbeConfig) -> None:
    if not isinstance(calibration, Tensor) or calibration.dim() < 2:
        raise DataError("calibration must be a tensor [N, ...] of model inputs")
    if not calibration.is_floating_point():
        raise DataError(f"calibration must be floating point, got {calibration.dtype}")
    if len(calibration) < config.min_calibration:
        raise DataError(
            f"range-probe needs at least {config.min_calibration} calibration inputs to start "
            f"probes from, got {len(calibration)}"
        )
    if not torch.isfinite(calibration).all():
        raise DataError("calibration data contains NaN or infinite values")
    lo, hi = float(calibration.min()), float(calibration.max())
    if not lo < hi:
        raise DataError(f"calibration data is constant ({lo:.4g}): nothing to start probes from")
    low = lo if config.low is None else config.low
    high = hi if config.high is None else config.high
    if lo < low - 1e-6 or hi > high + 1e-6:
        raise DataError(
            f"calibration values span [{lo:.4g}, {hi:.4g}], outside the valid input range "
            f"[{low}, {high}] the probes are kept in: pass low=/high="
        )


def _collect(
    model: nn.Module,
    sites: list[Site],
    units: list[_Unit],
    calibration: Tensor,
    config: RangeProbeConfig,
) -> tuple[Tensor, dict[str, Any]]:
    """Pick the probes to return and measure, with one full forward of them, every site's
    reachable output range against its calibrated one (the scan signal)."""
    if not units:
        return calibration[:0].clone(), {"sites": []}
    if config.keep == "all":
        chosen = units
    else:
        top: dict[tuple[int, int], _Unit] = {}
        for u in units:
            key = (u.site, u.direction)
            if key not in top or u.value > top[key].value:
                top[key] = u
        chosen = list(top.values())
    # Reachable extremes per site over every probe found (all units, not only those kept).
    every = torch.stack([u.probe for u in units])
    reach_hi = [-math.inf] * len(sites)
    reach_lo = [math.inf] * len(sites)
    unit_peak: dict[tuple[int, int], float] = {}
    numel = [1] * len(sites)  # values per input at each site
    with torch.no_grad():
        for s in range(0, len(every), 256):
            calls = _run(model, every[s : s + 256], linear_ops=config.sites == "all")
            for k, site in enumerate(sites):
                out = calls[site.index]["output"]
                reach_hi[k] = max(reach_hi[k], float(out.max()))
                reach_lo[k] = min(reach_lo[k], float(out.min()))
                numel[k] = out[0].numel()
            for off, u in enumerate(units[s : s + 256]):
                out = calls[sites[u.site].index]["output"][off]
                peak = (
                    out.reshape(out.shape[0], -1)[u.channel]
                    if out.dim() > 1
                    else out[u.channel : u.channel + 1]
                )
                unit_peak[(u.site, u.channel)] = max(
                    unit_peak.get((u.site, u.channel), -math.inf), float(peak.max())
                )
    rows = []
    for k, site in enumerate(sites):
        width = max(site.out_high - site.out_low, 1e-12)
        hi_ratio = reach_hi[k] / site.out_high if site.out_high > 0 else math.inf
        grow = max(reach_hi[k], site.out_high) - min(reach_lo[k], site.out_low)
        tops = sorted(
            ((c, v) for (s_, c), v in unit_peak.items() if s_ == k), key=lambda cv: -cv[1]
        )[:5]
        rows.append(
            {
                "site": site.label,
                "op": site.op,
                "channels": site.channels,
                "calibrated": [round(site.out_low, 6), round(site.out_high, 6)],
                "reachable": [
                    round(min(reach_lo[k], site.out_low), 6),
                    round(max(reach_hi[k], site.out_high), 6),
                ],
                "ratio": round(hi_ratio, 4) if math.isfinite(hi_ratio) else None,
                "range_growth": round(grow / width, 4),
                "top_units": [
                    {
                        "channel": c,
                        "reached": round(v, 6),
                        "over_calibrated": round(v / site.out_high, 4)
                        if site.out_high > 0
                        else None,
                    }
                    for c, v in tops
                ],
            }
        )
    probes = torch.stack([u.probe for u in chosen])
    outside = _far_values(model, sites, probes, reach_lo, reach_hi, config)
    repeats, short = tail_repeats(
        outside, numel, len(calibration), config.tail_mass, config.max_inputs
    )
    probes = probes.repeat_interleave(repeats, dim=0)
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    details = {
        "sites": rows,
        "max_ratio": max(ratios) if ratios else None,
        "probes_returned": len(chosen),
        "inputs_returned": len(probes),
        "repeated_probes": int((repeats > 1).sum()),
        "tail_short_sites": [sites[k].label for k in short],
    }
    return probes, details


def _far_values(
    model: nn.Module,
    sites: list[Site],
    probes: Tensor,
    reach_lo: list[float],
    reach_hi: list[float],
    config: RangeProbeConfig,
) -> Tensor:
    """``[P, S]``: values of each probe at each site in the far half of the range the probes
    add (beyond the midpoint between calibrated and reachable extreme). A histogram
    calibrator keeps the range's extreme only if these carry mass; what lies between is then
    covered too (ranges are intervals)."""
    hi = [s.out_high + (r - s.out_high) / 2 for s, r in zip(sites, reach_hi, strict=True)]
    lo = [s.out_low - (s.out_low - r) / 2 for s, r in zip(sites, reach_lo, strict=True)]
    far = torch.zeros(len(probes), len(sites))
    with torch.no_grad():
        for start in range(0, len(probes), 256):
            calls = _run(model, probes[start : start + 256], linear_ops=config.sites == "all")
            for k, site in enumerate(sites):
                flat = calls[site.index]["output"].reshape(len(calls[site.index]["output"]), -1)
                count = (flat > max(hi[k], site.out_high)).sum(1)
                count += (flat < min(lo[k], site.out_low)).sum(1)
                far[start : start + len(flat), k] = count.float()
    return far


def tail_repeats(
    outside: Tensor, numel: list[int], calibration: int, mass: float, max_inputs: int
) -> tuple[Tensor, list[int]]:
    """How often to return each probe so that, at every site, the probes' out-of-range values
    make up at least ``mass`` of all the values the site's observer sees.

    Sites are served cheapest first while the total stays within ``max_inputs`` (never fewer
    than one copy of each probe), so a budget protects as many sites as it can.

    :param outside: ``[P, S]`` out-of-range values of probe ``p`` at site ``s``.
    :param numel: values per input at each site.
    :param calibration: clean calibration inputs the observer also sees.
    :return: ``[P]`` repeat counts ≥ 1, and the sites left short by the budget.
    """
    repeats = torch.ones(len(outside))
    if mass <= 0 or not len(outside):
        return repeats.long(), []
    share = outside / torch.tensor(numel, dtype=torch.float32)  # [P, S] fraction per copy
    # Copies of probe p push site s's fraction towards share[p, s] at most: a site whose best
    # probe stays below `mass` is asked for half its best share (reachable with finite copies).
    target = torch.minimum(torch.full((share.shape[1],), mass), share.amax(0) / 2)
    needy = [s for s in range(share.shape[1]) if target[s] > 0]
    alone = {s: float(_serve(repeats, share, target, calibration, [s]).sum()) for s in needy}
    served: list[int] = []
    short: list[int] = []
    for s in sorted(needy, key=alone.__getitem__):
        trial = _serve(repeats, share, target, calibration, [*served, s])
        if trial.sum() <= max(max_inputs, len(outside)):
            repeats, served = trial, [*served, s]
        else:
            short.append(s)
    return repeats.long(), sorted(short)


def _serve(
    repeats: Tensor, share: Tensor, target: Tensor, calibration: int, sites: list[int]
) -> Tensor:
    """Raise ``repeats`` until every site in ``sites`` holds its target fraction."""
    repeats = repeats.clone()
    for _ in range(16):  # growing the total dilutes the other sites: iterate to a fixed point
        changed = False
        for s in sites:
            helps = share[:, s] > target[s]  # only these copies raise the site's fraction
            have = float(repeats @ share[:, s])  # out-of-range values / values per input
            total = calibration + float(repeats.sum())
            if have >= target[s] * total:
                continue
            # scale the helpful copies by k: have + (k-1)·h ≥ target·(total + (k-1)·n)
            h, n = float(repeats[helps] @ share[helps, s]), float(repeats[helps].sum())
            k = 1 + (target[s] * total - have) / max(h - target[s] * n, 1e-12)
            repeats[helps] = torch.ceil(repeats[helps] * k)
            changed = True
        if not changed:
            break
    return repeats
