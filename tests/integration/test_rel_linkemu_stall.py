"""A stalled emulated link (:meth:`tightwad.pool.linkemu.Relay.stall`) delivers nothing in either
direction until :meth:`~tightwad.pool.linkemu.Relay.unstall`, then everything it held, in order; the
connection stays open throughout (a dropped Wi-Fi, not a reset)."""

from __future__ import annotations

import asyncio

from tightwad.pool.linkemu import Relay


def test_stall_holds_bytes_both_ways_and_unstall_delivers_them() -> None:
    async def scenario() -> tuple[bytes, bytes, bytes]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with Relay("127.0.0.1", port) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"before")
            before = await asyncio.wait_for(reader.readexactly(6), 5)
            relay.stall()
            writer.write(b"during")
            try:
                held = await asyncio.wait_for(reader.read(100), 0.5)
            except asyncio.TimeoutError:
                held = b""
            relay.unstall()
            after = await asyncio.wait_for(reader.readexactly(6), 5)
            writer.close()
        server.close()
        await server.wait_closed()
        return before, held, after

    before, held, after = asyncio.run(scenario())
    assert before == b"before" and held == b"" and after == b"during"
