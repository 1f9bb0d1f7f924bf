"""A pool of local processes on loopback: the demo's pool, kept running between commands.

``tightwad start --local`` launches RPC workers, a pooled coordinator, a drafter and the proxy
exactly as ``python -m tightwad.pool.demo`` does (:func:`launch` is shared), detaches them, and
records them in a state file (``<cache>/local/state.json``, written atomically). ``stop``
signals only the PIDs recorded there, after checking each is still the process that was started
(its start time in ``/proc``), so a recycled PID is never killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tightwad import build as llama_build
from tightwad import defaults
from tightwad.llamaserver import blocking, wire
from tightwad.llamaserver.wire import UpstreamFailure
from tightwad.pool.procs import HttpService, LlamaServer, ProcessGroup, RpcWorker

STATE_VERSION = 1


class LocalPoolError(RuntimeError):
    """A local pool operation failed; the message says what to do."""


@dataclass
class Service:
    name: str
    kind: str  # rpc | coordinator | drafter | proxy
    host: str
    port: int
    pid: int
    started: int | None  # /proc/<pid>/stat start time (clock ticks since boot)
    log: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class LocalState:
    bin_dir: str
    log_dir: str
    model: str
    draft: str | None
    ctx: int
    slots: int
    services: list[Service] = field(default_factory=list)
    version: int = STATE_VERSION

    def by_kind(self, kind: str) -> list[Service]:
        return [s for s in self.services if s.kind == kind]

    def one(self, kind: str) -> Service | None:
        found = self.by_kind(kind)
        return found[0] if found else None


@dataclass
class LaunchSpec:
    """What :func:`launch` starts (the demo and ``start --local`` share it)."""

    model: Path
    draft: Path | None
    worker_ports: Sequence[int] = defaults.LOCAL_WORKER_PORTS
    coordinator_port: int = defaults.COORDINATOR_PORT
    drafter_port: int = defaults.DRAFTER_PORT
    proxy_port: int = defaults.PROXY_PORT
    slots: int = defaults.SLOTS
    ctx: int = defaults.LOCAL_CTX_SIZE
    proxy_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Launched:
    workers: list[RpcWorker]
    coordinator: LlamaServer
    drafter: LlamaServer | None
    proxy: HttpService


def coordinator_args(verify_max_tokens: int = defaults.VERIFY_MAX_TOKENS) -> list[str]:
    # -lv 4 puts the load report (model buffers per device) into the log: the live split.
    # The pool settings (defaults.LLAMA_SERVER_ARGS) come with ProcessGroup.llama_server, for
    # the drafter too.
    return ["--verify-max-tokens", str(verify_max_tokens), *defaults.COORDINATOR_ARGS, "-lv", "4"]


def launch(group: ProcessGroup, spec: LaunchSpec) -> Launched:
    """Start workers, the pooled coordinator, the drafter and the proxy; wait until healthy."""
    workers = [group.rpc_worker(name=f"worker{i}", port=port, cache=True)
               for i, port in enumerate(spec.worker_ports)]
    coordinator = group.llama_server(spec.model, name="coordinator", rpc=workers,
                                     port=spec.coordinator_port, slots=spec.slots, ctx=spec.ctx,
                                     args=coordinator_args())
    drafter = None
    if spec.draft is not None:
        drafter = group.llama_server(spec.draft, name="drafter", port=spec.drafter_port,
                                     slots=spec.slots, ctx=spec.ctx)
    proxy = group.tightwad_proxy(target=coordinator, drafter=drafter, slots=spec.slots,
                                 port=spec.proxy_port, mode="remote" if drafter else "off",
                                 env=spec.proxy_env)
    return Launched(workers, coordinator, drafter, proxy)


# --- state -----------------------------------------------------------------------------------


def state_dir(override: Path | None = None) -> Path:
    if override is not None:
        return Path(override)
    if env := os.environ.get("TIGHTWAD_STATE_DIR"):
        return Path(env)
    return llama_build.default_cache_dir() / "local"


def state_path(directory: Path) -> Path:
    return directory / "state.json"


def load_state(directory: Path) -> LocalState | None:
    path = state_path(directory)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise LocalPoolError(f"{path} is unreadable ({exc}); remove it if no pool runs") \
            from None
    if raw.get("version") != STATE_VERSION:
        raise LocalPoolError(f"{path} was written by another tightwad version; stop that "
                             "pool with it, or remove the file")
    services = [Service(**s) for s in raw.pop("services", [])]
    return LocalState(**raw, services=services)


def save_state(directory: Path, state: LocalState) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(state), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, state_path(directory))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def clear_state(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(directory).unlink()


# --- processes -------------------------------------------------------------------------------


def start_ticks(pid: int) -> int | None:
    """The process's start time (field 22 of /proc/PID/stat), or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie is not running
        return None
    return int(fields[19])


def alive(svc: Service) -> bool:
    """Running, and the same process that was started (not a recycled PID)."""
    ticks = start_ticks(svc.pid)
    return ticks is not None and (svc.started is None or ticks == svc.started)


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this machine (/proc/net/tcp*): no connection is made,
    which matters for RPC workers (one client at a time, a tiny listen backlog)."""
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def signal_and_wait(svc: Service, grace: float = 10.0) -> str:
    """SIGTERM, then SIGKILL after ``grace`` s; only if the PID is still the one we started."""
    if not alive(svc):
        return "not running"
    with contextlib.suppress(ProcessLookupError):
        os.kill(svc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(svc) and time.monotonic() < deadline:
        _reap(svc.pid)
        time.sleep(0.05)
    if alive(svc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(svc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while alive(svc) and time.monotonic() < deadline:
            _reap(svc.pid)
            time.sleep(0.05)
        return "killed"
    return "stopped"


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our own child (the same CLI process)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def service_from(proc: Any, kind: str) -> Service:
    return Service(name=proc.name, kind=kind, host=proc.host, port=proc.port, pid=proc.pid,
                   started=start_ticks(proc.pid), log=str(proc.log_path), args=list(proc.args))


# --- observations and operations on the running pool -------------------------------------


def live_split(coordinator: Service) -> list[wire.ModelBuffer]:
    """The weights per device the running coordinator loaded: its log's last load report
    (``-lv 4``, see :func:`coordinator_args`); empty when the log is gone."""
    try:
        text = Path(coordinator.log).read_text(errors="replace")
    except OSError:
        return []
    return wire.parse_load_report(text)


def wait_idle(url: str, timeout: float) -> None:
    """Wait until no slot of the llama-server at ``url`` is processing (at most ``timeout`` s).
    Returns at once when ``/slots`` does not answer: nothing to wait for then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            slots = wire.parse_slots(blocking.get_json(f"{url}/slots", timeout=3))
        except UpstreamFailure:
            return
        if not any(s.processing for s in slots):
            return
        time.sleep(0.2)


def nudge_proxy(proxy_url: str) -> None:
    """Make the proxy re-read its coordinator (model, vocabulary, verify limit) now.

    The proxy re-reads the target after a request finds it unreachable, or on its own within
    target.recheck_s; a one-token request while the coordinator is down makes it happen now
    (it gets a 503, which is the point)."""
    try:
        blocking.request("POST", f"{proxy_url}/v1/completions", {"prompt": "x", "max_tokens": 1},
                         timeout=10)
    except UpstreamFailure:
        pass
