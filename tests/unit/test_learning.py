"""The engine's shared speculation estimates (:mod:`tightwad.engine.learning`): one state per
drafter/target pair that every request reads and teaches, costs per load level, k from buckets,
target-only rounds where drafting cannot pay, and the probes that keep it from staying off."""

from __future__ import annotations

from typing import Any

import pytest

from tightwad.config import parse_config
from tightwad.decoding.sampling import SamplingParams
from tightwad.engine.learning import Learning, PairLearning
from tightwad.engine.telemetry import Telemetry

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0)
SEEDED = SamplingParams(temperature=1.0, seed=7)
KS = (1, 2, 4, 8, 16)


def _learning(**speculation: Any) -> Learning:
    config = parse_config({"speculation": {"mode": "remote"} | speculation}, env={})
    return Learning(config.speculation, Telemetry())


def _pair(**speculation: Any) -> PairLearning:
    return _learning(**speculation).pair("target.gguf", "draft.gguf", 16)


def teach(p: PairLearning, streams: int, verify_fixed: float, verify_per_token: float,
          accepted_of: dict[int, int] | None = None, greedy: bool = True,
          draft_per_token: float = 0.001) -> None:
    """Rounds at every bucket with these costs (all accepted unless ``accepted_of`` says)."""
    for _ in range(6):
        for k in KS:
            accepted = k if accepted_of is None else accepted_of[k]
            p.observe_round(greedy, streams, k, accepted, draft_per_token * k,
                            verify_fixed + verify_per_token * k, timed=True)


def _metrics(telemetry: Telemetry) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in telemetry.prometheus().decode().splitlines()
            if line and not line.startswith("#")}


def test_one_pair_is_shared_and_another_pair_starts_afresh() -> None:
    learning = _learning()
    first = learning.pair("target.gguf", "draft.gguf", 16)
    teach(first, 1, 0.05, 0.002)
    assert learning.pair("target.gguf", "draft.gguf", 16) is first  # the next request
    assert first.round_k(GREEDY, 1) == 16  # cheap drafts, all accepted, a slow round trip
    for other in [("target.gguf", "other-draft.gguf", 16), ("swapped.gguf", "draft.gguf", 16),
                  ("target.gguf", "draft.gguf", 8)]:
        fresh = learning.pair(*other)
        assert fresh is not first and fresh.acceptance[True].rounds == 0
        assert fresh.round_k(GREEDY, 1) == 4  # k_initial: nothing learned about this pair
    assert learning.pair("target.gguf", "draft.gguf", 8).buckets == (1, 2, 4, 8)


def test_k_comes_from_the_buckets_and_stays_put_in_a_close_call() -> None:
    p = _pair(k_max=12, probe_every=0)
    assert p.buckets == (1, 2, 4, 8, 12)
    teach(p, 1, 0.05, 0.002, accepted_of={1: 1, 2: 2, 4: 3, 8: 3, 16: 3})
    seen = {p.round_k(GREEDY, 1) for _ in range(20)}
    assert len(seen) == 1 and seen <= set(p.buckets)


def test_costs_are_kept_per_load_and_k_shrinks_under_load() -> None:
    p = _pair()
    # One stream: a round trip dominates, drafts are nearly free, 80% of drafts pass.
    a80 = {1: 1, 2: 2, 4: 3, 8: 6, 16: 13}
    teach(p, 1, 0.05, 0.002, accepted_of=a80)
    # Eight streams: every verified token costs a share of a full batch.
    teach(p, 8, 0.05, 0.03, accepted_of=a80)
    alone, loaded = p.round_k(GREEDY, 1), p.round_k(GREEDY, 8)
    assert loaded < alone, (alone, loaded)
    assert p.round_k(GREEDY, 7) == loaded  # 5-8 streams are one level
    assert set(p.status()["by_streams"]) == {"1", "5-8"}


COMPUTE_BOUND = {1: 1, 2: 1, 4: 2, 8: 3, 16: 3}  # accepted of k at 8 streams, with...


def teach_compute_bound(p: PairLearning, greedy: bool = True) -> None:
    """...every verified token costing nearly a whole step, and target-only measured."""
    teach(p, 8, 0.02, 0.018, accepted_of=COMPUTE_BOUND, greedy=greedy)
    for _ in range(4):
        p.observe_round(greedy, 8, 0, 0, None, 0.02, timed=True)


def test_a_compute_bound_pool_pauses_drafting_and_says_so() -> None:
    learning = _learning(probe_every=0)
    p = learning.pair("target.gguf", "draft.gguf", 16)
    teach_compute_bound(p)
    assert p.round_k(GREEDY, 8) == 0  # target-only rounds
    status = learning.status()
    assert status["drafting"] is False and status["streams"] == 8
    assert status["reason"].startswith("compute-bound at 8 streams: best k=")
    assert status["k"] in p.buckets and status["predicted_speedup"] < 1.0
    assert status["by_streams"]["5-8"]["target_only_measured"] is True
    series = _metrics(learning.telemetry)
    assert series['tightwad_speculation_paused{reason="compute_bound"}'] == 1.0
    assert series["tightwad_speculation_k"] == status["k"]
    # One stream, where drafting pays: it drafts (and says why).
    teach(p, 1, 0.05, 0.002)
    assert p.round_k(GREEDY, 1) > 0 and learning.status()["drafting"] is True
    assert _metrics(learning.telemetry)[
        'tightwad_speculation_paused{reason="compute_bound"}'] == 0.0


