"""The proxy's statistics, each counted once: per request (:class:`RequestStats`, carried in
:class:`~tightwad.engine.events.Finished`) and since start (:class:`Telemetry`).

The engine reports each event once (request start and end, the queue, a round, a drafter
fallback, pass-through tokens) to :class:`Telemetry`, which updates the request's stats and the
totals. Both views read those totals: :meth:`Telemetry.status` is ``/tightwad/status``'s
``stats`` object, and :meth:`Telemetry.prometheus` renders them, with the series only Prometheus
has (HTTP answers, latency histograms, queue gauges), as ``/metrics``. Each proxy has a registry
of its own (never the process-global one, so several proxies in one process do not collide).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tightwad.decoding.speculation import Plan

# Round latencies on a loopback pool are milliseconds, on a slow LAN pool up to seconds.
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_RECENT_ROUNDS = 200  # rounds behind "recent_acceptance"
SERIES_S = 300.0  # seconds of rounds kept for the dashboard's charts and rolling rates
_RECENT_REQUESTS = 20  # finished requests the dashboard lists
_SAMPLES_MAX = 100_000  # a bound on memory at thousands of rounds a second


@dataclass
class RequestStats:
    """One generation. ``acceptance`` is llama.cpp's accepted/drafted ratio; ``alpha`` is the
    per-position acceptance estimate (Leviathan's a) the k controller used last."""

    mode: str = "remote"
    speculative: bool = False
    """Drafting was possible when the request started (remote mode, tokenizers match)."""
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    fallbacks: int = 0
    """Rounds that wanted a draft and ran target-only (drafter down, slow, busy or erroring)."""
    tokens: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    queued_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    last_k: int = 0
    alpha: float | None = None

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_round(self) -> float | None:
        return self.tokens / self.rounds if self.rounds else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance": self.acceptance,
                "tokens_per_round": self.tokens_per_round}


@dataclass(frozen=True)
class Round:
    """One verify round as the statistics see it."""

    drafted: int
    accepted: int
    tokens: int
    """Tokens the round added to the output."""
    draft_seconds: float | None
    """None when no draft was asked of the drafter."""
    verify_seconds: float
    counted: bool = False
    """Its tokens were counted as they streamed (:meth:`Telemetry.on_streamed`)."""


@dataclass(frozen=True)
class _Sample:
    """A round, or a pass-through stream's tokens, when it ended: the rolling rates' input."""

    at: float
    tokens: int
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    """Draft plus verify time; 0 for tokens counted outside rounds."""
    drafting: bool = False
    """The round asked the drafter for a draft (False: target-only)."""
    in_round: bool = False


@dataclass
class _Totals:
    """Everything since the proxy started: the one copy both views read."""

    requests: int = 0
    failed: int = 0
    tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)  # reason -> rounds
    passed_through: dict[str, int] = field(default_factory=dict)  # field -> requests
    draft_seconds: float = 0.0
    draft_calls: int = 0
    verify_seconds: float = 0.0
    continuations: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    """Overlapped drafting: continuations used as the next draft (True) or dropped."""
    recent: deque = field(default_factory=lambda: deque(maxlen=_RECENT_ROUNDS))
    """(drafted, accepted) of the last rounds that drafted."""


