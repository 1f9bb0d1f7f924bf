"""Speculative decoding, the pure part: accept/reject a draft, and choose how long to draft.

One round: the drafter proposes ``d_1..d_k``; the target scores, in one pass, the k drafted
positions plus the next one (k+1 distributions); the proxy keeps an accepted prefix and then one
token of the target's own (the correction at the first rejection, or the bonus token after k
acceptances). Every round therefore emits between 1 and k+1 tokens.

Greedy (:func:`greedy_verify`) keeps the longest prefix equal to the target's argmax, so the
output is exactly the target's greedy output. Sampling (:func:`speculative_sample`, Leviathan et
al. 2023, Chen et al. 2023) accepts ``d_i`` with probability ``min(1, p_i(d_i) / q_i(d_i))`` and on
rejection draws from ``normalize(max(0, p_i - q_i))``, so every emitted token is distributed
exactly as the target alone would sample it, provided p and q are the post-chain distributions
each model samples from (see :mod:`tightwad.decoding.sampling`).

Choosing k. With a per-position acceptance probability ``a`` (Leviathan's alpha: the chance that
the target accepts one drafted token, given all earlier ones were accepted; NOT llama.cpp's
"draft acceptance" accepted/drafted, which falls as k grows), one round emits on average

    E(a, k) = (1 - a^(k+1)) / (1 - a)        (k + 1 when a = 1)

tokens, and with a draft/target cost ratio c the speedup over the target alone is
``S = E(a, k) / (k c + 1)``. The proxy does not trust a fixed c: it measures. The rule:

    k* = argmax over k in the buckets of  E(a_hat, k) / (t_draft(k) + t_verify(k))

- ``a_hat`` is the mean of a Beta posterior over a (:class:`AcceptanceEstimate`). A round that
  drafted k and accepted n is n successes followed by one failure if n < k, so the exact
  conjugate update is ``alpha += n``, ``beta += (n < k)``. Old evidence decays geometrically
  toward the prior (factor ``decay`` per round) so the estimate follows the text's difficulty; the
  prior (mean 0.6, weight 4 rounds) keeps the first rounds from swinging k to an extreme.
- ``t_draft(k)`` and ``t_verify(k)`` are straight lines ``fixed + per_token * k`` fitted by
  exponentially weighted least squares on measured round times (:class:`CostModel`). While the
  measured k's barely differ the slope is not identified, so it is shrunk toward a prior
  proportional to the measured mean (per-token cost = ``prior_ratio`` x fixed cost: 1.0 for
  drafting, which decodes token after token, 0.1 for verifying, one batch) and the
  line always passes through the mean of what was measured; slopes and intercepts are clamped
  at 0. The engine keeps one pair of lines per load level (:func:`load_level`: streams in
  flight, by powers of two), since sharing the servers' batches makes every round slower.
- The buckets (:func:`k_buckets`: powers of two within ``[k_min, k_max]``) keep the batch shape
  stable; :func:`choose_k` leaves the current k unless another bucket predicts more than
  ``1 + margin`` times its tokens/s. Ties go to the smaller k (same throughput, less work thrown
  away on rejection).
- :func:`plan` compares the best k with target-only decoding (a round without a draft,
  ``t_verify(0)`` a token) at the same load: when drafting predicts no more tokens/s (the pool
  is compute-bound: the target's batch is full anyway), rounds go without a draft until
  drafting predicts more than ``1 + margin`` times target-only again.

The state (one estimate per drafter/target pair, shared by its requests) lives in
:mod:`tightwad.engine.learning`; this module is the math.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from tightwad.decoding.sampling import Rng, normalize


@dataclass(frozen=True)
class Acceptance:
    """What one verify round decided."""

    drafted: int
    """k: how many draft tokens were proposed."""
    accepted: int
    """How many of them were kept (a prefix), 0..k."""
    tokens: tuple[int, ...]
    """Tokens to emit: the accepted drafts, then the target's correction or bonus token."""

    @property
    def bonus(self) -> bool:
        """All k drafts were accepted, so the last token is the free bonus token."""
        return self.accepted == self.drafted