def test_where_one_stream_pauses_a_new_load_starts_target_only() -> None:
    p = _pair(probe_every=0)
    teach(p, 1, 0.02, 0.018, accepted_of=COMPUTE_BOUND)
    for _ in range(4):
        p.observe_round(True, 1, 0, 0, None, 0.02, timed=True)
    assert p.round_k(GREEDY, 1) == 0  # compute-bound even alone
    # A burst of 4 streams, a load nothing was measured at: no drafting window first (it would
    # run at a fraction of target-only's rate on such a pool); target-only is measured.
    assert [p.round_k(GREEDY, 4) for _ in range(5)] == [0] * 5
    window = p.regimes.window
    assert window is not None and window.level == 2 and window.drafting is False
    assert p.status()["reason"] == ("target-only at 4 streams: not measuring drafting "
                                    "(drafting is paused at one stream)")


def test_paused_drafting_is_probed_ever_less_often_until_it_resumes() -> None:
    p = _pair(probe_every=4)
    teach_compute_bound(p)

    def rounds(n: int, drafter_up: bool = True) -> list[int]:
        """``n`` planned rounds; a probe's draft is observed (compute-bound) where the drafter
        answers."""
        ks = []
        for _ in range(n):
            ks.append(k := p.round_k(GREEDY, 8))
            if k and drafter_up:
                p.observe_round(True, 8, k, 0, 0.001 * k, 0.02 + 0.018 * k, timed=True)
        return ks

    # Probes whose drafter is down say nothing: every 4th round, no longer apart.
    assert [k > 0 for k in rounds(12, drafter_up=False)] == [False, False, False, True] * 3
    ks = rounds(128)
    assert set(ks) - {0} <= set(p.buckets)
    # Probes after 4 rounds, then 8, 16, 32 (the most: 2**MAX_PROBE_BACKOFF x 4), and 32.
    probes = [i + 1 for i, k in enumerate(ks) if k > 0]
    assert probes == [4, 12, 28, 60, 92, 124]
    # Drafting pays again (load fell): it resumes, and a later pause probes after 4 again.
    teach(p, 8, 0.05, 0.002)
    assert p.round_k(GREEDY, 8) > 0
    teach_compute_bound(p)
    teach_compute_bound(p)
    assert [p.round_k(GREEDY, 8) > 0 for _ in range(4)] == [False, False, False, True]


def test_target_only_is_measured_where_unknown_and_left_alone_where_clear() -> None:
    p = _pair(probe_every=4)
    teach(p, 1, 0.05, 0.002)
    # Drafting clearly pays by the fitted line, but target-only was never measured at this
    # load: the 4th round goes without a draft to measure it.
    assert [p.round_k(GREEDY, 1) > 0 for _ in range(4)] == [True, True, True, False]
    p.observe_round(True, 1, 0, 0, None, 0.05, timed=True)
    # Measured, and drafting predicts well over 1.2x of it: no more detours.
    assert all(p.round_k(GREEDY, 1) > 0 for _ in range(8))


def test_seeded_sampling_keeps_k_initial_and_always_drafts() -> None:
    p = _pair(k_initial=2, probe_every=0)
    teach(p, 1, 0.05, 0.002, greedy=False)
    assert p.round_k(SAMPLED, 1) == 16
    assert p.round_k(SEEDED, 1) == 2
    teach_compute_bound(p, greedy=False)
    assert p.round_k(SAMPLED, 8) == 0 and not p.plan.drafting
    assert p.round_k(SEEDED, 8) == 2


def test_greedy_and_sampled_acceptance_are_learned_apart() -> None:
    p = _pair()
    for _ in range(20):
        p.observe_round(True, 1, 4, 4, 0.004, 0.05, timed=True)
        p.observe_round(False, 1, 4, 0, 0.004, 0.05, timed=True)
    assert p.acceptance[True].mean > 0.9 and p.acceptance[False].mean < 0.2
    assert p.round_k(SAMPLED, 1) < p.round_k(GREEDY, 1)


def test_untimed_rounds_teach_acceptance_only() -> None:
    p = _pair()
    p.observe_round(True, 1, 4, 4, 0.3, 0.6, timed=False)  # a first round: the whole prompt
    assert p.acceptance[True].rounds == 1 and not p.draft and not p.verify
    p.observe_round(True, 1, 0, 0, None, 0.04, timed=True)  # a round without a draft
    assert p.verify[0].fit()(0) == pytest.approx(0.04) and not p.draft
    assert p.target_only == {0}


def test_fixed_k_when_not_adaptive() -> None:
    p = _pair(adaptive=False, k_initial=6, probe_every=1)
    teach_compute_bound(p)
    assert all(p.round_k(GREEDY, 8) == 6 for _ in range(4))


def test_status_before_any_request_and_in_other_modes() -> None:
    assert _learning().status() == {"drafting": True, "reason": "no request yet", "k": None}
    assert _learning(mode="off").status()["drafting"] is False
