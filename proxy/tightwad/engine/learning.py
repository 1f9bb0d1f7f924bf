"""What speculation rounds taught, shared by all requests of one drafter/target pair.

:class:`Learning` (one per engine) keeps a :class:`PairLearning` for the pair the servers run
now, named by the models they report (the target's and the drafter's); another pair (a swap, a
drafter restarted with another model, another verify limit) starts afresh. A pair holds the
acceptance estimates (greedy and sampling apart: sampled drafts are accepted less often), the
draft and verify cost lines per load level (streams in flight, by powers of two; a round
without a draft measures the verify line at k = 0, target-only decoding), the current k and
whether drafting is paused. A new request starts from what the last ones learned, so k sits at
its best from the first round, and one k for all streams keeps the coordinator's batch shape
stable.

The decisions are :func:`tightwad.decoding.speculation.plan`'s: k from the buckets with
hysteresis, and whether drafting pays at this load. Where it does not (compute-bound), rounds
run without a draft. Probes keep the estimates fresh: while paused every ``probe_every``-th
round drafts anyway (load falls; acceptance and draft costs go stale), and each probe that
drafted and left drafting paused doubles that interval, up to ``MAX_PROBE_BACKOFF`` doublings
(a probe on a pool where drafting cannot pay costs more than a round; one whose drafter was
down says nothing, so the drafter's return is tried soon); while drafting, where
target-only at this load is unmeasured or close, every ``probe_every``-th round goes without a
draft to measure it. Under load (two streams or more) a :class:`LoadRegimes` has the last word:
it times windows in which all streams draft or none does and keeps the faster regime, which a
stream's own cost lines cannot see. A seeded sampling request always drafts at ``k_initial``:
its random stream depends on k.

Every method is synchronous (no await), so under asyncio each update is atomic with respect to
the other requests of the process.
"""

from __future__ import annotations

import time
from typing import Any

from tightwad import defaults
from tightwad.config import SpeculationConfig
from tightwad.decoding.sampling import SamplingParams
from tightwad.decoding.speculation import (
    AcceptanceEstimate,
    CostModel,
    Line,
    LoadRegimes,
    Plan,
    k_buckets,
    level_streams,
    load_level,
    plan,
)
from tightwad.engine.telemetry import Telemetry

Key = tuple[str, str, int]
"""(target model, drafter model, verify limit) as the servers report them."""


def _fits(models: dict[int, CostModel], level: int) -> Line | None:
    model = models.get(level)
    return model.fit() if model is not None else None


