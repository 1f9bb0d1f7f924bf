"""The one build path for the pinned llama.cpp.

Every host of a Tightwad pool must run the same llama.cpp commit (the RPC client refuses a
server speaking another protocol version), so this module is the only place that knows how to
get the source, patch it and compile it. The test harness, the local demo and the Ansible
``llama_cpp`` role all call it; it uses the standard library only, so the role can copy this one
file to a build host and run it with the system ``python3``.

    python -m tightwad.build fetch  [--source auto|git|sdist|PATH|URL]
    python -m tightwad.build build  [--backend cpu|cuda|rocm|metal|vulkan] [--cuda-arch 86] ...
    python -m tightwad.build path   [same selection options]   # bin dir of a cached build, or exit 1
    python -m tightwad.build build --no-patches --target ggml-rpc-server   # stock worker (tests)
    python -m tightwad.build list                               # what the cache holds (JSON)

Builds land in ``<cache>/builds/<commit>-<backend>-<patch-set hash>-<flags hash>/`` with a
``manifest.json`` recording what they hold; a second call with the same key does no work. A
build of fewer targets than the default three gets a ``-t<targets hash>`` suffix. An unpatched
build (``--no-patches``: the stock binaries, to reproduce upstream bugs our patches fix) keeps
a work tree of its own, so it never makes the patched tree recompile.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PIN_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
PIN_SHORT = PIN_COMMIT[:7]
# Fixed so that a git checkout and the offline archive produce identical binaries (a git
# checkout would otherwise embed its commit count, an archive "unknown").
PIN_BUILD_NUMBER = 1
GIT_URL = "https://github.com/ggml-org/llama.cpp.git"
# Offline source: this PyPI sdist vendors the pinned tree (as a git submodule at the pin).
SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_SUBDIR = "vendor/llama.cpp"
SDIST_SUBMODULE_HEAD = ".git/modules/vendor/llama.cpp/HEAD"
# The sdist's PEP 517 build backend. pip prepares an sdist's metadata even for a download; a
# stand-in of this name answers instead, so nothing in the archive runs and no build
# dependency is installed (the archive is only unpacked, after its sha256 matched).
SDIST_BUILD_BACKEND = "scikit_build_core.build"

TARGETS = ("llama-server", "ggml-rpc-server", "llama-quantize")
BACKENDS = ("cpu", "cuda", "rocm", "metal", "vulkan")
BASE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_RPC=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    # Static binaries can be shipped to hosts that never compile.
    "-DBUILD_SHARED_LIBS=OFF",
    # The default downloads the web UI at configure time; these machines have no such route.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    f"-DLLAMA_BUILD_COMMIT={PIN_SHORT}",
    f"-DLLAMA_BUILD_NUMBER={PIN_BUILD_NUMBER}",
    # ggml asks git for its commit and would print "unknown" (the work tree is no checkout);
    # a false, non-NOTFOUND GIT_EXE skips that (find_program re-searches a NOTFOUND value), so
    # ggml inherits LLAMA_BUILD_COMMIT and both binaries report the pin.
    "-DGIT_EXE=OFF",
)
BACKEND_FLAGS: dict[str, tuple[str, ...]] = {
    "cpu": ("-DGGML_METAL=OFF",),
    "cuda": ("-DGGML_CUDA=ON",),
    "rocm": ("-DGGML_HIP=ON",),
    "metal": ("-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"),
    "vulkan": ("-DGGML_VULKAN=ON",),
}
SOURCE_MARKER = ".tightwad-source.json"
PATCHED_MARKER = ".tightwad-patched.json"


class BuildError(RuntimeError):
    """A build step failed; the message says what to do about it."""


def log(message: str) -> None:
    print(f"[tightwad.build] {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    if env := os.environ.get("TIGHTWAD_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tightwad"


def default_patches_dir() -> Path:
    """Our patches, shipped inside the package (package data: an installed wheel has them too).
    A remote build host gets this file alone: the role passes --patches there."""
    return Path(__file__).resolve().parent / "patches" / "llama.cpp"


# --- pure: flags and keys -------------------------------------------------------------------


def cmake_flags(
    backend: str,
    *,
    cuda_arch: str | None = None,
    rocm_target: str | None = None,
    portable: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """The cmake definitions for one backend, in a stable order (they are part of the key)."""
    if backend not in BACKEND_FLAGS:
        raise BuildError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if cuda_arch and backend != "cuda":
        raise BuildError("--cuda-arch only applies to --backend cuda")
    if rocm_target and backend != "rocm":
        raise BuildError("--rocm-target only applies to --backend rocm")
    flags = [*BASE_FLAGS, *BACKEND_FLAGS[backend]]
    if cuda_arch:
        flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}")
    if rocm_target:
        flags.append(f"-DGPU_TARGETS={rocm_target}")
    if portable:
        # Binaries shipped to other hosts must not assume the build host's CPU features.
        flags.append("-DGGML_NATIVE=OFF")
    flags.extend(extra)
    return flags


def list_patches(patches_dir: Path | None) -> list[Path]:
    """Every ``*.patch`` file of the directory, applied in name order."""
    if patches_dir is None or not patches_dir.is_dir():
        return []
    return sorted(p for p in patches_dir.iterdir() if p.is_file() and p.suffix == ".patch")


def required_patches(patches_dir: Path) -> list[Path]:
    """The patches of a directory that must hold some: a build meant to be patched never
    silently turns stock (``--no-patches`` is the one way to build stock)."""
    patches = list_patches(patches_dir)
    if not patches:
        raise BuildError(f"no llama.cpp patches (*.patch) in {patches_dir}: without them the "
                         "pool lacks the verify API; reinstall tightwad from a Tightwad "
                         "checkout (pip install .), pass --patches DIR, or --no-patches to "
                         "build stock llama.cpp on purpose")
    return patches


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def patch_set_hash(patches: Sequence[Path]) -> str:
    """Hash of the ordered patch set (names and contents): any change makes a new build key."""
    digest = hashlib.sha256()
    for patch in patches:
        digest.update(patch.name.encode() + b"\0" + sha256_file(patch).encode() + b"\0")
    return digest.hexdigest()


EMPTY_PATCH_SET = hashlib.sha256().hexdigest()
NO_PATCHES = Path(os.devnull)
"""A ``patches_dir`` that holds no patches: the stock source."""


@dataclass(frozen=True)
class BuildKey:
    commit: str
    backend: str
    patch_set: str
    flags: tuple[str, ...]
    targets: tuple[str, ...] = TARGETS

    @property
    def unpatched(self) -> bool:
        return self.patch_set == EMPTY_PATCH_SET

    @property
    def flags_hash(self) -> str:
        return sha256_bytes("\n".join(self.flags).encode())

    @property
    def name(self) -> str:
        # Flags are keyed too: a changed build setting must never reuse an older build.
        name = f"{self.commit[:12]}-{self.backend}-{self.patch_set[:12]}-{self.flags_hash[:8]}"
        if self.targets != TARGETS:
            name += "-t" + sha256_bytes("\n".join(self.targets).encode())[:6]
        return name

    @property
    def work_name(self) -> str:
        """One work tree per commit, backend and flags: patch changes rebuild incrementally.
        Unpatched builds get their own tree, so switching to one and back never recompiles
        the patched files of the main tree (ccache serves the unchanged objects)."""
        name = f"{self.commit[:12]}-{self.backend}-{self.flags_hash[:8]}"
        return name + "-unpatched" if self.unpatched else name


def patched_files(patch_text: str) -> list[str]:
    """Paths (relative to the tree root) that a unified diff touches, for -p1 patches."""
    paths: list[str] = []
    for line in patch_text.splitlines():
        for prefix in ("--- ", "+++ "):
            if line.startswith(prefix):
                raw = line[len(prefix):].split("\t")[0].strip()
                if raw != "/dev/null" and "/" in raw:
                    path = raw.split("/", 1)[1]
                    if path not in paths:
                        paths.append(path)
    return paths


# --- source -----------------------------------------------------------------------------------


def _run(cmd: Sequence[str], *, cwd: Path | None = None, env: dict | None = None,
         timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=cwd, env=env, timeout=timeout, check=False,
                          capture_output=True, text=True)


def source_dir(cache: Path, commit: str = PIN_COMMIT) -> Path:
    return cache / "src" / commit


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def file_lock(path: Path, what: str | None = None,
              timeout: float | None = None) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (two builds of one tree never interleave).

    Waits, with a note, while another process holds it; past ``timeout`` seconds raises
    TimeoutError. Lives here because this module must stay self-contained (the role ships it).
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process holding {what or path} ({path})")
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"{what or path} still locked after {timeout:.0f} s "
                                           f"({path})") from None
                    time.sleep(0.5)
        yield


def _install_tree(tree: Path, dest: Path, origin: dict) -> Path:
    """Move a verified tree into the cache atomically and record where it came from."""
    if not (tree / "CMakeLists.txt").is_file() or not (tree / "tools" / "server").is_dir():
        raise BuildError(f"{origin.get('from')}: this does not look like a llama.cpp source tree")
    _write_json_atomic(tree / SOURCE_MARKER, {"commit": PIN_COMMIT, **origin})
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tree, dest)
    log(f"source of {PIN_SHORT} ready in {dest}")
    return dest


def _fetch_git(staging: Path, url: str) -> dict:
    tree = staging / "tree"
    tree.mkdir()
    steps = [
        ["git", "init", "-q"],
        ["git", "fetch", "-q", "--depth", "1", url, PIN_COMMIT],
        ["git", "checkout", "-q", "FETCH_HEAD"],
    ]
    for cmd in steps:
        result = _run(cmd, cwd=tree, timeout=1800)
        if result.returncode != 0:
            raise BuildError(f"git source failed ({' '.join(cmd)}): {result.stderr.strip()}")
    head = _run(["git", "rev-parse", "HEAD"], cwd=tree).stdout.strip()
    if head != PIN_COMMIT:
        raise BuildError(f"git checked out {head}, expected the pin {PIN_COMMIT}")
    shutil.rmtree(tree / ".git")
    return {"from": "git", "url": url}


def _download(url: str, dest: Path) -> Path:
    if not url.startswith("https://"):
        raise BuildError(f"{url}: only https:// URLs are fetched (a plain http:// download can "
                         "be swapped on the way)")
    log(f"downloading {url}")
    with urllib.request.urlopen(url, timeout=60) as resp, dest.open("wb") as out:
        shutil.copyfileobj(resp, out)
    return dest


_STANDIN_BACKEND = """\
# Stands in for the sdist's build backend while pip downloads it: pip asks for metadata, gets
# the name and version it asked for, and nothing from the archive runs.
import os

