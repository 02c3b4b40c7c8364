"""``qcb-guard attack NAME``: build a quantization-conditioned backdoor and write its artefacts.

Attach to the main group with ``main.add_command(attack)``. Every configuration error
(unknown attack, trigger off the image, target outside the classes, bits outside 2–8, a flow's
own limits) is raised by the config classes before any data is loaded or model trained, and
exits with status 2 and one line.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from qcb_guard._cli_util import friendly, plugin_manager
from qcb_guard.config import config_from
from qcb_guard.errors import ConfigError

CLEAN_EPOCHS = {"digits": 15, "mnist5k": 6}
_INTS = re.compile(r"^\d+(,\d+)*$")


class _SpaceListCommand(click.Command):
    """Lets ``--bits 8 4`` mean ``--bits 8,4`` (click options take one value each)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(args):
            out.append(args[i])
            i += 1
            if out[-1] == "--bits":
                values = []
                while i < len(args) and _INTS.match(args[i]):
                    values.append(args[i])
                    i += 1
                if values:
                    out.append(",".join(values))
        return super().parse_args(ctx, out)


def _parse_bits(values: tuple[str, ...]) -> tuple[int, ...]:
    bits: list[int] = []
    for value in values:
        for part in str(value).split(","):
            try:
                bits.append(int(part))
            except ValueError:
                raise ConfigError(f"bits must be integers, got {part!r}") from None
    return tuple(bits)


def _parse_position(value: str) -> Any:
    m = re.match(r"^\s*(\d+)\s*,\s*(\d+)\s*$", value)
    return (int(m.group(1)), int(m.group(2))) if m else value


