"""Adapter for torch.ao eager and FX post-training quantization (deprecated, still in torch).

``guard(qconfig)``, ``guard(qconfig_mapping)`` and ``guard(torch.ao.quantization.quantize_dynamic)``
return objects that the unchanged ``prepare``/``convert``, ``prepare_fx``/``convert_fx`` and
``quantize_dynamic`` flows use exactly like the originals; the int8 weights that ``convert``
packs come from the configured defense, with torch's own scales and zero points.

How (docs/adapters/torch_ao.md has the details and the verified facts): torch builds a fresh
weight observer from the qconfig for every layer it converts, calls it on the layer's float
weight, asks it for the qparams, then quantizes that same tensor. The guarded observer lets
the original observer compute the qparams first (so they stay bit-identical), finds the layer
being converted among the conversion functions on the call stack, asks the defense for the
integers, and points the weight tensor at their on-grid values ``s * (q - zp)`` until torch
drops the observer, i.e. until that layer is converted; then the tensor gets its own storage
back, so no float weight is left modified (FX shares the user's parameters). Defenses that need
data get each layer's inputs recorded by guarded activation observers during the user's own
calibration passes; ``quantize_dynamic`` has none and uses ``guard(..., calibration=...)``.

Static flows also run the activation defense (``range-probe`` by default): guarded activation
observers record the prepared model's inputs during calibration, and when ``convert`` first asks
a guarded observer for its qparams (before any module is swapped), the defense probes a float
copy of the model being converted (observers stripped) and the probes are run through that
model, in eval mode and without gradients, while every activation observer still observes.

torch is imported lazily: importing this plugin must work without it.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import sys
import warnings
import weakref
from bisect import bisect_left, insort
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qcb_guard import hookimpl
from qcb_guard.activation import TURNED_OFF, skipped

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from qcb_guard.config import GuardConfig
    from qcb_guard.guarding import GuardResult
    from qcb_guard.manager import PluginManager
    from qcb_guard.slots import SlotCalibration, WeightSlot

FRAMEWORK = "torch.ao"
EXTRA = "torchao"
#: Calibration rows recorded per layer (the first ones the user feeds), read when guard() runs.
MAX_CALIBRATION_SAMPLES = 1024

_QCONFIG_TYPES = {
    ("torch.ao.quantization.qconfig", "QConfig"),
    ("torch.ao.quantization.qconfig", "QConfigDynamic"),
}
_MAPPING_TYPE = ("torch.ao.quantization.qconfig_mapping", "QConfigMapping")
_DYNAMIC = "dynamic flow: no static activation ranges to protect"
_QUANTIZE_DYNAMIC = ("torch.ao.quantization.quantize", "quantize_dynamic")
_MAPPING_DICTS = (
    "object_type_qconfigs",
    "module_name_regex_qconfigs",
    "module_name_qconfigs",
    "module_name_object_type_order_qconfigs",
)


class TorchAoWarning(UserWarning):
    """A layer torch.ao converted kept nearest rounding (the report says which and why)."""


# ------------------------------------------------------------------------------------------
# Adapter
# ------------------------------------------------------------------------------------------


class TorchAoAdapter:
    """``guard()`` support for ``QConfig``, ``QConfigMapping`` and ``quantize_dynamic``."""

    requires = EXTRA

    def matches(self, obj: Any) -> bool:
        """True for torch.ao qconfigs, qconfig mappings and ``quantize_dynamic`` (no import)."""
        kind = (type(obj).__module__, type(obj).__qualname__)
        if kind in _QCONFIG_TYPES or kind == _MAPPING_TYPE:
            return True
        if callable(obj) and not isinstance(obj, type):
            name = (getattr(obj, "__module__", None), getattr(obj, "__qualname__", None))
            return name == _QUANTIZE_DYNAMIC
        return False

    def wrap(self, obj: Any, config: GuardConfig, pm: PluginManager) -> Any:
        """The guarded counterpart of ``obj`` (same type, or same signature for a function)."""
        from qcb_guard._compat import require

        require("torch.ao.quantization", EXTRA)
        kind = (type(obj).__module__, type(obj).__qualname__)
        if kind in _QCONFIG_TYPES:
            session = _Session(config, pm)
            guarded = _guard_qconfig(obj, session, {})
            if guarded is obj:
                raise _config_error(
                    "this QConfig has no integer weight observer to guard (weight is None, "
                    "a float16/no-op observer, or float-qparams embedding quantization)"
                )
            return guarded
        if kind == _MAPPING_TYPE:
            return _guard_mapping(obj, _Session(config, pm))
        if getattr(obj, "__qcb_guard__", False):
            raise _config_error("this quantize_dynamic is already guarded")
        return _guard_quantize_dynamic(obj, config, pm)


@hookimpl
def qcb_guard_register_adapters(register):
    register(
        "torch-ao",
        TorchAoAdapter(),
        description="torch.ao eager/FX PTQ: QConfig, QConfigMapping, quantize_dynamic",
    )


def _config_error(message: str) -> Exception:
    from qcb_guard.errors import ConfigError

    return ConfigError(message)


# ------------------------------------------------------------------------------------------
# Guarded observer factories
# ------------------------------------------------------------------------------------------


class _Factory:
    """Stands in a QConfig for an observer constructor; builds the original observer and
    turns it into its guarded subclass.

    It is not a ``_PartialWrapper`` on purpose: torch then keeps it as is instead of
    rebuilding it per module, compares it with ``==`` (defined below) and deep-copies it as
    itself, so every copy torch makes of a qconfig mapping shares one session.
    """

    def __init__(self, original: Any, session: _Session, role: str):
        self.original = original
        self.session = session
        self.role = role

    def __call__(self, **kwargs: Any) -> Any:
        observer = self.original(**kwargs)
        mixin = _GuardedWeight if self.role == "weight" else _RecordingActivation
        observer.__class__ = _guarded_class(type(observer), mixin)
        observer._qcb_session = self.session
        if self.role == "activation":
            observer._qcb_samples = _Samples(self.session.max_samples)
            observer._qcb_inputs = _InputIndex()
        return observer

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Factory)
            and other.role == self.role
            and other.session is self.session
            and (other.original is self.original or other.original == self.original)
        )

    def __hash__(self) -> int:
        return hash((self.role, id(self.session), id(self.original)))

    def __deepcopy__(self, memo: dict) -> _Factory:
        return self

    def __copy__(self) -> _Factory:
        return self

    def __repr__(self) -> str:
        return f"qcb_guard[{self.session.config.defense}]({self.original!r})"


_CLASSES: dict[tuple[type, type], type] = {}


def _guarded_class(cls: type, mixin: type) -> type:
    """``Qcb<mixin><Observer>``: a subclass of torch's observer class, so every isinstance
    check torch makes still holds; cached so each observer class gets one subclass."""
    key = (cls, mixin)
    if key not in _CLASSES:
        name = f"QcbGuarded{cls.__name__}"
        _CLASSES[key] = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
    return _CLASSES[key]


class _GuardedWeight:
    """Mixin for weight observers: observe as usual, then round the layer being converted."""

    def forward(self, x):
        out = super().forward(x)
        session = self.__dict__.get("_qcb_session")
        if session is not None:
            session.on_weight(self, x)
        return out


class _RecordingActivation:
    """Mixin for activation observers: observe as usual; during calibration record the inputs
    of the layer they belong to (eager) or feed (FX) and the prepared model's own inputs; at
    convert, run the activation defense before the first qparams are read."""

    def forward(self, x):
        out = super().forward(x)
        session = self.__dict__.get("_qcb_session")
        if session is not None and not session.probing:  # probes are not calibration data
            if session.needs_data:
                session.on_activation(self, x)
            if session.probe:
                session.on_model_input(self)
        return out

    def calculate_qparams(self, *args, **kwargs):
        session = self.__dict__.get("_qcb_session")
        if session is not None and session.probe and not session.probing:
            session.before_qparams(self)
        return super().calculate_qparams(*args, **kwargs)


class _Samples:
    """The first ``limit`` rows a layer received during calibration.

    Deep copies share it: torch deep-copies prepared models at ``convert``, and the samples
    must not be duplicated (or lost) on the way.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.chunks: list[torch.Tensor] = []
        self.rows = 0

    def add(self, t: Any) -> None:
        import torch

        need = self.limit - self.rows
        if need <= 0 or not isinstance(t, torch.Tensor) or t.dim() == 0:
            return
        if not t.is_floating_point():
            return
        if self.chunks and t.shape[1:] != self.chunks[0].shape[1:]:
            return
        chunk = t.detach()[:need].to(torch.float32).clone()
        self.chunks.append(chunk)
        self.rows += chunk.shape[0]

    def tensor(self) -> torch.Tensor | None:
        import torch

        return torch.cat(self.chunks) if self.chunks else None

    def __deepcopy__(self, memo: dict) -> _Samples:
        return self


