"""Slot leasing is first come, first served (:class:`tightwad.llamaserver.slots.SlotPool`): a slot that is
released goes to the longest waiter even when a new request asks at that very moment, and a
waiter that gives up never loses a slot. Under load (tests/test_load.py) an unfair pool showed
as a p99 latency three times the median."""

from __future__ import annotations

import asyncio

from tightwad.llamaserver.slots import SlotPool, common_prefix


def test_a_released_slot_goes_to_the_longest_waiter_not_a_newcomer() -> None:
    async def scenario() -> list[str]:
        pool = SlotPool(1)
        order: list[str] = []
        first = await pool.acquire()

        async def user(name: str) -> None:
            slot = await pool.acquire()
            order.append(name)
            await asyncio.sleep(0)
            pool.release(slot)

        waiting = [asyncio.ensure_future(user(f"w{i}")) for i in range(3)]
        await asyncio.sleep(0)  # all three queue up
        assert pool.waiting == 3
        pool.release(first)
        late = asyncio.ensure_future(user("newcomer"))  # asks the moment the slot frees
        assert pool.try_acquire() is None  # nor may anyone grab it without waiting
        await asyncio.gather(*waiting, late)
        return order

    assert asyncio.run(scenario()) == ["w0", "w1", "w2", "newcomer"]


def test_a_waiter_that_gives_up_passes_its_slot_on() -> None:
    async def scenario() -> tuple[int, int, int]:
        pool = SlotPool(1)
        held = await pool.acquire()
        quitter = asyncio.ensure_future(pool.acquire())
        patient = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0)
        pool.release(held)  # handed to the quitter...
        quitter.cancel()  # ...which gives up before it runs
        got = await asyncio.wait_for(patient, 5)
        return got, pool.in_use, pool.waiting

    got, in_use, waiting = asyncio.run(scenario())
    assert got == 0 and in_use == 1 and waiting == 0


def test_a_free_slot_that_holds_the_prompts_prefix_is_preferred() -> None:
    async def scenario() -> list[int]:
        pool = SlotPool(3)
        a, b, c = (await pool.acquire(), await pool.acquire(), await pool.acquire())
        pool.release(a, [1, 2, 3, 4])  # a conversation's first turn
        pool.release(b, [9, 9])
        pool.release(c, [5, 6])
        # Its next turn extends the same prompt: slot a still holds it.
        follow_up = await pool.acquire([1, 2, 3, 4, 7, 8])
        # Nothing in common with anything cached: the least recently used slot.
        fresh = await pool.acquire([42])
        return [a, follow_up, b, fresh]

    a, follow_up, b, fresh = asyncio.run(scenario())
    assert follow_up == a and fresh == b


def test_a_shared_template_prefix_alone_does_not_pull_requests_onto_one_slot() -> None:
    template = [7, 7, 7]

    async def scenario() -> list[int]:
        pool = SlotPool(2)
        x = await pool.acquire(template + [1, 2, 3, 4, 5])
        pool.release(x, template + [1, 2, 3, 4, 5])
        # Another prompt with the same template goes to the other (unused) slot, so x keeps
        # the first prompt cached; that prompt, asked again, finds x.
        y = await pool.acquire(template + [9, 8, 7, 6, 5])
        again = await pool.acquire(template + [1, 2, 3, 4, 5])
        return [x, y, again]

    x, y, again = asyncio.run(scenario())
    assert y != x and again == x


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix((7, 8), [7, 8]) == 2
