"""The plugin system: loading, blocking, validation, hook documentation, third parties."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pluggy
import pytest
import torch

import qcb_guard
from qcb_guard import hookimpl, hookspecs
from qcb_guard.errors import PluginError
from qcb_guard.manager import BUILTIN_PLUGINS, make_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "qcb_guard_floor_plugin"


def install_fixture_plugin(target: Path) -> Path:
    """Install the third-party fixture package into ``target`` the way pip lays it out:
    the package plus a ``.dist-info`` with METADATA and entry_points.txt."""
    meta = tomllib.loads((FIXTURE / "pyproject.toml").read_text())["project"]
    pkg = target / "qcb_guard_floor"
    pkg.mkdir(parents=True)
    src = FIXTURE / "src" / "qcb_guard_floor" / "__init__.py"
    (pkg / "__init__.py").write_text(src.read_text())
    info = target / f"qcb_guard_floor-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    eps = meta["entry-points"]["qcb_guard"]
    lines = ["[qcb_guard]"] + [f"{k} = {v}" for k, v in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return target


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    site = install_fixture_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("qcb_guard_floor", None)


def test_builtins_match_pyproject_entry_points():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared["qcb_guard"] == BUILTIN_PLUGINS


def test_every_package_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "qcb_guard").rglob("__init__.py")
    }
    assert found | {"qcb_guard_plugins"} == listed


def test_builtins_load_and_nearest_is_registered():
    pm = make_plugin_manager(autoload=False, block=[])
    names = {row["name"] for row in pm.describe()}
    assert set(BUILTIN_PLUGINS) <= names
    assert "nearest" in pm.defenses


def test_third_party_entry_point_is_loaded_and_callable(third_party):
    pm = make_plugin_manager(autoload=True, allow=None, block=[])
    row = next(r for r in pm.describe() if r["name"] == "floor")
    assert row["source"] == "qcb-guard-floor 1.2.3"
    assert row["hooks"] == ["qcb_guard_register_defenses"]
    defense = pm.defenses.get("floor")
    assert defense.plugin == "floor"
    from qcb_guard.slots import WeightSlot

    slot = WeightSlot(
        "w", "linear", torch.tensor([[0.9, -0.1, 2.6]]), torch.tensor(1.0), 0, None, -8, 7
    )
    assert defense.obj(slot, None).tolist() == [[0, -1, 2]]


def test_disabling_autoload_hides_third_party(third_party):
    pm = make_plugin_manager(autoload=False, block=[])
    assert "floor" not in {r["name"] for r in pm.describe()}
    assert "floor" not in pm.defenses


def test_allow_list_and_block(third_party):
    assert "floor" not in make_plugin_manager(autoload=True, allow=["other"], block=[]).defenses
    assert "floor" in make_plugin_manager(autoload=True, allow=["floor"], block=[]).defenses
    blocked = make_plugin_manager(autoload=True, block=["floor", "nearest"])
    assert "floor" not in blocked.defenses and "nearest" not in blocked.defenses


def test_env_vars_control_loading(third_party, monkeypatch):
    monkeypatch.setenv("QCB_GUARD_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "floor" not in make_plugin_manager().defenses
    monkeypatch.delenv("QCB_GUARD_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("QCB_GUARD_BLOCK", "floor")
    assert "floor" not in make_plugin_manager().defenses


def test_cli_plugins_lists_third_party_and_autoload_switch(third_party):
    env = {
        **os.environ,
        "PYTHONPATH": f"{third_party}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, "-m", "qcb_guard", "plugins"]
    shown = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    assert "floor" in shown and "qcb-guard-floor 1.2.3" in shown
    assert "qcb_guard_register_defenses" in shown
    env["QCB_GUARD_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    hidden = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    assert "qcb-guard-floor" not in hidden and "nearest" in hidden


def test_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def qcb_guard_register_defences(self, register):  # British spelling: not a hook
            pass

    with pytest.raises(pluggy.PluginValidationError, match="qcb_guard_register_defences"):
        make_plugin_manager(autoload=False, plugins=[Typo()])


@pytest.mark.parametrize(
    ("name", "entry", "match"),
    [
        ("Bad Name", lambda s, c: None, "names must match"),
        ("ok", 42, "must be callable"),
        ("nearest", lambda s, c: None, "registered twice"),
    ],
)
def test_bad_registrations_name_the_plugin(name, entry, match):
    class Bad:
        @hookimpl
        def qcb_guard_register_defenses(self, register):
            register(name, entry)

    pm = make_plugin_manager(autoload=False, plugins=[Bad()], block=[])
    with pytest.raises(PluginError, match=match):
        pm.defenses  # noqa: B018 - building the registry validates


def test_unknown_defense_lists_known_ones(pm):
    with pytest.raises(
        PluginError, match=r"unknown defense 'efrapp'; registered: .*floor.*nearest"
    ):
        pm.defenses.get("efrapp")


def test_registries_rebuild_after_unregister(pm, floor_plugin):
    assert "floor" in pm.defenses
    pm.unregister(floor_plugin)
    assert "floor" not in pm.defenses


def test_every_hookspec_is_documented():
    specs = [
        f
        for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
        if n.startswith("qcb_guard_")
    ]
    assert len(specs) >= 8
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert "Called" in doc, f"{spec.__name__}: say when it is called"
        assert ":return:" in doc, f"{spec.__name__}: document the return value"
        for param in inspect.signature(spec).parameters:
            assert f":param {param}:" in doc, f"{spec.__name__}: document {param}"
        firstresult = spec.qcb_guard_spec["firstresult"]
        assert ("Stops at the first non-``None`` result" in doc) == firstresult, spec.__name__


def test_hooks_are_documented_in_docs_with_exact_signature():
    text = (ROOT / "docs" / "hooks.md").read_text()
    for name, spec in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("qcb_guard_"):
            params = ", ".join(inspect.signature(spec).parameters)
            assert f"{name}({params})" in text, f"docs/hooks.md lacks {name}({params})"


def test_import_qcb_guard_does_not_import_torch_or_frameworks():
    code = (
        "import sys, qcb_guard; from qcb_guard import hookimpl; "
        "print(sorted(m for m in ('torch','onnxruntime','nncf','torchao') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert qcb_guard.hookimpl is hookspecs.hookimpl


def test_trace_env_prints_hook_calls(monkeypatch, capsys):
    pm = make_plugin_manager(autoload=False, block=[], trace=True)
    pm.defenses  # noqa: B018
    assert "qcb_guard_register_defenses" in capsys.readouterr().err
