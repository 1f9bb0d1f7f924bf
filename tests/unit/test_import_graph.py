"""The package's layers (docs/architecture.md): each part imports only the parts below it, the
pure ones import nothing but the standard library, and nothing shipped imports test, bench or
dev code. Every import counts, also one inside a function."""

from __future__ import annotations

import ast
import io
import os
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


# --- the probe's closure: what the coordinator's host runs from one zip --------------------------

PROBE = "tightwad.pool.probe"


def module_file(module: str) -> Path | None:
    """The source of a tightwad module (``None``: not a module, e.g. a name a module defines)."""
    base = PACKAGE.parent.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def import_closure(module: str, source_of=None) -> tuple[set[str], set[str]]:
    """The tightwad modules importing ``module`` loads (each package on the way, and every
    import of each, also one inside a function), and the other top-level names they import.
    ``source_of(name)`` gives a module's source (None: no such module); default, the files."""
    if source_of is None:
        def source_of(name: str) -> str | None:
            path = module_file(name)
            return path.read_text() if path is not None else None
    seen: set[str] = set()
    others: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        pieces = name.split(".")
        for i in range(1, len(pieces) + 1):  # importing a.b.c runs a and a.b first
            current = ".".join(pieces[:i])
            if current in seen:
                continue
            source = source_of(current)
            if source is None:
                continue
            seen.add(current)
            for found in imports(source, current):
                if found.split(".")[0] == "tightwad":
                    todo.append(found)
                else:
                    others.add(found.split(".")[0])
    return seen, others


def test_the_probe_imports_only_the_standard_library() -> None:
    """The coordinator role ships the package as one zip to the coordinator's host and runs
    ``python -S -m tightwad.pool.probe`` there: nothing but the standard library is installed
    for it (docs/deploy.md)."""
    modules, others = import_closure(PROBE)
    assert PROBE in modules and "tightwad.pool.rpcproto" in modules and "tightwad" in modules
    assert sorted(others - STDLIB) == []


def test_the_closure_check_catches_a_third_party_import() -> None:
    sources = {"tightwad": "", "tightwad.pool": "", PROBE: "from tightwad.pool import helper\n",
               "tightwad.pool.helper": "def f():\n    import aiohttp\n"}
    modules, others = import_closure(PROBE, sources.get)
    assert "tightwad.pool.helper" in modules and others - STDLIB == {"aiohttp"}


def _lookup_plugin():
    pytest.importorskip("ansible", reason="ansible-core is not installed")
    import importlib.util

    spec = importlib.util.spec_from_file_location("tightwad_lookup",
                                                  REPO / "lookup_plugins" / "tightwad.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_probe_runs_from_the_zip_without_site_packages(tmp_path) -> None:
    """The zip lookup('tightwad', 'probe_zip') builds, run as the coordinator role runs it: no
    site-packages (-S), no PYTHONPATH but the zip; it loads nothing outside the standard
    library and answers --help."""
    import subprocess

    lookup = _lookup_plugin()
    archive = lookup.probe_zip(tmp_path)
    assert archive == tmp_path / "probe" / "tightwad.zip"
    code = ("import runpy, sys\n"
            f"sys.path.insert(0, {str(archive)!r})\n"
            "import tightwad.pool.probe\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] not in "
            "sys.stdlib_module_names and m.split('.')[0] not in ('tightwad', '__main__')))\n"
            "sys.argv = ['probe', '--help']\n"
            "runpy.run_module('tightwad.pool.probe', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-E", "-S", "-c", code], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("[]\n") and "--rpc" in result.stdout, result.stdout


def test_the_probe_zip_is_the_same_bytes_for_the_same_sources(tmp_path) -> None:
    """Fixed timestamps and modes: a rerun's copy finds the host's zip unchanged, also after the
    sources were touched (a fresh checkout, an editor's save without a change)."""
    import shutil
    import zipfile

    lookup = _lookup_plugin()
    package = tmp_path / "src" / "tightwad"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    first = lookup.probe_zip_bytes(package)
    for path in package.rglob("*.py"):
        os.utime(path, (1_900_000_000, 1_900_000_000))
        path.chmod(0o600)
    assert lookup.probe_zip_bytes(package) == first
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names) and "tightwad/pool/probe.py" in names
    assert not any(n.endswith(".patch") or "/static/" in n for n in names)
    assert {i.date_time for i in infos} == {lookup.ZIP_TIME}
    assert {i.external_attr >> 16 for i in infos} == {0o100644}
    # ... and a change in a source is a change in the zip.
    (package / "pool" / "probe.py").write_text("# changed\n")
    assert lookup.probe_zip_bytes(package) != first
    # The cache copy is rewritten only when its bytes differ.
    cached = lookup.probe_zip(tmp_path / "cache")
    stamp = (cached.stat().st_ino, cached.stat().st_mtime_ns)
    assert lookup.probe_zip(tmp_path / "cache") == cached
    assert (cached.stat().st_ino, cached.stat().st_mtime_ns) == stamp
