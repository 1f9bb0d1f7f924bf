"""A pool of local processes on loopback: the demo's pool, kept running between commands.

``tightwad start --local`` launches RPC workers, a pooled coordinator, a drafter and the proxy
exactly as ``python -m tightwad.pool.demo`` does (:func:`launch` is shared), detaches them, and
records them in a state file (``<cache>/local/state.json``, written atomically). ``stop``
signals only the PIDs recorded there, after checking each is still the process that was started
(its start time in ``/proc``), so a recycled PID is never killed.

With a link profile (``--link wifi``) every worker gets a relay process of its own
(:mod:`tightwad.pool.linkemu`) that emulates that link, and the coordinator's ``--rpc`` names the
relays: pooling then pays a network's latency and bandwidth, as it does between real machines.
The profile is recorded in the state (``link``) so that every output can say the link is emulated.
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
from tightwad.pool import placement, probe, rpcproto
from tightwad.pool.linkemu import PROFILES, get_profile
from tightwad.pool.procs import HttpService, LlamaServer, ProcessGroup, RpcWorker

STATE_VERSION = 1


class LocalPoolError(RuntimeError):
    """A local pool operation failed; the message says what to do."""


@dataclass
class Service:
    name: str
    kind: str  # rpc | link | coordinator | drafter | proxy
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
    # The emulated link between the coordinator and each worker (a linkemu profile name);
    # None: direct loopback. State files written before links existed have no such key.
    link: str | None = None

    def by_kind(self, kind: str) -> list[Service]:
        return [s for s in self.services if s.kind == kind]

    def one(self, kind: str) -> Service | None:
        found = self.by_kind(kind)
        return found[0] if found else None

    def rpc_endpoints(self) -> list[str]:
        """What the coordinator's ``--rpc`` names: the link relays if any, else the workers."""
        return [f"{s.host}:{s.port}" for s in (self.by_kind("link") or self.by_kind("rpc"))]


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
    link: str | None = None  # a linkemu profile: one relay process per worker; None: direct


@dataclass
class Launched:
    workers: list[RpcWorker]
    coordinator: LlamaServer
    drafter: LlamaServer | None
    proxy: HttpService
    # emulated links: one in front of each worker, then one in front of each peer port
    links: list[RpcWorker] = field(default_factory=list)


def link_choice(name: str | None) -> str | None:
    """A ``--link`` value as stored: a profile name, or None for direct loopback ("none" too:
    an emulated link without delay would only add a relay's overhead)."""
    if name is None or name == "none":
        return None
    get_profile(name)  # ValueError naming the choices
    return name


LINK_CHOICES = tuple(PROFILES)


def link_label(link: str | None) -> str:
    """How every output names the link: emulated (with its numbers) or direct."""
    if link is None:
        return "direct (loopback: no network delay or bandwidth limit)"
    try:
        p = get_profile(link)
    except ValueError:
        return f"{link} (emulated, unknown profile)"
    bandwidth = ("unlimited bandwidth" if p.bandwidth_bps is None
                 else f"{p.bandwidth_bps / 1e6:g} Mbit/s each way")
    return (f"{p.name} (emulated: {p.rtt_s * 1e3:g} ms RTT, jitter +-{p.jitter_s * 1e3:g} ms, "
            f"{bandwidth})")


def coordinator_args(verify_max_tokens: int = defaults.VERIFY_MAX_TOKENS) -> list[str]:
    # -lv 4 puts the load report (model buffers per device) into the log: the live split.
    # The pool settings (defaults.LLAMA_SERVER_ARGS) come with ProcessGroup.llama_server, for
    # the drafter too.
    return ["--verify-max-tokens", str(verify_max_tokens), *defaults.COORDINATOR_ARGS, "-lv", "4"]


def local_split(spec: LaunchSpec, workers: Sequence[RpcWorker]) -> placement.Placement:
    """The split of the one placement rule (:func:`tightwad.pool.placement.place`), memory-
    proportional: every local worker shares this machine's cores, so a speed-aware split would
    put every layer on one of them, and the local pool is there to show pooling. Each worker
    is asked its free memory (RPC hello) before the coordinator connects to it."""
    devices = [placement.Device(w.name, rpcproto.hello(w.host, w.port, timeout=5).free_memory)
               for w in workers]
    return placement.place(probe.model_shape(spec.model, spec.ctx), devices,
                           mode="memory")


def launch(group: ProcessGroup, spec: LaunchSpec) -> Launched:
    """Start workers, the pooled coordinator, the drafter and the proxy; wait until healthy."""
    # Workers pass hidden states to each other (their peer ports), as a deployed pool does.
    workers = [group.rpc_worker(name=f"worker{i}", port=port, cache=True, peer=True)
               for i, port in enumerate(spec.worker_ports)]
    links, peer_links = [], []
    if spec.link is not None:  # every link emulated: to each worker, and into each peer port
        links = [group.link_relay(w, spec.link, name=f"link{i}") for i, w in enumerate(workers)]
        peer_links = [group.link_relay(w, spec.link, name=f"peer-link{i}", peer=True)
                      for i, w in enumerate(workers)]
    rpc = links or workers
    peers = {r.endpoint: p.endpoint for r, p in zip(links, peer_links)} if links else None
    coordinator = group.llama_server(spec.model, name="coordinator", rpc=rpc, peers=peers,
                                     port=spec.coordinator_port, slots=spec.slots, ctx=spec.ctx,
                                     args=[*coordinator_args(), "--tensor-split",
                                           local_split(spec, workers).tensor_split])
    drafter = None
    if spec.draft is not None:
        drafter = group.llama_server(spec.draft, name="drafter", port=spec.drafter_port,
                                     slots=spec.slots, ctx=spec.ctx)
    proxy = group.tightwad_proxy(target=coordinator, drafter=drafter, slots=spec.slots,
                                 port=spec.proxy_port, mode="remote" if drafter else "off",
                                 env=spec.proxy_env)
    return Launched(workers, coordinator, drafter, proxy, [*links, *peer_links])


def services_of(launched: Launched) -> list[Service]:
    """The state's services, in start order (``stop`` ends them in reverse: proxy first)."""
    services = [service_from(w, "rpc") for w in launched.workers]
    services += [service_from(r, "link") for r in launched.links]
    services.append(service_from(launched.coordinator, "coordinator"))
    if launched.drafter is not None:
        services.append(service_from(launched.drafter, "drafter"))
    services.append(service_from(launched.proxy, "proxy"))
    return services


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
