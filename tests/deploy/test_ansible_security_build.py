"""The build verifies before it executes (tightwad.build, which the llama_cpp role runs on the
controller and copies to build hosts): the pinned sdist is fetched by pip in hash-checking mode
with no build isolation and a stand-in for its build backend, so a tampered archive is refused
before anything in it is unpacked and nothing in a good one runs; URL sources need a sha256 and
https; a local archive needs a sha256; a cached binary that no longer matches its manifest is
refused, never shipped."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tightwad import build as b

MARKER = "the-sdist-ran-code"


def _fake_sdist(directory: Path, marker: Path) -> Path:
    """An sdist named like the pinned one whose every piece of code would leave ``marker``:
    its build backend (importable from its own root) and its setup.py."""
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    backend = code + ("def get_requires_for_build_wheel(c=None):\n    return []\n"
                      "def prepare_metadata_for_build_wheel(d, c=None):\n    raise SystemExit(1)\n")
    files = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {b.SDIST_NAME}\nVersion: {b.SDIST_VERSION}\n",
        "pyproject.toml": f'[build-system]\nrequires = ["not-a-real-build-dependency-xyz"]\n'
                          f'build-backend = "{b.SDIST_BUILD_BACKEND}"\n',
        "setup.py": code,
        "scikit_build_core/__init__.py": "",
        "scikit_build_core/build.py": backend,
    }
    path = directory / f"llama_cpp_python-{b.SDIST_VERSION}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"llama_cpp_python-{b.SDIST_VERSION}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _download(tmp_path: Path, index: Path, sha256: str, monkeypatch) -> subprocess.CompletedProcess:
    monkeypatch.setattr(b, "SDIST_SHA256", sha256)
    staging = tmp_path / "staging"
    staging.mkdir()
    cmd, env = b._sdist_download_command(staging)
    # Offline: pip finds the archive in ``index`` only.
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index), PIP_CONSTRAINT="", PIP_CONFIG_FILE=os.devnull)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_the_sdist_download_runs_nothing_from_the_archive(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    marker = tmp_path / MARKER
    archive = _fake_sdist(index, marker)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    done = _download(tmp_path, index, sha, monkeypatch)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "staging" / "download" / archive.name).read_bytes() == archive.read_bytes()
    # Neither its backend nor its setup.py ran, and its (unpinned) build dependency was never
    # looked for.
    assert not marker.exists()
    assert "not-a-real-build-dependency-xyz" not in done.stdout + done.stderr


def test_a_tampered_sdist_is_refused_before_it_is_used(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    marker = tmp_path / MARKER
    _fake_sdist(index, marker)
    done = _download(tmp_path, index, "0" * 64, monkeypatch)
    assert done.returncode != 0
    assert "DO NOT MATCH THE HASHES" in done.stderr, done.stderr[-2000:]
    assert not marker.exists()
    assert not list((tmp_path / "staging").glob("download/*"))


@pytest.mark.parametrize("source,sha256,words", [
    ("http://example.invalid/llama.cpp.tar.gz", "a" * 64, "only https:// URLs"),
    ("ftp://example.invalid/llama.cpp.tar.gz", "a" * 64, "only https:// URLs"),
    ("https://example.invalid/llama.cpp.tar.gz", None, "a URL needs --sha256"),
])
def test_url_sources_need_https_and_a_sha256(tmp_path, source, sha256, words):
    with pytest.raises(b.BuildError, match=words):
        b.fetch_source(tmp_path / "cache", source, sha256=sha256)
    assert not b.source_dir(tmp_path / "cache").exists()


def test_a_local_archive_cannot_vouch_for_itself(tmp_path):
    """A HEAD file inside an archive saying "the pin" proves nothing: a sha256 must."""
    archive = tmp_path / "claims-the-pin.tar.gz"
    files = {"pkg/vendor/llama.cpp/CMakeLists.txt": "project(x)\n",
             "pkg/vendor/llama.cpp/tools/server/server.cpp": "int main() {}\n",
             "pkg/.git/modules/vendor/llama.cpp/HEAD": b.PIN_COMMIT + "\n"}
    with tarfile.open(archive, "w:gz") as tf:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tf.addfile(info, io.BytesIO(text.encode()))
    with pytest.raises(b.BuildError, match="pass --sha256"):
        b.fetch_source(tmp_path / "c1", str(archive))
    tree = b.fetch_source(tmp_path / "c2", str(archive), sha256=b.sha256_file(archive))
    assert (tree / "tools/server/server.cpp").is_file()


def test_a_cached_binary_is_rehashed_before_use(tmp_path):
    key = b.build_key("cpu")
    path = tmp_path / "builds" / key.name
    (path / "bin").mkdir(parents=True)
    binaries = {}
    for target in key.targets:
        (path / "bin" / target).write_bytes(target.encode())
        binaries[target] = {"sha256": b.sha256_file(path / "bin" / target)}
    (path / "manifest.json").write_text(json.dumps({"binaries": binaries}))
    found = b.cached_build(tmp_path, key)
    assert found is not None and found.cache_hit
    (path / "bin" / "ggml-rpc-server").write_bytes(b"swapped")
    with pytest.raises(b.BuildError, match="bin/ggml-rpc-server does not match the sha256"):
        b.cached_build(tmp_path, key)
