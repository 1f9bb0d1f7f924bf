"""Real Linux hosts for deployment tests: systemd-nspawn containers in their own network namespaces.

Each host boots systemd as PID 1 from one cached Debian rootfs, has its own network namespace and
address on a private test bridge, and answers SSH as root with a key made for the cache. Hosts
reach each other and the controller (the machine running the tests) over that bridge and
nothing else: there is no default route, so nothing leaves the test network.

::

    with HostGroup(["w1", "w2", "coord"]) as hosts:
        hosts["coord"].run("systemctl is-system-running")
        hosts.write_inventory(tmp / "inventory.yml", groups={"rpc_workers": ["w1", "w2"]})

The pieces (recipe: docs/architecture.md; reference: docs/test-hosts.md):

- :func:`ensure_rootfs` debootstraps Debian bookworm (minbase plus :data:`PACKAGES`) once into
  ``<cache>/hosts/bookworm-<key>/``, keyed by the suite and package list, built in a temporary
  directory under a lock and renamed into place. The same directory holds the SSH key pair whose
  public half is root's ``authorized_keys`` in the rootfs.
- :class:`HostGroup` gives every host a network namespace ``<prefix>-<name>``, a veth pair whose
  root-side end ``<prefix>-<i>`` is enslaved to the bridge ``<prefix>-br`` (the controller's
  address, ``.1`` of the group's /24), and boots ``systemd-nspawn --boot --volatile=overlay``
  inside that namespace, from a cgroup of its own (``tightwad-<prefix>-<name>``; with
  ``--keep-unit`` containers started from one cgroup would share one cgroup tree) and with
  CAP_NET_ADMIN (for the host's own firewall); ``cpu_quota`` puts a host, all of it, in a
  CPU-limited cgroup too (a slow machine). All hosts share the read-only rootfs; each writes
  to its own tmpfs overlay, so every boot starts clean and nothing is written back to the cache.
- ``close()`` (or leaving the ``with`` block, a failing test, Ctrl-C, SIGTERM, interpreter
  exit) stops every container (SIGTERM for an orderly halt, then SIGKILL of every process in the
  namespace) and deletes namespaces, veths, the bridge and the cgroups. A group also removes, before it
  starts, whatever a crashed earlier run left behind under the same prefix; a per-prefix lock
  makes sure that run is really dead (a live one is waited for instead).

Needs root, ``systemd-nspawn`` (package ``systemd-container``), ``debootstrap`` and ``ip``;
:func:`ensure_tools` installs the first two with apt-get when they are missing.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PACKAGES",
    "SUITE",
    "Host",
    "HostGroup",
    "HostsError",
    "Rootfs",
    "cleanup_prefix",
    "debian_mirror",
    "ensure_rootfs",
    "ensure_tools",
    "leftovers",
    "skip_reason",
]

SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES: tuple[str, ...] = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "iproute2", "nftables", "sudo",
    "procps",  # ps/pgrep/pkill: tests look at processes on the hosts
    # The hosts have no route out, so what the roles install with apt must be there already:
    # libgomp1 (the llama.cpp binaries' OpenMP runtime), python3-apt (Ansible's apt module),
    # python3-venv (the proxy's virtualenv).
    "libgomp1", "python3-apt", "python3-venv",
)
# Bump when the customisation of the rootfs changes: a new key, a new cached tree.
RECIPE = 1
DEFAULT_PREFIX = "twh"
CONTROLLER_NAME = "tightwad-controller"
SSH_USER = "root"
SSH_COMMON_OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null")
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")


class HostsError(RuntimeError):
    """A rootfs could not be built or a host did not come up; the message says why."""


def log(message: str) -> None:
    print(f"[tightwad-hosts] {message}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float | None = 60,
         input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, input=input,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise HostsError(f"{shlex.join(str(c) for c in cmd)} failed ({proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


@contextlib.contextmanager
def _flock(path: Path, what: str, timeout: float | None = None) -> Iterator[None]:
    """The build module's process lock, with its timeout reported as a HostsError."""
    from tightwad.build import file_lock

    with contextlib.ExitStack() as stack:
        try:  # only the wait for the lock, not the body, may turn into a HostsError
            stack.enter_context(file_lock(path, what, timeout))
        except TimeoutError as exc:
            raise HostsError(str(exc)) from None
        yield