class _InputIndex(dict):
    """Per activation observer: its qualified name in a model that was called during
    calibration → that model's recorded inputs. Shared by deep copies (eager ``convert`` copies
    the prepared model), so the model being converted finds the inputs of the model that was
    calibrated through the observer's name in it, and a wrapper around it never matches."""

    def __deepcopy__(self, memo: dict) -> _InputIndex:
        return self


class _ModelInputs:
    """The inputs of one model's calibration forwards (the first ``limit`` rows), recorded
    once per forward; ``problem`` says why they cannot be probed (not one float tensor)."""

    def __init__(self, limit: int):
        self.samples = _Samples(limit)
        self.last: Any = None  # the args tuple of the forward recorded last (one per call)
        self.batch: int | None = None
        self.problem: str | None = None

    def add(self, args: Any, kwargs: Any) -> None:
        import torch

        if args is self.last:
            return
        self.last = args
        x = args[0] if isinstance(args, tuple) and len(args) == 1 and not kwargs else None
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or not x.is_floating_point():
            self.problem = (
                "the prepared model is called with other than one float tensor input; range "
                "probing needs one input tensor [N, ...]"
            )
            return
        if self.batch is None:
            self.batch = int(x.shape[0])
        self.samples.add(x)

    def __deepcopy__(self, memo: dict) -> _ModelInputs:
        return self