def _check_lengths(k: int, n_target: int, what: str) -> None:
    if n_target != k + 1:
        raise ValueError(f"{what}: a draft of {k} tokens needs {k + 1} target positions "
                         f"(the k drafted ones plus the next), got {n_target}")


def greedy_verify(draft: Sequence[int], target: Sequence[int]) -> Acceptance:
    """Accept the longest prefix of ``draft`` equal to the target's argmax tokens.

    ``target[i]`` is the target's greedy token at drafted position i (``target[k]`` is the one
    after the whole draft); take it with :func:`tightwad.decoding.sampling.argmax` so ties are broken the
    same way everywhere (highest log-probability, then the lowest token id).
    """
    _check_lengths(len(draft), len(target), "greedy_verify")
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return Acceptance(drafted=len(draft), accepted=n, tokens=(*draft[:n], target[n]))


def residual(p: Mapping[int, float], q: Mapping[int, float]) -> dict[int, float]:
    """``normalize(max(0, p - q))`` over the union of both supports; ``p`` when that is all zero.

    A token only in q contributes 0; a token only in p keeps its p. The all-zero case (p <= q
    everywhere, i.e. p == q up to rounding) cannot follow a real rejection, so p is the honest
    fallback.
    """
    weights = {t: pt - q.get(t, 0.0) for t, pt in p.items() if pt > q.get(t, 0.0)}
    if not weights or math.fsum(weights.values()) <= 1e-12:
        return normalize(p)
    return normalize(weights)


def speculative_sample(draft: Sequence[int], q: Sequence[Mapping[int, float]],
                       p: Sequence[Mapping[int, float]], rng: Rng) -> Acceptance:
    """Leviathan/Chen acceptance of a sampled draft.

    ``q[i]`` is the drafter's post-chain distribution at drafted position i (the one ``draft[i]``
    was drawn from), ``p[i]`` the target's at the same position, and ``p[k]`` the target's after the
    whole draft. Exactly one uniform is drawn per examined position, and one more for the
    correction or bonus, so a seeded :class:`~tightwad.decoding.sampling.Rng` replays a round.

    ``q[i](draft[i]) == 0`` cannot happen when q is the exact distribution the drafter sampled
    from; it means q was truncated. It is treated as the limit of ``p/q`` for q -> 0: accepted
    when ``p(draft[i]) > 0``, rejected otherwise.
    """
    k = len(draft)
    if len(q) != k:
        raise ValueError(f"speculative_sample: {k} draft tokens need {k} draft distributions, "
                         f"got {len(q)}")
    _check_lengths(k, len(p), "speculative_sample")
    for i, x in enumerate(draft):
        px, qx = p[i].get(x, 0.0), q[i].get(x, 0.0)
        u = rng.uniform()
        if qx > 0.0:
            keep = u * qx < px  # u < p/q without dividing; always true when p >= q
        else:
            keep = px > 0.0
        if not keep:
            return Acceptance(drafted=k, accepted=i,
                              tokens=(*draft[:i], rng.draw(residual(p[i], q[i]))))
    return Acceptance(drafted=k, accepted=k, tokens=(*draft, rng.draw(p[k])))


def expected_tokens(a: float, k: int) -> float:
    """E(a, k) = (1 - a^(k+1)) / (1 - a): mean tokens one round emits (k + 1 at a = 1)."""
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"acceptance rate must lie in [0, 1], got {a}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if a > 1.0 - 1e-9:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def predicted_speedup(a: float, k: int, c: float) -> float:
    """S = E(a, k) / (k c + 1), c = one draft token's time over one target token's time."""
    if c < 0:
        raise ValueError(f"cost ratio c must be >= 0, got {c}")
    return expected_tokens(a, k) / (k * c + 1.0)