NAME, VERSION = {name!r}, {version!r}


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = NAME.replace("-", "_") + "-" + VERSION + ".dist-info"
    os.makedirs(os.path.join(metadata_directory, info))
    with open(os.path.join(metadata_directory, info, "METADATA"), "w") as out:
        out.write("Metadata-Version: 2.1\\nName: " + NAME + "\\nVersion: " + VERSION + "\\n")
    return info
"""


def _sdist_download_command(staging: Path) -> tuple[list[str], dict[str, str]]:
    """``pip download`` of the pinned sdist that runs nothing in it: hash-checking mode (pip
    compares the sha256 before it unpacks anything), no build isolation (no build dependency
    is installed) and a stand-in for its build backend (pip's metadata step runs that)."""
    requirements = staging / "requirements.txt"
    requirements.write_text(f"{SDIST_NAME}=={SDIST_VERSION} --hash=sha256:{SDIST_SHA256}\n")
    standin = staging / "standin-backend"
    module = standin.joinpath(*SDIST_BUILD_BACKEND.split("."))
    module.parent.mkdir(parents=True)
    for parent in (module.parent, *list(module.parent.parents)):
        if parent == standin:
            break
        (parent / "__init__.py").touch()
    module.with_suffix(".py").write_text(
        _STANDIN_BACKEND.format(name=SDIST_NAME, version=SDIST_VERSION))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(standin), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", "--require-hashes", "--disable-pip-version-check",
           "-d", str(staging / "download"), "-r", str(requirements)]
    return cmd, env


