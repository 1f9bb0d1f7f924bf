"""The few read-only messages of llama.cpp's RPC protocol that identify a ``ggml-rpc-server``.

Wire format at the pin (ggml/src/ggml-rpc/ggml-rpc.cpp): a request is ``cmd (u8) | size (u64 LE)
| payload``, a response ``size (u64 LE) | payload``. The first command of every connection must
be HELLO (14, a 24-byte capability block); the answer carries the protocol version. Then
DEVICE_COUNT (15, empty payload -> u32) and GET_DEVICE_MEMORY (11, u32 device -> u64 free,
u64 total) read the worker's devices.

A worker serves ONE client at a time; other connections wait in its listen backlog. So a probe
of a worker that is serving a coordinator gets no answer: that is reported as :class:`Busy`.
How the probe ends matters (measured on the pin, docs/architecture.md): if it sends a HELLO and
closes normally (FIN), the worker later accepts the dead connection, writes its answer, and a
stock worker dies of SIGPIPE. This module therefore closes every connection that may still be
waiting in the backlog with a reset (SO_LINGER 0): the worker's first write then fails with
ECONNRESET, which it handles by dropping the connection. A probe that was answered closes
normally: the worker is then blocked reading the next command and sees a clean end of stream.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

CMD_ALLOC_BUFFER = 0
CMD_BUFFER_GET_BASE = 3
CMD_FREE_BUFFER = 4
CMD_GET_TENSOR = 8
CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS_SIZE = 24
# The protocol's structs are packed (#pragma pack(1) in ggml-rpc.cpp). struct rpc_tensor at the
# pin (296 bytes): id, type, buffer, ne[4], nb[4], op, op_params[16], flags, src[10],
# view_src, view_offs, data, name[64], use_count.
_RPC_TENSOR = struct.Struct("<QIQ4I4II16ii10QQQQ64si")
GGML_TYPE_F32 = 0
PIN_PROTOCOL = (7, 0, 0)
"""The RPC protocol of the pinned llama.cpp (``RPC_PROTO_*_VERSION`` in ggml-rpc.h)."""


class ProbeError(Exception):
    """The endpoint could not be identified; the message says why."""


class Unreachable(ProbeError):
    """Nothing accepted a TCP connection (refused, filtered or timed out)."""


class Silent(Unreachable):
    """The TCP handshake timed out: a firewall drops it, or the worker's listen backlog is full
    (a worker serving a coordinator queues at most two connections; the kernel then ignores new
    ones until the coordinator disconnects)."""


class Busy(ProbeError):
    """A TCP connection was accepted but no HELLO answer came: a worker serving another client."""


class NotRpc(ProbeError):
    """Something answered, but not with an RPC HELLO response."""


@dataclass(frozen=True)
class Device:
    index: int
    free: int
    total: int


@dataclass(frozen=True)
class Hello:
    host: str
    port: int
    version: tuple[int, int, int]
    rtt_s: float
    """Time from sending HELLO to its complete answer."""
    connect_s: float
    devices: list[Device] = field(default_factory=list)
    download_bps: float | None = None
    """Bytes per second the worker sent back a buffer at (None: not measured)."""

    @property
    def protocol(self) -> str:
        return "v{}.{}.{}".format(*self.version)

    @property
    def total_memory(self) -> int:
        return sum(d.total for d in self.devices)

    @property
    def free_memory(self) -> int:
        return sum(d.free for d in self.devices)


def compatible(version: tuple[int, int, int], pin: tuple[int, int, int] = PIN_PROTOCOL) -> bool:
    """The client's own rule (negotiate_hello): same major, server minor <= client minor."""
    return version[0] == pin[0] and version[1] <= pin[1]


def format_version(version: tuple[int, int, int]) -> str:
    return "v{}.{}.{}".format(*version)


def _request(cmd: int, payload: bytes = b"") -> bytes:
    return bytes([cmd]) + struct.pack("<Q", len(payload)) + payload


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        size = sock.recv_into(view[got:], n - got)
        if not size:
            raise NotRpc("the connection closed in the middle of an answer")
        got += size
    return bytes(buf)


def _response(sock: socket.socket, expected: int) -> bytes:
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size != expected:
        raise NotRpc(f"answer of {size} bytes where the RPC protocol sends {expected}")
    return _recv_exact(sock, size)


