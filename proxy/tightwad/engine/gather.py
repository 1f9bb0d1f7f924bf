"""Verify gathering: the ready verifies of several streams reach the coordinator together, so
that its main loop evaluates them in ONE batch (docs/proxy.md, "Verify gathering").

Why: llama-server's loop (``server-queue.cpp`` ``start_loop``) takes every task queued when it
wakes, then runs one batch (``update_slots``) over all busy slots; a task that arrives a moment
after a batch started waits for that batch and then runs in one of its own. Over RPC every batch
pays the pool's chain of round trips (each worker in turn), so N streams whose verifies arrive a
few milliseconds apart pay it up to N times per round.

A stream (one leased target slot) is, as the gather sees it:

- ``new``: no verify yet (its first is on the way, or it is a pass-through): nobody waits for it;
- ``waiting``: its verify is at the gate;
- ``in_flight``: its verify is at the coordinator; its next one is expected when that answers
  (sent + the usual verify time) plus its usual gap;
- ``drafting``: its last verify answered; its next one is expected at that answer plus its usual
  gap (drafting, deciding, emitting), measured.

The waiting verifies all go at once when no stream is expected before the group's deadline: the
window after the earliest waiter's arrival or after the coordinator frees up (its last verify
of ours is expected to answer), whichever is later. Waiting while the coordinator is busy costs
nothing: a verify sent then would wait in its queue. This is what merges streams that fell into
two cohorts (one verifies while the other drafts, each cohort a batch of its own) into one batch
per round. The window is the configured one, or less: never more than a verify has been taking
(waiting longer than a batch costs more than the batch it saves). So no verify is delayed more
than the window past the moment the coordinator is free (:attr:`Released.delay_s`), and one that
is alone, or whose peers are all far from ready, does not wait at all.

A group goes as ONE call (patch 0004: a JSON array of ``/completion`` bodies, posted to the
server's queue at once). Separate requests, even written to their sockets back to back, race the
server's loop: the first wakes it and starts a batch alone, the rest form a second one (measured:
2 decodes for 4 such verifies in 13 of 16 tries).

:class:`GatherState` is that rule as pure logic on explicit times; :class:`VerifyGather` runs it
on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

State = Literal["new", "waiting", "in_flight", "drafting"]
P = TypeVar("P")
R = TypeVar("R")

GAP_WEIGHT = 0.5
"""Weight of the newest observation in a stream's gap and in the verify time (the draft length
changes from round to round, so old rounds age fast)."""


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - GAP_WEIGHT) * old + GAP_WEIGHT * new


@dataclass
class Stream:
    state: State = "new"
    arrived: float = 0.0
    """When its verify reached the gate (``waiting``)."""
    answered: float = 0.0
    """When its last verify answered (``drafting``)."""
    sent: float = 0.0
    """When its verify left the gate (``in_flight``)."""
    gap: float | None = None
    """Its usual time from an answer to its next verify."""


@dataclass(frozen=True)
class Released:
    """One verify let through the gate."""

    key: Hashable
    waited_s: float
    group: int
    """How many verifies went with it (itself included)."""
    reason: str
    """``alone`` (nobody expected), ``all_here`` (every expected peer came) or ``window``."""
    delay_s: float = 0.0
    """The part of the wait that the gate added: the time since the coordinator was last seen
    free of our verifies (or since arrival, if later); 0 when one is still in flight (the
    verify would have waited in the coordinator's queue)."""


@dataclass
class GatherState:
    """The gathering rule on explicit times (seconds on one monotonic clock)."""

    window_s: float
    streams: dict[Hashable, Stream] = field(default_factory=dict)
    verify_s: float | None = None
    """How long a verify has been taking, gate to answer (smoothed)."""
    idle_since: float = 0.0
    """When the last verify in flight answered."""

    def join(self, key: Hashable) -> None:
        self.streams[key] = Stream()

    def leave(self, key: Hashable) -> None:
        self.streams.pop(key, None)

    def arrive(self, key: Hashable, now: float) -> None:
        s = self.streams[key]
        if s.state == "drafting":
            s.gap = _ewma(s.gap, max(0.0, now - s.answered))
        s.state, s.arrived = "waiting", now

    def abandon(self, key: Hashable) -> None:
        """A waiting verify was cancelled (its request ended), or the stream decodes without
        verifies for now: nobody waits for it."""
        if (s := self.streams.get(key)) is not None:
            s.state = "new"

    def answered(self, key: Hashable, now: float) -> None:
        """Its verify answered (or failed): it drafts its next round."""
        if (s := self.streams.get(key)) is None:
            return
        if s.state == "in_flight":
            self.verify_s = _ewma(self.verify_s, max(0.0, now - s.sent))
        s.state, s.answered = "drafting", now
        if not self._in_flight():
            self.idle_since = now

    def _in_flight(self) -> list[Stream]:
        return [s for s in self.streams.values() if s.state == "in_flight"]

    @property
    def limit_s(self) -> float:
        """The window in force: the configured one, at most what a verify takes."""
        if self.verify_s is None:
            return self.window_s
        return min(self.window_s, self.verify_s)

    def waiting(self) -> list[Hashable]:
        return [k for k, s in self.streams.items() if s.state == "waiting"]

    def free_at(self) -> float:
        """When the coordinator is free of our verifies: when the last in flight is expected to
        answer (as good as now while that is unknown), else when it answered."""
        flying = self._in_flight()
        if not flying:
            return self.idle_since
        if self.verify_s is None:
            return 0.0
        return max(s.sent for s in flying) + self.verify_s

    def deadline(self) -> float | None:
        """When the waiting group goes regardless: the window after its first arrival or after
        the coordinator frees up, whichever is later."""
        arrivals = [s.arrived for s in self.streams.values() if s.state == "waiting"]
        if not arrivals:
            return None
        return max(min(arrivals), self.free_at()) + self.limit_s

    def _due_at(self, s: Stream) -> float | None:
        """When this stream's next verify is expected (None: unknown)."""
        if s.gap is None:
            return None
        if s.state == "drafting":
            return s.answered + s.gap
        if s.state == "in_flight" and self.verify_s is not None:
            return s.sent + self.verify_s + s.gap
        return None

    def expected(self) -> list[Hashable]:
        """Streams whose next verify is due before the deadline: drafting ones (also when not
        yet known) and in-flight ones (when known)."""
        deadline = self.deadline()
        if deadline is None:
            return []
        out = []
        for k, s in self.streams.items():
            due = self._due_at(s)
            if (s.state == "drafting" and (due is None or due <= deadline)) or (
                    s.state == "in_flight" and due is not None and due <= deadline):
                out.append(k)
        return out

    def due(self, now: float) -> str | None:
        """Why the waiting group goes now, or None while it waits."""
        deadline = self.deadline()
        if deadline is None:
            return None
        if not self.expected():
            return "all_here" if len(self.waiting()) > 1 else "alone"
        return "window" if now >= deadline else None

    def release(self, now: float, reason: str) -> list[Released]:
        keys = self.waiting()
        busy = bool(self._in_flight())
        out = []
        for key in keys:
            s = self.streams[key]
            delay = 0.0 if busy else max(0.0, now - max(s.arrived, self.idle_since))
            out.append(Released(key, now - s.arrived, len(keys), reason, delay))
        for key in keys:
            s = self.streams[key]
            s.state, s.sent = "in_flight", now
        return out


@dataclass
class GatherStats:
    verifies: int = 0
    groups: int = 0
    waited_s: float = 0.0
    max_wait_s: float = 0.0
    max_delay_s: float = 0.0
    by_reason: dict[str, int] = field(default_factory=dict)
    recent: deque[Released] = field(default_factory=lambda: deque(maxlen=4096))
    """The latest releases, for tests and diagnosis."""

    def add(self, released: list[Released]) -> None:
        if not released:
            return
        self.groups += 1
        reason = released[0].reason
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        for r in released:
            self.verifies += 1
            self.waited_s += r.waited_s
            self.max_wait_s = max(self.max_wait_s, r.waited_s)
            self.max_delay_s = max(self.max_delay_s, r.delay_s)
            self.recent.append(r)


class _Group(Generic[P, R]):
    """The payloads of one released group, and the one call that sends them together."""

    def __init__(self, payloads: dict[Hashable, P]) -> None:
        self.payloads = payloads
        self.index = {key: i for i, key in enumerate(payloads)}
        self.call: asyncio.Future[list[R]] | None = None


class VerifyGather(Generic[P, R]):
    """The gate every coordinator verify goes through (:meth:`send`). Streams are keyed by
    their target slot: :meth:`join` when leased, :meth:`leave` when released. A window of 0, or
    a key that never joined, passes straight through. Use on one event loop.

    A group of several goes to the coordinator as ONE call (``many``: patch 0004's batch of
    completions), because separate requests, even written at the same instant, race the
    server's loop: the first starts a batch alone (docs/proxy.md, "Verify gathering"). When
    that call fails with one of ``alone_on`` (an element the server refused, a server without
    the patch), each payload goes again alone, so each gets its own answer or error."""

    def __init__(self, window_s: float, *, alone_on: tuple[type[BaseException], ...] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state = GatherState(window_s)
        self.stats = GatherStats()
        self.batch_calls = True
        """Whether groups go as one call (False: the coordinator lacks patch 0004)."""
        self._alone_on = alone_on
        self._clock = clock
        self._gates: dict[Hashable, asyncio.Future[_Group[P, R]]] = {}
        self._payloads: dict[Hashable, P] = {}
        self._timer: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return self.state.window_s > 0

    def join(self, key: Hashable) -> None:
        self.state.join(key)

    def leave(self, key: Hashable) -> None:
        self.state.leave(key)
        self._check()

    def aside(self, key: Hashable) -> None:
        """This stream sends no verify for now (it streams target-only): nobody waits for it."""
        if key in self.state.streams:
            self.state.abandon(key)
            self._check()

    async def send(self, key: Hashable, payload: P, one: Callable[[P], Awaitable[R]],
                   many: Callable[[list[P]], Awaitable[list[R]]]) -> R:
        """Hold ``payload`` until its group goes, then send it: alone with ``one``, or with
        the group's other payloads in one call of ``many``. The stream is drafting once this
        returns, however it ends."""
        if not self.enabled or key not in self.state.streams:
            return await one(payload)
        gate: asyncio.Future[_Group[P, R]] = asyncio.get_running_loop().create_future()
        self._gates[key] = gate
        self._payloads[key] = payload
        self.state.arrive(key, self._clock())
        self._check()
        try:
            group = await gate
        except BaseException:
            self._gates.pop(key, None)
            self._payloads.pop(key, None)
            self.state.abandon(key)
            self._check()
            raise
        try:
            return await self._sent(group, key, one, many)
        finally:
            self.state.answered(key, self._clock())
            self._check()

    async def _sent(self, group: _Group[P, R], key: Hashable, one: Callable[[P], Awaitable[R]],
                    many: Callable[[list[P]], Awaitable[list[R]]]) -> R:
        if len(group.payloads) == 1 or not self.batch_calls:
            return await one(group.payloads[key])
        if group.call is None:  # the first member to get here sends the group
            group.call = asyncio.ensure_future(many(list(group.payloads.values())))
        try:
            # shielded: a member that goes away (its client left) does not cancel the others'
            results = await asyncio.shield(group.call)
        except self._alone_on:
            return await one(group.payloads[key])
        return results[group.index[key]]

    def _check(self) -> None:
        """Release the waiting group if it is due, else wake up at its deadline."""
        now = self._clock()
        reason = self.state.due(now)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if reason is None:
            deadline = self.state.deadline()
            if deadline is not None:
                self._timer = asyncio.get_running_loop().call_later(max(0.0, deadline - now),
                                                                    self._check)
            return
        released = self.state.release(now, reason)
        self.stats.add(released)
        group: _Group[P, R] = _Group({r.key: self._payloads.pop(r.key) for r in released
                                      if r.key in self._payloads})
        for r in released:
            gate = self._gates.pop(r.key, None)
            if gate is not None and not gate.done():
                gate.set_result(group)

    def status(self) -> dict[str, Any]:
        s = self.stats
        return {
            "window_ms": round(1e3 * self.state.window_s, 3),
            "window_in_force_ms": round(1e3 * self.state.limit_s, 3),
            "one_call_per_group": self.batch_calls,
            "verifies": s.verifies,
            "groups": s.groups,
            "verifies_per_group": round(s.verifies / s.groups, 3) if s.groups else None,
            "mean_wait_ms": round(1e3 * s.waited_s / s.verifies, 3) if s.verifies else None,
            "max_wait_ms": round(1e3 * s.max_wait_s, 3),
            "max_delay_ms": round(1e3 * s.max_delay_s, 3),
            "groups_by_reason": dict(s.by_reason),
        }
