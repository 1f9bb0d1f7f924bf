"""A link emulator: an asyncio TCP relay that adds delay, jitter and a bandwidth cap.

``tc netem`` is missing on the kernels Tightwad is developed on (docs/architecture.md), so slow links
between a coordinator and its RPC workers are emulated in userspace: point the coordinator at
the relay's port instead of the worker's, and every byte crosses an emulated link.

How a link is modelled (each direction independently, netem-like):

- A chunk read from one side is timestamped on arrival. It is serialised onto the link at the
  configured bandwidth (the link is shared by all connections of one relay and busy until the
  previous chunk has gone out), then released to the other side ``delay`` (+ jitter) after its
  last byte left. Release times are absolute, so a message that arrives as many reads is
  delayed ONCE, as on a real link; a relay that slept ``delay`` after every read would delay it
  once per read.
- Jitter is drawn per segment, uniform in ``delay +- jitter`` (never below 0), and a segment is
  never released before the one ahead of it on its connection: no reordering, as TCP would
  deliver it.
- With a bandwidth cap, chunks are cut into segments of ~0.5 ms of link time (at least 16 KiB),
  so a large message streams out at the link rate instead of arriving in one lump.
- Each direction buffers at most ``max_buffer`` bytes; beyond that the relay stops reading,
  and TCP flow control pushes back on the sender, like a full link.
- :meth:`Relay.stall` freezes the link (a Wi-Fi that drops without a reset): bytes are still
  read (up to ``max_buffer``) but nothing is delivered, in either direction, until
  :meth:`Relay.unstall`; then what was held is delivered in order.
- It runs on protocol callbacks, not a task per direction: bytes whose release time has come
  are written from the read callback itself, later ones from one timer per direction. Through
  the ``none`` profile a loopback round trip costs ~0.1 ms more than a direct connection.

Counters (:class:`LinkStats`): bytes and reads per direction; a "message" is a burst of bytes in
one direction of one connection that follows bytes in the other direction (or opens the
connection); a round trip is a burst of downstream bytes (upstream -> client) that follows a
burst of upstream bytes (client -> upstream). Strict request/response traffic thus counts one
message each way and one round trip per exchange.

Timer precision: asyncio's default loop on Linux waits with ``epoll``, whose timeout has 1 ms
granularity (rounded up), which would make every release up to 1 ms late. :func:`precise_loop`
gives a loop waiting with ``select`` (microseconds); :class:`RelayThread` and the command line
use it. In-process relays run on the caller's loop and get that loop's precision. Either way a
release can only be late, never early. On a loaded 2-core VM a timer fired 0.1 ms late (median;
p99 2-3 ms when the CPUs were busy), so sub-millisecond profiles (``lan``) are approximate there.

Three ways to use it::

    async with Relay("127.0.0.1", 50052, "wifi") as relay:   # in-process, caller's loop
        ...connect to ("127.0.0.1", relay.port)...

    with RelayThread(["127.0.0.1:50052", "127.0.0.1:50053"], "wifi") as relays:
        relays.endpoints   # ["127.0.0.1:<port>", ...] for llama-server --rpc
        relays.stats()     # one LinkStats per relay

    python -m tightwad.pool.linkemu --listen 50152 --upstream 127.0.0.1:50052 --profile wifi
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import random
import selectors
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "LinkProfile",
    "LinkStats",
    "PROFILES",
    "Relay",
    "RelayThread",
    "adjust_profile",
    "get_profile",
    "main",
    "parse_endpoint",
    "precise_loop",
]

LOOPBACK = "127.0.0.1"
MIN_SEGMENT = 16 * 1024
SEGMENT_TIME_S = 0.0005
DEFAULT_MAX_BUFFER = 4 * 1024 * 1024

Direction = Literal["up", "down"]  # up: client -> upstream; down: upstream -> client


@dataclass(frozen=True)
class LinkProfile:
    """One emulated link. Delay and jitter are ONE-WAY and apply to each direction, so the
    round-trip time is twice the delay; the bandwidth cap applies to each direction."""

    name: str
    delay_s: float = 0.0
    jitter_s: float = 0.0
    bandwidth_bps: float | None = None  # bits per second; None = unlimited

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.jitter_s < 0:
            raise ValueError("delay and jitter must be >= 0")
        if self.bandwidth_bps is not None and self.bandwidth_bps <= 0:
            raise ValueError("bandwidth must be > 0 (or None for unlimited)")

    @property
    def rtt_s(self) -> float:
        return 2 * self.delay_s

    def describe(self) -> str:
        if self.delay_s == self.jitter_s == 0 and self.bandwidth_bps is None:
            return f"{self.name} (no delay, unlimited bandwidth)"
        bandwidth = ("unlimited" if self.bandwidth_bps is None
                     else f"{self.bandwidth_bps / 1e6:g} Mbit/s")
        return (f"{self.name} ({self.delay_s * 1e3:g} ms one-way = {self.rtt_s * 1e3:g} ms RTT, "
                f"jitter +-{self.jitter_s * 1e3:g} ms, {bandwidth} each way)")


PROFILES: dict[str, LinkProfile] = {
    p.name: p for p in (
        LinkProfile("none"),
        LinkProfile("lan", delay_s=0.15e-3, bandwidth_bps=1e9),
        LinkProfile("wifi", delay_s=2.5e-3, jitter_s=1e-3, bandwidth_bps=200e6),
        LinkProfile("bad-wifi", delay_s=7.5e-3, jitter_s=3e-3, bandwidth_bps=50e6),
    )
}


def get_profile(profile: LinkProfile | str) -> LinkProfile:
    if isinstance(profile, LinkProfile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown link profile {profile!r}; "
                         f"choose one of: {', '.join(PROFILES)}") from None


def adjust_profile(profile: LinkProfile | str, *, delay_ms: float | None = None,
                   jitter_ms: float | None = None,
                   bandwidth_mbit: float | None = None) -> LinkProfile:
    """``profile`` with some values replaced (bandwidth 0 = unlimited); named "custom" if any
    value changed."""
    base = get_profile(profile)
    if delay_ms is None and jitter_ms is None and bandwidth_mbit is None:
        return base
    bandwidth = base.bandwidth_bps if bandwidth_mbit is None else bandwidth_mbit * 1e6 or None
    return LinkProfile(
        "custom",
        delay_s=base.delay_s if delay_ms is None else delay_ms / 1e3,
        jitter_s=base.jitter_s if jitter_ms is None else jitter_ms / 1e3,
        bandwidth_bps=bandwidth,
    )


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


@dataclass
class LinkStats:
    """Traffic through one relay (all its connections). Subtract two snapshots for a window."""

    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    reads_up: int = 0
    reads_down: int = 0
    messages_up: int = 0
    messages_down: int = 0
    round_trips: int = 0

    def __add__(self, other: LinkStats) -> LinkStats:
        return LinkStats(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                 dataclasses.astuple(other))))

    def __sub__(self, other: LinkStats) -> LinkStats:
        return LinkStats(*(a - b for a, b in zip(dataclasses.astuple(self),
                                                 dataclasses.astuple(other))))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def precise_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers have microsecond rather than millisecond resolution.

    ``select`` takes its timeout in microseconds; ``epoll`` (the default on Linux) in whole
    milliseconds, rounded up. ``select`` is limited to ~1000 descriptors, plenty for a relay.
    """
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