def reset_close(sock: socket.socket) -> None:
    """Close with RST: a worker that accepts this connection later cannot die writing to it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _measure_download(sock: socket.socket, nbytes: int, rounds: int = 3) -> float:
    """Allocate ``nbytes`` on device 0, read it back ``rounds`` times, free it; bytes/s.

    Every field is what the worker's own client would send: a buffer it allocated for this
    connection and a tensor lying wholly inside it (the worker asserts that, so nothing else
    is ever sent). The worker also frees the connection's buffers when it ends.
    """
    nbytes = max(4, nbytes - nbytes % 4)
    sock.sendall(_request(CMD_ALLOC_BUFFER, struct.pack("<IQ", 0, nbytes)))
    remote_ptr, remote_size = struct.unpack("<QQ", _response(sock, 16))
    if remote_ptr == 0 or remote_size < nbytes:
        raise NotRpc("the worker could not allocate a scratch buffer")
    sock.sendall(_request(CMD_BUFFER_GET_BASE, struct.pack("<Q", remote_ptr)))
    (base,) = struct.unpack("<Q", _response(sock, 8))
    tensor = _RPC_TENSOR.pack(
        1, GGML_TYPE_F32, remote_ptr, nbytes // 4, 1, 1, 1, 4, nbytes, nbytes, nbytes,
        0, *([0] * 16), 0, *([0] * 10), 0, 0, base, b"tightwad-probe", 0)
    request = _request(CMD_GET_TENSOR, tensor + struct.pack("<QQ", 0, nbytes))
    best = float("inf")
    for _ in range(rounds):
        started = time.monotonic()
        sock.sendall(request)
        _response(sock, nbytes)
        best = min(best, time.monotonic() - started)
    # (On an error above the caller resets the connection; the worker frees its buffers then.)
    sock.sendall(_request(CMD_FREE_BUFFER, struct.pack("<Q", remote_ptr)))
    return nbytes / best if best > 0 else float("inf")


def hello(host: str, port: int, *, timeout: float = 1.0, connect_timeout: float | None = None,
          devices: bool = True, measure_bytes: int = 0) -> Hello:
    """Speak HELLO (and read the devices) to ``host:port``.

    Raises :class:`Unreachable`, :class:`Busy` (accepted, no answer within ``timeout``) or
    :class:`NotRpc`. Never leaves a connection that can harm the worker (see the module doc).
    ``measure_bytes`` > 0 also times reading that many bytes back from a scratch buffer on the
    worker's first device (the link's throughput); the buffer is freed.
    """
    started = time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout or timeout)
    except TimeoutError:
        raise Silent(f"{host}:{port}: no answer to the TCP handshake") from None
    except OSError as exc:
        raise Unreachable(f"{host}:{port}: {exc.strerror or exc}") from None
    connect_s = time.monotonic() - started
    answered = False
    try:
        sock.settimeout(timeout)
        sent = time.monotonic()
        try:
            sock.sendall(_request(CMD_HELLO, bytes(CONN_CAPS_SIZE)))
            body = _response(sock, 4 + CONN_CAPS_SIZE)
        except TimeoutError:
            raise Busy(f"{host}:{port} accepted the connection but did not answer within "
                       f"{timeout:g} s (a worker serves one client at a time)") from None
        except OSError as exc:
            raise NotRpc(f"{host}:{port}: {exc.strerror or exc}") from None
        answered = True
        rtt = time.monotonic() - sent
        version = (body[0], body[1], body[2])
        found: list[Device] = []
        if devices:
            try:
                sock.sendall(_request(CMD_DEVICE_COUNT))
                (count,) = struct.unpack("<I", _response(sock, 4))
                for index in range(min(count, 64)):
                    sock.sendall(_request(CMD_GET_DEVICE_MEMORY, struct.pack("<I", index)))
                    free, total = struct.unpack("<QQ", _response(sock, 16))
                    found.append(Device(index, free, total))
            except (OSError, NotRpc):
                answered = False  # something odd mid-way: reset, do not leave it half-spoken
                found = []
        download = None
        if measure_bytes > 0 and found:
            try:
                sock.settimeout(max(timeout, 10.0))
                download = _measure_download(sock, measure_bytes)
            except (OSError, NotRpc, struct.error):
                answered = False
        return Hello(host, port, version, rtt, connect_s, found, download)
    finally:
        if answered:
            # The worker is blocked reading the next command: a clean end of stream.
            sock.close()
        else:
            reset_close(sock)
