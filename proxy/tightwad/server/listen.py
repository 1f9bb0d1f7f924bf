"""The proxy's listening socket, with its limits set explicitly (issue 15): at most
``listen.max_connections`` client connections (one more is answered 503 with ``Retry-After``
and closed, instead of waiting unseen in the accept queue), ``listen.keepalive_timeout_s`` for
an idle connection and for a new one to send its request's headers (a slowloris client that
trickles them is closed), bounded request-line and header sizes, and handler cancellation (a
client that goes away cancels its request's upstream work). :func:`serve` runs it until
SIGINT/SIGTERM, then shuts down as the app says (``listen.shutdown_grace_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tightwad.config import ListenConfig

log = logging.getLogger("tightwad.server.listen")

MAX_LINE_BYTES = 8190
"""Longest request line or header line (aiohttp's own default, said here)."""
MAX_HEADERS = 64
"""Most header fields in one request; clients send a dozen."""

_OVER_CAP = json.dumps({"error": {
    "message": "the tightwad proxy has too many open connections (listen.max_connections); "
               "retry shortly", "type": "service_unavailable", "param": None,
    "code": "too_many_connections"}}).encode()
_OVER_CAP_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                    + str(len(_OVER_CAP)).encode() + b"\r\n\r\n" + _OVER_CAP)


class _OverCap(asyncio.Protocol):
    """A connection beyond the cap: one 503 answer, then closed (its request is not read)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_OVER_CAP_ANSWER)
        transport.close()


class CappedSite(web.TCPSite):
    """A TCP site that holds at most ``max_connections`` client connections at once."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 max_connections: int, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.max_connections = max_connections

    async def start(self) -> None:
        await web.BaseSite.start(self)  # what TCPSite.start does, with a capped factory
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        cap = self.max_connections
        # A connection counts in server.connections from its connection_made, which the
        # transport schedules (call_soon) right after the factory runs; a burst of accepts runs
        # every factory first. Connections made by a factory but not yet counted there are
        # counted here until then (the decrement is scheduled just before connection_made).
        unmade = 0

        def made() -> None:
            nonlocal unmade
            unmade -= 1

        def factory() -> asyncio.Protocol:
            nonlocal unmade
            if len(server.connections) + unmade >= cap:
                log.warning("refusing a connection: %d open (listen.max_connections)", cap)
                return _OverCap()
            unmade += 1
            loop.call_soon(made)
            return server()

        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)


def runner(app: web.Application, listen: ListenConfig) -> web.AppRunner:
    """The app's runner with the server limits set explicitly."""
    return web.AppRunner(
        app, handle_signals=False, handler_cancellation=True,
        keepalive_timeout=listen.keepalive_timeout_s,
        # A backstop only: the app itself ends what runs past the grace period.
        shutdown_timeout=listen.shutdown_grace_s + 5,
        max_line_size=MAX_LINE_BYTES, max_field_size=MAX_LINE_BYTES, max_headers=MAX_HEADERS)


async def start(app: web.Application, listen: ListenConfig) -> tuple[web.AppRunner, CappedSite]:
    """Set up and start serving ``app`` as ``listen`` says; :meth:`web.AppRunner.cleanup`
    stops it."""
    run = runner(app, listen)
    await run.setup()
    site = CappedSite(run, listen.host, listen.port, max_connections=listen.max_connections)
    try:
        await site.start()
    except BaseException:
        await run.cleanup()
        raise
    return run, site


def serve(app: web.Application, listen: ListenConfig,
          ready: Callable[[], None] = lambda: None) -> None:
    """Serve ``app`` until SIGINT or SIGTERM; ``ready()`` once the socket listens."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        run, _ = await start(app, listen)
        try:
            ready()
            await stop.wait()
        finally:
            await run.cleanup()

    asyncio.run(main())
