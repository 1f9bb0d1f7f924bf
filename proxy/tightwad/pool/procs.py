"""Start real llama.cpp processes on loopback, wait until they serve, and always tear them down.

Used by the test fixtures and the local demo pool. Every process gets a free port, its own log
file and its own process group; ``ProcessGroup.close()`` stops them all (SIGTERM, then SIGKILL),
also when a test fails or the demo is interrupted. Every llama-server runs with the pool's
settings (``tightwad.defaults.LLAMA_SERVER_ARGS``), as a deployed one does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tightwad import defaults
from tightwad.llamaserver import blocking

LOOPBACK = "127.0.0.1"


class ProcessFailed(RuntimeError):
    """A process exited or never became ready; the message carries the tail of its log."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Plain TCP reachability. Never speaks RPC: a worker serves one client at a time."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Proc:
    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def fail(self, why: str) -> ProcessFailed:
        return ProcessFailed(f"{self.name} {why}; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; return the exit code."""
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(10)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled plug would."""
        self._signal(signal.SIGKILL)
        self.popen.wait(10)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass


@dataclass
class RpcWorker(Proc):
    host: str = LOOPBACK
    port: int = 0
    peer_port: int = 0  # where it takes tensors pushed by other workers (--peer); 0: none

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def peer(self) -> str:
        return f"{self.host}:{self.peer_port}" if self.peer_port else ""


def peers_env(peers: Mapping[str, str]) -> dict[str, str]:
    """The coordinator's environment for worker-to-worker transfers (patch 0007): each worker
    endpoint as its ``--rpc`` names it, and the endpoint where that worker takes tensors pushed
    by the others. A copy between two workers named here skips the coordinator."""
    return {"GGML_RPC_PEERS": ",".join(f"{w}={p}" for w, p in peers.items())} if peers else {}


@dataclass
class HttpService(Proc):
    """A process serving HTTP: llama-server, or the tightwad proxy. Its calls go through the
    blocking client (:mod:`tightwad.llamaserver.blocking`) and fail as it does."""

    host: str = LOOPBACK
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def post_raw(self, path: str, body: Any, timeout: float = 60) -> tuple[int, Any]:
        """(status, JSON or text) whatever the status."""
        answer = blocking.request("POST", self.url + path, body, timeout=timeout)
        return answer.status, answer.body

    def post(self, path: str, body: Any, timeout: float = 60) -> Any:
        """The JSON answer; any other status raises :class:`~tightwad.llamaserver.wire.UpstreamError`."""
        return blocking.post_json(self.url + path, body, timeout=timeout)

    def get(self, path: str, timeout: float = 30) -> Any:
        return blocking.get_json(self.url + path, timeout=timeout)

    def healthy(self) -> bool:
        return blocking.ok(self.url + "/health", timeout=2)


@dataclass
class LlamaServer(HttpService):
    model: Path | None = None


@dataclass
class ProcessGroup:
    """Owns every process it starts; ``close()`` (or leaving the ``with`` block) stops them all."""

    bin_dir: Path
    log_dir: Path
    threads: int = 1
    procs: list[Proc] = field(default_factory=list)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, cls: type, name: str, args: Sequence[object], env: dict | None = None,
               **attrs: Any) -> Any:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("w") as log_fh:
            popen = subprocess.Popen(
                [str(a) for a in args], stdin=subprocess.DEVNULL, stdout=log_fh,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        proc = cls(name=name, args=[str(a) for a in args], log_path=log_path, popen=popen,
                   **attrs)
        self.procs.append(proc)
        return proc

    def _unique(self, base: str) -> str:
        taken = {p.name for p in self.procs}
        if base not in taken:
            return base
        return next(f"{base}-{i}" for i in range(2, 10_000) if f"{base}-{i}" not in taken)

    def rpc_worker(self, *, name: str | None = None, port: int | None = None,
                   host: str = LOOPBACK, cache: bool = False, args: Sequence[str] = (),
                   timeout: float = 30, cache_dir: Path | None = None,
                   peer: bool = False) -> RpcWorker:
        """Start ``ggml-rpc-server`` and wait until its port accepts connections.
        ``cache_dir``: where its tensor cache (``--cache``) lives, e.g. to restart a worker
        with the cache of its predecessor (default: a directory of its own in the log dir).
        ``peer``: also listen on a port of its own for tensors pushed by other workers."""
        port = port or free_port(host)
        peer_port = free_port(host) if peer else 0
        name = self._unique(name or "rpc-worker")
        cmd = [self.bin_dir / "ggml-rpc-server", "--host", host, "--port", str(port),
               "--threads", str(self.threads), *(["--cache"] if cache else []),
               *(["--peer", f"{host}:{peer_port}"] if peer else []), *args]
        # The tensor cache (-c) lives under LLAMA_CACHE: keep it inside the log dir.
        env = {"LLAMA_CACHE": str(cache_dir or self.log_dir / f"{name}.cache")}
        worker: RpcWorker = self._spawn(RpcWorker, name, cmd, env, host=host, port=port,
                                        peer_port=peer_port)
        deadline = time.monotonic() + timeout
        # up once both listen (the peer port binds just after the RPC port)
        while not (tcp_open(host, port) and (not peer or tcp_open(host, peer_port))):
            if not worker.alive():
                raise worker.fail(f"exited with code {worker.popen.returncode}")
            if time.monotonic() > deadline:
                raise worker.fail(f"did not listen on {host}:{port} within {timeout:.0f} s")
            time.sleep(0.05)
        return worker

    def link_relay(self, upstream: RpcWorker, profile: str, *, name: str | None = None,
                   port: int | None = None, timeout: float = 30,
                   peer: bool = False) -> RpcWorker:
        """Start an emulated link (``python -m tightwad.pool.linkemu``, in a process of its own
        so that neither its caller nor a load generator slows it) in front of ``upstream``;
        return it as the endpoint to give a coordinator's ``--rpc`` instead of the worker's.
        ``peer``: in front of the worker's peer port instead (the link other workers use).
        Ready once it says so in its log: no test connection, which would reach the worker."""
        port = port or free_port(upstream.host)
        name = self._unique(name or "link")
        cmd = [sys.executable, "-m", "tightwad.pool.linkemu", "--listen", str(port),
               "--listen-host", upstream.host,
               "--upstream", upstream.peer if peer else upstream.endpoint,
               "--profile", profile]
        relay: RpcWorker = self._spawn(RpcWorker, name, cmd, host=upstream.host, port=port)
        deadline = time.monotonic() + timeout
        while "linkemu: " not in relay.log_text():
            if not relay.alive():
                raise relay.fail(f"exited with code {relay.popen.returncode}")
            if time.monotonic() > deadline:
                raise relay.fail(f"did not listen on {upstream.host}:{port} within "
                                 f"{timeout:.0f} s")
            time.sleep(0.05)
        return relay

    def llama_server(self, model: Path, *, name: str | None = None,
                     rpc: Sequence[RpcWorker | str] = (), args: Sequence[str] = (),
                     ctx: int = 2048, slots: int = 1, port: int | None = None,
                     host: str = LOOPBACK, timeout: float = 120, wait: bool = True,
                     pool_args: Sequence[str] = defaults.LLAMA_SERVER_ARGS,
                     peers: Mapping[str, str] | None = None) -> LlamaServer:
        """Start ``llama-server`` (a pooled coordinator when ``rpc`` is given) and wait for health.
        ``pool_args``: the settings every pool server runs with (``()``: llama.cpp's own
        defaults, to measure what they cost); ``args`` come after them and win. ``peers``:
        worker endpoint -> peer endpoint (:func:`peers_env`); by default, that of every
        ``rpc`` worker started with a peer port."""
        port = port or free_port(host)
        name = self._unique(name or ("coordinator" if rpc else "llama-server"))
        cmd: list[Any] = [self.bin_dir / "llama-server", "-m", model, "--host", host,
                          "--port", str(port), "-c", str(ctx), "-np", str(slots),
                          "--threads", str(self.threads), "--no-webui"]
        if rpc:
            endpoints = [w.endpoint if isinstance(w, RpcWorker) else w for w in rpc]
            cmd += ["--rpc", ",".join(endpoints), "-ngl", "999"]
        cmd += [*pool_args, *args]
        if peers is None:
            peers = {w.endpoint: w.peer for w in rpc if isinstance(w, RpcWorker) and w.peer}
        server: LlamaServer = self._spawn(LlamaServer, name, cmd, peers_env(peers), host=host,
                                          port=port, model=model)
        if wait:
            self.wait_healthy(server, timeout)
        return server

    def tightwad_proxy(self, *, target: LlamaServer, drafter: LlamaServer | None = None,
                       mode: str = "remote", slots: int = 1, port: int | None = None,
                       name: str = "proxy",
                       env: dict[str, str] | None = None, timeout: float = 60,
                       args: Sequence[str] = ()) -> HttpService:
        """Start ``python -m tightwad.server`` in front of ``target`` (and ``drafter``);
        ``args`` are extra command-line arguments (e.g. ``--log-level DEBUG``)."""
        port = port or free_port()
        config = {
            "TIGHTWAD_LISTEN__HOST": LOOPBACK,
            "TIGHTWAD_LISTEN__PORT": str(port),
            "TIGHTWAD_TARGET__URL": target.url,
            "TIGHTWAD_SPECULATION__MODE": mode,
            "TIGHTWAD_TARGET__SLOTS": str(slots),
            "TIGHTWAD_DRAFTER__SLOTS": str(slots),
            **({"TIGHTWAD_DRAFTER__URL": drafter.url} if drafter else {}),
            **(env or {}),
        }
        proxy: HttpService = self._spawn(HttpService, self._unique(name),
                                         [sys.executable, "-m", "tightwad.server", *args],
                                         config,
                                         port=port)
        self.wait_healthy(proxy, timeout)
        return proxy

    @staticmethod
    def wait_healthy(server: HttpService, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not server.healthy():
            if not server.alive():
                raise server.fail(f"exited with code {server.popen.returncode}")
            if time.monotonic() > deadline:
                raise server.fail(f"was not healthy within {timeout:.0f} s")
            time.sleep(0.1)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