class PairLearning:
    """The estimates and the plan of one drafter/target pair."""

    MAX_PROBE_BACKOFF = 3
    """While paused, at most 2**3 x ``probe_every`` rounds between probes (128 rounds of up to
    8 streamed tokens with the defaults)."""

    def __init__(self, key: Key, config: SpeculationConfig, telemetry: Telemetry) -> None:
        self.key = key
        self.config = config
        self.telemetry = telemetry
        k_max = max(1, min(config.k_max, key[2]))
        k_min = min(config.k_min, k_max)
        self.buckets = k_buckets(k_min, k_max)
        self.k_fixed = max(k_min, min(config.k_initial, k_max))
        self.k = self.k_fixed
        self.acceptance = {greedy: AcceptanceEstimate.with_prior() for greedy in (True, False)}
        # Drafting decodes token after token (per-token cost ~ the call's fixed cost); verifying
        # batches them, so its per-token cost is small next to the round trips.
        self.draft: dict[int, CostModel] = {}
        self.verify: dict[int, CostModel] = {}
        self.target_only: set[int] = set()
        """Load levels with a timed round without a draft (target-only measured, not inferred)."""
        self.rounds = 0
        self.paused_rounds = 0
        """Rounds planned since the last probe while paused."""
        self.paused_probes = 0
        """Probes in a row that drafted and left drafting paused."""
        self.probing = False
        """A probe was planned and has not drafted yet (a drafter that is down does not)."""
        self.regimes = LoadRegimes(defaults.REGIME_WINDOW_S, defaults.REGIME_REFRESH_S,
                                   config.k_margin)
        self.plan = Plan(True, self.k, 0, None, "nothing learned yet")
        self.modelled_drafting = True
        self.telemetry.on_plan(self.plan)

    @staticmethod
    def fixed(sampling: SamplingParams) -> bool:
        """A seeded sampling request keeps k_initial and always drafts: its random stream
        depends on k."""
        return not sampling.greedy and sampling.seed is not None

    def _plan(self, greedy: bool, streams: int) -> Plan:
        level = load_level(streams)
        # Hysteresis on the cost model's own last word, not on a load regime's override.
        self.plan = plan(self.acceptance[greedy].mean, _fits(self.draft, level),
                         _fits(self.verify, level), self.buckets, self.k,
                         not self.modelled_drafting, streams, self.config.k_margin)
        self.modelled_drafting = self.plan.drafting
        self.k = self.plan.k
        self.telemetry.on_plan(self.plan)
        return self.plan

    def round_k(self, sampling: SamplingParams, streams: int) -> int:
        """The next round's draft length (before the request's own limits); 0: the round
        runs target-only."""
        if not self.config.adaptive or self.fixed(sampling):
            return self.k_fixed
        now = self._plan(sampling.greedy, streams)
        self.rounds += 1
        level = load_level(streams)
        if level == 0:
            self.regimes.alone(now.drafting, time.monotonic())
        if not self.regimes.drafting(level, time.monotonic()):
            rates = self.regimes.rates.get(level, {})
            evidence = self.regimes.evidence
            measured = (f"{rates[False][0]:.1f} against {rates[True][0]:.1f} tok/s per stream "
                        "drafting" if len(rates) == 2
                        else f"not measuring drafting ({evidence})" if evidence
                        else "measuring drafting")
            self.plan = Plan(False, now.k, streams, now.speedup,
                             f"target-only at {streams} streams: {measured}")
            self.telemetry.on_plan(self.plan)
            return 0
        every = self.config.probe_every
        if not now.drafting:
            self.paused_rounds += 1
            interval = every * 2 ** min(self.paused_probes, self.MAX_PROBE_BACKOFF)
            if every <= 0 or self.paused_rounds < interval:
                return 0
            self.paused_rounds = 0
            self.probing = True  # counted once it drafts (observe_round)
            return now.k
        self.paused_rounds = self.paused_probes = 0
        self.probing = False  # drafting resumed: a probe not yet drafted counts for nothing
        probe = every > 0 and self.rounds % every == 0
        unknown = load_level(streams) not in self.target_only
        close = now.speedup is not None and now.speedup < 1.0 + 2 * self.config.k_margin
        if probe and now.speedup is not None and (unknown or close):
            return 0  # measure target-only at this load
        return now.k

    def peek_k(self, sampling: SamplingParams) -> int:
        """The k the next round most likely plans, without planning (no probe counted): how
        far a continuation drafts ahead."""
        if not self.config.adaptive or self.fixed(sampling):
            return self.k_fixed
        return self.k if self.plan.drafting else 0

    def observe_tokens(self, tokens: int, started: float, ended: float) -> None:
        """A round's tokens and its time, for the load regimes (:class:`LoadRegimes`)."""
        self.regimes.observe(tokens, started, ended)

    def observe_round(self, greedy: bool, streams: int, drafted: int, accepted: int,
                      draft_seconds: float | None, verify_seconds: float,
                      timed: bool) -> None:
        """Fold in one round. ``timed=False``: its times measure something else too (a prompt
        evaluation, see :func:`tightwad.decoding.speculation.round_timed`); only its acceptance
        counts. A round without a draft measures the verify cost at k = 0."""
        self.acceptance[greedy] = self.acceptance[greedy].observe(drafted, accepted)
        if drafted and self.probing:  # a probe that drafted: the next waits longer if paused
            self.probing = False
            self.paused_probes += 1
        if not timed:
            return
        level = load_level(streams)
        self.verify[level] = self.verify.get(level, CostModel(prior_ratio=0.1)).observe(
            drafted, verify_seconds)
        if not drafted:
            self.target_only.add(level)
        if drafted and draft_seconds is not None:
            self.draft[level] = self.draft.get(level, CostModel(prior_ratio=1.0)).observe(
                drafted, draft_seconds)

    def status(self) -> dict[str, Any]:
        def ms(line: Line | None) -> dict[str, float] | None:
            return None if line is None else {"fixed_ms": round(1000 * line.fixed, 3),
                                              "per_token_ms": round(1000 * line.per_token, 3)}

        levels = sorted({*self.draft, *self.verify})
        p = self.plan
        return {
            "drafting": p.drafting, "reason": p.reason, "k": p.k, "streams": p.streams,
            "predicted_speedup": None if p.speedup is None else round(p.speedup, 3),
            "adaptive": self.config.adaptive, "buckets": list(self.buckets),
            "pair": {"target": self.key[0], "drafter": self.key[1],
                     "verify_limit": self.key[2]},
            "alpha": {"greedy": round(self.acceptance[True].mean, 4),
                      "sampled": round(self.acceptance[False].mean, 4)},
            "rounds_learned": self.acceptance[True].rounds + self.acceptance[False].rounds,
            "rounds_planned": self.rounds,
            "by_streams": {level_streams(level): {
                "draft": ms(_fits(self.draft, level)), "verify": ms(_fits(self.verify, level)),
                "target_only_measured": level in self.target_only,
            } for level in levels},
            "load_regimes": self.regimes.status(),
        }


class Learning:
    """The engine's estimates: one :class:`PairLearning`, for the pair the servers run now."""

    def __init__(self, config: SpeculationConfig, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self.current: PairLearning | None = None

    def pair(self, target_model: str, drafter_model: str | None,
             verify_limit: int) -> PairLearning:
        """The estimates of this pair; a pair other than the last one starts afresh."""
        key = (target_model, drafter_model or "", verify_limit)
        if self.current is None or self.current.key != key:
            self.current = PairLearning(key, self.config, self.telemetry)
        return self.current

    def status(self) -> dict[str, Any]:
        """``/tightwad/status``'s ``speculation`` object."""
        if self.config.mode != "remote":
            return {"drafting": False, "reason": f"mode {self.config.mode}: the proxy does "
                    "not draft", "k": None}
        if self.current is None:
            return {"drafting": True, "reason": "no request yet", "k": None}
        return self.current.status()
