"""Accept/reject rules and the choice of k."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tightwad.decoding.sampling import Rng
from tightwad.decoding.speculation import (
    AcceptanceEstimate,
    AdaptiveK,
    CostModel,
    Line,
    choose_k,
    expected_tokens,
    greedy_verify,
    predicted_speedup,
    residual,
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


def brute_force_k(a: float, draft: Line, verify: Line, k_min: int, k_max: int) -> int:
    rates = {k: expected_tokens(a, k) / (draft(k) + verify(k)) for k in range(k_min, k_max + 1)}
    return max(rates, key=lambda k: (rates[k], -k))


@pytest.mark.parametrize("a", [0.0, 0.3, 0.6, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("draft,verify", [
    (Line(0.0, 0.002), Line(0.1, 0.001)),   # round-trip-bound pool, cheap draft: long drafts
    (Line(0.005, 0.02), Line(0.03, 0.004)),  # costly draft
    (Line(0.0, 0.0), Line(0.05, 0.0)),       # free drafting
])
def test_choose_k_maximises_tokens_per_second(a: float, draft: Line, verify: Line) -> None:
    k = choose_k(a, draft, verify, 1, 16)
    assert k == brute_force_k(a, draft, verify, 1, 16)


def test_choose_k_extremes() -> None:
    assert choose_k(0.0, Line(0, 0.01), Line(0.1, 0.001), 2, 16) == 2  # useless draft: k_min
    assert choose_k(1.0, Line(0, 0.0), Line(0.1, 0.0), 1, 12) == 12  # perfect, free: k_max
    assert choose_k(0.9, Line(0, 0.0), Line(0.1, 0.0), 3, 3) == 3
    with pytest.raises(ValueError, match="k_min"):
        choose_k(0.5, Line(0, 0), Line(1, 0), 0, 4)


def test_adaptive_k_grows_with_acceptance_on_a_slow_pool() -> None:
    ctl = AdaptiveK(k=4)
    for _ in range(30):
        ctl = ctl.observe(drafted=ctl.k, accepted=ctl.k, draft_seconds=0.002 * ctl.k,
                          verify_seconds=0.1 + 0.001 * ctl.k)
    assert ctl.k >= 12


def test_adaptive_k_shrinks_when_drafts_fail() -> None:
    ctl = AdaptiveK(k=8)
    for _ in range(30):
        ctl = ctl.observe(drafted=ctl.k, accepted=0, draft_seconds=0.02 * ctl.k,
                          verify_seconds=0.05 + 0.005 * ctl.k)
    assert ctl.k == 1


def test_fixed_k_never_moves() -> None:
    ctl = AdaptiveK(k=6, adaptive=False)
    for _ in range(10):
        ctl = ctl.observe(drafted=6, accepted=0, draft_seconds=0.1, verify_seconds=0.1)
    assert ctl.k == 6
    assert ctl.acceptance.rounds == 10  # still measured, for the metrics


def test_untimed_rounds_count_acceptance_but_not_cost() -> None:
    ctl = AdaptiveK(k=4)
    # The first round also evaluates a long prompt: 0.6 s that says nothing about k.
    first = ctl.observe(drafted=4, accepted=4, draft_seconds=0.3, verify_seconds=0.6,
                        timed=False)
    assert first.acceptance.rounds == 1 and first.verify_cost == ctl.verify_cost
    assert first.draft_cost == ctl.draft_cost and first.k == 4
    # Timed the same, it would have dragged the fitted cost of every later round up.
    timed = ctl.observe(drafted=4, accepted=4, draft_seconds=0.3, verify_seconds=0.6)
    assert timed.verify_cost.fit()(4) == pytest.approx(0.6)


def test_k_at_most_doubles_per_round() -> None:
    ctl = AdaptiveK(k=2, k_max=32)
    seen = [ctl.k]
    for _ in range(6):  # perfect, nearly free drafts: the optimum is k_max at once
        ctl = ctl.observe(drafted=ctl.k, accepted=ctl.k, draft_seconds=1e-4 * ctl.k,
                          verify_seconds=0.1)
        seen.append(ctl.k)
    assert seen[:5] == [2, 4, 8, 16, 32]
    assert all(b <= 2 * a for a, b in zip(seen, seen[1:]))


@pytest.mark.parametrize("rounds_before, evaluated, drafted, appended, pending, timed", [
    (0, 9, 8, 0, 0, False),      # first round: whole prompt evaluated
    (1, 10, 8, 1, 0, True),      # correction token + draft (+ one re-evaluated)
    (3, 17, 8, 8, 0, True),      # all accepted last time, bonus, new draft
    (3, 240, 8, 3, 0, False),    # the slot lost the prefix: a prompt re-evaluation
    (2, 12, 8, 2, 1, True),      # one token whose bytes were pending
])
def test_round_timed(rounds_before, evaluated, drafted, appended, pending, timed) -> None:
    assert round_timed(rounds_before, evaluated, drafted, appended, pending) is timed


def test_adaptive_k_validates_bounds() -> None:
    with pytest.raises(ValueError, match="k_min <= k <= k_max"):
        AdaptiveK(k=20, k_max=16)