class _Link:
    """One direction of one relay: the serialiser shared by all its connections."""

    def __init__(self, profile: LinkProfile, rng: random.Random) -> None:
        self.profile = profile
        self.rng = rng
        self.free_at = 0.0  # when the link has finished sending what it was given
        bps = profile.bandwidth_bps
        self.segment = max(MIN_SEGMENT, int(bps / 8 * SEGMENT_TIME_S)) if bps else None

    def schedule(self, arrival: float, nbytes: int) -> float:
        """When a segment of ``nbytes`` that arrived at ``arrival`` reaches the other side."""
        sent = arrival
        if self.profile.bandwidth_bps:
            sent = max(arrival, self.free_at) + nbytes * 8 / self.profile.bandwidth_bps
            self.free_at = sent
        delay = self.profile.delay_s
        if self.profile.jitter_s:
            delay = max(0.0, delay + self.rng.uniform(-self.profile.jitter_s,
                                                      self.profile.jitter_s))
        return sent + delay


class _Pipe:
    """One direction of one connection: timestamp and schedule what ``src`` sends, hand it to
    ``dst`` when released. Callback-driven (no task per direction): with no delay due, bytes
    are written straight from the read callback."""

    def __init__(self, conn: _Conn, direction: Direction, link: _Link,
                 src: asyncio.Transport, dst: asyncio.Transport, max_buffer: int) -> None:
        self.conn, self.direction, self.link = conn, direction, link
        self.src, self.dst = src, dst
        self.max_buffer = max_buffer
        self.loop = asyncio.get_running_loop()
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()  # None = EOF
        self.queued = 0
        self.last_release = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.src_paused = False  # we stopped reading: too much is queued
        self.dst_paused = False  # dst's transport buffer is full (pause_writing)
        self.done = False  # EOF handed on

    def feed(self, data: bytes) -> None:
        now = self.loop.time()
        self.conn.arrived(self.direction, len(data))
        step = self.link.segment or len(data)
        for start in range(0, len(data), step):
            segment = data[start:start + step] if step < len(data) else data
            self._push(self.link.schedule(now, len(segment)), segment)
            self.queued += len(segment)
        if self.queued > self.max_buffer and not self.src_paused:
            self.src_paused = True  # TCP flow control pushes back on the sender
            self.src.pause_reading()
        self.flush()

    def feed_eof(self) -> None:
        """Pass the half-close on, after what is in flight."""
        self._push(self.loop.time() + self.link.profile.delay_s, None)
        self.flush()

    def _push(self, release: float, data: bytes | None) -> None:
        release = max(release, self.last_release)  # never overtake the segment ahead
        self.last_release = release
        self.queue.append((release, data))

    def flush(self) -> None:
        """Write everything that is due; arm a timer for the next release."""
        if (self.timer is not None or self.dst_paused or self.done or self.conn.closed
                or self.conn.relay.stalled):
            return  # a timer is armed for the head (releases only grow), or we must wait
        now = self.loop.time()
        parts: list[bytes] = []
        eof = False
        while self.queue and self.queue[0][0] <= now:
            data = self.queue.popleft()[1]
            if data is None:
                eof = True
                break
            parts.append(data)
        if parts:
            self.dst.write(parts[0] if len(parts) == 1 else b"".join(parts))
            self.queued -= sum(map(len, parts))
            if self.src_paused and self.queued <= self.max_buffer // 2:
                self.src_paused = False
                self.src.resume_reading()
        if eof:
            self.done = True
            if self.dst.can_write_eof():
                self.dst.write_eof()
            self.conn.pipe_done()
        elif self.queue and not self.dst_paused:
            self.timer = self.loop.call_at(self.queue[0][0], self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.flush()

    def pause(self) -> None:
        self.dst_paused = True

    def resume(self) -> None:
        self.dst_paused = False
        self.flush()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Side(asyncio.Protocol):
    """One socket of a relayed connection; reads feed the pipe leaving it."""

    def __init__(self, conn: _Conn, reads: Direction) -> None:
        self.conn = conn
        self.reads = reads  # direction of the bytes read from this socket
        self.writes: Direction = "down" if reads == "up" else "up"
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.made(self)

    def data_received(self, data: bytes) -> None:
        self.conn.pipes[self.reads].feed(data)

    def eof_received(self) -> bool:
        self.conn.pipes[self.reads].feed_eof()
        return True  # keep the socket open: the other direction may still carry data

    def pause_writing(self) -> None:
        if pipe := self.conn.pipes.get(self.writes):
            pipe.pause()

    def resume_writing(self) -> None:
        if pipe := self.conn.pipes.get(self.writes):
            pipe.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close(abort=exc is not None)


class _Conn:
    """One relayed connection: its two sockets, its two pipes, and its counters."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.client = _Side(self, "up")
        self.upstream = _Side(self, "down")
        self.pipes: dict[Direction, _Pipe] = {}
        self.connecting: asyncio.Task | None = None
        self.closed = False
        self.last: Direction | None = None  # direction of the latest bytes, for bursts

    def made(self, side: _Side) -> None:
        assert side.transport is not None
        if side is self.client:
            if self.relay._closed:  # accepted just before close()
                self.closed = True
                side.transport.abort()
                return
            self.relay._conns.add(self)
            side.transport.pause_reading()  # until the upstream side is connected
            self.connecting = asyncio.ensure_future(self._connect())
            return
        if self.closed:
            side.transport.abort()
            return
        client, upstream = self.client.transport, self.upstream.transport
        assert client is not None and upstream is not None
        relay = self.relay
        self.pipes = {
            "up": _Pipe(self, "up", relay._links["up"], client, upstream, relay.max_buffer),
            "down": _Pipe(self, "down", relay._links["down"], upstream, client,
                          relay.max_buffer),
        }
        relay._stats.connections += 1
        client.resume_reading()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self.upstream, *self.relay.upstream)
        except OSError:
            self.close(abort=True)  # upstream down: the client sees its connection closed

    def arrived(self, direction: Direction, nbytes: int) -> None:
        s = self.relay._stats
        if direction == "up":
            s.bytes_up += nbytes
            s.reads_up += 1
        else:
            s.bytes_down += nbytes
            s.reads_down += 1
        if direction != self.last:  # a new burst: the traffic turned around
            if direction == "up":
                s.messages_up += 1
            else:
                s.messages_down += 1
                if self.last == "up":
                    s.round_trips += 1
            self.last = direction

    def pipe_done(self) -> None:
        if all(pipe.done for pipe in self.pipes.values()):
            self.close(abort=False)  # both directions ended cleanly

    def close(self, abort: bool) -> None:
        """Close both sockets: flushing what their transports hold, or dropping it (a reset,
        or the relay shutting down)."""
        if self.closed:
            return
        self.closed = True
        self.relay._conns.discard(self)
        if self.connecting is not None:
            self.connecting.cancel()
        for pipe in self.pipes.values():
            pipe.cancel()
        for side in (self.client, self.upstream):
            if side.transport is not None:
                if abort:
                    side.transport.abort()
                else:
                    side.transport.close()


class Relay:
    """Listen on ``listen_host:listen_port`` (0 = a free port) and relay every connection to
    ``upstream_host:upstream_port`` through the emulated link ``profile``."""

    def __init__(self, upstream_host: str, upstream_port: int,
                 profile: LinkProfile | str = "none", *, listen_host: str = LOOPBACK,
                 listen_port: int = 0, seed: int | None = None,
                 max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.profile = get_profile(profile)
        self.listen = (listen_host, listen_port)
        self.max_buffer = max_buffer
        rng = random.Random(seed)
        self._links: dict[Direction, _Link] = {"up": _Link(self.profile, rng),
                                               "down": _Link(self.profile, rng)}
        self._stats = LinkStats()
        self._server: asyncio.AbstractServer | None = None
        self._port = 0
        self._closed = False
        self._conns: set[_Conn] = set()
        self.stalled = False

    def stall(self) -> None:
        """Stop delivering bytes, in both directions and on every connection, until
        :meth:`unstall` (connections stay open; nothing is lost)."""
        self.stalled = True

    def unstall(self) -> None:
        """Deliver what a stall held back, and carry on."""
        self.stalled = False
        for conn in list(self._conns):
            for pipe in conn.pipes.values():
                pipe.flush()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the relay is not started")
        return self._port

    @property
    def endpoint(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    def stats(self) -> LinkStats:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats)

    async def start(self) -> Relay:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self).client, *self.listen)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        self._closed = True
        if self._server is not None:
            self._server.close()
        connecting = [c.connecting for c in self._conns if c.connecting is not None]
        for conn in list(self._conns):
            conn.close(abort=True)
        await asyncio.gather(*connecting, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class RelayThread:
    """Relays to several upstreams, served by a background thread with its own precise loop,
    for synchronous code (benchmarks, test fixtures). ``start()`` returns once they listen."""

    def __init__(self, upstreams: Sequence[str | tuple[str, int]],
                 profile: LinkProfile | str = "none", *, listen_host: str = LOOPBACK,
                 seed: int | None = None, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self.profile = get_profile(profile)
        self._targets = [parse_endpoint(u) if isinstance(u, str) else u for u in upstreams]
        self._listen_host, self._max_buffer, self._seed = listen_host, max_buffer, seed
        self.relays: list[Relay] = []
        self.loop = precise_loop()
        self._thread = threading.Thread(target=self._run, name="tightwad-linkemu", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            for i, (host, port) in enumerate(self._targets):
                seed = None if self._seed is None else self._seed + i
                relay = Relay(host, port, self.profile, listen_host=self._listen_host,
                              seed=seed, max_buffer=self._max_buffer)
                self.relays.append(await relay.start())
        except BaseException as exc:
            self._error = exc
        self._ready.set()
        if self._error is None:
            await self._stop.wait()
        await asyncio.gather(*(r.close() for r in self.relays), return_exceptions=True)

    def start(self, timeout: float = 30) -> RelayThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the relays did not start")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    @property
    def ports(self) -> list[int]:
        return [r.port for r in self.relays]

    @property
    def endpoints(self) -> list[str]:
        return [r.endpoint for r in self.relays]

    def stats(self) -> list[LinkStats]:
        """A consistent snapshot of each relay's counters (taken on the relays' loop)."""
        if not self._thread.is_alive():
            return [r.stats() for r in self.relays]

        async def snap() -> list[LinkStats]:
            return [r.stats() for r in self.relays]
        return asyncio.run_coroutine_threadsafe(snap(), self.loop).result(30)

    def stall(self, index: int | None = None) -> None:
        """Freeze one relay's link (``index``) or all of them (see :meth:`Relay.stall`)."""
        self._on_loop(lambda: self._each(index, Relay.stall))

    def unstall(self, index: int | None = None) -> None:
        self._on_loop(lambda: self._each(index, Relay.unstall))

    def _each(self, index: int | None, method: Callable[[Relay], None]) -> None:
        for relay in self._pick(index):
            method(relay)

    def _pick(self, index: int | None) -> list[Relay]:
        return self.relays if index is None else [self.relays[index]]

    def _on_loop(self, fn: Callable[[], object]) -> None:
        async def call() -> None:
            fn()
        asyncio.run_coroutine_threadsafe(call(), self.loop).result(30)

    def close(self, timeout: float = 30) -> None:
        """Stop the relays, drop their connections and end the thread."""
        if not self._thread.is_alive():
            if not self.loop.is_closed() and self._thread.ident is None:  # never started
                self.loop.close()
            return
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> RelayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tightwad.pool.linkemu",
        description="Relay TCP connections through an emulated slow link (delay, jitter, "
                    "bandwidth cap per direction) and count bytes and round trips.")
    p.add_argument("--listen", type=int, required=True, metavar="PORT",
                   help="port to listen on (0: a free one, printed at start)")
    p.add_argument("--listen-host", default=LOOPBACK)
    p.add_argument("--upstream", required=True, metavar="HOST:PORT")
    p.add_argument("--profile", default="none", choices=list(PROFILES))
    p.add_argument("--delay-ms", type=float, help="one-way delay, overrides the profile's")
    p.add_argument("--jitter-ms", type=float, help="overrides the profile's jitter")
    p.add_argument("--bandwidth-mbit", type=float,
                   help="per direction, overrides the profile's (0: unlimited)")
    p.add_argument("--seed", type=int, help="seed of the jitter (default: random)")
    return p


async def _serve(args: argparse.Namespace) -> LinkStats:
    host, port = parse_endpoint(args.upstream)
    profile = adjust_profile(args.profile, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms,
                             bandwidth_mbit=args.bandwidth_mbit)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Relay(host, port, profile, listen_host=args.listen_host,
                     listen_port=args.listen, seed=args.seed) as relay:
        print(f"linkemu: {relay.endpoint} -> {host}:{port} over {profile.describe()}",
              flush=True)
        await stop.wait()
        return relay.stats()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        parse_endpoint(args.upstream)
    except ValueError as exc:
        _parser().error(str(exc))
    with contextlib.closing(precise_loop()) as loop:
        stats = loop.run_until_complete(_serve(args))
    print(f"linkemu: stats {json.dumps(stats.as_dict())}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