class Telemetry(Collector):
    """The proxy's statistics: the engine's ``request_*``/``on_*`` calls in, status JSON and
    Prometheus text out. ``speculation_active`` is read at each scrape."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, speculation_active: Callable[[], bool] = lambda: False) -> None:
        self._speculation_active = speculation_active
        self._started = time.time()
        self._totals = _Totals()
        self._fallback_since: dict[str, float] = {}
        self.in_flight = 0
        """Generations holding a slot: the load the k controller plans for."""
        self._plan: Plan | None = None
        # The dashboard's views (docs/proxy.md, "The dashboard"): the last minutes of rounds,
        # acceptance per draft position, the last fallback, the last requests.
        self._samples: deque[_Sample] = deque(maxlen=_SAMPLES_MAX)
        self._positions: list[list[int]] = []  # [reached, accepted] per draft position
        self._k_counts: dict[int, int] = {}
        self._last_fallback: tuple[str, float] | None = None
        self._finished: deque[dict[str, Any]] = deque(maxlen=_RECENT_REQUESTS)
        # Series that only Prometheus shows; the shared totals are exported by collect().
        self._registry = r = CollectorRegistry(auto_describe=True)
        self._http = Counter("tightwad_requests", "HTTP requests answered",
                             ["endpoint", "status"], registry=r)
        self._prompt_tokens = Counter("tightwad_prompt_tokens", "Prompt tokens processed",
                                      registry=r)
        self._draft_latency = Histogram("tightwad_draft_seconds", "Drafter time per round",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self._verify_latency = Histogram("tightwad_verify_seconds", "Target time per round "
                                         "(one forward pass)", buckets=_LATENCY_BUCKETS,
                                         registry=r)
        self._in_flight = Gauge("tightwad_requests_in_flight", "Generations holding a slot",
                                registry=r)
        self._queued = Gauge("tightwad_requests_queued", "Generations waiting for a slot",
                             registry=r)
        r.register(self)

    # -- events ---------------------------------------------------------------------------

    def request_started(self, mode: str) -> RequestStats:
        self._totals.requests += 1
        return RequestStats(mode=mode)

    def request_failed(self) -> None:
        self._totals.failed += 1

    def request_finished(self, stats: RequestStats, elapsed_s: float) -> None:
        stats.elapsed_seconds = elapsed_s
        generating = elapsed_s - stats.queued_seconds
        self._finished.append({
            "at": time.time(), "mode": stats.mode, "speculative": stats.speculative,
            "tokens": stats.tokens, "latency_s": round(elapsed_s, 4),
            "queued_s": round(stats.queued_seconds, 4),
            "tok_s": round(stats.tokens / generating, 2) if generating > 0 else None,
            "acceptance": stats.acceptance, "fallbacks": stats.fallbacks,
            "tokens_per_round": stats.tokens_per_round})

    @contextlib.contextmanager
    def waiting_for_slot(self, prompt_tokens: int) -> Iterator[None]:
        """A request with ``prompt_tokens`` waits in the slot queue for as long as the block
        runs."""
        self._prompt_tokens.inc(prompt_tokens)
        self._queued.inc()
        try:
            yield
        finally:
            self._queued.dec()

    def slot_taken(self, stats: RequestStats, queued_s: float) -> None:
        stats.queued_seconds = queued_s
        self.in_flight += 1
        self._in_flight.inc()

    def slot_released(self) -> None:
        self.in_flight -= 1
        self._in_flight.dec()

    def on_plan(self, plan: Plan) -> None:
        """The k controller's latest plan (:mod:`tightwad.engine.learning`)."""
        self._plan = plan

    def on_round(self, stats: RequestStats, done: Round) -> None:
        totals = self._totals
        stats.rounds += 1
        totals.rounds += 1
        if not done.counted:
            stats.tokens += done.tokens
            totals.tokens += done.tokens
        stats.verify_seconds += done.verify_seconds
        totals.verify_seconds += done.verify_seconds
        self._verify_latency.observe(done.verify_seconds)
        if done.draft_seconds is not None:
            stats.draft_seconds += done.draft_seconds
            totals.draft_seconds += done.draft_seconds
            totals.draft_calls += 1
            self._draft_latency.observe(done.draft_seconds)
        self._sample(_Sample(time.time(), done.tokens, done.drafted, done.accepted,
                             done.verify_seconds + (done.draft_seconds or 0.0),
                             drafting=done.draft_seconds is not None, in_round=True))
        if done.drafted:
            self._k_counts[done.drafted] = self._k_counts.get(done.drafted, 0) + 1
            while len(self._positions) < done.drafted:
                self._positions.append([0, 0])
            for i in range(done.drafted):
                self._positions[i][0] += 1
                self._positions[i][1] += i < done.accepted
            stats.drafted += done.drafted
            stats.accepted += done.accepted
            totals.drafted += done.drafted
            totals.accepted += done.accepted
            totals.recent.append((done.drafted, done.accepted))

    def on_fallback(self, stats: RequestStats, reason: str) -> None:
        """A round that wanted a draft runs target-only, for ``reason``."""
        stats.fallbacks += 1
        fallbacks = self._totals.fallbacks
        fallbacks[reason] = fallbacks.get(reason, 0) + 1
        self._fallback_since.setdefault(reason, time.time())
        self._last_fallback = (reason, time.time())

    def on_continuation(self, used: bool) -> None:
        """A continuation drafted during a verify was used as the next draft, or dropped."""
        self._totals.continuations[used] += 1

    def on_pass_through(self, reasons: Iterable[str]) -> None:
        """A request the coordinator answers itself, unspeculated, for these request fields."""
        counts = self._totals.passed_through
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1

    def on_streamed(self, stats: RequestStats, count: int) -> None:
        """Tokens of a target-only stream as they come (the token counters stay live between
        the stream's rounds, which then count them no more)."""
        stats.tokens += count
        self._totals.tokens += count

    def on_tokens(self, stats: RequestStats, count: int) -> None:
        """Tokens generated outside rounds (a pass-through stream)."""
        self.on_streamed(stats, count)
        self._sample(_Sample(time.time(), count))

    def _sample(self, sample: _Sample) -> None:
        self._samples.append(sample)
        while self._samples and self._samples[0].at < sample.at - SERIES_S:
            self._samples.popleft()

    def on_http_answer(self, endpoint: str, status: int) -> None:
        self._http.labels(endpoint=endpoint, status=str(status)).inc()

    # -- views ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``/tightwad/status``'s ``stats``: totals since start."""
        t = self._totals
        recent_d = sum(d for d, _ in t.recent)
        recent_a = sum(a for _, a in t.recent)
        return {
            "requests": t.requests, "failed": t.failed, "tokens": t.tokens,
            "rounds": t.rounds, "drafted": t.drafted, "accepted": t.accepted,
            "fallbacks": sum(t.fallbacks.values()),
            "acceptance": t.accepted / t.drafted if t.drafted else None,
            "recent_acceptance": recent_a / recent_d if recent_d else None,
            "tokens_per_round": t.tokens / t.rounds if t.rounds else None,
            "mean_draft_ms": (1000 * t.draft_seconds / t.draft_calls
                              if t.draft_calls else None),
            "mean_verify_ms": 1000 * t.verify_seconds / t.rounds if t.rounds else None,
            "continuations_used": t.continuations[True],
            "continuations_dropped": t.continuations[False],
        }

    def dashboard(self, now: float | None = None, window_s: float = 60.0,
                  step_s: float = 5.0) -> dict[str, Any]:
        """The dashboard's rolling view: rates over the last ``window_s`` (tokens per second
        of one stream with a draft and target-only, from the rounds' own times), acceptance
        per draft position and the k drafted since start, the last fallback, the last
        requests, and a series over the last :data:`SERIES_S` in ``step_s`` buckets."""
        now = time.time() if now is None else now
        recent = [s for s in self._samples if s.at >= now - window_s]
        spec = [s for s in recent if s.in_round and s.drafting]
        alone = [s for s in recent if s.in_round and not s.drafting]

        def rate(samples: list[_Sample]) -> float | None:
            seconds = sum(s.seconds for s in samples)
            return sum(s.tokens for s in samples) / seconds if seconds > 0 else None

        drafted = sum(s.drafted for s in recent)
        buckets = int(SERIES_S // step_s)
        tokens = [0] * buckets
        series_d, series_a = [0] * buckets, [0] * buckets
        # Buckets on multiples of step_s, so a chart does not shift between two polls.
        start = (now // step_s + 1) * step_s - buckets * step_s
        for s in self._samples:
            i = int((s.at - start) // step_s)
            if 0 <= i < buckets:
                tokens[i] += s.tokens
                series_d[i] += s.drafted
                series_a[i] += s.accepted
        last = self._last_fallback
        return {
            "window_s": window_s,
            "speculative_tok_s": rate(spec), "target_only_tok_s": rate(alone),
            "rounds": sum(1 for s in recent if s.in_round),
            "tokens_per_round": (sum(s.tokens for s in spec) / len(spec) if spec else None),
            "acceptance": sum(s.accepted for s in recent) / drafted if drafted else None,
            "tok_s": sum(s.tokens for s in recent) / window_s,
            "positions": [{"position": i + 1, "drafted": n, "accepted": a,
                           "acceptance": a / n if n else None}
                          for i, (n, a) in enumerate(self._positions)],
            "k_drafted": {str(k): n for k, n in sorted(self._k_counts.items())},
            "fallbacks": dict(self._totals.fallbacks),
            "last_fallback": None if last is None else {"reason": last[0], "at": last[1]},
            "requests": list(reversed(self._finished)),
            "series": [{"t": round(start + (i + 1) * step_s, 3), "tok_s": tokens[i] / step_s,
                        "acceptance": series_a[i] / series_d[i] if series_d[i] else None}
                       for i in range(buckets)],
        }

    def passed_through(self) -> dict[str, int]:
        """``/tightwad/status``'s ``passed_through``: requests answered unspeculated, by the
        request field that asked for it."""
        return dict(self._totals.passed_through)

    def prometheus(self) -> bytes:
        """``/metrics``: every series, in Prometheus' text format (:attr:`content_type`)."""
        return generate_latest(self._registry)

    def collect(self) -> Iterable[Metric]:
        """The series read from the totals (called by the registry at each scrape)."""
        t, since = self._totals, self._started

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value, created=since)

        yield counter("tightwad_tokens_generated", "Completion tokens sent to clients",
                      t.tokens)
        yield counter("tightwad_draft_tokens", "Tokens proposed by the drafter and verified",
                      t.drafted)
        yield counter("tightwad_accepted_tokens", "Drafted tokens the target accepted",
                      t.accepted)
        yield GaugeMetricFamily("tightwad_acceptance_ratio", "Accepted / drafted tokens since "
                                "start (llama.cpp's 'draft acceptance')",
                                value=t.accepted / t.drafted if t.drafted else 0.0)
        yield counter("tightwad_rounds", "Verify rounds (draft + one target pass)", t.rounds)
        continuations = CounterMetricFamily("tightwad_draft_continuations", "Drafts continued "
                                            "while the target verified (overlapped drafting), "
                                            "by whether the next round used them",
                                            labels=["used"])
        for used, count in t.continuations.items():
            continuations.add_metric([str(used).lower()], count, created=since)
        yield continuations
        fallbacks = CounterMetricFamily("tightwad_drafter_fallbacks", "Rounds run target-only "
                                        "because the drafter failed or was unavailable",
                                        labels=["reason"])
        for reason, count in t.fallbacks.items():
            fallbacks.add_metric([reason], count, created=self._fallback_since[reason])
        yield fallbacks
        passed = CounterMetricFamily("tightwad_passed_through", "Requests the coordinator "
                                     "answered unspeculated, by the request field that asked "
                                     "for it", labels=["reason"])
        for reason, count in t.passed_through.items():
            passed.add_metric([reason], count, created=since)
        yield passed
        yield GaugeMetricFamily("tightwad_speculation_active", "1 when remote drafting is on "
                                "(mode remote, tokenizers match, verify supported)",
                                value=1.0 if self._speculation_active() else 0.0)
        if (plan := self._plan) is not None:
            paused = GaugeMetricFamily("tightwad_speculation_paused", "1 while rounds go "
                                       "without a draft because drafting cannot pay at the "
                                       "current load", labels=["reason"])
            paused.add_metric(["compute_bound"], 0.0 if plan.drafting else 1.0)
            yield paused
            yield GaugeMetricFamily("tightwad_speculation_k", "Draft length the k controller "
                                    "chose last", value=plan.k)
            if plan.speedup is not None:
                yield GaugeMetricFamily("tightwad_speculation_predicted_speedup", "Predicted "
                                        "tokens/s drafting k over target-only at that load",
                                        value=plan.speedup)
            yield GaugeMetricFamily("tightwad_speculation_streams", "Streams in flight the "
                                    "last plan was made for", value=plan.streams)
