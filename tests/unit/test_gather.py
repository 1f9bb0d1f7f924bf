"""Verify gathering (:mod:`tightwad.engine.gather`): the rule as pure logic on explicit times,
then the gate on an event loop (no llama-server; tests/integration/test_verify_batching.py has
the coordinator's side)."""

from __future__ import annotations

import asyncio

import pytest

from tightwad.engine.gather import GatherState, VerifyGather

W = 0.020  # the window, seconds


def state(*keys: str, window: float = W) -> GatherState:
    s = GatherState(window)
    for key in keys:
        s.join(key)
    return s


def drafting(s: GatherState, key: str, answered: float, gap: float | None = None) -> None:
    """``key``'s verify answered at ``answered``; ``gap``: its measured time to the next."""
    s.arrive(key, answered - 0.05)
    s.release(answered - 0.05, "alone")
    s.answered(key, answered)
    s.streams[key].gap = gap


def test_a_stream_alone_goes_at_once() -> None:
    s = state("a")
    s.arrive("a", 1.0)
    assert s.due(1.0) == "alone"
    [r] = s.release(1.0, "alone")
    assert (r.key, r.waited_s, r.group) == ("a", 0.0, 1)
    assert s.streams["a"].state == "in_flight"


def test_new_and_in_flight_peers_of_unknown_timing_are_not_waited_for() -> None:
    """A peer with no verify yet (its first round, or a pass-through), or whose verify is at the
    coordinator while its timing is unknown: nobody waits for it."""
    s = state("a", "new", "busy")
    s.arrive("busy", 0.5)
    s.release(0.5, "alone")
    s.arrive("a", 1.0)
    assert s.expected() == []
    assert s.due(1.0) == "alone"


def test_a_cohort_in_flight_is_waited_for_while_the_coordinator_is_busy() -> None:
    """Streams that fell into two cohorts (a verifies while b drafts, and the other way round)
    merge: waiting for b while its verify holds the coordinator costs a nothing (a's verify
    would queue there), and b comes back one gap after its answer."""
    s = state("a", "b")
    s.verify_s, s.idle_since = 0.070, 0.9
    s.arrive("b", 1.0)
    s.release(1.0, "alone")
    s.streams["b"].gap = 0.019
    s.arrive("a", 1.030)  # b's verify answers at ~1.070 and b is back at ~1.089
    assert s.free_at() == pytest.approx(1.070)
    assert s.deadline() == pytest.approx(1.070 + W)
    assert s.expected() == ["b"]
    assert s.due(1.060) is None
    s.answered("b", 1.068)
    assert s.idle_since == 1.068 and s.deadline() == pytest.approx(1.068 + W)
    s.arrive("b", 1.087)
    assert s.due(1.087) == "all_here"
    released = {r.key: r for r in s.release(1.087, "all_here")}
    assert released["a"].waited_s == pytest.approx(0.057)
    # The gate's own delay: only the time since the coordinator went free.
    assert released["a"].delay_s == pytest.approx(0.019)
    assert released["b"].delay_s == 0.0


def test_no_delay_is_counted_while_a_verify_is_in_flight() -> None:
    s = state("a", "b", "c")
    s.arrive("c", 1.0)
    s.release(1.0, "alone")
    s.arrive("a", 1.01)
    [r] = s.release(1.05, "window")
    assert (r.waited_s, r.delay_s) == (pytest.approx(0.04), 0.0)


def test_a_drafting_peer_is_waited_for_until_it_comes() -> None:
    s = state("a", "b")
    drafting(s, "b", answered=0.99)
    s.arrive("a", 1.0)
    assert s.expected() == ["b"]
    assert s.due(1.0 + W / 2) is None
    s.arrive("b", 1.0 + W / 2)
    assert s.due(1.0 + W / 2) == "all_here"
    released = {r.key: r for r in s.release(1.0 + W / 2, "all_here")}
    assert released["a"].waited_s == pytest.approx(W / 2)
    assert released["b"].waited_s == 0.0
    assert {r.group for r in released.values()} == {2}


def test_no_verify_waits_past_the_window() -> None:
    s = state("a", "b", "c")
    drafting(s, "b", answered=0.99)
    drafting(s, "c", answered=0.99)
    s.arrive("a", 1.0)
    s.arrive("c", 1.0 + W / 2)
    assert s.deadline() == pytest.approx(1.0 + W)  # the FIRST waiter's arrival + the window
    assert s.due(1.0 + W - 1e-6) is None
    assert s.due(1.0 + W) == "window"
    waits = {r.key: r.waited_s for r in s.release(1.0 + W, "window")}
    assert waits == pytest.approx({"a": W, "c": W / 2})


