"""The one build path: flags per backend, cache keys, patching, source checks, and the real build."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tightwad import build as b

# --- pure -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "kwargs", "expected"),
    [
        ("cpu", {}, ["-DGGML_METAL=OFF"]),
        ("cuda", {"cuda_arch": "86"}, ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=86"]),
        ("rocm", {"rocm_target": "gfx1100"}, ["-DGGML_HIP=ON", "-DGPU_TARGETS=gfx1100"]),
        ("metal", {}, ["-DGGML_METAL=ON"]),
        ("vulkan", {}, ["-DGGML_VULKAN=ON"]),
    ],
)
def test_backend_flags(backend: str, kwargs: dict, expected: list[str]) -> None:
    flags = b.cmake_flags(backend, **kwargs)
    for flag in expected + ["-DGGML_RPC=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_COMMIT=0c1e570"]:
        assert flag in flags
    others = {"cuda": "-DGGML_CUDA=ON", "rocm": "-DGGML_HIP=ON", "vulkan": "-DGGML_VULKAN=ON"}
    assert not [f for k, f in others.items() if k != backend and f in flags]


def test_bad_backend_and_misplaced_arch_are_refused() -> None:
    with pytest.raises(b.BuildError, match="unknown backend 'opencl'"):
        b.cmake_flags("opencl")
    with pytest.raises(b.BuildError, match="--cuda-arch only applies"):
        b.cmake_flags("cpu", cuda_arch="86")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cache_key_follows_patches_backend_and_flags(tmp_path: Path) -> None:
    patches = tmp_path / "patches"
    _write(patches / "0001-a.patch", "one")
    _write(patches / "notes.txt", "not a patch: ignored")
    first = b.build_key("cpu", patches_dir=patches)
    assert first == b.build_key("cpu", patches_dir=patches)  # stable
    assert first.name == f"{b.PIN_COMMIT[:12]}-cpu-{first.patch_set[:12]}-{first.flags_hash[:8]}"

    _write(patches / "0001-a.patch", "one, changed")
    changed = b.build_key("cpu", patches_dir=patches)
    assert changed.patch_set != first.patch_set and changed.name != first.name

    _write(patches / "0002-b.patch", "two")
    assert b.build_key("cpu", patches_dir=patches).patch_set != changed.patch_set
    assert b.build_key("vulkan", patches_dir=patches).name != b.build_key("cpu", patches_dir=patches).name
    portable = b.build_key("cpu", patches_dir=patches, flags=b.cmake_flags("cpu", portable=True))
    assert portable.name != b.build_key("cpu", patches_dir=patches).name
    # Patch changes keep the work tree (incremental rebuild); flags do not.
    assert changed.work_name == first.work_name != portable.work_name


def test_repo_patches_are_listed_in_order_and_keyed() -> None:
    names = [p.name for p in b.list_patches(b.default_patches_dir())]
    assert names == sorted(names) and names, "tightwad/patches/llama.cpp must hold the project's patches"
    assert b.build_key("cpu").patch_set == b.patch_set_hash(b.list_patches(b.default_patches_dir()))


DIFF = """header text is ignored by patch
--- a/src/hello.c
+++ b/src/hello.c
@@ -1,2 +1,2 @@
 int main(void) {
-    return 0;
+    return {value};
"""


def test_sync_patches_applies_and_reapplies(tmp_path: Path) -> None:
    pristine, work = tmp_path / "pristine", tmp_path / "work"
    _write(pristine / "src/hello.c", "int main(void) {\n    return 0;\n")
    _write(work / "src/hello.c", "int main(void) {\n    return 0;\n")
    patches = tmp_path / "patches"
    patch = _write(patches / "0001-x.patch", DIFF.replace("{value}", "1"))
    assert b.patched_files(patch.read_text()) == ["src/hello.c"]

    b._sync_patches(pristine, work, b.list_patches(patches))
    assert "return 1;" in (work / "src/hello.c").read_text()
    # A changed patch is applied to the pristine file, not on top of the old patch.
    _write(patches / "0001-x.patch", DIFF.replace("{value}", "2"))
    b._sync_patches(pristine, work, b.list_patches(patches))
    assert "return 2;" in (work / "src/hello.c").read_text()
    # Removing the patch restores the pristine file.
    patch.unlink()
    b._sync_patches(pristine, work, b.list_patches(patches))
    assert (work / "src/hello.c").read_text() == (pristine / "src/hello.c").read_text()


def test_patch_that_does_not_apply_names_itself(tmp_path: Path) -> None:
    pristine, work = tmp_path / "pristine", tmp_path / "work"
    for root in (pristine, work):
        _write(root / "src/hello.c", "something else entirely\n")
    patches = tmp_path / "patches"
    _write(patches / "0001-x.patch", DIFF.replace("{value}", "1"))
    with pytest.raises(b.BuildError, match="0001-x.patch does not apply"):
        b._sync_patches(pristine, work, b.list_patches(patches))
    assert (work / "src/hello.c").read_text() == "something else entirely\n"  # untouched


def _fake_sdist(path: Path, head: str) -> Path:
    """A tarball shaped like the llama-cpp-python sdist, with a tiny 'llama.cpp' inside."""
    files = {
        "pkg/vendor/llama.cpp/CMakeLists.txt": "project(x)\n",
        "pkg/vendor/llama.cpp/tools/server/server.cpp": "int main() {}\n",
        "pkg/vendor/llama.cpp/.git": "gitdir: ../../.git/modules/vendor/llama.cpp\n",
        "pkg/.git/modules/vendor/llama.cpp/HEAD": head + "\n",
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_archive_source_is_verified_against_the_pin(tmp_path: Path) -> None:
    wrong = _fake_sdist(tmp_path / "wrong.tar.gz", "f" * 40)
    with pytest.raises(b.BuildError, match="expected the pin"):
        b.fetch_source(tmp_path / "cache-a", str(wrong), sha256=b.sha256_file(wrong))
    assert not b.source_dir(tmp_path / "cache-a").exists()  # nothing half-installed

    good = _fake_sdist(tmp_path / "good.tar.gz", b.PIN_COMMIT)
    tree = b.fetch_source(tmp_path / "cache-b", str(good), sha256=b.sha256_file(good))
    assert tree == b.source_dir(tmp_path / "cache-b")
    assert (tree / "tools/server/server.cpp").is_file() and not (tree / ".git").exists()
    origin = json.loads((tree / b.SOURCE_MARKER).read_text())
    assert origin["commit"] == b.PIN_COMMIT and origin["sha256"] == b.sha256_file(good)


def test_unprovable_archive_needs_a_checksum(tmp_path: Path) -> None:
    plain = tmp_path / "plain.tar.gz"
    with tarfile.open(plain, "w:gz") as tf:
        for name in ("llama.cpp/CMakeLists.txt", "llama.cpp/tools/server/x.cpp"):
            info = tarfile.TarInfo(name)
            tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(b.BuildError, match="cannot prove"):
        b.fetch_source(tmp_path / "c1", str(plain))
    tree = b.fetch_source(tmp_path / "c2", str(plain), sha256=b.sha256_file(plain))
    assert (tree / "CMakeLists.txt").is_file()


# --- the real pinned build ------------------------------------------------------------------


def test_second_build_is_a_cache_hit_that_changes_nothing(
        llama: b.Build, cache_dir: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = llama.path / "manifest.json"
    before = {p: p.stat().st_mtime_ns for p in llama.path.rglob("*")}
    again = b.ensure_build("cpu", cache=cache_dir)
    assert again.cache_hit and again.path == llama.path
    assert "cache hit" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in llama.path.rglob("*")} == before

    recorded = json.loads(manifest.read_text())
    key = b.build_key("cpu")
    assert recorded["commit"] == b.PIN_COMMIT and recorded["backend"] == "cpu"
    assert recorded["patch_set"] == key.patch_set
    patches = b.list_patches(b.default_patches_dir())
    assert [p["name"] for p in recorded["patches"]] == [p.name for p in patches]
    for name in b.TARGETS:
        assert recorded["binaries"][name]["sha256"] == b.sha256_file(llama.binary(name))


def test_cli_reports_the_cached_build(llama: b.Build, cache_dir: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tightwad.build", "--cache", str(cache_dir), *args],
                              capture_output=True, text=True, timeout=120)

    built = cli("build")
    assert built.returncode == 0 and "cache hit" in built.stderr
    assert built.stdout.strip() == str(llama.bin_dir)
    assert cli("path").stdout.strip() == str(llama.bin_dir)
    listed = json.loads(cli("list").stdout)
    assert str(llama.path) in [entry["path"] for entry in listed]
    missing = cli("path", "--backend", "vulkan")
    assert missing.returncode == 1 and "no cached build" in missing.stderr


def test_binaries_report_the_pinned_commit(llama: b.Build) -> None:
    server = subprocess.run([llama.binary("llama-server"), "--version"], capture_output=True,
                            text=True, timeout=60)
    assert f"(build 1, commit {b.PIN_SHORT})" in server.stdout + server.stderr
    # --version on the worker comes from tightwad/patches/llama.cpp/0002-rpc-server-version.patch.
    worker = subprocess.run([llama.binary("ggml-rpc-server"), "--version"], capture_output=True,
                            text=True, timeout=60)
    assert worker.returncode == 0
    assert f"commit {b.PIN_SHORT}" in worker.stdout and "rpc protocol: v7.0.0" in worker.stdout


def test_repo_patches_apply_cleanly_to_the_pinned_tree(source_tree: Path, tmp_path: Path) -> None:
    patches = b.list_patches(b.default_patches_dir())
    work = tmp_path / "tree"
    files = sorted({f for p in patches for f in b.patched_files(p.read_text())})
    for rel in files:
        assert (source_tree / rel).is_file(), f"{rel} is not in the pinned tree"
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes((source_tree / rel).read_bytes())
    b._sync_patches(source_tree, work, patches)  # raises BuildError naming a patch that fails
    assert "prompt_logprobs" in (work / "tools/server/server-context.cpp").read_text()
    # Applied for real, in order: undoing them newest first must succeed and give back the
    # pinned files (later patches build on earlier ones, so each reverses only on top of them).
    for patch in reversed(patches):
        reverse = subprocess.run(["patch", "-p1", "-R", "--batch", "--no-backup-if-mismatch",
                                  "-i", str(patch)], cwd=work, capture_output=True, text=True)
        assert reverse.returncode == 0, f"{patch.name}: {reverse.stdout}"
    for rel in files:
        assert (work / rel).read_bytes() == (source_tree / rel).read_bytes(), rel
