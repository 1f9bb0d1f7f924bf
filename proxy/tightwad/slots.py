"""Slot leasing: every in-flight request owns one llama-server slot id until it ends.

A slot holds one sequence's KV cache. Two requests on one slot would evict each other's cache
on every round (correct, but every verify would re-evaluate the whole context), so a request
leases a slot for its whole life and requests beyond the slot count wait in FIFO order.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator


class SlotPool:
    """The slot ids ``0..size-1`` of one server, leased one per request."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a slot pool needs at least one slot, got {size}")
        self.size = size
        self._free: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(size):
            self._free.put_nowait(slot)
        self.waiting = 0

    @property
    def in_use(self) -> int:
        return self.size - self._free.qsize()

    async def acquire(self) -> int:
        """Wait for a free slot (FIFO) and take it."""
        self.waiting += 1
        try:
            return await self._free.get()
        finally:
            self.waiting -= 1

    def try_acquire(self) -> int | None:
        """A free slot right now, or None."""
        try:
            return self._free.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def release(self, slot: int) -> None:
        self._free.put_nowait(slot)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[int]:
        slot = await self.acquire()
        try:
            yield slot
        finally:
            self.release(slot)