def _fetch_sdist_file(staging: Path) -> Path:
    """``pip download`` the sdist that vendors the pinned tree (works wherever pip's index
    does), checked against its pinned sha256 before anything in it is read or run."""
    log(f"fetching the {SDIST_NAME}=={SDIST_VERSION} sdist with pip (vendors {PIN_SHORT})")
    cmd, env = _sdist_download_command(staging)
    result = _run(cmd, env=env, timeout=1800)
    found = sorted((staging / "download").glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not found:
        raise BuildError(f"pip download failed: {(result.stderr or result.stdout).strip()[-800:]}")
    return found[0]


def _unpack_archive(archive: Path, dest: Path) -> Path:
    dest.mkdir()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    entries = list(dest.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


def _tree_from_unpacked(root: Path, label: str, archive_sha: str | None,
                        expected_sha: str | None) -> tuple[Path, dict]:
    """Find the llama.cpp tree inside an unpacked archive and prove it is the pinned commit."""
    origin: dict = {"from": label}
    if archive_sha:
        origin["sha256"] = archive_sha
    if (root / SDIST_SUBDIR).is_dir():  # the llama-cpp-python sdist
        head_file = root / SDIST_SUBMODULE_HEAD
        head = head_file.read_text().strip() if head_file.is_file() else ""
        if head != PIN_COMMIT:
            raise BuildError(f"{label}: vendored llama.cpp is at {head or 'an unknown commit'}, "
                             f"expected the pin {PIN_COMMIT}")
        return root / SDIST_SUBDIR, origin
    if (root / ".git").is_dir() and archive_sha is None:  # a local checkout: git knows
        head = _run(["git", "rev-parse", "HEAD"], cwd=root).stdout.strip()
        if head != PIN_COMMIT:
            raise BuildError(f"{label}: checkout is at {head or 'an unknown commit'}, "
                             f"expected the pin {PIN_COMMIT}")
        return root, origin
    # An archive is what its sha256 says it is (checked before it was unpacked); nothing in it
    # can vouch for itself.
    if expected_sha and archive_sha == expected_sha:
        return root, origin
    raise BuildError(f"{label}: cannot prove this tree is llama.cpp {PIN_SHORT}; pass --sha256 "
                     "with the archive's checksum, or use --source git / --source sdist")


def fetch_source(cache: Path, source: str = "auto", *, git_url: str = GIT_URL,
                 sha256: str | None = None) -> Path:
    """Return the pristine pinned tree in the cache, fetching it first if needed.

    ``source``: ``auto`` (cached tree, else git, else the sdist), ``git``, ``sdist``, or a local
    path / URL of an archive (``.tar.gz``/``.zip``) or a directory holding the pinned tree.
    """
    dest = source_dir(cache)
    if (dest / SOURCE_MARKER).is_file():
        return dest
    with file_lock(cache / "locks" / "src.lock", "the source fetch"):
        if (dest / SOURCE_MARKER).is_file():
            return dest
        (cache / "src").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache / "src", prefix=".fetch-") as tmp:
            staging = Path(tmp)
            if source == "auto":
                try:
                    origin = _fetch_git(staging, git_url)
                    return _install_tree(staging / "tree", dest, origin)
                except (BuildError, FileNotFoundError, subprocess.TimeoutExpired) as exc:
                    reason = (str(exc).strip().splitlines() or ["?"])[-1][:200]
                    log(f"git source unavailable ({reason}); using the offline archive")
                    shutil.rmtree(staging / "tree", ignore_errors=True)
                    source = "sdist"
            if source == "git":
                return _install_tree(staging / "tree", dest, _fetch_git(staging, git_url))
            expected: str | None
            if source == "sdist":
                archive = _fetch_sdist_file(staging)
                sha, expected = sha256_file(archive), SDIST_SHA256
                if sha != expected:
                    raise BuildError(f"{archive.name}: sha256 {sha} != pinned {expected}")
                label = f"sdist:{SDIST_NAME}=={SDIST_VERSION}"
            elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
                if not source.startswith("https://"):
                    raise BuildError(f"--source {source}: only https:// URLs (a plain http:// "
                                     "download can be swapped on the way)")
                if not sha256:
                    raise BuildError(f"--source {source}: a URL needs --sha256 (the archive's "
                                     "checksum), checked before anything in it is used")
                archive = _download(source, staging / "archive")
                sha, expected, label = sha256_file(archive), sha256, source
            elif Path(source).is_dir():
                tree, origin = _tree_from_unpacked(Path(source), str(source), None, None)
                copy = staging / "tree"
                shutil.copytree(tree, copy, symlinks=True, ignore=shutil.ignore_patterns(".git"))
                return _install_tree(copy, dest, origin)
            elif Path(source).is_file():
                if not sha256:
                    raise BuildError(f"--source {source}: cannot prove this archive is llama.cpp "
                                     f"{PIN_SHORT}; pass --sha256 with its checksum")
                archive = Path(source)
                sha, expected, label = sha256_file(archive), sha256, str(source)
            else:
                raise BuildError(f"--source {source!r}: not git, sdist, a URL, or an existing path")
            if expected and sha != expected:
                raise BuildError(f"{label}: sha256 {sha} does not match {expected}")
            root = _unpack_archive(archive, staging / "unpacked")
            tree, origin = _tree_from_unpacked(root, label, sha, expected)
            git_link = tree / ".git"
            if git_link.is_file() or git_link.is_symlink():
                git_link.unlink()  # a submodule's gitdir pointer; meaningless once moved
            return _install_tree(tree, dest, origin)


# --- build ------------------------------------------------------------------------------------


@dataclass
class Build:
    """A finished build in the cache."""

    path: Path
    manifest: dict = field(default_factory=dict)
    cache_hit: bool = False

    @property
    def bin_dir(self) -> Path:
        return self.path / "bin"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name


def check_targets(targets: Sequence[str] | None) -> tuple[str, ...]:
    """The build targets in their canonical order (a subset of TARGETS; default all)."""
    if not targets:
        return TARGETS
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise BuildError(f"unknown target(s) {', '.join(unknown)}; choose from: "
                         f"{', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in targets)


def build_key(backend: str = "cpu", *, patches_dir: Path | None = None,
              flags: Sequence[str] | None = None,
              targets: Sequence[str] | None = None) -> BuildKey:
    """The cache key. ``patches_dir`` defaults to the package's own patches, which must be
    there; a directory given without patches (or ``NO_PATCHES``) means the stock source."""
    flags = list(flags) if flags is not None else cmake_flags(backend)
    patches = list_patches(patches_dir) if patches_dir is not None else required_patches(
        default_patches_dir())
    return BuildKey(PIN_COMMIT, backend, patch_set_hash(patches), tuple(flags),
                    check_targets(targets))


def cached_build(cache: Path, key: BuildKey) -> Build | None:
    """The cached build of ``key``, its binaries re-hashed against its manifest first (a
    binary changed since it was built is refused, never shipped), or None."""
    path = cache / "builds" / key.name
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if not all((path / "bin" / t).is_file() for t in key.targets):
        return None
    recorded = manifest.get("binaries") or {}
    for target in key.targets:
        want = (recorded.get(target) or {}).get("sha256")
        if want is None or sha256_file(path / "bin" / target) != want:
            raise BuildError(f"cached build {path}: bin/{target} does not match the sha256 its "
                             f"manifest recorded; delete {path} to build it again")
    return Build(path, manifest, cache_hit=True)


def _sync_patches(pristine: Path, work_src: Path, patches: Sequence[Path]) -> None:
    """Bring ``work_src`` to pristine + ``patches``, rewriting only files the patches touch.

    Keeping one work tree per backend (instead of a fresh copy per key) lets ninja rebuild only
    what a patch change touched.
    """
    marker = work_src / PATCHED_MARKER
    previous = json.loads(marker.read_text())["files"] if marker.is_file() else []
    texts = [(p, p.read_text()) for p in patches]
    touched = sorted({f for _, t in texts for f in patched_files(t)} | set(previous))
    # Record first: a crash below leaves a marker that makes the next run restore these files.
    _write_json_atomic(marker, {"files": touched, "patches": []})
    for rel in touched:
        original, current = pristine / rel, work_src / rel
        if original.is_file():
            current.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original, current)  # a fresh mtime, so ninja notices
        elif current.exists():
            current.unlink()
    for patch, _ in texts:
        for dry in (True, False):  # all-or-nothing per patch
            cmd = ["patch", "-p1", "--forward", "--batch", "--silent", "-i", str(patch)]
            result = _run(cmd + (["--dry-run"] if dry else []), cwd=work_src)
            if result.returncode != 0:
                raise BuildError(f"patch {patch.name} does not apply to {PIN_SHORT}:\n"
                                 f"{(result.stdout + result.stderr).strip()[-1500:]}")
        log(f"applied {patch.name}")
    _write_json_atomic(marker, {"files": touched, "patches": [p.name for p in patches]})


def _stream(cmd: Sequence[str], log_path: Path, env: dict, verbose: bool) -> None:
    """Run a long build step, keeping its full log and showing progress."""
    with log_path.open("a") as log_fh:
        log_fh.write(f"$ {' '.join(cmd)}\n")
        log_fh.flush()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
        last_shown = 0.0
        assert proc.stdout is not None
        for line in proc.stdout:
            log_fh.write(line)
            now = time.monotonic()
            if verbose or (line.startswith("[") and now - last_shown > 10):
                sys.stderr.write(line if verbose else f"[tightwad.build] {line}")
                last_shown = now
        if proc.wait() != 0:
            tail = log_path.read_text().splitlines()[-40:]
            raise BuildError(f"{cmd[0]} failed (full log: {log_path}):\n" + "\n".join(tail))


def _binary_version(path: Path) -> str:
    """What ``--version`` prints, or "" when the binary has no such option (a stock worker)."""
    result = _run([str(path), "--version"], timeout=60)
    return (result.stdout + result.stderr).strip() if result.returncode == 0 else ""


def ensure_build(
    backend: str = "cpu",
    *,
    cache: Path | None = None,
    patches_dir: Path | None = None,
    flags: Sequence[str] | None = None,
    source: str = "auto",
    sha256: str | None = None,
    jobs: int | None = None,
    verbose: bool = False,
    targets: Sequence[str] | None = None,
) -> Build:
    """Return the cached build for this key, building it first if the cache lacks it.

    ``targets`` (default: all of TARGETS) builds only some binaries, e.g. a stock
    ``ggml-rpc-server`` with an empty ``patches_dir``.
    """
    cache = cache or default_cache_dir()
    if patches_dir is None:
        patches_dir = default_patches_dir()
        required_patches(patches_dir)
    # Absolute: patch runs inside the work tree, where a relative path means nothing.
    patches_dir = patches_dir.resolve()
    key = build_key(backend, patches_dir=patches_dir, flags=flags, targets=targets)
    if hit := cached_build(cache, key):
        log(f"cache hit: {hit.path}")
        return hit
    work = cache / "work" / key.work_name
    with file_lock(cache / "locks" / f"{work.name}.lock", f"the {work.name} build"):
        if hit := cached_build(cache, key):
            log(f"cache hit: {hit.path}")
            return hit
        pristine = fetch_source(cache, source, sha256=sha256)
        for tool in ("cmake", "patch"):
            if shutil.which(tool) is None:
                raise BuildError(f"'{tool}' is not installed; install it (and ninja) and retry")
        started = time.monotonic()
        work_src, work_build = work / "src", work / "build"
        if not work_src.is_dir():
            log(f"copying the pinned tree to {work_src}")
            shutil.copytree(pristine, work_src.with_name("src.tmp"), symlinks=True,
                            dirs_exist_ok=True)
            os.replace(work_src.with_name("src.tmp"), work_src)
        patches = list_patches(patches_dir)
        _sync_patches(pristine, work_src, patches)
        env = dict(os.environ, CCACHE_BASEDIR=str(work))
        build_log = work / "build.log"
        build_log.write_text("")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        log(f"configuring {key.name} ({backend}); full log in {build_log}")
        _stream(["cmake", "-S", str(work_src), "-B", str(work_build), *generator, *key.flags],
                build_log, env, verbose)
        log(f"compiling {', '.join(key.targets)} (a CPU build takes ~6 min on 2 cores)")
        _stream(["cmake", "--build", str(work_build), "--target", *key.targets,
                 "--parallel", str(jobs or os.cpu_count() or 2)], build_log, env, verbose)
        return _install(cache, key, work_build, patches, pristine, time.monotonic() - started)


def _install(cache: Path, key: BuildKey, work_build: Path, patches: Sequence[Path],
             pristine: Path, seconds: float) -> Build:
    dest = cache / "builds" / key.name
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "bin").mkdir(parents=True)
    binaries = {}
    for target in key.targets:
        built = work_build / "bin" / target
        shutil.copy2(built, staging / "bin" / target)
        binaries[target] = {"sha256": sha256_file(built),
                            "version": _binary_version(staging / "bin" / target)}
    # The stock worker has no --version (our patch 0002 adds it): check what can report.
    for target in ("llama-server", "ggml-rpc-server"):
        version = binaries.get(target, {}).get("version", "")
        if version.startswith("version:") and f"commit {PIN_SHORT}" not in version:
            raise BuildError(f"built {target} reports {version!r}, not the pin {PIN_SHORT}")
    if "llama-server" in key.targets and not binaries["llama-server"]["version"].startswith(
            "version:"):
        raise BuildError(f"built llama-server gives no version: "
                         f"{binaries['llama-server']['version']!r}")
    manifest = {
        "commit": key.commit,
        "backend": key.backend,
        "cmake_flags": list(key.flags),
        "targets": list(key.targets),
        "patch_set": key.patch_set,
        "patches": [{"name": p.name, "sha256": sha256_file(p)} for p in patches],
        "source": json.loads((pristine / SOURCE_MARKER).read_text()),
        "binaries": binaries,
        "host": {"system": platform.system(), "machine": platform.machine()},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(seconds, 1),
    }
    _write_json_atomic(staging / "manifest.json", manifest)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)
    log(f"built {key.name} in {seconds:.0f} s -> {dest}")
    return Build(dest, manifest, cache_hit=False)


