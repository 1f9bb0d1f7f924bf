"""The proxy's lifetime as its requests see it: how many are in flight, and the signal that
ends them when the proxy stops (SIGTERM, a restart).

On shutdown the HTTP server stops accepting connections first; :meth:`Lifecycle.drain` then
gives requests in flight a grace period, and after it every request still running gets
:data:`SHUTTING_DOWN` as its next event, whatever it was waiting for upstream (the step in
progress is cancelled, which closes its upstream calls and frees its slots). No HTTP here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

from tightwad.engine.events import Event, Failed

SHUTTING_DOWN = Failed(503, "the tightwad proxy is restarting; retry shortly", "shutting_down",
                       retry_after=2.0)


class Lifecycle:
    """Requests in flight, and the signal that ends them when the proxy stops."""

    def __init__(self) -> None:
        self.active = 0
        self.stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count one request in flight for as long as the block runs."""
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def drain(self, grace_s: float) -> int:
        """Wait up to ``grace_s`` for requests in flight, then tell the rest to end; returns
        how many were still running."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        left = self.active
        self.stopping.set()
        return left

    async def next_event(self, events: AsyncIterator[Event]) -> Event:
        """The generator's next event, or :data:`SHUTTING_DOWN` once the proxy stops (the step
        in progress is cancelled, which closes its upstream calls)."""
        if self.stopping.is_set():
            return SHUTTING_DOWN
        step = asyncio.ensure_future(anext(events))
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait((step, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not step.done():
                step.cancel()
                await asyncio.wait((step,))
        if step.cancelled():
            return SHUTTING_DOWN
        return step.result()
