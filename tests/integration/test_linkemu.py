"""The link emulator (tightwad.pool.linkemu): real sockets on loopback, a tiny framed echo server.

Timing assertions use lower bounds the emulated link guarantees (a byte cannot arrive before
its delay and serialisation time have passed) and generous upper bounds: these machines are
shared and noisy. A relay that delayed every read instead of every message, or ignored the
bandwidth cap, misses them by a wide margin.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from support import REPO
from tightwad.pool.linkemu import (
    PROFILES,
    LinkProfile,
    LinkStats,
    Relay,
    RelayThread,
    adjust_profile,
    get_profile,
    parse_endpoint,
    precise_loop,
)

LOOPBACK = "127.0.0.1"


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run a test coroutine on the precise loop the relay threads and the CLI use."""
    with asyncio.Runner(loop_factory=precise_loop) as runner:
        return runner.run(asyncio.wait_for(main(), 60))


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


class EchoServer:
    """Answers each framed message (4-byte length + payload) with the same frame, in one write,
    and records what it received."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.connections = 0
        self.closed = 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> EchoServer:
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head, "big"))
                self.received.append(body)
                writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   payload: bytes) -> bytes:
    writer.write(frame(payload))
    await writer.drain()
    head = await reader.readexactly(4)
    return await reader.readexactly(int.from_bytes(head, "big"))


async def connect(relay: Relay) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(LOOPBACK, relay.port)


# --- profiles ---------------------------------------------------------------------------------


def test_profiles() -> None:
    assert set(PROFILES) == {"none", "lan", "wifi", "bad-wifi"}
    assert get_profile("none") == LinkProfile("none")
    lan, wifi, bad = PROFILES["lan"], PROFILES["wifi"], PROFILES["bad-wifi"]
    assert lan.rtt_s == pytest.approx(0.3e-3) and lan.bandwidth_bps == 1e9
    assert wifi.rtt_s == pytest.approx(5e-3) and wifi.jitter_s == pytest.approx(1e-3)
    assert wifi.bandwidth_bps == 200e6
    assert bad.rtt_s == pytest.approx(15e-3) and bad.bandwidth_bps == 50e6
    assert "5 ms RTT" in wifi.describe()
    with pytest.raises(ValueError, match="unknown link profile"):
        get_profile("carrier-pigeon")
    with pytest.raises(ValueError):
        LinkProfile("x", delay_s=-1)
    assert adjust_profile("wifi") is wifi
    slow = adjust_profile("wifi", delay_ms=20, bandwidth_mbit=0)
    assert (slow.name, slow.delay_s, slow.jitter_s, slow.bandwidth_bps) == ("custom", 0.02,
                                                                           wifi.jitter_s, None)
    assert parse_endpoint("127.0.0.1:50052") == ("127.0.0.1", 50052)
    assert parse_endpoint("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        parse_endpoint("localhost")


# --- bytes ------------------------------------------------------------------------------------

JITTERY = LinkProfile("jittery", delay_s=1e-3, jitter_s=1e-3, bandwidth_bps=200e6)


@pytest.mark.parametrize("profile", [PROFILES["none"], JITTERY], ids=lambda p: p.name)
def test_bytes_pass_through_unchanged(profile: LinkProfile) -> None:
    payloads = [b"x", os.urandom(1000), bytes(range(256)) * 4, os.urandom(3 * 1024 * 1024)]

    async def main() -> None:
        async with EchoServer() as echo, Relay(LOOPBACK, echo.port, profile, seed=1) as relay:
            reader, writer = await connect(relay)
            for payload in payloads:
                assert await exchange(reader, writer, payload) == payload
            # Many small writes back to back: jitter must not reorder them.
            small = [os.urandom(97) for _ in range(300)]
            for piece in small:
                writer.write(frame(piece))
            await writer.drain()
            for piece in small:
                head = await reader.readexactly(4)
                assert await reader.readexactly(int.from_bytes(head, "big")) == piece
            writer.close()
            assert echo.received == payloads + small

    run(main)


def test_half_close_is_passed_on() -> None:
    """EOF from the client reaches the upstream (after the data), and the reply still flows."""

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until EOF
        writer.write(data[::-1])
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(upstream, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        profile = LinkProfile("slow", delay_s=5e-3, bandwidth_bps=100e6)
        async with Relay(LOOPBACK, port, profile) as relay:
            reader, writer = await connect(relay)
            payload = os.urandom(200_000)
            writer.write(payload)
            writer.write_eof()
            assert await reader.read() == payload[::-1]
            writer.close()
        server.close()
        await server.wait_closed()

    run(main)


# --- timing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["precise", "default"])
def test_delay_is_per_message_not_per_chunk(loop: str) -> None:
    """A request sent as many separate pieces is delayed once, not once per piece: its reply
    comes 2 x 20 ms after the last piece left, not 20 ms x pieces."""
    delay = 0.020
    profile = LinkProfile("delay20", delay_s=delay)
    pieces = 24

    async def main() -> None:
        async with EchoServer() as echo, Relay(LOOPBACK, echo.port, profile) as relay:
            reader, writer = await connect(relay)
            rtts = []
            for _ in range(3):
                before = relay.stats()
                payload = os.urandom(pieces * 2048)
                data = frame(payload)
                step = -(-len(data) // pieces)
                for start in range(0, len(data), step):
                    if start:
                        await asyncio.sleep(0.001)  # so that the relay reads them separately
                    writer.write(data[start:start + step])
                    await writer.drain()
                sent = time.monotonic()  # the last piece has left
                head = await reader.readexactly(4)
                assert await reader.readexactly(int.from_bytes(head, "big")) == payload
                rtts.append(time.monotonic() - sent)
                window = relay.stats() - before
                assert window.reads_up >= pieces // 2, "the request did not arrive in pieces"
                assert window.round_trips == 1
            writer.close()
            # Physics: the reply cannot come back earlier than one delay each way.
            assert min(rtts) >= 2 * delay
            # A per-chunk delay would take >= pieces / 2 x 20 ms = 240 ms here.
            assert min(rtts) < 4 * delay, rtts

    if loop == "precise":
        run(main)
    else:
        asyncio.run(asyncio.wait_for(main(), 60))


def test_bandwidth_cap_limits_throughput() -> None:
    """400 kB each way over 8 Mbit/s (1 MB/s per direction) takes >= 0.4 s + 0.4 s."""
    profile = LinkProfile("8mbit", bandwidth_bps=8e6)
    size = 400_000

    async def main() -> float:
        async with EchoServer() as echo, Relay(LOOPBACK, echo.port, profile) as relay:
            reader, writer = await connect(relay)
            payload = os.urandom(size)
            started = time.monotonic()
            assert await exchange(reader, writer, payload) == payload
            elapsed = time.monotonic() - started
            writer.close()
            return elapsed

    elapsed = run(main)
    # The echo replies after the whole request arrived, so the two directions add up.
    physics = 2 * (size + 4) * 8 / 8e6
    assert elapsed >= physics
    assert elapsed < 4 * physics, elapsed


def test_bandwidth_is_shared_by_connections() -> None:
    """Two connections through one relay share its link: 2 x 200 kB up takes >= 0.4 s."""
    profile = LinkProfile("8mbit", bandwidth_bps=8e6)
    size = 200_000

    async def one(relay: Relay) -> None:
        reader, writer = await connect(relay)
        writer.write(os.urandom(size))
        writer.write_eof()
        await reader.read()
        writer.close()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def main() -> float:
        server = await asyncio.start_server(sink, LOOPBACK, 0)
        async with Relay(LOOPBACK, server.sockets[0].getsockname()[1], profile) as relay:
            started = time.monotonic()
            await asyncio.gather(one(relay), one(relay))
            elapsed = time.monotonic() - started
        server.close()
        await server.wait_closed()
        return elapsed

    elapsed = run(main)
    physics = 2 * size * 8 / 8e6
    assert physics <= elapsed < 4 * physics


# --- counters ---------------------------------------------------------------------------------


def test_counters() -> None:
    sizes = [10, 5000, 1, 300_000, 64]

    async def main() -> None:
        async with EchoServer() as echo, Relay(LOOPBACK, echo.port, "lan") as relay:
            assert relay.stats() == LinkStats()
            reader, writer = await connect(relay)
            for n in sizes:
                await exchange(reader, writer, b"a" * n)
            first = relay.stats()
            wire = sum(4 + n for n in sizes)
            assert first.connections == 1
            assert first.bytes_up == first.bytes_down == wire
            assert first.messages_up == first.messages_down == first.round_trips == len(sizes)
            assert first.reads_up >= len(sizes) and first.reads_down >= len(sizes)

            reader2, writer2 = await connect(relay)
            await exchange(reader2, writer2, b"b" * 7)
            await exchange(reader, writer, b"c" * 9)  # the first connection again
            window = relay.stats() - first
            assert window.connections == 1
            assert window.bytes_up == window.bytes_down == 11 + 13
            assert window.messages_up == window.messages_down == window.round_trips == 2
            assert (first + window) == relay.stats()
            assert relay.stats().as_dict()["round_trips"] == len(sizes) + 2
            for w in (writer, writer2):
                w.close()

    run(main)


def test_server_speaking_first_is_not_a_round_trip() -> None:
    async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")  # a banner, unprompted
        await writer.drain()
        writer.write(await reader.readexactly(3))
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(greeter, LOOPBACK, 0)
        async with Relay(LOOPBACK, server.sockets[0].getsockname()[1]) as relay:
            reader, writer = await connect(relay)
            assert await reader.readexactly(5) == b"hello"
            writer.write(b"abc")
            assert await reader.readexactly(3) == b"abc"
            stats = relay.stats()
            assert (stats.messages_down, stats.messages_up, stats.round_trips) == (2, 1, 1)
            writer.close()
        server.close()
        await server.wait_closed()

    run(main)


# --- shutdown ---------------------------------------------------------------------------------


def test_close_drops_everything() -> None:
    async def main() -> None:
        async with EchoServer() as echo:
            relay = await Relay(LOOPBACK, echo.port, "wifi").start()
            port = relay.port
            reader, writer = await connect(relay)
            assert await exchange(reader, writer, b"ping") == b"ping"
            # Something in flight when it closes.
            writer.write(frame(b"x" * 100_000))
            await relay.close()
            try:
                assert await asyncio.wait_for(reader.read(), 5) == b""
            except ConnectionResetError:
                pass
            writer.close()
            for _ in range(100):  # the upstream side is closed too
                if echo.closed == echo.connections == 1:
                    break
                await asyncio.sleep(0.01)
            assert echo.closed == echo.connections == 1
            with pytest.raises(OSError):
                await asyncio.open_connection(LOOPBACK, port)
            others = asyncio.all_tasks() - {asyncio.current_task()}
            assert not [t for t in others if "Relay" in repr(t) or "pump" in repr(t)]

    run(main)


def test_upstream_down_closes_the_client() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind((LOOPBACK, 0))
        dead = sock.getsockname()[1]

    async def main() -> None:
        async with Relay(LOOPBACK, dead) as relay:
            reader, writer = await connect(relay)
            try:
                assert await asyncio.wait_for(reader.read(), 5) == b""
            except ConnectionResetError:
                pass
            writer.close()
            assert relay.stats().connections == 0

    run(main)


# --- from synchronous code --------------------------------------------------------------------


class _SyncEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            head = self._exactly(4)
            if head is None:
                return
            body = self._exactly(int.from_bytes(head, "big")) or b""
            self.request.sendall(head + body)

    def _exactly(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = self.request.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf


@pytest.fixture
def sync_echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer((LOOPBACK, 0), _SyncEcho)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(10)


def sync_exchange(port: int, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(frame(payload))
        buf = b""
        while len(buf) < 4 + len(payload):
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed early"
            buf += chunk
        return buf[4:], time.monotonic() - started


def test_relay_thread(sync_echo: int) -> None:
    profile = LinkProfile("delay10", delay_s=0.010)
    relays = RelayThread([f"{LOOPBACK}:{sync_echo}", (LOOPBACK, sync_echo)], profile).start()
    try:
        assert len(relays.ports) == 2 and all(relays.ports)
        assert relays.endpoints == [f"{LOOPBACK}:{p}" for p in relays.ports]
        for i, port in enumerate(relays.ports):
            for _n in range(i + 1):
                payload = os.urandom(50_000)
                reply, rtt = sync_exchange(port, payload)
                assert reply == payload
                assert 0.020 <= rtt < 0.5
        first, second = relays.stats()
        assert (first.connections, first.round_trips) == (1, 1)
        assert (second.connections, second.round_trips) == (2, 2)
        assert second.bytes_up == second.bytes_down == 2 * 50_004
    finally:
        relays.close()
    assert not relays._thread.is_alive()
    assert relays.loop.is_closed()
    for port in relays.ports:
        with pytest.raises(OSError):
            socket.create_connection((LOOPBACK, port), timeout=2).close()
    assert relays.stats()[1].round_trips == 2  # still readable after close


def test_relay_thread_start_failure() -> None:
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        # Listening on an address that is not local fails; the thread must not linger.
        relays = RelayThread([f"{LOOPBACK}:9"], listen_host="192.0.2.1")
        with pytest.raises(OSError):
            relays.start()
        assert not relays._thread.is_alive()


def test_command_line(sync_echo: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tightwad.pool.linkemu", "--listen", "0",
         "--upstream", f"{LOOPBACK}:{sync_echo}", "--profile", "lan", "--delay-ms", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "proxy")})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "custom (5 ms one-way" in line and "1000 Mbit/s" in line, line
        port = parse_endpoint(line.split()[1])[1]
        reply, rtt = sync_exchange(port, b"hello")
        assert reply == b"hello" and rtt >= 0.010
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    stats = json.loads(err.split("linkemu: stats ", 1)[1])
    assert stats["round_trips"] == 1 and stats["bytes_up"] == 9