@dataclass(frozen=True)
class AcceptanceEstimate:
    """A Beta posterior over the per-position acceptance probability a, with forgetting.

    ``alpha``/``beta`` include the prior; each :meth:`observe` returns a new estimate. Totals of
    drafted/accepted tokens are kept too, to report llama.cpp's accepted/drafted ratio next to a.
    """

    prior_mean: float = 0.6
    prior_weight: float = 4.0
    decay: float = 0.95
    """Weight left to the evidence so far after each round (1.0: never forget)."""
    alpha: float = 2.4
    beta: float = 1.6
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    @classmethod
    def with_prior(cls, mean: float = 0.6, weight: float = 4.0,
                   decay: float = 0.95) -> AcceptanceEstimate:
        if not 0.0 < mean < 1.0 or weight <= 0.0:
            raise ValueError(f"the prior needs 0 < mean < 1 and weight > 0, got {mean}, {weight}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        return cls(prior_mean=mean, prior_weight=weight, decay=decay,
                   alpha=mean * weight, beta=(1.0 - mean) * weight)

    @property
    def mean(self) -> float:
        """The estimate of a (the posterior mean)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def draft_acceptance(self) -> float | None:
        """llama.cpp's metric: accepted / drafted tokens over all rounds (None before any)."""
        return self.accepted / self.drafted if self.drafted else None

    def observe(self, drafted: int, accepted: int) -> AcceptanceEstimate:
        """Fold in one round that proposed ``drafted`` tokens and kept ``accepted``."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted ({accepted}) must lie between 0 and drafted ({drafted})")
        if drafted == 0:
            return self
        a0 = self.prior_mean * self.prior_weight
        b0 = (1.0 - self.prior_mean) * self.prior_weight
        return replace(
            self,
            alpha=a0 + self.decay * (self.alpha - a0) + accepted,
            beta=b0 + self.decay * (self.beta - b0) + (1.0 if accepted < drafted else 0.0),
            drafted=self.drafted + drafted, accepted=self.accepted + accepted,
            rounds=self.rounds + 1)


@dataclass(frozen=True)
class Line:
    """A fitted cost: ``fixed + per_token * k`` seconds."""

    fixed: float
    per_token: float

    def __call__(self, k: int) -> float:
        return self.fixed + self.per_token * k


@dataclass(frozen=True)
class CostModel:
    """Exponentially weighted least squares of seconds against k, shrunk toward a prior slope.

    The sums are decayed by ``decay`` per observation so the model follows load changes. The
    slope estimate is ``(Sxx * slope_data + prior_strength * slope_prior) / (Sxx + prior_strength)``
    with ``Sxx`` the weighted spread of the measured k's and ``slope_prior`` =
    ``prior_ratio * mean_time / (1 + prior_ratio * mean_k)``; the line passes through the
    weighted mean of the measurements.
    """

    prior_ratio: float = 0.1
    """Assumed per-token cost as a fraction of the fixed cost until the data says otherwise."""
    prior_strength: float = 2.0
    decay: float = 0.9
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def observe(self, k: int, seconds: float) -> CostModel:
        """Fold in one measurement: a call for k tokens took ``seconds``."""
        if k < 0 or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"need k >= 0 and a finite time >= 0, got k={k}, {seconds} s")
        d = self.decay
        return replace(self, w=d * self.w + 1.0, sx=d * self.sx + k, sy=d * self.sy + seconds,
                       sxx=d * self.sxx + k * k, sxy=d * self.sxy + k * seconds)

    def fit(self) -> Line | None:
        """The current line, or None before the first measurement."""
        if self.w <= 0.0:
            return None
        mx, my = self.sx / self.w, self.sy / self.w
        spread = max(self.sxx - self.w * mx * mx, 0.0)
        slope_prior = self.prior_ratio * my / (1.0 + self.prior_ratio * mx)
        slope_data = (self.sxy - self.w * mx * my) / spread if spread > 1e-12 else 0.0
        slope = (spread * slope_data + self.prior_strength * slope_prior) / (
            spread + self.prior_strength)
        slope = max(slope, 0.0)
        return Line(fixed=max(my - slope * mx, 0.0), per_token=slope)


def load_level(streams: int) -> int:
    """Streams in flight grouped by powers of two (1, 2, 3-4, 5-8, 9-16, ...): levels 0, 1, 2,
    3, 4, ... Costs are kept per level, since a round's times depend on how many streams share
    the coordinator's (and the drafter's) batches."""
    return max(0, streams - 1).bit_length()


def level_streams(level: int) -> str:
    """The stream counts a level stands for, as text (``"5-8"``)."""
    if level <= 1:
        return str(level + 1)
    return f"{2 ** (level - 1) + 1}-{2 ** level}"


def k_buckets(k_min: int, k_max: int) -> tuple[int, ...]:
    """The draft lengths k is chosen from: the powers of two within [k_min, k_max], and the
    bounds themselves. Few lengths mean few batch shapes, so the coordinator can reuse its graph."""
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    powers = {2 ** i for i in range(k_max.bit_length()) if k_min <= 2 ** i <= k_max}
    return tuple(sorted(powers | {k_min, k_max}))


def round_rate(a: float, k: int, draft: Line, verify: Line) -> float:
    """Predicted tokens per second of one stream drafting k: E(a, k) / (draft(k) + verify(k))."""
    seconds = draft(k) + verify(k)
    return expected_tokens(a, k) / seconds if seconds > 0 else math.inf


def choose_k(a: float, draft: Line, verify: Line, candidates: Sequence[int],
             current: int | None = None, margin: float = 0.0) -> int:
    """The candidate with the most predicted tokens per second (ties: the smaller k), except
    that ``current`` (one of the candidates) stays unless the best beats it by more than
    ``margin`` (hysteresis: every change of k is a new batch shape)."""
    if not candidates or min(candidates) < 1:
        raise ValueError(f"need candidates k >= 1, got {list(candidates)}")
    best_k, best_rate = candidates[0], -1.0
    for k in sorted(candidates):
        rate = round_rate(a, k, draft, verify)
        if rate > best_rate * (1.0 + 1e-9):
            best_k, best_rate = k, rate
    if current is None or current == best_k or current not in candidates:
        return best_k
    return best_k if best_rate > round_rate(a, current, draft, verify) * (1.0 + margin) \
        else current


@dataclass(frozen=True)
class Plan:
    """What the proxy does at a given load: draft k tokens per round, or run rounds without a
    draft (the pool is compute-bound)."""

    drafting: bool
    """False: rounds run target-only (no draft), but for a probe now and then."""
    k: int
    """The chosen draft length (also while paused: what a probe drafts)."""
    streams: int
    """Streams in flight the plan was made for."""
    speedup: float | None
    """Predicted tokens/s drafting k over target-only decoding at this load (None: not yet
    measured)."""
    reason: str


def plan(a: float, draft: Line | None, verify: Line | None, candidates: Sequence[int],
         current: int, paused: bool, streams: int, margin: float) -> Plan:
    """Choose k (with hysteresis around ``current``) and whether drafting pays at this load.

    ``draft``/``verify`` are the fitted round costs at this load; target-only decoding is a
    round without a draft, ``verify(0)`` seconds a token. A load without timed rounds drafts, to
    learn it, at ``current``. Drafting pauses when the best k predicts no more tokens/s than
    target-only, and resumes when it predicts more than ``1 + margin`` times target-only.
    """
    at = f"{streams} stream{'' if streams == 1 else 's'}"
    if draft is None or verify is None:  # draft, to learn this load
        return Plan(True, current, streams, None, f"k={current}: no timed rounds at {at} yet")
    k = choose_k(a, draft, verify, candidates, current, margin)
    baseline = verify(0)
    rate = round_rate(a, k, draft, verify)
    speedup = rate * baseline if baseline > 0 else math.inf
    drafting = speedup > (1.0 + margin if paused else 1.0)
    if drafting:
        reason = f"best k={k} predicts {speedup:.2f}x of target-only at {at}"
    else:
        reason = f"compute-bound at {at}: best k={k} predicts {speedup:.2f}x of target-only"
    return Plan(drafting, k, streams, speedup, reason)


def round_timed(rounds_before: int, evaluated: int, drafted: int, appended: int,
                pending: int) -> bool:
    """Whether a round's timings measure a round: not the request's first (which evaluates the
    whole prompt) and the coordinator evaluated only what the round added (the tokens appended
    since the last verify, the pending one and the draft), not a prefix it lost from its cache.
    ``evaluated`` is the server's ``prompt_n``."""
    return rounds_before > 0 and evaluated <= appended + pending + drafted + 1


