"""The package's layers (docs/architecture.md): each part imports only the parts below it, the
pure ones import nothing but the standard library, and nothing shipped imports test, bench or
dev code. Every import counts, also one inside a function."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from support import REPO

PACKAGE = REPO / "proxy" / "tightwad"
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}

# part -> the tightwad parts it may import (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "build": frozenset(),
    "defaults": frozenset(),
    "decoding": frozenset(),
    "config": frozenset({"defaults"}),
    "llamaserver": frozenset({"decoding"}),
    "engine": frozenset({"decoding", "llamaserver", "config", "defaults"}),
    "server": frozenset({"engine", "pool", "decoding", "llamaserver", "config", "defaults"}),
    "pool": frozenset({"llamaserver", "decoding", "build", "config", "defaults"}),
    "cli": frozenset({"pool", "server", "llamaserver", "decoding", "build", "config", "defaults"}),
    "__init__": frozenset(),
}
# parts that may import nothing outside the standard library (and their own part)
STDLIB_ONLY = frozenset({"build", "defaults", "decoding"})
NEVER = ("tightwad_dev", "tests", "bench", "support", "conftest", "pytest")


def part_of(module: str) -> str:
    """``tightwad.engine.rounds`` -> ``engine``; ``tightwad`` -> ``__init__``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def imports(source: str, module: str) -> list[str]:
    """Absolute names of everything ``source`` (the module ``module``) imports."""
    found: list[str] = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.append(name)
            if name in ("tightwad", *(f"tightwad.{p}" for p in ALLOWED)):
                found.extend(f"{name}.{alias.name}" for alias in node.names)
    return found


def violations(source: str, module: str) -> list[str]:
    """Why ``module``'s imports break the layering (empty when they do not)."""
    part = part_of(module)
    if part not in ALLOWED:
        return [f"{module}: part '{part}' is not in the layer table (add it there)"]
    bad: list[str] = []
    for name in imports(source, module):
        top = name.split(".")[0]
        if top in NEVER:
            bad.append(f"{module} imports {name}: shipped code never imports test/dev code")
        elif top == "tightwad":
            if name == "tightwad":
                continue
            other = part_of(name)
            if other != part and other not in ALLOWED[part] and other in ALLOWED:
                bad.append(f"{module} imports {name}: '{part}' may import only "
                           f"{sorted(ALLOWED[part]) or 'the standard library'}")
        elif part in STDLIB_ONLY and top not in STDLIB:
            bad.append(f"{module} imports {name}: '{part}' is pure (standard library only)")
    return bad


def shipped_modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def test_every_shipped_module_respects_the_layers() -> None:
    found = [v for module, path in shipped_modules() for v in violations(path.read_text(), module)]
    assert found == []


def test_the_package_has_the_parts_the_table_names() -> None:
    parts = {part_of(m) for m, _ in shipped_modules()}
    assert parts == set(ALLOWED), "docs/architecture.md's table and ALLOWED must name every part"


@pytest.mark.parametrize(("module", "source", "why"), [
    ("tightwad.pool.localpool", "from tightwad_dev.models import ensure_models", "test/dev code"),
    ("tightwad.cli.pool", "def f():\n    import tightwad_dev.hosts\n", "test/dev code"),
    ("tightwad.decoding.sampling", "import aiohttp", "pure"),
    ("tightwad.decoding.acceptance", "from tightwad.llamaserver.wire import Completion",
     "may import only"),
    ("tightwad.engine.engine", "from tightwad import server", "may import only"),
    ("tightwad.llamaserver.client", "from ..engine import events", "may import only"),
])
def test_the_check_catches_a_bad_import(module: str, source: str, why: str) -> None:
    found = violations(source, module)
    assert found and why in found[0]


def test_the_check_lets_a_good_import_pass() -> None:
    assert violations("from tightwad.decoding.sampling import Rng\nimport aiohttp\n",
                      "tightwad.engine.rounds") == []
