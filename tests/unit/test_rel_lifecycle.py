"""The proxy's shutdown logic (:mod:`tightwad.server.lifecycle`) without processes: drain waits for
requests in flight up to the grace period, then a request waiting upstream gets SHUTTING_DOWN
at once and its generator is closed (so its slots and upstream calls are released)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from tightwad.engine.events import Event, Failed
from tightwad.server.lifecycle import SHUTTING_DOWN, Lifecycle


def test_drain_waits_for_requests_that_finish_in_time() -> None:
    async def main() -> tuple[int, float]:
        life = Lifecycle()

        async def request() -> None:
            with life.request():
                await asyncio.sleep(0.1)

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        left = await life.drain(5.0)
        await task
        return left, loop.time() - t0

    left, waited = asyncio.run(main())
    assert left == 0 and waited < 5.0


def test_a_request_stuck_upstream_ends_with_shutting_down() -> None:
    closed: list[bool] = []

    async def stuck() -> AsyncIterator[Event]:
        try:
            yield Failed(200, "first", "x")  # any first event
            await asyncio.sleep(3600)  # an upstream call that never answers
            yield Failed(500, "never", "x")
        finally:
            closed.append(True)

    async def main() -> tuple[list, int]:
        life = Lifecycle()
        events = stuck()
        seen: list = []

        async def request() -> None:
            with life.request():
                seen.append(await life.next_event(events))
                seen.append(await life.next_event(events))
                seen.append(await life.next_event(events))

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.05)
        left = await life.drain(0.1)
        await asyncio.wait_for(task, 5)
        return seen, left

    seen, left = asyncio.run(main())
    assert left == 1
    assert seen[0].message == "first" and seen[1] is SHUTTING_DOWN and seen[2] is SHUTTING_DOWN
    assert closed == [True]
    assert SHUTTING_DOWN.status == 503 and SHUTTING_DOWN.retry_after