@dataclass
class _Window:
    level: int
    drafting: bool
    start: float
    tokens: int = 0
    seconds: float = 0.0


class LoadRegimes:
    """Under load, whether drafting or target-only decoding gives the pool more tokens per
    second, measured, not predicted.

    A round's own costs cannot see what its draft costs the other streams: on a compute-bound
    pool every drafted row makes the shared batch slower for everyone, and a stream probing
    target-only alone still waits on everyone else's verify rows. So at two streams or more the
    proxy runs windows of ``window_s`` seconds in which every stream follows one regime. A
    window's rate is the tokens of the rounds that started in it over their seconds (a stream's
    tokens/s; at one load level, the aggregate is that times the streams), counted when they
    end: taken when the window closes, from the rounds ended by then, and again when the next
    one closes, with all of them. Each regime's rate is kept per load
    level; the faster one runs (the other must be ``margin`` faster to take over), and the other
    is measured again once its rate is older than ``refresh_s``, doubled each time it loses
    again (up to ``MAX_BACKOFF`` doublings; reset when it wins), so a pool whose load regime is
    settled spends ever less time in the slower one. Which regime runs changes only speed,
    never the output.

    Load only takes from what drafting can win (every stream's verify rows share one batch), so
    the levels inform each other: where target-only won at a lower level, drafting is not
    measured at a higher one (nor target-only below a level where drafting won), as long as
    that level's both rates are younger than ``EVIDENCE_REFRESHES`` of its refresh periods. One
    stream counts too: where its cost lines (which see everything there) pause drafting
    (:meth:`alone`), drafting is not measured under load either, unless a measured level says
    drafting won. A short burst of load then does not spend its first windows on a regime
    known to lose: a drafting window on a compute-bound pool can run at a third of
    target-only's rate.
    """

    EVIDENCE_REFRESHES = 4
    MAX_BACKOFF = 3
    """At most 2**3 = 8 refresh periods between two windows of the slower regime: with the
    defaults, 3 s every 4 minutes."""

    def __init__(self, window_s: float, refresh_s: float, margin: float) -> None:
        self.window_s = window_s
        self.refresh_s = refresh_s
        self.margin = margin
        self.rates: dict[int, dict[bool, tuple[float, float]]] = {}
        """level -> regime (True: drafting) -> (a stream's tokens/s, when measured)."""
        self.best: dict[int, bool] = {}
        self.backoff: dict[int, int] = {}
        """level -> how many windows in a row the slower regime lost again."""
        self.window: _Window | None = None
        self.ending: _Window | None = None
        """The window before: its last rounds may still end."""
        self.alone_drafting: tuple[bool, float] | None = None
        """One stream's last decision (drafting?) and when it was taken."""
        self.evidence = ""
        """What the last window's regime followed, where not its own level's two rates."""

    def alone(self, drafting: bool, now: float) -> None:
        """One stream's decision, from its cost lines: evidence for the loaded levels."""
        self.alone_drafting = (drafting, now)

    def drafting(self, level: int, now: float) -> bool:
        """Whether a round starting now at this load level may draft (level 0, one stream:
        always; its own costs see everything)."""
        window = self.window
        if window is not None and window.level == level and now - window.start < self.window_s:
            return window.drafting
        if self.ending is not None:
            self._record(self.ending, now, complete=True)  # its rounds have had a window to end
        if window is not None:
            self._record(window, now)  # so far: the rounds still running count when they end
        self.ending, self.window = window, None
        if level == 0:
            return True
        rates = self.rates.get(level, {})
        measuring = window.drafting if window is not None and window.level == level else None
        implied, self.evidence = self._implied(level, now)
        stale = [regime for regime in (True, False) if regime != measuring
                 and implied in (None, regime)
                 and (regime not in rates or now - rates[regime][1] > self.period(level))]
        if len(rates) < 2 and implied is not None:
            self.best[level] = implied  # until its own two rates decide (with the margin)
        regime = stale[0] if stale else self.best.get(level, True)
        self.window = _Window(level, regime, now)
        return regime

    def _implied(self, level: int, now: float) -> tuple[bool | None, str]:
        """The regime the other levels' fresh decisions imply at ``level`` (None: no single
        one): target-only where it won at a lower level, drafting where it won at a higher;
        and where that comes from."""
        fresh = {other: self.best.get(other, True) for other, rates in self.rates.items()
                 if other != level and len(rates) == 2
                 and all(now - t <= self.EVIDENCE_REFRESHES * self.period(other)
                         for _, t in rates.values())}
        # Target-only (False) below this level, or drafting (True) above it, says something.
        votes = {other: best for other, best in fresh.items() if (other < level) != best}
        said = [f"{'drafting' if best else 'target-only'} won at {level_streams(other)} "
                "streams" for other, best in sorted(votes.items())]
        horizon = self.EVIDENCE_REFRESHES * self.refresh_s
        if (self.alone_drafting is not None and not self.alone_drafting[0]
                and now - self.alone_drafting[1] <= horizon and True not in fresh.values()):
            votes[0] = False  # one stream pauses drafting, and no load level contradicts it
            said.append("drafting is paused at one stream")
        regimes = set(votes.values())
        return (regimes.pop(), ", ".join(said)) if len(regimes) == 1 else (None, "")

    def observe(self, tokens: int, started: float, ended: float) -> None:
        """A round that ran from ``started`` to ``ended`` emitted ``tokens``: it counts for the
        window it started in."""
        for window in (self.window, self.ending):
            if window is not None and window.start <= started < window.start + self.window_s:
                window.tokens += tokens
                window.seconds += ended - started
                return

    def _record(self, window: _Window, now: float, complete: bool = False) -> None:
        if window.seconds <= 0 or window.tokens == 0:
            return
        rates = self.rates.setdefault(window.level, {})
        rates[window.drafting] = (window.tokens / window.seconds, now)
        if len(rates) == 2:
            best = self.best.get(window.level, True)
            if rates[not best][0] > rates[best][0] * (1 + self.margin):
                self.best[window.level] = not best
                self.backoff[window.level] = 0
            elif complete and window.drafting != best:  # the slower one lost again
                self.backoff[window.level] = min(self.backoff.get(window.level, 0) + 1,
                                                 self.MAX_BACKOFF)

    def period(self, level: int) -> float:
        """How old the slower regime's rate at ``level`` may get before it is measured again."""
        return self.refresh_s * float(2 ** self.backoff.get(level, 0))

    def status(self) -> dict[str, dict[str, float | bool | None]]:
        """Per load level (streams): each regime's measured tokens/s per stream, which runs,
        and how often the other is measured again."""
        return {level_streams(level): {
            "drafting_tok_s": round(rates[True][0], 2) if True in rates else None,
            "target_only_tok_s": round(rates[False][0], 2) if False in rates else None,
            "drafting": self.best.get(level, True),
            "remeasured_every_s": self.period(level),
        } for level, rates in sorted(self.rates.items())}
