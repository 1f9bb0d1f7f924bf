"""Prometheus metrics of one proxy, in a registry of its own (never the process-global one, so
several proxies in one process, e.g. in tests, do not collide)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Round latencies on a loopback pool are milliseconds, on a slow LAN pool up to seconds.
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    """Every series the proxy exports; the engine and the API call the ``on_*`` hooks."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tightwad_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.tokens = Counter("tightwad_tokens_generated", "Completion tokens sent to clients",
                              registry=r)
        self.prompt_tokens = Counter("tightwad_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.drafted = Counter("tightwad_draft_tokens", "Tokens proposed by the drafter and "
                               "verified", registry=r)
        self.accepted = Counter("tightwad_accepted_tokens", "Drafted tokens the target accepted",
                                registry=r)
        self.acceptance = Gauge("tightwad_acceptance_ratio", "Accepted / drafted tokens since "
                                "start (llama.cpp's 'draft acceptance')", registry=r)
        self.rounds = Counter("tightwad_rounds", "Verify rounds (draft + one target pass)",
                              registry=r)
        self.draft_seconds = Histogram("tightwad_draft_seconds", "Drafter time per round",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.verify_seconds = Histogram("tightwad_verify_seconds", "Target time per round "
                                        "(one forward pass)", buckets=_LATENCY_BUCKETS,
                                        registry=r)
        self.fallbacks = Counter("tightwad_drafter_fallbacks", "Rounds run target-only because "
                                 "the drafter failed or was unavailable", ["reason"], registry=r)
        self.in_flight = Gauge("tightwad_requests_in_flight", "Generations holding a slot",
                               registry=r)
        self.queued = Gauge("tightwad_requests_queued", "Generations waiting for a slot",
                            registry=r)
        self.speculating = Gauge("tightwad_speculation_active", "1 when remote drafting is on "
                                 "(mode remote, tokenizers match, verify supported)", registry=r)
        self._drafted = 0
        self._accepted = 0

    def on_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def on_round(self, drafted: int, accepted: int, draft_s: float | None,
                 verify_s: float) -> None:
        self.rounds.inc()
        self.verify_seconds.observe(verify_s)
        if draft_s is not None:
            self.draft_seconds.observe(draft_s)
        if drafted:
            self.drafted.inc(drafted)
            self.accepted.inc(accepted)
            self._drafted += drafted
            self._accepted += accepted
            self.acceptance.set(self._accepted / self._drafted)

    def on_fallback(self, reason: str) -> None:
        self.fallbacks.labels(reason=reason).inc()

    def on_tokens(self, n: int) -> None:
        self.tokens.inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