def test_a_peer_due_after_the_deadline_is_not_waited_for() -> None:
    """Its measured gap says it comes after the window: waiting for it would be in vain."""
    s = state("a", "b", "c")
    drafting(s, "b", answered=0.99, gap=0.050)  # due at 1.04 > 1.0 + W
    drafting(s, "c", answered=0.99, gap=0.015)  # due at 1.005
    s.arrive("a", 1.0)
    assert s.expected() == ["c"]
    s.arrive("c", 1.005)
    assert s.due(1.005) == "all_here"


def test_the_gap_is_measured_from_the_answer_to_the_next_arrival() -> None:
    s = state("a")
    drafting(s, "a", answered=1.0)
    s.arrive("a", 1.010)
    assert s.streams["a"].gap == pytest.approx(0.010)
    s.release(1.010, "alone")
    s.answered("a", 1.030)
    s.arrive("a", 1.050)
    assert s.streams["a"].gap == pytest.approx(0.015)  # smoothed: 0.5 * 0.010 + 0.5 * 0.020


def test_the_window_in_force_is_at_most_what_a_verify_takes() -> None:
    """On a fast pool a batch costs less than the configured window: waiting longer than a
    batch would cost more than the batch it saves."""
    s = state("a", "b", window=0.050)
    assert s.limit_s == 0.050
    s.arrive("a", 1.0)
    s.release(1.0, "alone")
    s.answered("a", 1.004)
    assert s.verify_s == pytest.approx(0.004)
    assert s.limit_s == pytest.approx(0.004)
    drafting(s, "b", answered=1.004)
    s.arrive("a", 1.005)
    assert s.deadline() == pytest.approx(1.005 + s.limit_s)


def test_leaving_and_abandoning_end_the_wait_for_a_stream() -> None:
    s = state("a", "b", "c")
    drafting(s, "b", answered=0.99)
    drafting(s, "c", answered=0.99)
    s.arrive("a", 1.0)
    s.leave("b")
    assert s.expected() == ["c"]
    s.abandon("c")
    assert s.due(1.0) == "alone"


# -- the gate on an event loop -------------------------------------------------------------------


class Coordinator:
    """A fake coordinator: ``one`` answers one payload, ``many`` a group in one call (and
    records the groups); ``refuse_groups`` makes ``many`` fail as a server without the
    batch call does."""

    def __init__(self, refuse_groups: bool = False) -> None:
        self.groups: list[list[str]] = []
        self.singles: list[str] = []
        self.refuse_groups = refuse_groups

    async def one(self, payload: str) -> str:
        self.singles.append(payload)
        await asyncio.sleep(0.01)  # a batch
        return payload.upper()

    async def many(self, payloads: list[str]) -> list[str]:
        await asyncio.sleep(0.01)
        if self.refuse_groups:
            raise LookupError("no batch call here")
        self.groups.append(payloads)
        return [p.upper() for p in payloads]


async def _rounds(gate: VerifyGather, server: Coordinator, key: str, n: int,
                  draft_s: float) -> list[str]:
    """``n`` rounds of one stream: draft (a sleep), then a verify through the gate."""
    gate.join(key)
    try:
        answers = []
        for i in range(n):
            await asyncio.sleep(draft_s)
            answers.append(await gate.send(key, f"{key}{i}", server.one, server.many))
        return answers
    finally:
        gate.leave(key)


def test_concurrent_streams_go_through_in_groups_of_one_call() -> None:
    gate: VerifyGather[str, str] = VerifyGather(0.2)
    server = Coordinator()

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(_rounds(gate, server, k, 5, 0.002) for k in "abcd"))

    answers = asyncio.run(main())
    assert answers == [[f"{k}{i}".upper() for i in range(5)] for k in "abcd"]
    assert gate.stats.verifies == 20
    # Round 0 goes alone (nobody has a verify behind it yet); later rounds wait for the drafting
    # peers, go as one call of the whole group, and the window bounds every wait.
    assert max(len(g) for g in server.groups) == 4
    assert sum(len(g) for g in server.groups) + len(server.singles) == 20
    assert all(r.waited_s <= 0.2 + 0.05 for r in gate.stats.recent)
    assert gate.state.streams == {}


