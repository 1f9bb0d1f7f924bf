"""docs/architecture.md stays the map of the house: its module table lists every shipped module
once and names no module that does not exist."""

from __future__ import annotations

import re

from support import REPO

PACKAGE = REPO / "proxy" / "tightwad"


def _listed() -> list[str]:
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text.split("### One line per module", 1)[1].split("\n## ", 1)[0]
    return [m.removeprefix("tightwad/") for m in re.findall(r"^\| `([^`]+\.py)` \|", table, re.M)]


def _shipped() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if p.name != "__init__.py" or p.parent.name == "cli")


def test_every_shipped_module_is_on_the_map_once() -> None:
    listed = _listed()
    assert sorted(set(listed)) == sorted(listed), "a module is listed twice"
    assert sorted(listed) == _shipped()
