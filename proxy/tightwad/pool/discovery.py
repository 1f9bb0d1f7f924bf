"""Find what a pool can be made of: RPC workers, llama-servers, Tightwad proxies, SSH hosts.

Every probe has a timeout and the number of probes in flight is bounded, so a /24 takes
seconds and a dead address costs one timeout. RPC workers are identified with the protocol's
HELLO (:mod:`tightwad.pool.rpcproto`), which never harms a worker that is serving a coordinator: it
is reported as busy. HTTP services are identified by ``/health``, ``/props`` (llama-server:
model, slots, build; read by :mod:`tightwad.llamaserver.wire`) and ``/tightwad/status`` (the
proxy), through the blocking client (:mod:`tightwad.llamaserver.blocking`).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tightwad import defaults
from tightwad.llamaserver import blocking, wire
from tightwad.pool import rpcproto

DEFAULT_RPC_PORTS = defaults.DISCOVERY_RPC_PORTS
DEFAULT_HTTP_PORTS = defaults.DISCOVERY_HTTP_PORTS
SSH_PORT = 22
MAX_HOSTS = 4096


class DiscoveryError(ValueError):
    """Bad scan input (a network too large, an unparsable port list)."""


@dataclass
class RpcFinding:
    port: int
    state: str
    """ok (answered HELLO), busy (accepted, no answer: serving another client), silent (the
    handshake itself timed out while other ports refuse: a busy worker with a full backlog),
    not-rpc."""
    hello: rpcproto.Hello | None = None
    detail: str = ""


@dataclass
class HttpFinding:
    port: int
    kind: str
    """llama-server, tightwad-proxy or http (something else answering HTTP)."""
    healthy: bool = False
    model: str | None = None
    slots: int | None = None
    build: str | None = None
    n_ctx: int | None = None
    detail: str = ""


@dataclass
class HostFinding:
    address: str
    rpc: list[RpcFinding] = field(default_factory=list)
    http: list[HttpFinding] = field(default_factory=list)
    ssh: str | None = None
    """The SSH banner when port 22 answered one."""

    @property
    def interesting(self) -> bool:
        return bool(self.rpc or self.http or self.ssh)

    def service(self, kind: str) -> list[HttpFinding]:
        return [h for h in self.http if h.kind == kind]


def parse_ports(text: str) -> list[int]:
    """``50052,50060-50062`` -> [50052, 50060, 50061, 50062]."""
    ports: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo or hi - lo > 1000:
                    raise ValueError
                ports.extend(range(lo, hi + 1))
            else:
                ports.append(int(part))
        except ValueError:
            raise DiscoveryError(f"bad port list {text!r}; use e.g. 50052,50053 or 50052-50055") \
                from None
    if not all(1 <= p <= 65535 for p in ports):
        raise DiscoveryError(f"ports must be 1-65535: {text!r}")
    return list(dict.fromkeys(ports))


def expand(targets: Iterable[str]) -> list[str]:
    """Addresses of CIDRs / single addresses (network and broadcast addresses left out)."""
    out: list[str] = []
    for target in targets:
        try:
            net = ipaddress.ip_network(target, strict=False)
        except ValueError:
            raise DiscoveryError(f"{target!r} is not an address or CIDR (e.g. 192.168.1.0/24)") \
                from None
        if net.num_addresses > MAX_HOSTS:
            raise DiscoveryError(f"{target} has {net.num_addresses} addresses; scan at most "
                                 f"{MAX_HOSTS} (a /20) at a time")
        hosts = [net.network_address] if net.num_addresses == 1 else list(net.hosts())
        out.extend(str(h) for h in hosts)
    return list(dict.fromkeys(out))


def local_networks(include_loopback: bool = False) -> list[str]:
    """The IPv4 networks of this machine's interfaces (``ip -j addr``), as CIDRs."""
    try:
        raw = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                             timeout=5, check=True).stdout
        links = json.loads(raw)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return ["127.0.0.1/32"] if include_loopback else []
    nets: list[str] = []
    for link in links:
        for addr in link.get("addr_info", []):
            if addr.get("family") != "inet":
                continue
            net = ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", strict=False)
            if net.is_loopback and not include_loopback:
                continue
            if net.is_loopback:
                net = ipaddress.ip_network("127.0.0.1/32")
            # Big corporate / container networks: scan the /24 around this host only.
            if net.prefixlen < 20:
                net = ipaddress.ip_network(f"{addr['local']}/24", strict=False)
            nets.append(str(net))
    return list(dict.fromkeys(nets))


def local_addresses() -> set[str]:
    """Every IPv4 address of this machine (to tell "this host" from the others)."""
    found = {"127.0.0.1"}
    try:
        raw = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                             timeout=5, check=True).stdout
        for link in json.loads(raw):
            found.update(a["local"] for a in link.get("addr_info", []) if "local" in a)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, KeyError):
        pass
    return found


def tcp_connect_time(host: str, port: int, timeout: float = 0.5) -> float | None:
    """Seconds a TCP handshake took, or None. Sends nothing (safe on a serving worker)."""
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return time.monotonic() - started
    except OSError:
        return None


