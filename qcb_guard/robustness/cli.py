"""``qcb-guard robustness``: adversarial, patch and extraction robustness of a model across
bit-widths, with training defenses, written as the project's JSON + HTML report.

Every configuration error (unknown attack or defense, an implant attack, ε outside [0, 1],
bits outside 2–8, unknown data set or flow) exits with status 2 and one line before any
model is trained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from qcb_guard._cli_util import friendly, plugin_manager
from qcb_guard.errors import ConfigError

#: Options that take several space-separated values (``--bits 8 4 2``).
_MULTI = ("--bits", "--attacks", "--eps", "--defense", "--flows", "--patch-archs")
_VALUE = re.compile(r"^[^-]|^-\d")


class _SpaceListCommand(click.Command):
    """Lets ``--bits 8 4 2`` mean ``--bits 8 --bits 4 --bits 2``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            out.append(arg)
            i += 1
            if arg in _MULTI and i < len(args):
                out.append(args[i])
                i += 1
                while i < len(args) and _VALUE.match(args[i]):
                    out += [arg, args[i]]
                    i += 1
        return super().parse_args(ctx, out)


def _split(values: tuple[str, ...]) -> list[str]:
    return [part for v in values for part in str(v).split(",") if part]


def _numbers(values: tuple[str, ...], kind: type, what: str) -> tuple[Any, ...]:
    out = []
    for part in _split(values):
        try:
            out.append(kind(part))
        except ValueError:
            raise ConfigError(f"{what} must be {kind.__name__}s, got {part!r}") from None
    return tuple(out)


