"""The listening socket's connection cap holds exactly, also when a burst of connections is
accepted at once (asyncio runs every accepted connection's protocol factory before any of them
counts as made): real sockets against a trivial app served by tightwad.server.listen."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web

from tightwad.config import parse_config
from tightwad.pool.procs import free_port
from tightwad.server import listen

CAP = 5


async def _burst(n: int) -> list[bytes]:
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", hello)
    config = parse_config({"listen": {"port": free_port(), "max_connections": CAP,
                                      "keepalive_timeout_s": 5}}).listen
    runner, _ = await listen.start(app, config)
    loop = asyncio.get_running_loop()
    socks = []
    try:
        for _ in range(n):  # all connected before the server's loop runs once
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", config.port))
            socks.append(sock)
        await asyncio.sleep(0.2)
        answers = []
        for sock in socks:
            await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answers.append(await asyncio.wait_for(loop.sock_recv(sock, 4096), 5))
        return answers
    finally:
        for sock in socks:
            sock.close()
        await runner.cleanup()


def test_a_burst_of_connections_gets_exactly_the_cap() -> None:
    answers = asyncio.run(_burst(4 * CAP))
    served = [a for a in answers if a.startswith(b"HTTP/1.1 200")]
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert len(served) == CAP and len(refused) == 3 * CAP, answers
    assert all(b"Retry-After: 1" in a and b"too_many_connections" in a for a in refused)