def refuses_connections(host: str, timeout: float = 0.5, port: int = 1) -> bool:
    """Does ``host`` answer a closed port with a reset (rather than dropping the handshake)?
    Port 1 (tcpmux) is closed nearly everywhere."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def ssh_banner(host: str, port: int = SSH_PORT, timeout: float = 0.5) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout * 2)
            line = sock.recv(256).split(b"\n", 1)[0].strip()
    except OSError:
        return None
    text = line.decode("ascii", "replace")
    return text if text.startswith("SSH-") else None


def identify_http(host: str, port: int, timeout: float = 2.0) -> HttpFinding | None:
    """What serves HTTP on ``host:port`` (None: nothing, or not HTTP)."""
    base = f"http://{host}:{port}"
    status = blocking.probe(f"{base}/health", timeout=timeout).status
    if status == 0:
        return None
    healthy = status == 200
    answer = blocking.probe(f"{base}/tightwad/status", timeout=timeout)
    code, tw = answer.status, answer.body
    if code == 401 and wire.is_key_refusal(tw):  # a llama-server behind its API key
        return HttpFinding(port, "llama-server", healthy, detail="needs its API key")
    if code in (200, 401) and (code == 401 or (isinstance(tw, dict) and "mode" in tw)):
        finding = HttpFinding(port, "tightwad-proxy", healthy)
        if isinstance(tw, dict):
            target = tw.get("target") or {}
            finding.model = target.get("model")
            finding.slots = target.get("slots")
            finding.detail = f"mode {tw.get('mode')}"
        else:
            finding.detail = "needs a token"
        return finding
    answer = blocking.probe(f"{base}/props", timeout=timeout)
    if answer.status == 200 and wire.is_props(answer.body):
        try:
            props = wire.parse_props(answer.body, None)
        except (TypeError, ValueError):
            return HttpFinding(port, "http", healthy, detail="unreadable /props")
        return HttpFinding(port, "llama-server", healthy, model=props.model_path or None,
                           slots=props.total_slots, build=props.build_info or None,
                           n_ctx=props.n_ctx or None)
    return HttpFinding(port, "http", healthy, detail=f"HTTP {status} on /health")


def probe_rpc(host: str, port: int, timeout: float = 1.0,
              connect_timeout: float | None = None) -> RpcFinding | None:
    try:
        hello = rpcproto.hello(host, port, timeout=timeout, connect_timeout=connect_timeout)
    except rpcproto.Silent as exc:
        return RpcFinding(port, "silent", detail=str(exc))
    except rpcproto.Unreachable:
        return RpcFinding(port, "refused")
    except rpcproto.Busy as exc:
        return RpcFinding(port, "busy", detail=str(exc))
    except rpcproto.NotRpc as exc:
        return RpcFinding(port, "not-rpc", detail=str(exc))
    return RpcFinding(port, "ok", hello)


def scan(addresses: Sequence[str], *, rpc_ports: Sequence[int] = DEFAULT_RPC_PORTS,
         http_ports: Sequence[int] = DEFAULT_HTTP_PORTS, ssh_port: int | None = SSH_PORT,
         connect_timeout: float = 0.4, rpc_timeout: float = 1.0, http_timeout: float = 2.0,
         concurrency: int = 64,
         progress: Callable[[int, int], None] | None = None) -> list[HostFinding]:
    """Probe every (address, port); returns the hosts where something answered, in order.

    Two stages, both bounded by ``concurrency``: plain TCP connects find open ports (sending
    nothing), then only open ports get the protocol probes. RPC ports are never connected to
    twice without need: a worker's listen backlog is tiny.
    """
    jobs: list[tuple[str, str, int]] = []
    for addr in addresses:
        jobs += [("http", addr, p) for p in http_ports]
        jobs += [("rpc", addr, p) for p in rpc_ports]
        if ssh_port:
            jobs.append(("ssh", addr, ssh_port))
    results: dict[str, HostFinding] = {a: HostFinding(a) for a in addresses}
    done = 0

    def run(job: tuple[str, str, int]) -> tuple[tuple[str, str, int], Any]:
        kind, addr, port = job
        if kind == "rpc":
            # HELLO does its own connect: a busy worker's backlog sees one connection only.
            return job, probe_rpc(addr, port, rpc_timeout, connect_timeout)
        if kind == "ssh":
            return job, ssh_banner(addr, port, connect_timeout)
        if tcp_connect_time(addr, port, connect_timeout) is None:
            return job, None
        return job, identify_http(addr, port, http_timeout)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for (kind, addr, _port), found in pool.map(run, jobs):
            done += 1
            if progress:
                progress(done, len(jobs))
            if found is None:
                continue
            host = results[addr]
            if kind == "rpc":
                host.rpc.append(found)
            elif kind == "http":
                host.http.append(found)
            else:
                host.ssh = found
    for host in results.values():
        # A port that ignores the handshake on a host that refuses closed ports is a listening
        # socket with a full backlog: a busy worker. Where everything is silent (a dropping
        # firewall, or no machine at all) nothing can be told.
        silent = any(r.state == "silent" for r in host.rpc)
        refuses = any(r.state == "refused" for r in host.rpc) or (
            silent and refuses_connections(host.address, connect_timeout))
        host.rpc = [r for r in host.rpc
                    if r.state not in ("refused", "silent") or (r.state == "silent" and refuses)]
        for r in host.rpc:
            if r.state == "silent":
                r.detail = ("ignores new connections: a worker serving a coordinator (its "
                            "one-client backlog is full)")
    return [h for h in results.values() if h.interesting]
