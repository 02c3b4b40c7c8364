"""Hook specifications: the whole public contract between qcb_guard and its plugins.

A plugin is a plain module (or object) whose functions are decorated with
``qcb_guard.hookimpl`` and named after one of the specs below. Built-in plugins (the
``plugins/`` directory, importable as ``qcb_guard_plugins``) and third-party packages are
loaded the same way, through the ``qcb_guard`` entry-point group.

Specs only grow by adding arguments; pluggy lets older implementations ignore new ones.
Order plugins with ``tryfirst``/``trylast``/``wrapper``, never by registration order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from qcb_guard.config import GuardConfig
    from qcb_guard.registry import Register
    from qcb_guard.slots import SlotCalibration, WeightSlot

PROJECT_NAME = "qcb_guard"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --------------------------------------------------------------------------------------
# Registration: called once per plugin manager, the first time a registry is needed.
# Each receives a ``register`` callback; the core validates what is registered, so
# plugins never duplicate checks and a bad registration fails with the plugin's name.
# --------------------------------------------------------------------------------------


@hookspec
def qcb_guard_register_defenses(register: Register) -> None:
    """Register weight-rounding defenses.

    Called when the defense registry is first built (``guard()``, ``qcb-guard plugins``,
    ``qcb_guard.get_defense``).

    :param register: ``register(name, defense, *, needs_calibration=False,
        configurable=False, validate=None, description="")``.
        ``defense(slot, calibration)`` receives a :class:`~qcb_guard.slots.WeightSlot` and
        a :class:`~qcb_guard.slots.SlotCalibration` (``None`` unless the defense declared
        ``needs_calibration=True``) and returns the integer weights: a tensor of
        ``slot.weight``'s shape with values in ``[slot.qmin, slot.qmax]``. A
        ``configurable`` defense is also called with keyword arguments: ``seed`` (derived
        from ``guard(seed=...)`` and the slot's position) and every extra keyword the user
        gave ``guard()``; it must reject unknown ones with a ``ConfigError``.
        ``validate(options)``, if given, is called by ``guard()`` before the framework runs,
        so bad options fail before any work (a ``ConfigError`` is never turned into a
        per-layer fallback).
    :return: nothing; all implementations are called.
    """


@hookspec
def qcb_guard_register_activation_defenses(register: Register) -> None:
    """Register activation defenses: protections of the *activation ranges* a static flow
    calibrates, which no weight-rounding defense reaches.

    Called when the activation-defense registry is first built (``guard()`` on a static
    flow, ``qcb-guard plugins``).

    :param register: ``register(name, defense, *, description="")``.
        ``defense(model, calibration, *, seed, **options)`` receives a float
        ``torch.nn.Module`` (never modified; an ONNX model arrives converted to torch) and the
        flow's calibration inputs ``[N, ...]``, and returns an
        :class:`~qcb_guard.activation.ActivationDefenseResult` whose ``inputs`` are appended
        to the flow's calibration data, so that the framework's own observers calibrate every
        range over them. It must reject unknown options with a ``ConfigError``.
    :return: nothing; all implementations are called.
    """


@hookspec
def qcb_guard_register_training_defenses(register: Register) -> None:
    """Register training-time defenses (quantization-aware training objectives).

    Called when the training-defense registry is first built (``qcb-guard robustness``,
    ``qcb-guard plugins``, ``qcb_guard.robustness``).

    :param register: ``register(name, defense, *, description="")``.
        ``defense(model, train, *, bits, seed, **options)`` receives a float
        ``torch.nn.Module`` (never modified) and a labelled
        :class:`~qcb_guard.data.DataSplit`, and returns a new trained ``torch.nn.Module``
        ready for any of the torch flows. It must reject unknown options with a
        ``ConfigError``.
    :return: nothing; all implementations are called.
    """


@hookspec
def qcb_guard_register_attacks(register: Register) -> None:
    """Register attacks (red-team implants and evaluations).

    Called when the attack registry is first built (``qcb-guard attack``, ``qcb-guard plugins``,
    ``qcb_guard.get_attack``).

    :param register: ``register(name, attack, *, description="")``; ``attack`` is a callable
        or an object documented by the attack's own module.
    :return: nothing; all implementations are called.
    """


@hookspec
def qcb_guard_register_adapters(register: Register) -> None:
    """Register framework adapters used by :func:`qcb_guard.guard`.

    Called when the adapter registry is first built. Adapters must not import their
    framework at registration time: ``guard()`` asks each adapter's ``matches(obj)`` in turn.

    :param register: ``register(name, adapter, *, description="")``; ``adapter`` is a
        :class:`~qcb_guard.registry.Adapter` (``matches(obj) -> bool``,
        ``wrap(obj, config, pm) -> guarded object``, ``requires``: the pip extra to install).
    :return: nothing; all implementations are called.
    """


@hookspec
def qcb_guard_register_flows(register: Register) -> None:
    """Register real quantization flows for evaluation (``qcb_guard.evaluate``, benchmarks).

    Called when the flow registry is first built (``qcb-guard evaluate``, benchmarks,
    ``qcb-guard plugins``). A flow runs one framework's own post-training quantization on a
    torch model, unguarded or through ``guard()``, so that attacks and defenses are measured
    on what users really deploy.

    :param register: ``register(name, flow, *, bits=(8, 4), requires="", description="")``;
        ``flow(model, calibration, request)`` receives a float ``torch.nn.Module`` (never
        modified), calibration inputs ``[N, C, H, W]`` and a
        :class:`~qcb_guard.evaluate.FlowRequest` (bits, defense or ``None`` for the unguarded
        flow, per-channel, seed, options, plugin manager) and returns a callable mapping an
        input batch to logits. ``bits`` lists the weight bit-widths the flow supports;
        ``requires`` names the pip extra that installs the framework.
    :return: nothing; all implementations are called.
    """


# --------------------------------------------------------------------------------------
# Quantization time: called by guarded flows, once per quantization run.
# --------------------------------------------------------------------------------------


@hookspec
def qcb_guard_before_quantize(slots: list[WeightSlot], config: GuardConfig) -> None:
    """Called once per guarded quantization, after the adapter has built the weight slots
    and before any weight is rounded.

    :param slots: the weight slots of the flow, in topological order (read-only view).
    :param config: the guard configuration of this run.
    :return: nothing; all implementations are called.
    """


@hookspec(firstresult=True)
def qcb_guard_round_weights(
    slot: WeightSlot, calibration: SlotCalibration | None, config: GuardConfig
) -> Any:
    """Choose the integer weights of one slot.

    Called by guarded flows for each slot in topological order.
    Stops at the first non-``None`` result; when every implementation returns ``None``,
    the core applies the registered defense named by ``config.defense``. Implement it to
    override rounding for some layers only (e.g. keep the classifier at nearest rounding).

    :param slot: the framework-neutral view of the weight to round.
    :param calibration: the layer's calibration inputs, or ``None`` when the flow has none.
    :param config: the guard configuration of this run.
    :return: an integer-valued tensor of ``slot.weight``'s shape within
        ``[slot.qmin, slot.qmax]``, or ``None`` to let the next implementation decide.
    """


@hookspec
def qcb_guard_after_quantize(slots: list[WeightSlot], result: Any, config: GuardConfig) -> None:
    """Called once per guarded quantization, after every slot has its integers and the
    framework's artefact (module, graph or ONNX file) is final. Frameworks that convert one
    layer at a time (torch.ao eager/FX) call it after each layer with all slots so far.

    :param slots: the weight slots, with ``slot.integers`` set to the deployed integers.
    :param result: what the guarded flow returns to the user (module, ModelProto, path ...),
        or, for flows that finish after the guard runs (PT2E constant-folds inside
        ``convert_pt2e``), the object being converted.
    :param config: the guard configuration of this run.
    :return: nothing; all implementations are called.
    """


# --------------------------------------------------------------------------------------
# Scanning and reporting.
# --------------------------------------------------------------------------------------


@hookspec
def qcb_guard_scan(slots: list[WeightSlot], calibration: Any, config: Any) -> Any:
    """Contribute evidence about whether a model carries a quantization-conditioned backdoor.

    Called by ``qcb_guard.scan`` / ``qcb-guard scan`` and by ``guard(..., scan=True)``.

    :param slots: the model's weight slots under the convention being probed.
    :param calibration: unlabelled inputs (a tensor ``[N, ...]``) or ``None``.
    :param config: the scan configuration.
    :return: a list of findings (or ``None``); the results of all implementations are
        combined into one verdict.
    """


@hookspec
def qcb_guard_report_sections(report: dict[str, Any]) -> Any:
    """Add sections to a JSON/HTML report.

    Called when a report is written, with the report's JSON-ready dictionary.

    :param report: the report so far (do not mutate it).
    :return: a list of ``{"title": str, "html": str}`` sections (or ``None``); sections of all
        implementations are appended in plugin order.
    """
