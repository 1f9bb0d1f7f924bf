"""Slot leasing: every in-flight request owns one llama-server slot id until it ends.

A slot holds one sequence's KV cache. Two requests on one slot would evict each other's cache
on every round (correct, but every verify would re-evaluate the whole context), so a request
leases a slot for its whole life and requests beyond the slot count wait in FIFO order.
Among free slots a request gets the one whose last prompt covers most of its own (the next turn
of a conversation finds its history still cached), else the least recently used one, so the caches
of recent prompts survive (a shared chat-template prefix alone would pull every request onto one
slot and make each evict the last).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SlotPool:
    """The slot ids ``0..size-1`` of one server, leased one per request, strictly first come
    first served: a released slot goes straight to the longest waiter, so a request arriving
    at that moment cannot take it (with :class:`asyncio.Queue` it could, and under steady load
    an unlucky request was passed over again and again)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a slot pool needs at least one slot, got {size}")
        self.size = size
        self._free: collections.deque[int] = collections.deque(range(size))
        self._prompts: dict[int, tuple[int, ...]] = {}  # the last prompt each slot served
        self._waiters: collections.deque[asyncio.Future[int]] = collections.deque()

    # A free slot counts as holding a prompt when it shares at least this share of it.
    REUSE_SHARE = 0.5

    @property
    def in_use(self) -> int:
        return self.size - len(self._free)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    @property
    def busy(self) -> bool:
        """A request arriving now would wait (no free slot, or earlier requests wait)."""
        return not self._free or self.waiting > 0

    def _take(self, prompt: Sequence[int]) -> int:
        # _free runs from least to most recently released.
        shared = {s: common_prefix(self._prompts.get(s, ()), prompt) for s in self._free}
        best = max(self._free, key=shared.__getitem__)
        if not prompt or shared[best] < self.REUSE_SHARE * len(prompt):
            best = self._free[0]
        self._free.remove(best)
        return best

    async def acquire(self, prompt: Sequence[int] = ()) -> int:
        """Wait for a free slot (FIFO) and take it: the one holding most of ``prompt``, else the
        least recently used."""
        if self._free and not self.waiting:
            return self._take(prompt)
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # handed a slot just as it gave up: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def try_acquire(self, prompt: Sequence[int] = ()) -> int | None:
        """A free slot right now (never one a waiter is owed), or None."""
        if self._free and not self.waiting:
            return self._take(prompt)
        return None

    def release(self, slot: int, prompt: Sequence[int] | None = None) -> None:
        """Give ``slot`` back; ``prompt``: what it now holds at its start (for the next pick)."""
        if prompt is not None:
            self._prompts[slot] = tuple(prompt)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[int]:
        slot = await self.acquire()
        try:
            yield slot
        finally:
            self.release(slot)
