"""The README's two commands stay true: CI runs the test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.+?)\n```", text)
    assert match, f"README.md lacks the {marker} block"
    return match.group(1)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"( {_command('test-command')} ) || exit 1" in ci


def test_readme_commands_pin_torch_through_constraints():
    assert (ROOT / "constraints.txt").read_text().split() == ["torch==2.13.0"]
    for marker in ("demo-command", "test-command"):
        assert "-c constraints.txt" in _command(marker)
    assert "-c {toxinidir}/constraints.txt" in (ROOT / "tox.ini").read_text()


def test_documented_files_exist():
    text = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(((?:docs)/[^)#]+)\)", text):
        assert (ROOT / link).exists(), link