def _options(values: tuple[str, ...], what: str) -> dict[str, dict[str, Any]]:
    """``NAME:KEY=VALUE`` (JSON values) → ``{NAME: {KEY: VALUE}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in values:
        name, sep, rest = item.partition(":")
        key, eq, raw = rest.partition("=")
        if not sep or not eq or not name or not key:
            raise ConfigError(f"{what} takes NAME:KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name.strip(), {})[key.strip().replace("-", "_")] = value
    return out


@click.command("robustness", cls=_SpaceListCommand)
@click.option("--arch", default="smallcnn", show_default=True, help="Model architecture.")
@click.option("--data", default="digits", show_default=True, help="Bundled data set.")
@click.option(
    "--bits",
    multiple=True,
    default=("8", "4", "2"),
    show_default=True,
    help="Bit-widths of weights and activations (e.g. 8 4 2).",
)
@click.option(
    "--attacks",
    multiple=True,
    default=("fgsm", "pgd"),
    show_default=True,
    help="Registered attacks of kind evasion/patch/extraction.",
)
@click.option(
    "--eps",
    multiple=True,
    default=("0.05", "0.1", "0.15"),
    show_default=True,
    help="L-inf budgets of the evasion attacks (images in [0, 1]).",
)
@click.option(
    "--defense",
    "defenses",
    multiple=True,
    help="Training defenses to add (defensive-quantization, divqat).",
)
@click.option(
    "--defense-option",
    "defense_options",
    multiple=True,
    metavar="NAME:KEY=VALUE",
    help="A defense's option, e.g. defensive-quantization:beta=0.3.",
)
@click.option(
    "--attack-option",
    "attack_options",
    multiple=True,
    metavar="NAME:KEY=VALUE",
    help="An evasion attack's option, e.g. pgd:steps=40.",
)
@click.option("--flows", multiple=True, help="Real flows for transfer (e.g. pt2e-x86 ort-static).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=int, default=None, help="Float training epochs (default per data).")
@click.option("--qat-epochs", type=int, default=3, show_default=True, help="Vanilla QAT epochs.")
@click.option("--test-size", type=int, default=500, show_default=True, help="Test images used.")
@click.option("--limit", type=int, default=None, help="Use only this many images in total.")
@click.option("--patch-size", type=int, default=None, help="Patch side (default 0.3·H).")
@click.option("--patch-target", type=int, default=0, show_default=True)
@click.option("--patch-steps", type=int, default=300, show_default=True)
@click.option(
    "--patch-placement",
    type=click.Choice(["random", "center"]),
    default="random",
    show_default=True,
    help="Where patches go: uniform random per image, or fixed at the centre.",
)
@click.option("--patch-archs", multiple=True, help="Other float architectures to transfer from.")
@click.option("--spatial-stride", type=int, default=2, show_default=True)
@click.option("--queries", type=int, default=2000, show_default=True, help="Knockoff budget.")
@click.option(
    "--transfer",
    default="natural",
    show_default=True,
    help="Knockoff transfer set: natural, cross, noise.",
)
@click.option("--knockoff-bits", type=int, default=None, help="Bit-width of extraction victims.")
@click.option("--knockoff-flow", default=None, help="Deploy victims through this real flow.")
@click.option("--knockoff-epochs", type=int, default=20, show_default=True)
@click.option("--base", type=click.Path(path_type=Path), default=None, help="Float model to use.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the JSON here.")
@click.option("--html", "html_out", type=click.Path(path_type=Path), help="Write the HTML here.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bars or messages.")
@click.pass_context
@friendly
def robustness(ctx: click.Context, **opts: Any) -> None:
    """Accuracy under FGSM/PGD vs ε and bit-width, patch ASR and transfer, model extraction;
    with Defensive Quantization / DivQAT as training defenses."""
    from qcb_guard.robustness.study import StudyConfig

    if not opts["json_out"] and not opts["html_out"]:
        raise ConfigError("give --json and/or --html: the study writes a report")
    config = StudyConfig(
        arch=opts["arch"],
        data=opts["data"],
        bits=_numbers(opts["bits"], int, "bits"),
        attacks=tuple(_split(opts["attacks"])),
        eps=_numbers(opts["eps"], float, "eps"),
        defenses=tuple(_split(opts["defenses"])),
        defense_options=_options(opts["defense_options"], "--defense-option"),
        attack_options=_options(opts["attack_options"], "--attack-option"),
        flows=tuple(_split(opts["flows"])),
        seed=opts["seed"],
        limit=opts["limit"],
        epochs=opts["epochs"],
        qat_epochs=opts["qat_epochs"],
        test_size=opts["test_size"],
        patch_size=opts["patch_size"],
        patch_target=opts["patch_target"],
        patch_steps=opts["patch_steps"],
        patch_placement=opts["patch_placement"],
        patch_archs=tuple(_split(opts["patch_archs"])),
        spatial_stride=opts["spatial_stride"],
        knockoff_bits=opts["knockoff_bits"],
        knockoff_flow=opts["knockoff_flow"],
        queries=opts["queries"],
        transfer=opts["transfer"],
        knockoff_epochs=opts["knockoff_epochs"],
        progress=not opts["quiet"],
    )
    pm = plugin_manager(ctx)
    from qcb_guard.robustness.study import validate

    validate(config, pm)  # names resolved before anything is trained
    if opts["threads"] is not None:
        if opts["threads"] < 1:
            raise ConfigError(f"threads must be >= 1, got {opts['threads']}")
        import torch

        torch.set_num_threads(opts["threads"])
    base = None
    if opts["base"] is not None:
        from qcb_guard.models import load_model

        base = load_model(opts["base"])
    from qcb_guard.robustness.report import write
    from qcb_guard.robustness.study import run_study

    echo = (lambda _msg: None) if opts["quiet"] else (lambda msg: click.echo(msg, err=True))
    report = run_study(config, pm=pm, base=base, echo=echo)
    for path in write(report, json_path=opts["json_out"], html_path=opts["html_out"], pm=pm):
        click.echo(f"wrote {path}")
    click.echo(summary(report))


def summary(report: dict[str, Any]) -> str:
    """A plain-text digest: clean accuracy per model and accuracy at the largest ε."""
    lines = [f"{report['title']} ({report['seconds']:.0f} s)"]
    for m in report["models"]:
        lines.append(f"  {m['name']:32s} clean {100 * m['clean']:.1f}%")
    for attack, block in report.get("evasion", {}).items():
        eps = block["eps"][-1]
        for c in block["curves"]:
            lines.append(
                f"  {attack} eps={eps:g} {c['model']:26s} {c['mode']:13s} "
                f"{100 * c['accuracy'][-1]:.1f}%"
            )
    for name, block in report.get("patch", {}).items():
        for src, row in zip(block["sources"], block["asr"], strict=True):
            cells = " ".join(
                f"{t}={100 * v:.0f}" for t, v in zip(block["targets"], row, strict=True)
            )
            lines.append(f"  {name} from {src}: ASR% {cells}")
    for name, block in report.get("extraction", {}).items():
        for r in block["rows"]:
            lines.append(
                f"  {name} {r['victim']:28s} {r['perturbation']:15s} {r['labels']:4s} "
                f"surrogate {100 * r['surrogate_accuracy']:.1f}% "
                f"fidelity {100 * r['fidelity']:.1f}%"
            )
    return "\n".join(lines)