def list_builds(cache: Path) -> list[dict]:
    builds = []
    for manifest in sorted((cache / "builds").glob("*/manifest.json")):
        builds.append({"path": str(manifest.parent), **json.loads(manifest.read_text())})
    return builds


# --- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tightwad.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache directory (default: $TIGHTWAD_CACHE or ~/.cache/tightwad)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_source(p: argparse.ArgumentParser) -> None:
        p.add_argument("--source", default="auto",
                       help="auto (default), git, sdist, or a path/URL of an archive or tree")
        p.add_argument("--sha256", help="expected sha256 of an archive given by path/URL")

    def add_selection(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backend", default="cpu", choices=BACKENDS)
        p.add_argument("--cuda-arch", help="CMAKE_CUDA_ARCHITECTURES, e.g. 86 or 75;89")
        p.add_argument("--rocm-target", help="HIP GPU target(s), e.g. gfx1100")
        p.add_argument("--portable", action="store_true",
                       help="no -march=native (for binaries shipped to other hosts)")
        p.add_argument("--cmake-arg", action="append", default=[], metavar="-DNAME=VALUE",
                       help="extra cmake definition (part of the cache key)")
        p.add_argument("--patches", type=Path, default=None,
                       help="directory of *.patch files (default: the package's own, "
                       "tightwad/patches/llama.cpp)")
        p.add_argument("--no-patches", action="store_true",
                       help="build the stock source (to reproduce what a patch fixes)")
        p.add_argument("--target", action="append", default=None, choices=TARGETS,
                       help=f"build only this binary (repeatable; default: {' '.join(TARGETS)})")

    add_source(sub.add_parser("fetch", help="fetch and unpack the pinned source; print its path"))
    build_p = sub.add_parser("build", help="build (or reuse) the pinned binaries; print the bin dir")
    add_selection(build_p)
    add_source(build_p)
    build_p.add_argument("--jobs", type=int, default=None)
    build_p.add_argument("--verbose", action="store_true", help="show the whole compiler output")
    add_selection(sub.add_parser("path", help="print the bin dir of a cached build, or exit 1"))
    sub.add_parser("list", help="print what the cache holds as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cache = args.cache or default_cache_dir()
    try:
        if args.command == "fetch":
            print(fetch_source(cache, args.source, sha256=args.sha256))
        elif args.command == "list":
            print(json.dumps(list_builds(cache), indent=2))
        else:
            flags = cmake_flags(args.backend, cuda_arch=args.cuda_arch,
                                rocm_target=args.rocm_target, portable=args.portable,
                                extra=args.cmake_arg)
            if args.no_patches and args.patches is not None:
                raise BuildError("--no-patches and --patches exclude each other")
            if args.no_patches:
                patches = NO_PATCHES
            else:
                patches = args.patches if args.patches is not None else default_patches_dir()
                required_patches(patches)  # only --no-patches builds stock
            if args.command == "path":
                found = cached_build(cache, build_key(args.backend, patches_dir=patches,
                                                      flags=flags, targets=args.target))
                if not found:
                    print("no cached build for this key; run `python -m tightwad.build build`",
                          file=sys.stderr)
                    return 1
                print(found.bin_dir)
            else:
                build = ensure_build(args.backend, cache=cache, patches_dir=patches, flags=flags,
                                     source=args.source, sha256=args.sha256, jobs=args.jobs,
                                     verbose=args.verbose, targets=args.target)
                print(build.bin_dir)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-installed was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