def test_a_refused_group_call_sends_each_alone() -> None:
    """A server without the batch call (or one refusing an element): each payload goes again
    alone and gets its own answer."""
    gate: VerifyGather[str, str] = VerifyGather(0.2, alone_on=(LookupError,))
    server = Coordinator(refuse_groups=True)

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(_rounds(gate, server, k, 3, 0.002) for k in "ab"))

    assert asyncio.run(main()) == [["A0", "A1", "A2"], ["B0", "B1", "B2"]]
    assert sorted(server.singles) == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_without_batch_calls_a_group_goes_as_single_calls() -> None:
    gate: VerifyGather[str, str] = VerifyGather(0.2)
    gate.batch_calls = False
    server = Coordinator()

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(_rounds(gate, server, k, 3, 0.002) for k in "ab"))

    assert asyncio.run(main()) == [["A0", "A1", "A2"], ["B0", "B1", "B2"]]
    assert server.groups == [] and len(server.singles) == 6
    assert max(r.group for r in gate.stats.recent) == 2


def test_a_late_peer_holds_nobody_past_the_window() -> None:
    """b drafts far longer than the window: a's verify goes when the window ends, and the
    gate's own bookkeeping says it waited no longer than that."""
    window = 0.02
    gate: VerifyGather[str, str] = VerifyGather(window)
    server = Coordinator()

    async def main() -> None:
        gate.join("a")
        gate.join("b")
        await gate.send("b", "b0", server.one, server.many)  # answered: b drafts now
        gate.state.verify_s = None  # keep the configured window in force
        await gate.send("a", "a0", server.one, server.many)  # waits for b, which stays away
        gate.leave("a")
        gate.leave("b")

    asyncio.run(main())
    a = [r for r in gate.stats.recent if r.key == "a"]
    assert [r.reason for r in a] == ["window"]
    assert window <= a[0].waited_s <= window + 0.05  # the event loop's scheduling slack


def test_a_cancelled_wait_leaves_no_one_waiting_for_it() -> None:
    gate: VerifyGather[str, str] = VerifyGather(5.0)  # long: only the cancellation ends b's wait
    server = Coordinator()

    async def main() -> None:
        for key in "abc":
            gate.join(key)
        for key in "bc":
            drafting(gate.state, key, answered=0.0)
        waiting = asyncio.create_task(gate.send("b", "b1", server.one, server.many))
        await asyncio.sleep(0.01)
        assert gate.state.waiting() == ["b"]
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert gate.state.streams["b"].state == "new"
        # a is new and b gave up: c goes at once
        assert await gate.send("c", "c1", server.one, server.many) == "C1"

    asyncio.run(main())
    assert gate.stats.recent[-1].key == "c" and gate.stats.recent[-1].reason == "alone"
    assert server.singles == ["c1"]


def test_off_and_unknown_streams_pass_straight_through() -> None:
    server = Coordinator()

    async def main(gate: VerifyGather, key: str) -> str:
        return await gate.send(key, "x", server.one, server.many)

    off: VerifyGather[str, str] = VerifyGather(0.0)
    off.join("a")
    assert asyncio.run(main(off, "a")) == "X"
    assert off.stats.verifies == 0
    on: VerifyGather[str, str] = VerifyGather(W)
    assert asyncio.run(main(on, "never-joined")) == "X"
    assert on.stats.verifies == 0


def test_status_reports_groups_and_waits() -> None:
    gate: VerifyGather[str, str] = VerifyGather(W)
    server = Coordinator()

    async def main() -> None:
        await asyncio.gather(*(_rounds(gate, server, k, 3, 0.001) for k in "ab"))

    asyncio.run(main())
    status = gate.status()
    assert status["window_ms"] == 20.0
    assert status["verifies"] == 6
    assert status["groups"] == gate.stats.groups
    assert status["one_call_per_group"] is True
    assert sum(status["groups_by_reason"].values()) == status["groups"]


def test_a_stream_that_steps_aside_is_not_waited_for() -> None:
    # "a" answered a verify and is expected back; "b"'s verify waits for it until "a" steps
    # aside (it streams target-only tokens and sends no verify for now), then goes at once.
    gate: VerifyGather[str, str] = VerifyGather(5.0)
    server = Coordinator()

    async def main() -> tuple[bool, str]:
        gate.join("a")
        gate.join("b")
        await gate.send("a", "a0", server.one, server.many)
        gate.state.verify_s = 5.0  # a verify "takes" long: the window in force is the whole 5 s
        waiting = asyncio.ensure_future(gate.send("b", "b0", server.one, server.many))
        await asyncio.sleep(0.1)
        held = not waiting.done()
        gate.aside("a")
        return held, await asyncio.wait_for(waiting, 1.0)

    held, answer = asyncio.run(main())
    assert held and answer == "B0"
    assert gate.state.streams["a"].state == "new"
