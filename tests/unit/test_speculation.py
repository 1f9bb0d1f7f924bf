"""Accept/reject rules and the choice of k."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tightwad.decoding.sampling import Rng
from tightwad.decoding.speculation import (
    AcceptanceEstimate,
    CostModel,
    Line,
    Plan,
    choose_k,
    expected_tokens,
    greedy_verify,
    k_buckets,
    level_streams,
    load_level,
    plan,
    predicted_speedup,
    residual,
    round_rate,
    round_timed,
    speculative_sample,
)

# --- greedy ----------------------------------------------------------------------------------


def test_greedy_all_accepted_takes_the_bonus() -> None:
    result = greedy_verify([5, 6, 7], [5, 6, 7, 8])
    assert (result.accepted, result.tokens, result.bonus) == (3, (5, 6, 7, 8), True)


def test_greedy_first_mismatch_takes_the_targets_token() -> None:
    assert greedy_verify([5, 6, 7], [5, 9, 7, 8]).tokens == (5, 9)
    first = greedy_verify([5, 6, 7], [4, 6, 7, 8])
    assert (first.accepted, first.tokens, first.bonus) == (0, (4,), False)
    # A later match after a mismatch does not count: only a prefix is accepted.
    assert greedy_verify([1, 2, 3], [1, 0, 3, 4]).accepted == 1


def test_greedy_with_no_draft_is_a_plain_step() -> None:
    assert greedy_verify([], [42]).tokens == (42,)


def test_greedy_rejects_wrong_lengths() -> None:
    with pytest.raises(ValueError, match="needs 4 target positions"):
        greedy_verify([1, 2, 3], [1, 2, 3])


# --- speculative sampling --------------------------------------------------------------------

P = {1: 0.5, 2: 0.3, 3: 0.2}
Q = {1: 0.2, 2: 0.5, 4: 0.3}  # token 4 only in q, token 3 only in p


@pytest.mark.parametrize("p,q", [(P, Q), (Q, P), (P, P), ({1: 1.0}, {2: 1.0}),
                                 ({1: 0.9, 2: 0.1}, {1: 0.1, 2: 0.9})])
def test_accept_plus_residual_is_exactly_p(p: dict, q: dict) -> None:
    """P(emit y) = q(y) min(1, p(y)/q(y)) + P(reject) r(y) must equal p(y) for every y."""
    r = residual(p, q) if p != q else {}
    reject = 1.0 - sum(min(p.get(t, 0.0), q.get(t, 0.0)) for t in set(p) | set(q))
    for y in set(p) | set(q):
        qy, py = q.get(y, 0.0), p.get(y, 0.0)
        accepted = qy * min(1.0, py / qy) if qy else 0.0
        assert accepted + reject * r.get(y, 0.0) == pytest.approx(py, abs=1e-12)


def test_residual_supports() -> None:
    r = residual(P, Q)
    assert set(r) == {1, 3}  # 2 has p < q, 4 has p = 0
    assert r == pytest.approx({1: 0.3 / 0.5, 3: 0.2 / 0.5})
    assert residual(P, P) == P  # all-zero residual falls back to p
    assert residual({1: 1.0}, {2: 1.0}) == {1: 1.0}  # disjoint supports


def run_rounds(p: list[dict], q: list[dict], n: int, seed: int) -> list[tuple[int, ...]]:
    draft_rng, rng = random.Random(seed), Rng(seed + 1)
    out = []
    for _ in range(n):
        draft = [draft_rng.choices(list(qi), weights=list(qi.values()))[0] for qi in q]
        out.append(speculative_sample(draft, q, p, rng).tokens)
    return out


def test_emitted_tokens_follow_the_target_distribution() -> None:
    p = [P, {1: 0.1, 2: 0.1, 3: 0.8}, {5: 1.0}]
    q = [Q, {1: 0.6, 3: 0.4}]
    rounds = run_rounds(p, q, 20000, seed=3)
    first = Counter(t[0] for t in rounds)
    for token, prob in P.items():
        assert first[token] / len(rounds) == pytest.approx(prob, abs=0.015)
    assert first[4] == 0  # a token the target never samples is never emitted
    second = Counter(t[1] for t in rounds if len(t) > 1)
    n_second = sum(second.values())
    for token, prob in p[1].items():
        assert second[token] / n_second == pytest.approx(prob, abs=0.02)
    assert all(t[2] == 5 for t in rounds if len(t) == 3)  # the bonus comes from p[k]


def test_identical_distributions_accept_everything() -> None:
    rounds = run_rounds([P, P, {9: 1.0}], [P, P], 500, seed=4)
    assert all(len(t) == 3 and t[2] == 9 for t in rounds)


def test_disjoint_supports_always_reject() -> None:
    result = speculative_sample([2], [{2: 1.0}], [{1: 1.0}, {7: 1.0}], Rng(0))
    assert (result.accepted, result.tokens) == (0, (1,))


def test_draft_missing_from_q_is_accepted_only_if_p_allows() -> None:
    kept = speculative_sample([3], [{1: 1.0}], [{3: 1.0}, {8: 1.0}], Rng(0))
    assert (kept.accepted, kept.tokens) == (1, (3, 8))
    dropped = speculative_sample([4], [{1: 1.0}], [{3: 1.0}, {8: 1.0}], Rng(0))
    assert (dropped.accepted, dropped.tokens) == (0, (3,))


def test_a_seed_replays_a_round() -> None:
    p, q = [P, P, P], [Q, Q]
    assert ([speculative_sample([2, 1], q, p, Rng(11)) for _ in range(3)]
            == [speculative_sample([2, 1], q, p, Rng(11))] * 3)


def test_sampling_rejects_wrong_lengths() -> None:
    with pytest.raises(ValueError, match="draft distributions"):
        speculative_sample([1, 2], [P], [P, P, P], Rng(0))
    with pytest.raises(ValueError, match="needs 3 target positions"):
        speculative_sample([1, 2], [P, P], [P, P], Rng(0))


# --- expected tokens, speedup ----------------------------------------------------------------


@pytest.mark.parametrize("a", [0.0, 0.3, 0.79, 0.95, 1.0])
@pytest.mark.parametrize("k", [0, 1, 4, 16])
def test_expected_tokens_is_the_geometric_sum(a: float, k: int) -> None:
    assert expected_tokens(a, k) == pytest.approx(sum(a ** i for i in range(k + 1)))


def test_expected_tokens_matches_simulated_rounds() -> None:
    rng, a, k = random.Random(9), 0.7, 5
    total = 0
    for _ in range(20000):
        accepted = 0
        while accepted < k and rng.random() < a:
            accepted += 1
        total += accepted + 1
    assert total / 20000 == pytest.approx(expected_tokens(a, k), rel=0.02)


def test_speedup_formula() -> None:
    assert predicted_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8 ** 5) / 0.2 / 1.4)
    assert predicted_speedup(1.0, 3, 0.0) == 4.0
    with pytest.raises(ValueError):
        expected_tokens(1.2, 3)


# --- acceptance estimate ---------------------------------------------------------------------


def test_estimate_starts_at_the_prior_and_learns() -> None:
    prior = AcceptanceEstimate.with_prior(mean=0.6, weight=4.0)
    assert prior.mean == pytest.approx(0.6)
    good = prior
    for _ in range(30):
        good = good.observe(drafted=8, accepted=8)
    assert good.mean > 0.95
    bad = prior
    for _ in range(30):
        bad = bad.observe(drafted=8, accepted=0)
    assert bad.mean < 0.2
    # One round barely moves it (robust start).
    assert abs(prior.observe(4, 0).mean - 0.6) < 0.15


def test_estimate_recovers_a_from_truncated_rounds() -> None:
    """The conjugate update is unbiased for rounds cut at k (a != accepted/drafted)."""
    rng, a = random.Random(21), 0.7
    est = AcceptanceEstimate.with_prior(decay=1.0)
    for _ in range(3000):
        k = rng.choice([2, 4, 8])
        n = 0
        while n < k and rng.random() < a:
            n += 1
        est = est.observe(k, n)
    assert est.mean == pytest.approx(a, abs=0.02)
    assert est.draft_acceptance is not None and est.draft_acceptance < a - 0.1
    assert est.rounds == 3000


def test_estimate_forgets_old_evidence() -> None:
    est = AcceptanceEstimate.with_prior(decay=0.9)
    for _ in range(100):
        est = est.observe(4, 4)
    for _ in range(40):
        est = est.observe(4, 0)
    assert est.mean < 0.3


def test_estimate_rejects_impossible_rounds() -> None:
    with pytest.raises(ValueError, match="accepted"):
        AcceptanceEstimate().observe(drafted=2, accepted=3)
    assert AcceptanceEstimate().observe(0, 0) == AcceptanceEstimate()


# --- cost model and k ------------------------------------------------------------------------


def test_cost_model_recovers_a_line() -> None:
    model = CostModel()
    assert model.fit() is None
    for i in range(60):
        k = 1 + i % 16
        model = model.observe(k, 0.05 + 0.01 * k)
    line = model.fit()
    assert line is not None
    assert line.fixed == pytest.approx(0.05, rel=0.05)
    assert line.per_token == pytest.approx(0.01, rel=0.05)


def test_cost_model_at_one_k_predicts_it_and_uses_the_prior_slope() -> None:
    model = CostModel(prior_ratio=0.1)
    for _ in range(20):
        model = model.observe(4, 0.2)
    line = model.fit()
    assert line is not None
    assert line(4) == pytest.approx(0.2)
    assert line.per_token == pytest.approx(0.1 * line.fixed)


def test_cost_model_follows_a_change() -> None:
    model = CostModel()
    for _ in range(30):
        model = model.observe(4, 1.0)
    for _ in range(60):
        model = model.observe(4, 0.1)
    assert model.fit()(4) == pytest.approx(0.1, rel=0.05)  # 0.9 ** 60: the old regime is gone


def brute_force_k(a: float, draft: Line, verify: Line, ks: list[int]) -> int:
    rates = {k: expected_tokens(a, k) / (draft(k) + verify(k)) for k in ks}
    return max(rates, key=lambda k: (rates[k], -k))


@pytest.mark.parametrize("a", [0.0, 0.3, 0.6, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("draft,verify", [
    (Line(0.0, 0.002), Line(0.1, 0.001)),   # round-trip-bound pool, cheap draft: long drafts
    (Line(0.005, 0.02), Line(0.03, 0.004)),  # costly draft
    (Line(0.0, 0.0), Line(0.05, 0.0)),       # free drafting
])
@pytest.mark.parametrize("ks", [list(range(1, 17)), [1, 2, 4, 8, 16], [3, 4, 8, 12]])
def test_choose_k_maximises_tokens_per_second(a: float, draft: Line, verify: Line,
                                              ks: list[int]) -> None:
    assert choose_k(a, draft, verify, ks) == brute_force_k(a, draft, verify, ks)


def test_choose_k_extremes() -> None:
    assert choose_k(0.0, Line(0, 0.01), Line(0.1, 0.001), [2, 4, 16]) == 2  # useless: smallest
    assert choose_k(1.0, Line(0, 0.0), Line(0.1, 0.0), [1, 2, 4, 8, 12]) == 12  # perfect, free
    assert choose_k(0.9, Line(0, 0.0), Line(0.1, 0.0), [3]) == 3
    with pytest.raises(ValueError, match="candidates"):
        choose_k(0.5, Line(0, 0), Line(1, 0), [0, 4])


def test_buckets_are_powers_of_two_within_the_bounds() -> None:
    assert k_buckets(1, 16) == (1, 2, 4, 8, 16)
    assert k_buckets(1, 12) == (1, 2, 4, 8, 12)  # k_max stays reachable
    assert k_buckets(3, 16) == (3, 4, 8, 16)
    assert k_buckets(5, 5) == (5,)
    assert k_buckets(1, 1) == (1,)
    with pytest.raises(ValueError, match="k_min"):
        k_buckets(4, 2)


def test_load_levels_group_streams_by_powers_of_two() -> None:
    assert [load_level(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17)] == [0, 0, 1, 2, 2, 3, 3, 4,
                                                                         4, 5]
    assert [level_streams(level) for level in range(5)] == ["1", "2", "3-4", "5-8", "9-16"]


# Costs where k = 4 and k = 8 predict within a few percent of each other, k = 1 far less.
NEAR_DRAFT, NEAR_VERIFY = Line(0.0, 0.002), Line(0.05, 0.004)


def test_hysteresis_keeps_k_unless_another_bucket_beats_it_by_the_margin() -> None:
    ks = [1, 2, 4, 8, 16]
    a = 0.8
    rates = {k: round_rate(a, k, NEAR_DRAFT, NEAR_VERIFY) for k in ks}
    best = max(rates, key=lambda k: rates[k])
    runner_up = max((k for k in ks if k != best), key=lambda k: rates[k])
    assert rates[best] < rates[runner_up] * 1.1, "the test needs a close call"
    # Close: the current k stays, whichever of the two it is; without a margin the best wins.
    assert choose_k(a, NEAR_DRAFT, NEAR_VERIFY, ks, current=runner_up, margin=0.1) == runner_up
    assert choose_k(a, NEAR_DRAFT, NEAR_VERIFY, ks, current=best, margin=0.1) == best
    assert choose_k(a, NEAR_DRAFT, NEAR_VERIFY, ks, current=runner_up, margin=0.0) == best
    # A current k that is no candidate (k_initial off the buckets) is left at once.
    assert choose_k(a, NEAR_DRAFT, NEAR_VERIFY, ks, current=best + 1, margin=0.1) == best
    # Far: k = 1 is left at once.
    assert rates[best] > rates[1] * 1.1
    assert choose_k(a, NEAR_DRAFT, NEAR_VERIFY, ks, current=1, margin=0.1) == best


def test_hysteresis_holds_k_while_the_estimate_wobbles() -> None:
    """Acceptance estimates that wander a little around the truth leave k (the batch shape)
    alone; without a margin k flips between buckets."""
    ks, rng = [1, 2, 4, 8, 16], random.Random(3)
    draft, verify = Line(0.0, 0.0015), Line(0.05, 0.003)
    wobble = [0.8 + rng.uniform(-0.04, 0.04) for _ in range(200)]

    def changes(margin: float) -> int:
        k, moves = 4, 0
        for a in wobble:
            nxt = choose_k(a, draft, verify, ks, current=k, margin=margin)
            moves += nxt != k
            k = nxt
        return moves

    assert changes(0.0) > 5
    assert changes(0.1) <= 1


DRAFT, VERIFY = Line(0.002, 0.002), Line(0.05, 0.003)


def _plan(a: float = 0.8, draft: Line | None = DRAFT, verify: Line | None = VERIFY,
          current: int = 4, paused: bool = False, streams: int = 1) -> Plan:
    return plan(a, draft, verify, [1, 2, 4, 8, 16], current, paused, streams, 0.1)


def test_plan_drafts_while_it_pays_and_names_the_prediction() -> None:
    p = _plan()
    assert p.drafting and p.k in (4, 8) and p.speedup is not None and p.speedup > 1.5
    # Target-only: a round without a draft, verify(0) = 50 ms a token.
    assert p.speedup == pytest.approx(round_rate(0.8, p.k, DRAFT, VERIFY) * 0.05)
    assert p.reason == f"best k={p.k} predicts {p.speedup:.2f}x of target-only at 1 stream"


def test_plan_pauses_when_the_pool_is_compute_bound() -> None:
    # Under load the target's batch is full: each verified token costs nearly a step.
    loaded = Line(0.02, 0.018)
    p = _plan(verify=loaded, streams=8)
    assert not p.drafting and p.speedup is not None and p.speedup < 1.0
    assert p.k == 1  # under load k shrinks first: 1 is the least bad
    assert p.reason == (f"compute-bound at 8 streams: best k=1 predicts {p.speedup:.2f}x of "
                        "target-only")


def test_plan_resumes_only_past_the_margin() -> None:
    # Drafting at k=1 predicts 1.05x, then 1.2x, of target-only.
    for speedup, drafting, paused in [(1.05, True, False), (1.05, False, True),
                                      (1.2, True, True)]:
        # E(a, 1) = 1 + a; draft free; verify(1) = (1 + a) * verify(0) / speedup.
        a, v0 = 0.5, 0.01
        verify = Line(v0, (1 + a) * v0 / speedup - v0)
        p = plan(a, Line(0.0, 0.0), verify, [1], 1, paused, 1, 0.1)
        assert p.speedup == pytest.approx(speedup)
        assert p.drafting is drafting, (speedup, paused)


def test_plan_without_timings_at_this_load_drafts_at_the_current_k() -> None:
    p = _plan(draft=None, current=8, paused=True, streams=3)
    assert p.drafting and p.k == 8 and p.speedup is None and "3 streams" in p.reason


def test_plan_keeps_k_in_a_close_call() -> None:
    rates = {k: round_rate(0.8, k, NEAR_DRAFT, NEAR_VERIFY) for k in (4, 8)}
    assert abs(rates[4] / rates[8] - 1) < 0.1
    for current in (4, 8):
        assert plan(0.8, NEAR_DRAFT, NEAR_VERIFY, [1, 2, 4, 8, 16], current, False, 1,
                    0.1).k == current


@pytest.mark.parametrize("rounds_before, evaluated, drafted, appended, pending, timed", [
    (0, 9, 8, 0, 0, False),      # first round: whole prompt evaluated
    (1, 10, 8, 1, 0, True),      # correction token + draft (+ one re-evaluated)
    (3, 17, 8, 8, 0, True),      # all accepted last time, bonus, new draft
    (3, 240, 8, 3, 0, False),    # the slot lost the prefix: a prompt re-evaluation
    (2, 12, 8, 2, 1, True),      # one token whose bytes were pending
])
def test_round_timed(rounds_before, evaluated, drafted, appended, pending, timed) -> None:
    assert round_timed(rounds_before, evaluated, drafted, appended, pending) is timed