def _cache_dir(cache: Path | None) -> Path:
    if cache is not None:
        return Path(cache)
    from tightwad.build import default_cache_dir

    return default_cache_dir()


# --- can this machine run hosts? --------------------------------------------------------------


def skip_reason() -> str | None:
    """Why this machine cannot boot test hosts, or None when it can (tools may still be missing
    and are then installed by :func:`ensure_tools`)."""
    if not sys.platform.startswith("linux"):
        return "test hosts need Linux (network namespaces, systemd-nspawn)"
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, veths, systemd-nspawn)"
    for tool, package in (("ip", "iproute2"), ("ssh", "openssh-client"),
                          ("ssh-keygen", "openssh-client")):
        if shutil.which(tool) is None:
            return f"test hosts need {tool} ({package})"
    if not (shutil.which("systemd-nspawn") and shutil.which("debootstrap")) \
            and shutil.which("apt-get") is None:
        return "systemd-nspawn/debootstrap are missing and there is no apt-get to install them"
    try:
        if "overlay" not in Path("/proc/filesystems").read_text():
            return "the kernel has no overlayfs (systemd-nspawn --volatile=overlay needs it)"
    except OSError:
        return "cannot read /proc/filesystems"
    return None


_tools_lock = threading.Lock()


def ensure_tools() -> None:
    """Install systemd-nspawn and debootstrap with apt-get when they are missing."""
    with _tools_lock:
        if shutil.which("systemd-nspawn") and shutil.which("debootstrap"):
            return
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            raise HostsError("systemd-nspawn and debootstrap are needed: "
                             "apt-get install systemd-container debootstrap")
        log("installing systemd-container and debootstrap with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                     "systemd-container", "debootstrap"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if proc.returncode != 0:
                raise HostsError(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout)[-2000:]}")
        if not (shutil.which("systemd-nspawn") and shutil.which("debootstrap")):
            raise HostsError("apt-get ran but systemd-nspawn/debootstrap are still missing")


# --- the rootfs -------------------------------------------------------------------------------