def _plain_observer_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(observers qcb_guard may subclass, observers it must leave alone)."""
    from torch.ao.quantization import observer as obs

    special = (
        obs.PlaceholderObserver,
        obs.NoopObserver,
        obs.FixedQParamsObserver,
        obs.ReuseInputObserver,
    )
    return (obs.ObserverBase,), special


def _check_not_qat(probe: Any) -> None:
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    if isinstance(probe, FakeQuantizeBase):
        raise _config_error(
            "QAT qconfigs (fake-quantize weights) are not supported: quantization-aware "
            "training learns against nearest rounding; guard a post-training qconfig "
            "(e.g. get_default_qconfig) instead"
        )


def _guards_weight(probe: Any) -> bool:
    """True when ``probe`` is an observer torch uses to quantize weights to int8/uint8."""
    import torch

    base, special = _plain_observer_types()
    if not isinstance(probe, base) or isinstance(probe, special):
        return False
    schemes = (
        torch.per_tensor_affine,
        torch.per_tensor_symmetric,
        torch.per_channel_affine,
        torch.per_channel_symmetric,
    )
    return probe.dtype in (torch.qint8, torch.quint8) and probe.qscheme in schemes


def _records_activation(probe: Any) -> bool:
    base, special = _plain_observer_types()
    return isinstance(probe, base) and not isinstance(probe, special)


def _guard_qconfig(qconfig: Any, session: _Session, memo: dict[int, Any]) -> Any:
    """A QConfig of the same type whose weight (and, for defenses that need data, activation)
    constructors are guarded; ``qconfig`` itself when it has no integer weights."""
    if qconfig is None:
        return None
    if id(qconfig) in memo:  # identical qconfigs stay identical (torch compares them)
        return memo[id(qconfig)]
    weight, activation = qconfig.weight, qconfig.activation
    if isinstance(weight, _Factory) or isinstance(activation, _Factory):
        raise _config_error("this qconfig is already guarded")
    guarded = qconfig
    if weight is not None:
        probe = weight()
        _check_not_qat(probe)
        if _guards_weight(probe):
            new_activation = activation
            if (session.needs_data or session.probe) and activation is not None:
                act_probe = activation()
                _check_not_qat(act_probe)
                if _records_activation(act_probe):
                    new_activation = _Factory(activation, session, "activation")
            with warnings.catch_warnings():  # QConfigDynamic warns on construction
                warnings.simplefilter("ignore", FutureWarning)
                guarded = type(qconfig)(new_activation, _Factory(weight, session, "weight"))
    memo[id(qconfig)] = guarded
    return guarded


def _guard_mapping(mapping: Any, session: _Session) -> Any:
    """A new QConfigMapping with every entry guarded (the caller's mapping is untouched)."""
    from torch.ao.quantization import QConfigMapping

    memo: dict[int, Any] = {}
    new = QConfigMapping()
    new.global_qconfig = _guard_qconfig(mapping.global_qconfig, session, memo)
    for attr in _MAPPING_DICTS:
        target = getattr(new, attr)
        for key, qconfig in getattr(mapping, attr).items():
            target[key] = _guard_qconfig(qconfig, session, memo)
    if not any(guarded is not original for original, guarded in _memo_pairs(mapping, memo)):
        raise _config_error("this QConfigMapping has no integer weight observer to guard")
    return new


def _memo_pairs(mapping: Any, memo: dict[int, Any]) -> list[tuple[Any, Any]]:
    qconfigs = [mapping.global_qconfig]
    for attr in _MAPPING_DICTS:
        qconfigs.extend(getattr(mapping, attr).values())
    return [(q, memo[id(q)]) for q in qconfigs if q is not None]


# ------------------------------------------------------------------------------------------
# The layer being converted, found on the call stack
# ------------------------------------------------------------------------------------------

_LAYER_KINDS = {"Linear": "linear", "Conv1d": "conv1d", "Conv2d": "conv2d", "Conv3d": "conv3d"}


def _base_layer(module: Any) -> Any:
    """The Conv/Linear module holding the weight of ``module`` (itself, or the first module of
    a torch.ao fused module such as ConvReLU2d/LinearReLU), or None."""
    from torch import nn
    from torch.ao.nn.intrinsic import _FusedModule

    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if isinstance(module, _FusedModule) and len(module) and isinstance(module[0], layers):
        return module[0]
    if isinstance(module, layers):
        return module
    return None


def _layer_kind(base: Any) -> str:
    for cls in type(base).__mro__:
        if cls.__module__.startswith("torch.nn.modules") and cls.__name__ in _LAYER_KINDS:
            return _LAYER_KINDS[cls.__name__]
    raise _config_error(f"unsupported layer type {type(base).__name__}")


@dataclass
class _Located:
    """What the conversion functions on the stack tell about the weight being quantized."""

    base: Any = None  # the Conv/Linear module whose .weight is the tensor
    container: Any = None  # the module torch swaps (the fused module, or ``base``)
    root: Any = None  # the model being converted
    name: str = ""  # ``container``'s qualified name in ``root``
    # torch clamps the integers to the observer's [quant_min, quant_max]: the quantized
    # modules' from_float do (eager, quantize_dynamic); reference modules, hence FX, do not
    clamps: bool = True
    flow: str = "eager"  # "eager", "fx" or "dynamic"


def _convert_frame(frame: Any) -> bool:
    """True for frames of torch.ao's conversion code (not prepare, calibration or QAT)."""
    module = frame.f_globals.get("__name__", "")
    if module.startswith(("torch.ao.nn.quantized", "torch.ao.quantization.fx.convert")):
        return True
    return module == "torch.ao.quantization.quantize" and frame.f_code.co_name == "swap_module"


def _scan_stack(frame: Any) -> tuple[str, str, list[Any]] | None:
    """Walk the call stack from ``frame``: ``(caller, flow, modules)`` while a torch.ao
    conversion runs, else None (calibration, QAT). ``caller`` is the innermost torch.ao module
    on the stack, ``flow`` "eager", "fx" or "dynamic", ``modules`` the ``nn.Module`` locals of
    torch.ao frames, innermost first."""
    from torch import nn

    converting = False
    caller = ""  # the torch.ao module that called the observer
    flow = "eager"
    modules: list[Any] = []
    seen: set[int] = set()
    while frame is not None:
        module_name = frame.f_globals.get("__name__", "")
        if module_name.startswith(("torch.ao.nn.qat", "torch.ao.nn.intrinsic.qat")):
            return None
        converting = converting or _convert_frame(frame)
        if module_name.startswith("torch.ao.quantization.fx"):
            flow = "fx"
        elif frame.f_code.co_name == "quantize_dynamic" and flow == "eager":
            flow = "dynamic"
        if module_name.startswith("torch.ao."):
            caller = caller or module_name
            for value in list(frame.f_locals.values()):
                if isinstance(value, nn.Module) and id(value) not in seen:
                    seen.add(id(value))
                    modules.append(value)
        frame = frame.f_back
    return (caller, flow, modules) if converting else None


def _converting_root(observer: Any) -> _Located | None:
    """The model a torch.ao conversion on the stack converts (the outermost module of its
    frames that holds ``observer``), or None when no conversion is running."""
    scan = _scan_stack(sys._getframe(2))
    if scan is None:
        return None
    _caller, flow, modules = scan
    holders = [(list(m.modules()), m) for m in modules]
    holders = [(len(subs), m) for subs, m in holders if any(s is observer for s in subs)]
    if not holders:
        return None
    # the largest holder holds every other one (frames are deduplicated innermost first, so
    # their order does not tell which module is outermost)
    return _Located(root=max(holders, key=lambda h: h[0])[1], flow=flow)


def _locate(x: Any) -> _Located | None:
    """Find the layer torch is converting when it calls a weight observer on ``x``.

    Returns None when no torch.ao conversion function is on the stack (calibration of FX
    functional weights, QAT): the observer then behaves exactly like the original. Only the
    locals of torch.ao frames are read, and a layer is accepted only if its ``.weight`` *is*
    ``x``, so this does not depend on torch's variable names.
    """
    scan = _scan_stack(sys._getframe(2))
    if scan is None:
        return None
    caller, flow, modules = scan
    clamps = caller.startswith("torch.ao.nn.quantized") and ".reference" not in caller
    found = _Located(clamps=clamps, flow=flow)
    for module in modules:  # innermost frames first
        base = _base_layer(module)
        if base is not None and base.weight is x:
            found.base = base
            break
    if found.base is None:
        return found
    found.container = found.base
    for module in modules:
        if _base_layer(module) is found.base and module is not found.base:
            found.container = module
    for module in reversed(modules):  # outermost first: the model handed to torch
        names = {id(m): n for n, m in module.named_modules(remove_duplicate=False)}
        if id(found.container) in names:
            found.root, found.name = module, names[id(found.container)]
            break
    return found


# ------------------------------------------------------------------------------------------
# Session: one per guard() call
# ------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One conversion: the slots rounded so far and the report they make."""

    result: GuardResult
    slots: list[WeightSlot] = field(default_factory=list)
    unguarded: list[str] = field(default_factory=list)
    probed: bool = False  # the activation defense ran (or was skipped) for this conversion

    def add(self, slot: WeightSlot, partial: GuardResult) -> None:
        self.slots = [s for s in self.slots if s.name != slot.name] + [slot]
        self.result.slots = [s for s in self.result.slots if s.name != slot.name]
        self.result.slots.extend(partial.slots)
        self.result.seconds = round(self.result.seconds + partial.seconds, 4)
        for note in partial.notes:
            if note not in self.result.notes:
                self.result.notes.append(note)


class _Session:
    """Shared by every observer built from one guarded qconfig / mapping / quantize_dynamic."""

    def __init__(self, config: GuardConfig, pm: PluginManager):
        from torch.utils.weak import WeakIdKeyDictionary

        self.config = config
        self.pm = pm
        entry = pm.defenses.get(config.defense)
        self.needs_data = bool(entry.options.get("needs_calibration", False))
        if config.options and not entry.options.get("configurable", False):
            # round_slots would refuse them too, but only inside torch's convert
            raise _config_error(
                f"defense {config.defense!r} takes no options, got "
                f"{', '.join(sorted(config.options))}"
            )
        limit = MAX_CALIBRATION_SAMPLES
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise _config_error(f"MAX_CALIBRATION_SAMPLES must be a positive int, got {limit!r}")
        self.max_samples = limit
        self.runs: weakref.WeakKeyDictionary[Any, _Run] = weakref.WeakKeyDictionary()
        self.batch: _Run | None = None  # set by the quantize_dynamic wrapper
        self.layer_inputs: Any = None  # name -> tensor, quantize_dynamic's calibration=
        # keyed by weight parameter identity (a WeakKeyDictionary would compare tensors with ==)
        self.fx_samples: Any = WeakIdKeyDictionary()
        self.fx_graphs: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
        # activation defense (static flows): model inputs recorded per calibrated model
        self.probe = config.activation_defense is not None
        self.probing = False  # probes are running through a model: observe, record nothing
        self.model_inputs: weakref.WeakKeyDictionary[Any, _ModelInputs] = (
            weakref.WeakKeyDictionary()
        )
        self.observer_names: weakref.WeakKeyDictionary[Any, dict[int, str]] = (
            weakref.WeakKeyDictionary()
        )

    def __deepcopy__(self, memo: dict) -> _Session:
        return self

    def __copy__(self) -> _Session:
        return self

    def __reduce__(self) -> Any:
        raise TypeError(
            "a model prepared with a qcb_guard-guarded qconfig cannot be pickled before "
            "convert (its observers share the guard session); convert it first"
        )

    # -- runs --------------------------------------------------------------------------
    def new_result(self, flow: str) -> GuardResult:
        import torch

        from qcb_guard.guarding import GuardResult

        result = GuardResult(framework=FRAMEWORK, defense=self.config.defense)
        result.extra.update(flow=flow, engine=torch.backends.quantized.engine)
        if self.config.activation_defense is None:
            result.extra["activation_defense"] = dict(TURNED_OFF)
        elif flow == "dynamic":
            result.extra["activation_defense"] = skipped(self.config, _DYNAMIC)
            result.notes.append(f"activation defense skipped: {_DYNAMIC}")
        else:  # replaced when convert reaches the model's first guarded observer
            result.extra["activation_defense"] = skipped(
                self.config, "convert reached no guarded observer of this model"
            )
        return result

    def run_for(self, located: _Located) -> _Run:
        if self.batch is not None:
            return self.batch
        key = located.root if located.root is not None else self
        if key not in self.runs:
            run = _Run(self.new_result(located.flow))
            run.result.notes.append(
                "torch.ao converts layer by layer: each layer is rounded when convert asks "
                "for its weight qparams, and this report is rewritten after each layer"
            )
            if self.config.calibration is not None:
                run.result.notes.append(
                    "calibration= is not used by static torch.ao flows: layer inputs come "
                    "from the calibration passes through the prepared model"
                )
            self.runs[key] = run
        return self.runs[key]

    def unguarded(self, run: _Run, what: str, why: str) -> None:
        note = f"{what}: kept nearest rounding ({why})"
        run.unguarded.append(what)
        if note not in run.result.notes:
            run.result.notes.append(note)
            warnings.warn(f"qcb_guard: {note}", TorchAoWarning, stacklevel=4)

    # -- convert time ------------------------------------------------------------------
    def on_weight(self, observer: Any, x: Any) -> None:
        """Called by a guarded weight observer after it observed ``x``."""
        import torch

        from qcb_guard.guarding import finish, round_slots

        if self.probing:  # a functional weight's observer inside the probes' forward
            return
        located = _locate(x)
        if located is None:  # not converting: an ordinary observer call
            return
        run = self.run_for(located)
        if self.probe and located.root is not None:
            self.probe_ranges(run, located.root)
        shape = tuple(x.shape)
        if located.base is None:
            self.unguarded(
                run,
                f"a weight of shape {shape}",
                "torch.ao converted it outside a Conv/Linear module, e.g. a functional "
                "F.linear/F.conv2d weight or an RNN; qcb_guard guards Conv1d/2d/3d and Linear",
            )
            return
        if x.dtype != torch.float32:
            self.unguarded(run, located.name, f"weight dtype {x.dtype} is not float32")
            return
        slot = self.make_slot(observer, x, located)
        calibrator = self.calibrator(located) if self.needs_data else None
        with torch.random.fork_rng(devices=[]):  # round_slots seeds the global generator
            partial = round_slots(
                [slot],
                self.config,
                pm=self.pm,
                calibrator=calibrator,
                framework=FRAMEWORK,
                progress=False,
            )
        run.add(slot, partial)
        if self.batch is None:
            finish(run.result, list(run.slots), located.root, self.config, self.pm)

    def make_slot(self, observer: Any, x: Any, located: _Located) -> WeightSlot:
        import torch

        from qcb_guard.slots import WeightSlot

        scale, zero_point = observer.calculate_qparams()
        per_channel = observer.qscheme in (torch.per_channel_affine, torch.per_channel_symmetric)
        axis = int(observer.ch_axis) if per_channel else None
        base = located.base
        attrs: dict[str, Any] = {}
        if _layer_kind(base) != "linear":
            attrs = {
                "stride": base.stride,
                "padding": base.padding,
                "dilation": base.dilation,
                "groups": base.groups,
                "padding_mode": base.padding_mode,
            }
        qmin, qmax = int(observer.quant_min), int(observer.quant_max)
        dtype = observer.dtype
        nearest = functools.partial(_torch_nearest, dtype=dtype, clamp=located.clamps)
        if not located.clamps:  # FX: torch's own nearest may leave the observer's range
            probe = _Probe(x.detach(), scale, zero_point, axis, qmin, qmax)
            ints = nearest(probe)
            qmin, qmax = min(qmin, int(ints.min())), max(qmax, int(ints.max()))
        slot = WeightSlot(
            name=f"{located.name}.weight" if located.name else f"weight{tuple(x.shape)}",
            kind=_layer_kind(base),
            weight=x.detach().clone(),
            scale=scale,
            zero_point=zero_point,
            axis=axis,
            qmin=qmin,
            qmax=qmax,
            bias=None if base.bias is None else base.bias.detach().float().clone(),
            attrs=attrs,
            framework=FRAMEWORK,
        )
        slot.nearest_fn = nearest
        # weak references: the slot outlives the conversion (report, after-hooks) and must not
        # keep the observer alive, or the weight would never get its storage back
        slot.write = functools.partial(
            _deploy, weakref.ref(slot), weakref.ref(x), weakref.ref(observer), dtype
        )
        return slot

    def calibrator(self, located: _Located) -> Any:
        """``calibrator(slot)`` for this layer: the inputs recorded during calibration."""
        from qcb_guard.errors import DataError
        from qcb_guard.slots import SlotCalibration

        base, container, name = located.base, located.container, located.name

        def calibrate(slot: WeightSlot) -> SlotCalibration:
            if slot.attrs.get("padding_mode", "zeros") != "zeros":
                raise DataError(
                    f"layer {name!r}: padding_mode={slot.attrs['padding_mode']!r} cannot be "
                    "replayed by slot.layer (only 'zeros')"
                )
            inputs = None
            observer = getattr(container, "activation_post_process", None)
            samples = getattr(observer, "_qcb_samples", None)
            if isinstance(samples, _Samples) and samples.rows:  # eager
                inputs = samples.tensor()
            elif base.weight in self.fx_samples:  # FX (the same parameter as at calibration)
                inputs = self.fx_samples.pop(base.weight).tensor()
            elif self.layer_inputs is not None:  # quantize_dynamic: calibration=
                inputs = self.layer_inputs(name)
            if inputs is None:
                raise DataError(
                    f"no calibration inputs were recorded for layer {name!r}: run the "
                    "prepared model on calibration data before convert (for "
                    "quantize_dynamic pass calibration= to guard())"
                )
            return SlotCalibration(inputs=inputs, fp_inputs=inputs)

        return calibrate

    # -- activation defense ------------------------------------------------------------
    def before_qparams(self, observer: Any) -> None:
        """A guarded activation observer is asked for its qparams: when a conversion runs, this
        is before convert swaps the first module that reads any (eager ``from_float``, FX's
        observer replacement), so every observer of the model can still observe the probes."""
        located = _converting_root(observer)
        if located is not None:
            self.probe_ranges(self.run_for(located), located.root)

    def probe_ranges(self, run: _Run, root: Any) -> None:
        """Once per conversion: run the activation defense on a float copy of ``root`` and the
        probes through ``root`` itself (eval mode, no grad), so its observers see them."""
        import torch

        from qcb_guard.activation import defense_failed, run_activation_defense

        if run.probed or self.batch is not None:
            return
        run.probed = True
        x, batch, source = self.calibration_inputs(root)
        if x is None:
            run.result.extra["activation_defense"] = skipped(self.config, source)
            run.result.notes.append(f"activation defense skipped: {source}")
            return
        try:
            model = _float_copy(root)
        except Exception as exc:  # a model torch.ao prepared but this copy cannot rebuild
            model, entry = None, defense_failed(self.config, exc)
        if model is not None:
            with torch.random.fork_rng(devices=[]):  # the user's generator state is kept
                probes, entry = run_activation_defense(model, x, self.config, self.pm)
            if probes is not None and len(probes):
                try:
                    self.observe(root, probes, batch or 256)
                except Exception as exc:
                    entry = defense_failed(
                        self.config, exc, after=" (and any probes observed before the failure)"
                    )
        entry["source"] = source
        run.result.extra["activation_defense"] = entry

    def observe(self, root: Any, probes: torch.Tensor, batch: int) -> None:
        """Run ``probes`` through the prepared model in chunks of the user's batch size: its
        observers observe them like calibration data; nothing is recorded."""
        import torch

        modes = [(m, m.training) for m in root.modules()]
        self.probing = True
        try:
            root.eval()
            with torch.no_grad():
                for chunk in probes.split(batch):
                    root(chunk)
        finally:
            self.probing = False
            for module, training in modes:
                module.training = training

    def calibration_inputs(self, root: Any) -> tuple[torch.Tensor | None, int | None, str]:
        """``(inputs, batch size, source)`` of ``root``'s calibration forwards, else
        ``guard(calibration=...)``, else ``(None, None, why)``."""
        from qcb_guard.reference import check_calibration

        problem = None
        for name, module in root.named_modules(remove_duplicate=False):
            index = module.__dict__.get("_qcb_inputs")
            store = index.get(name) if isinstance(index, _InputIndex) else None
            if store is None:
                continue
            x = store.samples.tensor()
            if store.problem is None and x is not None and len(x):
                return x, store.batch, f"calibration forwards ({len(x)} inputs)"
            problem = store.problem
        data = check_calibration(self.config.calibration, "guard(calibration=...)")
        if data is not None:
            return data, None, f"guard(calibration=...) ({len(data)} inputs)"
        why = problem or (
            "no calibration forward through the prepared model was recorded (run the prepared "
            "model itself on calibration data before convert, or pass calibration= to guard())"
        )
        return None, None, why

    def on_model_input(self, observer: Any) -> None:
        """Record the input of the calibration forward ``observer`` runs in: the outermost
        module call on the stack that holds the observer (the prepared model)."""
        from torch import nn

        code = nn.Module._call_impl.__code__
        frame, outer = sys._getframe(2), None
        while frame is not None:
            if frame.f_code is code:
                local = frame.f_locals
                module = local.get("self")
                if isinstance(module, nn.Module) and id(observer) in self.names_in(module):
                    outer = (module, local.get("args"), local.get("kwargs"))
            frame = frame.f_back
        if outer is None:
            return
        module, args, kwargs = outer
        store = self.model_inputs.get(module)
        if store is None:
            store = self.model_inputs[module] = _ModelInputs(self.max_samples)
            for name, m in module.named_modules(remove_duplicate=False):
                index = m.__dict__.get("_qcb_inputs")
                if isinstance(index, _InputIndex) and m.__dict__.get("_qcb_session") is self:
                    index[name] = store
        store.add(args, kwargs)

    def names_in(self, module: Any) -> dict[int, str]:
        """This session's activation observers in ``module``: id → qualified name (cached)."""
        names = self.observer_names.get(module)
        if names is None:
            names = {
                id(m): name
                for name, m in module.named_modules(remove_duplicate=False)
                if isinstance(m, _RecordingActivation) and m.__dict__.get("_qcb_session") is self
            }
            self.observer_names[module] = names
        return names

    # -- calibration time --------------------------------------------------------------
    def on_activation(self, observer: Any, x: Any) -> None:
        """Record the layer inputs an activation observer sees during calibration."""
        # the submodule, not the function ``torch.ao.quantization.quantize`` that shadows it
        eager = importlib.import_module("torch.ao.quantization.quantize")
        hooks = (eager._observer_forward_hook.__code__, eager._observer_forward_pre_hook.__code__)
        frame = sys._getframe(2)
        for _ in range(8):
            if frame is None:
                return
            if frame.f_code in hooks:  # eager: torch's hook on the observed module
                module, inputs = frame.f_locals.get("self"), frame.f_locals.get("input")
                if (
                    _base_layer(module) is not None
                    and getattr(module, "activation_post_process", None) is observer
                    and isinstance(inputs, tuple)
                    and inputs
                ):
                    observer._qcb_samples.add(inputs[0])
                return
            if not frame.f_globals.get("__name__", "").startswith(("torch.nn.", __name__)):
                self.record_fx(observer, x, frame)
                return
            frame = frame.f_back

    def record_fx(self, observer: Any, x: Any, frame: Any) -> None:
        """FX: ``frame`` runs the prepared GraphModule's generated forward, which calls the
        observer once per graph node using it, in graph order; the node's users are the
        layers whose input this is."""
        from torch.fx import GraphModule

        gm = frame.f_locals.get("self")
        if not isinstance(gm, GraphModule):
            return
        info = self.fx_graphs.get(gm)
        if info is None:
            nodes: dict[int, list[Any]] = {}
            for node in gm.graph.nodes:
                if node.op == "call_module":
                    module = gm.get_submodule(node.target)
                    if isinstance(module, _RecordingActivation):
                        nodes.setdefault(id(module), []).append(node)
            info = self.fx_graphs[gm] = {"nodes": nodes, "sites": {}}
        sites = info["sites"].setdefault((id(observer), frame.f_code), [])
        if frame.f_lasti not in sites:
            insort(sites, frame.f_lasti)
        rank = bisect_left(sites, frame.f_lasti)
        nodes = info["nodes"].get(id(observer), [])
        if rank >= len(nodes):
            return
        for user in nodes[rank].users:
            if user.op != "call_module":
                continue
            base = _base_layer(gm.get_submodule(user.target))
            if base is not None:
                if base.weight not in self.fx_samples:
                    self.fx_samples[base.weight] = _Samples(self.max_samples)
                self.fx_samples[base.weight].add(x)


def _float_copy(root: Any) -> Any:
    """The float model the activation defense probes: ``root`` without its observers (eager:
    a deep copy with observer attributes and hooks removed; FX: a graph without observer
    nodes, sharing ``root``'s modules, which the defense never modifies). Fused modules and
    folded BatchNorms stay: the probes see the functions the observers observe."""
    import torch
    from torch.ao.quantization.quantize import (
        _is_activation_post_process,
        _remove_activation_post_process,
    )
    from torch.fx import GraphModule

    if isinstance(root, GraphModule):
        graph = torch.fx.Graph()
        graph.output(graph.graph_copy(root.graph, {}))
        for node in list(graph.nodes):
            if node.op == "call_module" and _is_activation_post_process(
                root.get_submodule(node.target)
            ):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        return GraphModule(root, graph)
    copied = copy.deepcopy(root)
    for module in list(copied.modules()):
        _remove_activation_post_process(module)
    return copied


# ------------------------------------------------------------------------------------------
# torch's own rounding, and deployment of the chosen integers
# ------------------------------------------------------------------------------------------


@dataclass
class _Probe:
    """The fields of a slot that :func:`_torch_nearest` reads."""

    weight: Any
    scale: Any
    zero_point: Any
    axis: int | None
    qmin: int
    qmax: int

    def __post_init__(self) -> None:
        self.scale = self.scale.detach().float().reshape(-1)
        self.zero_point = self.zero_point.detach().long().reshape(-1)


def _torch_nearest(slot: Any, *, dtype: Any, clamp: bool) -> torch.Tensor:
    """The integers torch's ``quantize_per_channel``/``quantize_per_tensor`` give: fp32
    ``w * (1 / s)`` + zp, rounded half to even — not always ``round(w / s)`` — then clamped
    to the observer's range where torch clamps (``clamp``)."""
    import torch

    w = slot.weight
    if slot.axis is None:
        q = torch.quantize_per_tensor(w, float(slot.scale), int(slot.zero_point), dtype)
    else:
        q = torch.quantize_per_channel(w, slot.scale.double(), slot.zero_point, slot.axis, dtype)
    q = q.int_repr().to(torch.int64)
    return q.clamp(slot.qmin, slot.qmax) if clamp else q


def _on_grid(slot: WeightSlot, q: torch.Tensor, dtype: Any) -> torch.Tensor:
    """The float weight that torch dequantizes integers ``q`` to (its own arithmetic)."""
    import torch

    storage = torch.int8 if dtype == torch.qint8 else torch.uint8
    if slot.axis is None:
        qt = torch._make_per_tensor_quantized_tensor(
            q.to(storage), float(slot.scale), int(slot.zero_point)
        )
    else:
        qt = torch._make_per_channel_quantized_tensor(
            q.to(storage), slot.scale.double(), slot.zero_point, slot.axis
        )
    return qt.dequantize().to(torch.float32).contiguous()


def _deploy(slot_ref: Any, x_ref: Any, observer_ref: Any, dtype: Any, q: torch.Tensor) -> None:
    """Make torch's next quantization of ``x`` produce exactly ``q``.

    ``x`` (the module's weight parameter, possibly the caller's own: FX shares them) is
    pointed at new storage holding the on-grid values, checked to round back to ``q`` with
    torch's arithmetic; it gets its original storage back as soon as torch releases the
    observer, i.e. once this layer is converted.
    """
    import torch

    from qcb_guard.errors import DefenseError

    slot, x, observer = slot_ref(), x_ref(), observer_ref()
    if slot is None or x is None or observer is None:
        raise DefenseError("torch released the layer before its integers were deployed")
    on_grid = _on_grid(slot, q, dtype)
    probe = _Probe(on_grid, slot.scale, slot.zero_point, slot.axis, slot.qmin, slot.qmax)
    if not torch.equal(slot.nearest_fn(probe), q):
        raise DefenseError(f"slot {slot.name!r}: torch does not round the on-grid weight back")
    original = x.data
    x.data = on_grid
    weakref.finalize(observer, _restore, x, original)


def _restore(x: Any, original: Any) -> None:
    x.data = original


# ------------------------------------------------------------------------------------------
# quantize_dynamic
# ------------------------------------------------------------------------------------------


def _dynamic_spec(qconfig_spec: Any, dtype: Any) -> dict | None:
    """``qconfig_spec`` as the dict torch's quantize_dynamic derives from it (torch 2.13
    defaults), or None when it quantizes no weight to int8 (float16, embeddings)."""
    import itertools

    import torch
    from torch import nn
    from torch.ao.quantization import qconfig as qc

    if isinstance(qconfig_spec, dict):
        return qconfig_spec
    if dtype != torch.qint8:
        return None
    if qconfig_spec is None:
        types = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.RNNCell, nn.GRUCell)
        return dict.fromkeys(types, qc.default_dynamic_qconfig)
    return dict(zip(qconfig_spec, itertools.repeat(qc.default_dynamic_qconfig), strict=False))


