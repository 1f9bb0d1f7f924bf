"""What `pip install .` gives: the wheel ships the `tightwad` package with its llama.cpp patches
and the licence, and nothing of the dev tools (proxy/tightwad_dev), the tests or the benchmarks;
installed into a fresh virtual environment (not editable, away from the checkout), the package
finds its patches, keys exactly the checkout's patched build and applies them to the pinned
tree, runs `tightwad --version` and `tightwad serve`, and refuses to build without them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

import tightwad
from support import REPO
from tightwad import build as llama_build

PATCHES = REPO / "proxy" / "tightwad" / "patches" / "llama.cpp"


def test_the_wheel_ships_tightwad_its_patches_and_no_dev_or_test_code(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path), str(REPO)], check=True, timeout=300,
                   capture_output=True, text=True)
    (wheel,) = tmp_path.glob("tightwad-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"tightwad"}
    assert "tightwad/server/__main__.py" in names and "tightwad/build.py" in names
    assert not [n for n in names if "tightwad_dev" in n or n.startswith(("tests/", "bench/"))]
    shipped = sorted(n.rsplit("/", 1)[1] for n in names
                     if n.startswith("tightwad/patches/llama.cpp/") and n.endswith(".patch"))
    assert shipped == sorted(p.name for p in PATCHES.glob("*.patch")) and shipped
    assert [n for n in names if ".dist-info/" in n and n.rsplit("/", 1)[1] == "LICENSE"]
    # Exactly the package's modules: none missing, none left over from an older build.
    package = REPO / "proxy" / "tightwad"
    assert sorted(n for n in names if n.endswith(".py")) == sorted(
        str(f.relative_to(package.parent)) for f in package.rglob("*.py"))


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that points Python at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install .` (with its dependencies, not editable) into a new virtual environment."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", "."], cwd=REPO, env=_clean_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return venv


def _run(venv: Path, *argv: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd,
                          env=_clean_env(**env), capture_output=True, text=True, timeout=300)


APPLY = """
import json, shutil, sys
from pathlib import Path
from tightwad import build as b
patches_dir = b.default_patches_dir()
patches = b.required_patches(patches_dir)
pristine, work = Path(sys.argv[1]), Path(sys.argv[2])
for rel in sorted({f for p in patches for f in b.patched_files(p.read_text())}):
    if (pristine / rel).is_file():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pristine / rel, work / rel)
b._sync_patches(pristine, work, patches)  # what `build` does before it compiles
print(json.dumps({"module": b.__file__, "patches_dir": str(patches_dir),
                  "patches": [p.name for p in patches], "key": b.build_key("cpu").name}))
"""


def test_the_installed_package_applies_its_patches(fresh_venv: Path, llama: llama_build.Build,
                                                   source_tree: Path, cache_dir: Path,
                                                   tmp_path: Path) -> None:
    """Compiling again would take 6-10 minutes here: the installed package instead shows the
    two halves of `python -m tightwad.build build` — the patches it applies to the pinned tree
    (for real, on a copy of the files they touch) and the cache key, which equals the one of
    the checkout's patched build, so its `build` yields exactly those binaries."""
    work = tmp_path / "work"
    done = _run(fresh_venv, "python", "-c", APPLY, str(source_tree), str(work), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert Path(got["module"]).is_relative_to(fresh_venv), got  # the installed copy, not ours
    assert Path(got["patches_dir"]).is_relative_to(fresh_venv)
    assert got["patches"] == [p["name"] for p in llama.manifest["patches"]] == sorted(
        p.name for p in PATCHES.glob("*.patch"))
    assert "applied 0001-server-verify-prompt-logprobs.patch" in done.stderr
    assert got["key"] == llama.path.name
    # The installed CLI names the same cached build: the patched one the test pools run.
    found = _run(fresh_venv, "python", "-m", "tightwad.build", "path", cwd=tmp_path,
                 TIGHTWAD_CACHE=str(cache_dir))
    assert found.returncode == 0 and found.stdout.strip() == str(llama.bin_dir), found.stderr


def test_the_installed_command_line(fresh_venv: Path, tmp_path: Path) -> None:
    version = _run(fresh_venv, "tightwad", "--version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == (
        f"tightwad {tightwad.__version__} (llama.cpp {llama_build.PIN_COMMIT})")
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        port, closed = a.getsockname()[1], b.getsockname()[1]
    config = tmp_path / "proxy.yml"
    config.write_text(yaml.safe_dump({"listen": {"port": port},
                                      "target": {"url": f"http://127.0.0.1:{closed}"}}))
    proc = subprocess.Popen([str(fresh_venv / "bin" / "tightwad"), "serve", "-c", str(config)],
                            cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.monotonic() + 60, None
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    status = r.status
            except urllib.error.HTTPError as exc:  # no coordinator: an HTTP answer all the same
                status = exc.code
            except OSError:
                time.sleep(0.2)
        assert status is not None, "tightwad serve never answered /health"
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert f"serving the OpenAI API on http://127.0.0.1:{port}/v1" in output


def test_a_wheel_without_its_patches_refuses_to_build(fresh_venv: Path, tmp_path: Path) -> None:
    """What an install without the package data (the old wheel) now does: exit 2 with a line
    that says so, instead of compiling stock llama.cpp without the verify API."""
    site = _run(fresh_venv, "python", "-c", "import tightwad.build as b; "
                "print(b.default_patches_dir())", cwd=tmp_path)
    patches_dir = Path(site.stdout.strip())
    aside = tmp_path / "aside"
    patches_dir.rename(aside)
    try:
        done = _run(fresh_venv, "python", "-m", "tightwad.build", "build", cwd=tmp_path,
                    TIGHTWAD_CACHE=str(tmp_path / "cache"))
    finally:
        aside.rename(patches_dir)
    assert done.returncode == 2 and "no llama.cpp patches" in done.stderr, done.stderr
    assert "--no-patches" in done.stderr and not (tmp_path / "cache" / "builds").exists()