def debian_mirror(suite: str = SUITE) -> str:
    """The Debian mirror this machine's own apt sources use for ``suite``.

    ``TIGHTWAD_DEBIAN_MIRROR`` overrides it. Reads deb822 ``*.sources`` files and one-line
    ``sources.list`` entries; skips -security/-updates suites and non-Debian archives.
    """
    if env := os.environ.get("TIGHTWAD_DEBIAN_MIRROR"):
        return env
    candidates: list[tuple[str, list[str]]] = []  # (uri, suites)
    root = Path("/etc/apt")
    files = [root / "sources.list", *sorted((root / "sources.list.d").glob("*.list")),
             *sorted((root / "sources.list.d").glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    candidates.append((uri, fields.get("suites", "").split()))
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(parts) >= 3 and parts[0] == "deb":
                    candidates.append((parts[1], [parts[2]]))
    for uri, suites in candidates:
        if suite in suites and "security" not in uri:
            return uri
    raise HostsError(f"no apt source for {suite} on this machine; set TIGHTWAD_DEBIAN_MIRROR")


def rootfs_key(packages: Sequence[str] = PACKAGES, suite: str = SUITE) -> str:
    blob = json.dumps({"suite": suite, "variant": VARIANT, "packages": sorted(packages),
                       "recipe": RECIPE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Rootfs:
    """A cached, ready-to-boot rootfs and the SSH key that logs into it as root."""

    dir: Path

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def key(self) -> Path:
        return self.dir / "ssh" / "id_ed25519"

    @property
    def meta(self) -> dict:
        return json.loads((self.dir / "meta.json").read_text())


def _cached(dest: Path) -> Rootfs | None:
    if (dest / "meta.json").is_file() and (dest / "rootfs" / "sbin" / "init").exists() \
            and (dest / "ssh" / "id_ed25519").is_file():
        return Rootfs(dest)
    return None


def ensure_rootfs(cache: Path | None = None, packages: Sequence[str] = PACKAGES,
                  suite: str = SUITE, mirror: str | None = None) -> Rootfs:
    """The cached rootfs for ``packages``, debootstrapped first if it is not there yet."""
    base = _cache_dir(cache) / "hosts"
    name = f"{suite}-{rootfs_key(packages, suite)}"
    dest = base / name
    if found := _cached(dest):
        return found
    ensure_tools()
    with _flock(_cache_dir(cache) / "locks" / f"hosts-{name}.lock", f"the {name} rootfs"):
        if found := _cached(dest):  # another session built it while we waited
            return found
        _remove_stale_builds(base, _cache_dir(cache) / "locks", name)
        tmp = base / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            meta = _build_rootfs(tmp, packages, suite, mirror or debian_mirror(suite))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            if dest.exists():  # an incomplete tree from an older recipe or a partial copy
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"rootfs ready in {dest} ({meta['build_seconds']:.0f} s)")
    return Rootfs(dest)


def _remove_stale_builds(base: Path, locks: Path, held: str) -> None:
    """Remove temporary trees of builders that died: those of ``held`` (we hold its lock) and
    those of other package lists whose lock nobody holds."""
    for stale in base.glob(".tmp-*"):
        name = stale.name[len(".tmp-"):].rsplit("-", 1)[0]
        if name == held:
            shutil.rmtree(stale, ignore_errors=True)
            continue
        with (locks / f"hosts-{name}.lock").open("a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being built right now
            shutil.rmtree(stale, ignore_errors=True)


def _build_rootfs(tmp: Path, packages: Sequence[str], suite: str, mirror: str) -> dict:
    rootfs = tmp / "rootfs"
    log_path = tmp / "debootstrap.log"
    log(f"debootstrapping {suite} ({VARIANT} + {', '.join(packages)}); "
        "a few minutes, once per package list")
    started = time.monotonic()
    with log_path.open("w") as fh:
        proc = subprocess.run(
            ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(packages)}",
             suite, str(rootfs), mirror],
            stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, timeout=1800,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if proc.returncode != 0:
        raise HostsError(f"debootstrap failed ({proc.returncode}):\n{_tail(log_path)}")
    debootstrap_seconds = time.monotonic() - started

    # Root logs in with a key made for this cache entry.
    (tmp / "ssh").mkdir(mode=0o700)
    key = tmp / "ssh" / "id_ed25519"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tightwad-test-hosts",
          "-f", str(key)])
    ssh_dir = rootfs / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    os.chmod(ssh_dir / "authorized_keys", 0o600)

    # sshd on boot (the package's postinst normally enables it already; make sure).
    wants = rootfs / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    if not (wants / "ssh.service").is_symlink():
        (wants / "ssh.service").symlink_to("/lib/systemd/system/ssh.service")
    if not list((rootfs / "etc" / "ssh").glob("ssh_host_*_key")):
        raise HostsError("openssh-server left no host keys in the rootfs")

    # Identity comes from the container: the hostname from nspawn's --hostname, a fresh
    # machine-id per boot. No resolver either: the test network has no route out.
    (rootfs / "etc" / "hostname").unlink(missing_ok=True)
    (rootfs / "etc" / "machine-id").write_text("")
    dbus_id = rootfs / "var" / "lib" / "dbus" / "machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
        dbus_id.symlink_to("/etc/machine-id")
    (rootfs / "etc" / "resolv.conf").unlink(missing_ok=True)
    (rootfs / "etc" / "resolv.conf").write_text("# test host: no resolver, no route out\n")
    (rootfs / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")

    # Nothing to fetch later without a route out; keep the tree small.
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / junk).glob("*"):
            if path.is_file():
                path.unlink()
    return {"suite": suite, "variant": VARIANT, "packages": list(packages), "recipe": RECIPE,
            "debootstrap_seconds": round(debootstrap_seconds, 1),
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# --- hosts ------------------------------------------------------------------------------------


@dataclass
class Host:
    """One booted container. ``run()`` executes a shell command on it over SSH as root."""

    name: str
    address: str
    netns: str
    veth: str
    key: Path
    log_path: Path
    popen: subprocess.Popen | None = None
    boot_seconds: float | None = None

    @property
    def ssh_options(self) -> list[str]:
        return ["-i", str(self.key), *SSH_COMMON_OPTIONS, "-o", "LogLevel=ERROR",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]

    @property
    def ssh_target(self) -> str:
        return f"{SSH_USER}@{self.address}"

    @property
    def ssh_args(self) -> list[str]:
        """``ssh`` with everything needed to log in; append a remote command."""
        return ["ssh", *self.ssh_options, self.ssh_target]

    def run(self, cmd: str | Sequence[str], *, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` (a shell string, or an argv that is quoted for the remote shell) as root
        on the host; raise :class:`HostsError` with stdout/stderr when it fails and ``check``."""
        remote = cmd if isinstance(cmd, str) else shlex.join(str(c) for c in cmd)
        proc = subprocess.run([*self.ssh_args, remote], capture_output=True, text=True,
                              input=input, timeout=timeout, check=False,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise HostsError(f"{self.name}: {remote!r} exited {proc.returncode}\n"
                             f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
        return proc

    @property
    def inventory_vars(self) -> dict[str, str]:
        """Host variables that let Ansible reach this host over SSH."""
        return {
            "ansible_host": self.address,
            "ansible_user": SSH_USER,
            "ansible_ssh_private_key_file": str(self.key),
            "ansible_ssh_common_args": " ".join(SSH_COMMON_OPTIONS),
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def _default_subnet(prefix: str) -> ipaddress.IPv4Network:
    third = zlib.crc32(prefix.encode()) % 200 + 20
    return ipaddress.IPv4Network(f"10.213.{third}.0/24")


def _netns_names() -> list[str]:
    proc = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _link_names() -> list[str]:
    proc = _run(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in proc.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def _nspawn_pids(prefix: str) -> list[int]:
    """systemd-nspawn processes whose network namespace belongs to ``prefix``."""
    marker = f"--network-namespace-path=/run/netns/{prefix}-".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"systemd-nspawn") and any(a.startswith(marker) for a in argv):
            pids.append(int(entry.name))
    return pids


def _netns_pids(netns: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill(pids: Sequence[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and not _is_zombie(p)]
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _cgroup_parents() -> list[Path]:
    """Where per-host cgroups go: our own cgroup in the cgroup2 hierarchy and, on a hybrid
    setup, in the name=systemd v1 hierarchy (the two systemd tracks processes with)."""
    mounts: dict[str, Path] = {}
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            fstype, _, options = post.split()[:3]
            if fstype == "cgroup2":
                mounts.setdefault("", Path(pre.split()[4]))
            elif fstype == "cgroup" and "name=systemd" in options.split(","):
                mounts.setdefault("name=systemd", Path(pre.split()[4]))
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            own[controllers] = path
    except (OSError, ValueError):
        return []
    return [mount / own[key].lstrip("/") for key, mount in mounts.items() if key in own]


CPU_PERIOD_US = 10_000
"""The CFS period of a host's CPU quota: short, so that a few milliseconds of work are slowed
evenly rather than stalled in bursts."""


def _cpu_parent() -> tuple[Path, str] | None:
    """Where a CPU-limited host cgroup goes and how it is limited: our own cgroup in the cgroup2
    hierarchy when it delegates the ``cpu`` controller (``cpu.max``), else in the v1 ``cpu``
    hierarchy (``cpu.cfs_quota_us``); None when neither is there."""
    try:
        own = {c: p for _, c, p in (line.split(":", 2) for line in
                                      Path("/proc/self/cgroup").read_text().splitlines())}
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except (OSError, ValueError):
        return None
    for line in mounts:
        pre, _, post = line.partition(" - ")
        fstype, _, options = post.split()[:3]
        mount = Path(pre.split()[4])
        if fstype == "cgroup2" and "" in own:
            parent = mount / own[""].lstrip("/")
            with contextlib.suppress(OSError):
                if "cpu" in (parent / "cgroup.subtree_control").read_text().split():
                    return parent, "v2"
    for line in mounts:
        pre, _, post = line.partition(" - ")
        fstype, _, options = post.split()[:3]
        if fstype == "cgroup" and "cpu" in options.split(","):
            key = next((c for c in own if "cpu" in c.split(",")), None)
            if key is not None:
                return Path(pre.split()[4]) / own[key].lstrip("/"), "v1"
    return None


def _cgroup_dirs(prefix: str) -> list[Path]:
    parents = _cgroup_parents()
    if (cpu := _cpu_parent()) is not None and cpu[0] not in parents:
        parents.append(cpu[0])
    return [d for parent in parents for d in parent.glob(f"tightwad-{prefix}-*") if d.is_dir()]


def _cgroup_pids(top: Path) -> list[int]:
    pids = []
    for procs in top.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def _remove_cgroup(top: Path) -> None:
    """rmdir a cgroup tree bottom-up (cgroup directories go with rmdir, never with unlink)."""
    for dirpath in sorted((p for p in top.rglob("*") if p.is_dir()),
                          key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            dirpath.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


def leftovers(prefix: str = DEFAULT_PREFIX) -> dict[str, list]:
    """What exists under ``prefix``: nspawn processes, namespaces, links. Empty lists when clean."""
    return {
        "nspawn": _nspawn_pids(prefix),
        "netns": [n for n in _netns_names() if n.startswith(f"{prefix}-")],
        "links": [n for n in _link_names() if n.startswith(f"{prefix}-")],
        "cgroups": [str(d) for d in _cgroup_dirs(prefix)],
    }


def cleanup_prefix(prefix: str = DEFAULT_PREFIX) -> dict[str, list]:
    """Remove every container, namespace, veth and bridge named under ``prefix``; return what was
    found. Only call it while holding the prefix's lock (:class:`HostGroup` does) or when you
    know no live run uses the prefix."""
    found = leftovers(prefix)
    victims = list(found["nspawn"])
    for ns in found["netns"]:
        victims += _netns_pids(ns)  # the containers' processes
    for cgroup in found["cgroups"]:
        victims += _cgroup_pids(Path(cgroup))  # the same, and any that left the namespace
    _kill(victims)
    _wait_gone(victims, 10)
    for cgroup in found["cgroups"]:
        _remove_cgroup(Path(cgroup))
    for ns in found["netns"]:
        _run(["ip", "netns", "delete", ns], check=False)
    for link in leftovers(prefix)["links"]:
        _run(["ip", "link", "delete", link], check=False)
    for path in Path("/run/systemd/nspawn/propagate").glob(f"{prefix}-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(tempfile.gettempdir()).glob(f"tightwad-hosts-{prefix}-*"):
        shutil.rmtree(path, ignore_errors=True)  # console logs of a run that did not close
    return found


@dataclass
class HostGroup:
    """Boots one container per name; ``close()`` tears everything down.

    ``prefix`` (at most 8 lowercase letters/digits) names every kernel object of the group and
    must differ between groups that run at the same time; the default /24 is derived from it.
    ``log_dir`` keeps the containers' console logs (a temporary directory, removed on close,
    when not given).
    """

    names: Sequence[str]
    prefix: str = DEFAULT_PREFIX
    subnet: str | None = None
    cache: Path | None = None
    log_dir: Path | None = None
    boot_timeout: float = 120.0
    stop_timeout: float = 10.0
    packages: Sequence[str] = PACKAGES
    cpu_quota: Mapping[str, float] = field(default_factory=dict)
    """Host name -> the share of one CPU its whole container may use (0.25: a quarter): a slow
    machine for placement tests (cgroup v2 ``cpu.max`` or the v1 CFS quota)."""
    hosts: dict[str, Host] = field(default_factory=dict, init=False)
    rootfs: Rootfs | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: 1-8 lowercase letters/digits, no '-'")
        names = list(self.names)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names in {names}")
        for name in names:
            if not _NAME_RE.match(name):
                raise ValueError(f"host name {name!r}: lowercase letters, digits, '-', <= 20")
        self.names = names
        if unknown := set(self.cpu_quota) - set(names):
            raise ValueError(f"cpu_quota for unknown hosts {sorted(unknown)}")
        net = ipaddress.IPv4Network(self.subnet) if self.subnet else _default_subnet(self.prefix)
        if net.num_addresses - 12 < len(names):
            raise ValueError(f"{net} is too small for {len(names)} hosts")
        self.network = net
        self.controller_address = str(net.network_address + 1)
        self.bridge = f"{self.prefix}-br"
        self._lock_cm: contextlib.AbstractContextManager | None = None
        self._own_log_dir = False
        self._closed = False
        self._old_sigterm: Any = None

    # -- the context manager

    def __enter__(self) -> HostGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    def __len__(self) -> int:
        return len(self.hosts)

    # -- start

    def start(self) -> HostGroup:
        if reason := skip_reason():
            raise HostsError(reason)
        self.rootfs = ensure_rootfs(self.cache, self.packages)
        lock = _cache_dir(self.cache) / "locks" / f"hosts-group-{self.prefix}.lock"
        self._lock_cm = _flock(lock, f"host prefix {self.prefix!r}", timeout=1800)
        self._lock_cm.__enter__()
        atexit.register(self.close)
        self._install_sigterm()
        try:
            if found := {k: v for k, v in cleanup_prefix(self.prefix).items() if v}:
                log(f"removed leftovers of an earlier run with prefix {self.prefix!r}: {found}")
            self._check_subnet_free()
            if self.log_dir is None:
                self.log_dir = Path(tempfile.mkdtemp(prefix=f"tightwad-hosts-{self.prefix}-"))
                self._own_log_dir = True
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._make_bridge()
            for index, name in enumerate(self.names):
                self._make_host(index, name)
            started = time.monotonic()
            for host in self.hosts.values():
                self._boot(host)
            # Not a `with` block: on Ctrl-C or an error, close() must not wait for the
            # other hosts' readiness checks; they end once their containers are gone.
            pool = concurrent.futures.ThreadPoolExecutor(max(1, len(self.hosts)))
            try:
                for future in [pool.submit(self._wait_ready, h, started)
                               for h in self.hosts.values()]:
                    future.result()
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
        except BaseException:
            self.close()
            raise
        return self

    def _check_subnet_free(self) -> None:
        proc = _run(["ip", "-4", "-o", "route", "show"], check=False)
        for line in proc.stdout.splitlines():
            dest = line.split()[0]
            if dest == "default":
                continue
            try:
                other = ipaddress.IPv4Network(dest, strict=False)
            except ValueError:
                continue
            if other.overlaps(self.network):
                raise HostsError(f"test subnet {self.network} overlaps a route on this machine "
                                 f"({line.strip()}); pass HostGroup(subnet=...)")

    def _make_bridge(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.controller_address}/{self.network.prefixlen}",
              "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])

    def _make_host(self, index: int, name: str) -> None:
        assert self.rootfs is not None and self.log_dir is not None
        netns, veth = f"{self.prefix}-{name}", f"{self.prefix}-{index}"
        address = str(self.network.network_address + 11 + index)
        _run(["ip", "netns", "add", netns])
        # Register the host before creating anything else, so close() removes what exists.
        self.hosts[name] = Host(name=name, address=address, netns=netns, veth=veth,
                                key=self.rootfs.key, log_path=self.log_dir / f"{name}.log")
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
              "netns", netns])
        _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        _run(["ip", "-n", netns, "addr", "add", f"{address}/{self.network.prefixlen}",
              "dev", "eth0"])
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        _run(["ip", "-n", netns, "link", "set", "eth0", "up"])

    def _boot(self, host: Host) -> None:
        assert self.rootfs is not None
        cmd = ["systemd-nspawn", "-D", str(self.rootfs.rootfs), "--boot", "--register=no",
               "--keep-unit", "--volatile=overlay",
               f"--network-namespace-path=/run/netns/{host.netns}",
               # nspawn keeps CAP_NET_ADMIN only with its own --private-network; hosts need it
               # for their firewall (nftables) and it only reaches the host's own namespace.
               "--capability=CAP_NET_ADMIN",
               f"--machine={host.netns}", f"--hostname={host.name}", "--console=read-only",
               "--link-journal=no", "--resolv-conf=off", "--settings=no"]
        # With --keep-unit, nspawn puts the container into "payload" under its OWN cgroup: start
        # each one in a cgroup of its own, or all containers share one cgroup tree and stopping
        # a unit on one host kills the same unit's processes on every other host.
        enter = []
        for parent in _cgroup_parents():
            cgroup = parent / f"tightwad-{host.netns}"
            cgroup.mkdir(exist_ok=True)
            enter.append(f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))}")
        if not enter:
            raise HostsError("no cgroup hierarchy found to give each container its own cgroup")
        if (quota := self.cpu_quota.get(host.name)) is not None:
            enter.append(f"echo $$ > {shlex.quote(str(self._limit_cpu(host, quota)))}")
        script = " && ".join(enter) + ' && exec "$@"'
        with host.log_path.open("w") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            host.popen = subprocess.Popen(["sh", "-c", script, "sh", *cmd],
                                          stdin=subprocess.DEVNULL, stdout=fh,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    def _limit_cpu(self, host: Host, quota: float) -> Path:
        """Make the host's CPU-limited cgroup; return its ``cgroup.procs``."""
        found = _cpu_parent()
        if found is None or quota <= 0:
            raise HostsError(f"host {host.name}: no cgroup cpu controller to limit it to "
                             f"{quota:g} of a CPU" if found is None else
                             f"host {host.name}: a CPU quota must be positive, not {quota:g}")
        parent, kind = found
        cgroup = parent / f"tightwad-{host.netns}"
        cgroup.mkdir(exist_ok=True)
        limit = max(1000, int(CPU_PERIOD_US * quota))
        if kind == "v2":
            (cgroup / "cpu.max").write_text(f"{limit} {CPU_PERIOD_US}")
        else:
            (cgroup / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (cgroup / "cpu.cfs_quota_us").write_text(str(limit))
        return cgroup / "cgroup.procs"

    def _hosts_file(self) -> str:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"{self.controller_address}\t{CONTROLLER_NAME}"]
        lines += [f"{h.address}\t{h.name}" for h in self.hosts.values()]
        return "\n".join(lines) + "\n"

    def _wait_ready(self, host: Host, started: float) -> None:
        """sshd answers, then boot has finished (running or degraded); write /etc/hosts."""
        deadline = started + self.boot_timeout

        def fail(why: str) -> HostsError:
            return HostsError(f"host {host.name} ({host.address}) {why}; console log "
                              f"{host.log_path}:\n{host.log_tail()}")

        while True:
            if not host.alive():
                raise fail(f"systemd-nspawn exited ({host.popen.returncode if host.popen else '?'})")
            # The deadline first, so that it is strict (the boot phase below always gets 5 s).
            if time.monotonic() > deadline:
                raise fail(f"no sshd after {self.boot_timeout:.0f} s")
            try:
                with socket.create_connection((host.address, 22), timeout=1):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        script = ("cat > /etc/hosts; state=$(timeout {t} systemctl is-system-running --wait); "
                  "echo \"$state\"; case $state in running|degraded) exit 0;; esac; "
                  "systemctl --failed --no-legend; exit 1")
        while True:
            remaining = max(5.0, deadline - time.monotonic())
            proc = host.run(script.format(t=int(remaining)), check=False, timeout=remaining + 10,
                            input=self._hosts_file())
            if proc.returncode == 0:
                break
            if not host.alive():
                raise fail("stopped while booting")
            if proc.returncode != 255 or time.monotonic() > deadline:  # 255: ssh itself failed
                raise fail(f"did not finish booting: {proc.stdout.strip()} {proc.stderr.strip()}")
            time.sleep(0.5)
        host.boot_seconds = round(time.monotonic() - started, 2)
        state = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else "?"
        log(f"{host.name} up at {host.address} in {host.boot_seconds:.1f} s ({state})")

    # -- inventory

    def inventory(self, groups: Mapping[str, Sequence[str]] | None = None) -> dict:
        """An Ansible YAML inventory (as a dict): every host under ``all`` with its connection
        variables, plus ``groups`` (group name -> host names) as children."""
        inv: dict[str, Any] = {"all": {"hosts": {h.name: h.inventory_vars
                                                 for h in self.hosts.values()}}}
        if groups:
            for group, members in groups.items():
                unknown = set(members) - set(self.hosts)
                if unknown:
                    raise ValueError(f"group {group}: unknown hosts {sorted(unknown)}")
            inv["all"]["children"] = {g: {"hosts": dict.fromkeys(members)}
                                      for g, members in groups.items()}
        return inv

    def inventory_yaml(self, groups: Mapping[str, Sequence[str]] | None = None) -> str:
        import yaml

        return yaml.safe_dump(self.inventory(groups), sort_keys=False, default_flow_style=False)

    def write_inventory(self, path: Path, groups: Mapping[str, Sequence[str]] | None = None) -> Path:
        path = Path(path)
        path.write_text(self.inventory_yaml(groups))
        return path

    # -- teardown

    def close(self) -> None:
        """Stop every container and remove every namespace, veth and the bridge. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            running = [h for h in self.hosts.values() if h.alive()]
            for host in running:  # orderly halt first: nspawn passes SIGTERM on as a halt
                with contextlib.suppress(ProcessLookupError):
                    os.kill(host.popen.pid, signal.SIGTERM)  # type: ignore[union-attr]
            deadline = time.monotonic() + self.stop_timeout
            for host in running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.popen.wait(max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
            for host in self.hosts.values():
                victims = _netns_pids(host.netns)
                if host.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(host.popen.pid, signal.SIGKILL)  # type: ignore[union-attr]
                _kill(victims)
                if host.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        host.popen.wait(10)
                _wait_gone(victims, 10)
            # Everything named under the prefix: the group's namespaces, veths, the bridge.
            cleanup_prefix(self.prefix)
        finally:
            if self._lock_cm is not None:
                self._lock_cm.__exit__(None, None, None)
                self._lock_cm = None
            self._restore_sigterm()
            with contextlib.suppress(Exception):
                atexit.unregister(self.close)
            if self._own_log_dir and self.log_dir is not None:
                shutil.rmtree(self.log_dir, ignore_errors=True)

    def _install_sigterm(self) -> None:
        """Turn SIGTERM into SystemExit while the group is up, so teardown runs (a CI timeout
        usually sends SIGTERM). Only from the main thread and only over the default handler."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def handler(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        self._old_sigterm = signal.signal(signal.SIGTERM, handler)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