class _DynamicInputs:
    """quantize_dynamic has no calibration pass: capture each layer's inputs from
    ``calibration=`` on a private float copy of the caller's model."""

    def __init__(self, model: Any, data: torch.Tensor, batch_size: int = 256):
        self.model = copy.deepcopy(model).eval()
        self.modules = dict(self.model.named_modules())
        self.data = data
        self.batch_size = batch_size

    def __call__(self, name: str) -> torch.Tensor | None:
        import torch

        module = self.modules.get(name)
        if module is None:
            return None
        chunks: list[torch.Tensor] = []

        class _Stop(Exception):
            pass

        def hook(_module, inputs):
            chunks.append(inputs[0].detach().float())
            raise _Stop

        handle = module.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                for start in range(0, len(self.data), self.batch_size):
                    try:
                        self.model(self.data[start : start + self.batch_size])
                    except _Stop:
                        pass
        finally:
            handle.remove()
        return torch.cat(chunks) if chunks else None


def _guard_quantize_dynamic(fn: Any, config: GuardConfig, pm: PluginManager) -> Any:
    """``quantize_dynamic`` with the same signature whose int8 Linear weights are guarded."""
    import torch

    from qcb_guard.errors import DefenseError
    from qcb_guard.guarding import finish
    from qcb_guard.reference import check_calibration

    def guarded(model, qconfig_spec=None, dtype=torch.qint8, mapping=None, inplace=False):
        session = _Session(config, pm)
        session.probe = False  # dynamic: no static activation ranges (reported as skipped)
        spec = _dynamic_spec(qconfig_spec, dtype)
        if spec is None:
            warnings.warn(
                f"qcb_guard: quantize_dynamic(dtype={dtype}) quantizes no weight to int8; "
                "nothing to guard",
                TorchAoWarning,
                stacklevel=2,
            )
            return fn(model, qconfig_spec, dtype, mapping, inplace)
        if session.needs_data:
            data = check_calibration(config.calibration, "calibration")
            if data is None:
                raise DefenseError(
                    f"defense {config.defense!r} needs calibration data and quantize_dynamic "
                    "has no calibration pass: pass calibration=<tensor of model inputs> to guard()"
                )
            session.layer_inputs = _DynamicInputs(model, data)
        memo: dict[int, Any] = {}
        guarded_spec = {key: _guard_qconfig(q, session, memo) for key, q in spec.items()}
        session.batch = run = _Run(session.new_result("dynamic"))
        quantized = fn(model, guarded_spec, dtype, mapping, inplace)
        rounded = {slot.name.removesuffix(".weight") for slot in run.slots}
        for name, module in quantized.named_modules():
            if type(module).__module__.startswith("torch.ao.nn.quantized.dynamic") and (
                callable(getattr(module, "weight", None)) and name not in rounded
            ):
                session.unguarded(run, name, "quantized by a qconfig qcb_guard did not guard")
        finish(run.result, list(run.slots), quantized, config, pm)
        return quantized

    functools.update_wrapper(guarded, fn)
    guarded.__signature__ = inspect.signature(fn)
    guarded.__qcb_guard__ = True
    return guarded
