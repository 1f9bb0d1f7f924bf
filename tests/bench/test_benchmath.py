"""The benchmark's pure math: Leviathan's bound, efficiency, agreement, statistics."""

from __future__ import annotations

import math

import pytest

from tightwad_dev import benchmath as bm


def test_expected_tokens_and_bound() -> None:
    assert bm.expected_tokens(0.0, 4) == 1.0
    assert bm.expected_tokens(1.0, 4) == 5.0
    assert bm.expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    # S = E / (k c + 1)
    assert bm.predicted_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8 ** 5) / 0.2 / 1.4)
    assert bm.predicted_speedup(0.8, 4, 0.0) == pytest.approx(bm.expected_tokens(0.8, 4))


def test_efficiency_and_ratio() -> None:
    assert bm.efficiency(1.8, 2.0) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        bm.efficiency(1.0, 0.0)
    assert bm.ratio(3.0, 2.0) == 1.5
    assert bm.ratio(None, 2.0) is None
    assert bm.ratio(1.0, 0.0) is None


def test_agreement_and_acceptance() -> None:
    assert bm.agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        bm.agreement([1], [1, 2])
    with pytest.raises(ValueError):
        bm.agreement([], [])
    assert bm.draft_acceptance(3, 4) == 0.75
    assert bm.draft_acceptance(0, 0) is None
    with pytest.raises(ValueError):
        bm.draft_acceptance(5, 4)


def test_expected_draft_acceptance_falls_with_k() -> None:
    # accepted/drafted at fixed a: k=1 -> a; decreasing in k; -> 0 as k grows.
    assert bm.expected_draft_acceptance(0.8, 1) == pytest.approx(0.8)
    values = [bm.expected_draft_acceptance(0.8, k) for k in (1, 2, 4, 8, 16, 32)]
    assert values == sorted(values, reverse=True)
    assert values[-1] < 0.16


def test_cost_ratio_and_best_k() -> None:
    assert bm.cost_ratio(0.002, 0.02) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        bm.cost_ratio(0.001, 0.0)
    ks = [1, 2, 4, 8, 16, 32]
    # Free drafts and perfect agreement: the longest draft wins.
    assert bm.best_k(0.999999, 0.0, ks) == 32
    # Expensive drafts: the shortest.
    assert bm.best_k(0.5, 1.0, ks) == 1
    k = bm.best_k(0.8, 0.05, ks)
    assert all(bm.predicted_speedup(0.8, k, 0.05) >= bm.predicted_speedup(0.8, j, 0.05)
               for j in ks)


def test_native_tokens_per_round() -> None:
    # 10 tokens of which 6 were accepted drafts: 4 rounds.
    assert bm.native_tokens_per_round(10, 6) == 2.5
    assert bm.native_tokens_per_round(0, 0) is None
    with pytest.raises(ValueError):
        bm.native_tokens_per_round(3, 4)


def test_spread_and_quantile() -> None:
    s = bm.spread([4.0, 1.0, 3.0, 2.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["n"] == 4
    assert s["p25"] == pytest.approx(1.75) and s["p75"] == pytest.approx(3.25)
    assert bm.quantile([5.0], 0.3) == 5.0
    with pytest.raises(ValueError):
        bm.spread([])
    with pytest.raises(ValueError):
        bm.quantile([1.0], 1.5)
    assert math.isclose(bm.quantile([0.0, 10.0], 0.5), 5.0)


def test_spread_has_a_bootstrap_interval_around_the_median() -> None:
    values = [10.0, 11.0, 9.0, 10.5, 9.5, 30.0, 10.2, 9.8]
    s = bm.spread(values)
    assert s["ci_lo"] <= s["median"] <= s["ci_hi"]
    assert s["min"] <= s["ci_lo"] and s["ci_hi"] <= s["max"]
    assert bm.spread(values) == s  # seeded: a saved run's summary is reproducible
    assert bm.bootstrap_ci([4.0]) == (4.0, 4.0)
    # A wider sample of the same centre gives a wider interval.
    lo1, hi1 = bm.bootstrap_ci([10.0 + 0.1 * (i % 5) for i in range(40)])
    lo2, hi2 = bm.bootstrap_ci([10.0 + 2.0 * (i % 5) for i in range(40)])
    assert hi1 - lo1 < hi2 - lo2
    with pytest.raises(ValueError):
        bm.bootstrap_ci([])
    with pytest.raises(ValueError):
        bm.bootstrap_ci([1.0, 2.0], level=1.0)


def test_latency_percentiles() -> None:
    lat = bm.latency([float(i) for i in range(1, 101)])
    assert lat["p50"] == pytest.approx(50.5) and lat["max"] == 100.0 and lat["n"] == 100
    assert lat["p99"] == pytest.approx(99.01)
    with pytest.raises(ValueError):
        bm.latency([])


def test_rate() -> None:
    assert bm.rate(50, 2.0) == 25.0
    with pytest.raises(ValueError):
        bm.rate(1, 0.0)


def test_component_bound_charges_the_measured_round() -> None:
    # A verify that costs one step and a free draft: the component bound is Leviathan's at c=0.
    assert bm.component_speedup(0.8, 4, 40.0, 0.0, 40.0) == pytest.approx(
        bm.predicted_speedup(0.8, 4, 0.0))
    # A draft of k tokens at c x step, verify = one step: exactly Leviathan's bound.
    assert bm.component_speedup(0.8, 4, 40.0, 4 * 0.1 * 40.0, 40.0) == pytest.approx(
        bm.predicted_speedup(0.8, 4, 0.1))
    # A verify costing 3 steps divides the bound accordingly.
    assert bm.component_speedup(0.8, 8, 40.0, 0.0, 120.0) == pytest.approx(
        bm.expected_tokens(0.8, 8) / 3)
    with pytest.raises(ValueError):
        bm.component_speedup(0.8, 4, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        bm.component_speedup(0.8, 4, 1.0, 1.0, 0.0)


def test_check_target() -> None:
    assert bm.check_target("x", 2.1, ">=", 2.0)["pass"] is True
    assert bm.check_target("x", 1.9, ">=", 2.0)["pass"] is False
    assert bm.check_target("x", 60e3, "<=", 64e3)["pass"] is True
    assert bm.check_target("x", None, ">=", 2.0)["pass"] is None
    with pytest.raises(ValueError):
        bm.check_target("x", 1.0, ">", 2.0)