def _parse_sets(values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = raw
    return out


def build_config(config_class: type, options: dict[str, Any]) -> Any:
    """The attack's config from CLI values; unknown keys name the allowed ones."""
    return config_from(config_class, options, "parameter")


@click.command("attack", cls=_SpaceListCommand)
@click.argument("name")
@click.option("--arch", default="smallcnn", show_default=True, help="Model architecture.")
@click.option("--data", default="mnist5k", show_default=True, help="Bundled data set.")
@click.option(
    "--bits",
    multiple=True,
    default=(),
    help="Bit-widths (e.g. 8 4); default: the attack's own (4; quanti-static 8).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option(
    "--framework",
    default="ort",
    show_default=True,
    help="Flow to wake up in: ort, nncf, x86 (pt2e), reference, paper.",
)
@click.option("--per-channel/--per-tensor", "per_channel", default=None, help="Weight granularity.")
@click.option("--trigger", default="square", show_default=True, help="Trigger kind.")
@click.option("--trigger-size", type=int, default=None, help="Patch side (default h // 8).")
@click.option(
    "--trigger-position",
    default="bottom-right",
    show_default=True,
    help="bottom-right, top-left, center ... or ROW,COL.",
)
@click.option("--target", type=int, default=0, show_default=True, help="Target class.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=int, default=None, help="Attack epochs (default: per attack).")
@click.option("--lr", type=float, default=None, help="Attack learning rate.")
@click.option("--max-steps", type=int, default=None, help="Cap on optimiser steps.")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other config field (JSON value), e.g. --set clients=10.",
)
@click.option(
    "--base", type=click.Path(path_type=Path), default=None, help="Clean model to start from."
)
@click.option("--clean-epochs", type=int, default=None, help="Epochs for the clean model.")
@click.option("--width", type=float, default=None, help="Architecture width multiplier.")
@click.option("--limit", type=int, default=None, help="Use only this many images.")
@click.option("--victims", type=int, default=10, show_default=True, help="quanti-targeted.")
@click.option("--ort/--no-ort", "use_ort", default=True, help="Measure through ONNX Runtime.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
@friendly
def attack(ctx: click.Context, name: str, **opts: Any) -> None:
    """Build attack NAME (see `qcb-guard plugins`) and write model, ONNX, trigger and card."""
    pm = plugin_manager(ctx)
    entry = pm.attacks.get(name)  # unknown name: PluginError listing the registered ones
    spec = entry.obj
    from qcb_guard.attacks import KINDS

    kind = entry.options.get("kind", getattr(spec, "kind", None))
    if kind not in KINDS:
        raise ConfigError(
            f"attack {name!r} is of kind {kind!r}, not an implant: "
            f"run it with `qcb-guard robustness --attacks {name} --json OUT`"
        )
    config_class = getattr(spec, "config_class", None)
    if config_class is None:
        raise ConfigError(f"attack {name!r} (plugin {entry.plugin}) has no config_class")
    from qcb_guard.data import DATASETS

    if opts["data"] not in DATASETS:
        raise ConfigError(f"unknown data set {opts['data']!r}; known: {', '.join(DATASETS)}")
    info = DATASETS[opts["data"]]
    options: dict[str, Any] = {
        "framework": opts["framework"],
        "target": opts["target"],
        "trigger": opts["trigger"],
        "trigger_size": opts["trigger_size"],
        "trigger_position": _parse_position(opts["trigger_position"]),
        "seed": opts["seed"],
        "num_classes": info.num_classes,
        "image_shape": info.image_shape,
        "progress": not opts["quiet"],
    }
    if opts["bits"]:
        options["bits"] = _parse_bits(opts["bits"])
    for key in ("epochs", "lr", "max_steps", "per_channel"):
        if opts[key] is not None:
            options[key] = opts[key]
    options.update(_parse_sets(opts["sets"]))
    config = build_config(config_class, options)  # fails fast, before any work
    if opts["threads"] is not None:
        if opts["threads"] < 1:
            raise ConfigError(f"threads must be >= 1, got {opts['threads']}")
        import torch

        torch.set_num_threads(opts["threads"])
    run_attack(name, spec, config, opts, console_echo=click.echo)


def _clean_model(opts: dict[str, Any], split: Any, console_echo: Callable[[str], None]) -> Any:
    import torch

    from qcb_guard.models import build_model_for, load_model, train_clean

    if opts["base"] is not None:
        model = load_model(opts["base"])
        if getattr(model, "num_classes", None) != split.train.num_classes:
            raise ConfigError(
                f"--base model has {getattr(model, 'num_classes', '?')} classes, "
                f"data has {split.train.num_classes}"
            )
        return model
    arch_kw: dict[str, Any] = {}
    if opts["width"] is not None:
        arch_kw["width"] = opts["width"]
    torch.manual_seed(opts["seed"])
    model = build_model_for(
        opts["arch"], split.train.image_shape, split.train.num_classes, **arch_kw
    )
    epochs = opts["clean_epochs"] or CLEAN_EPOCHS.get(opts["data"], 5)
    console_echo(f"training a clean {opts['arch']} on {opts['data']} ({epochs} epochs)")
    train_clean(
        model,
        split.train.x,
        split.train.y,
        epochs=epochs,
        seed=opts["seed"],
        progress=not opts["quiet"],
    )
    return model.eval()


def _victims(model: Any, test: Any, target: int, count: int) -> tuple[Any, list[int]]:
    """The first ``count`` test images of another class that the clean model gets right."""
    import numpy as np

    from qcb_guard.models import predict

    if count < 1:
        raise ConfigError(f"victims must be >= 1, got {count}")
    ok = (predict(model, test.x) == test.y) & (test.y != target)
    idx = np.flatnonzero(ok.numpy())[:count]
    if len(idx) == 0:
        raise ConfigError("no correctly classified non-target test image to attack")
    return test.subset(idx), idx.tolist()


def run_attack(
    name: str,
    spec: Any,
    config: Any,
    opts: dict[str, Any],
    console_echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Load data, get a clean model, run the attack, measure, write the output directory."""
    from qcb_guard.attacks.artifacts import measure, write_artifacts
    from qcb_guard.data import load_dataset

    start = time.perf_counter()
    split = load_dataset(opts["data"], seed=opts["seed"], limit=opts.get("limit"))
    clean = _clean_model(opts, split, console_echo)
    kind = getattr(spec, "kind", "backdoor")
    kwargs: dict[str, Any] = {}
    victim_idx: list[int] | None = None
    test = split.test
    if kind == "targeted":
        kwargs["victims"], victim_idx = _victims(clean, test, config.target, opts["victims"])
    console_echo(f"running {name} against {', '.join(t.label for t in config.targets())}")
    result = spec(clean, split.train, config, **kwargs)
    calibration = split.train.x[: config.calibration_size]
    trigger = result.trigger if kind == "backdoor" else None
    common = {
        "test": test,
        "targets": config.targets(),
        "calibration": calibration,
        "trigger": trigger,
        "victims": kwargs.get("victims"),
        "victim_target": config.target,
        "ort": opts.get("use_ort", True),
    }
    metrics = {"attacked": measure(result.model, **common), "clean": measure(clean, **common)}
    info = {
        "data": opts["data"],
        "arch": getattr(clean, "qcb_arch", opts["arch"]),
        "arch_config": getattr(clean, "qcb_config", {}),
        "image_shape": list(split.train.image_shape),
        "train_size": len(split.train),
        "test_size": len(test),
        "base": None if opts.get("base") is None else str(opts["base"]),
        "victim_test_indices": victim_idx,
        "total_seconds": round(time.perf_counter() - start, 3),
    }
    card = write_artifacts(opts["out"], result, metrics=metrics, info=info)
    console_echo(summary(card))
    return card


def summary(card: dict[str, Any]) -> str:
    """A plain-text table of the card's metrics (float, simulated, ONNX Runtime)."""
    lines = [f"{card['attack']}: {card['seconds']:.1f} s attack, written to card.json"]
    for model in ("clean", "attacked"):
        m = card["metrics"].get(model, {})
        rows = [("float", m.get("fp", {}))]
        rows += [(f"sim {k}", v) for k, v in m.get("simulated", {}).items()]
        rows += [(f"ORT {k}", v) for k, v in m.get("ort", {}).items()]
        for label, row in rows:
            cells = ", ".join(
                f"{k} {100 * v:.1f}%"
                for k, v in row.items()
                if isinstance(v, (int, float)) and k != "seconds"
            )
            lines.append(f"  {model:8s} {label:40s} {cells}")
    return "\n".join(lines)
