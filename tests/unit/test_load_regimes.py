"""tightwad.decoding.speculation.LoadRegimes: under load, drafting or target-only by the tokens/s
each gave in windows of its own, not by a stream's own cost model."""

from __future__ import annotations

from tightwad.decoding.speculation import LoadRegimes

W, REFRESH = 3.0, 30.0


def _run(regimes: LoadRegimes, level: int, t: float, until: float,
         rate: dict[bool, float], round_s: float = 0.5) -> float:
    """Rounds of ``round_s`` back to back from ``t`` to ``until``, each emitting tokens at the
    per-stream ``rate`` of the regime it was told; returns the time reached."""
    while t < until:
        drafting = regimes.drafting(level, t)
        regimes.observe(round(rate[drafting] * round_s), t, t + round_s)
        t += round_s
    return t


def test_one_stream_always_may_draft_and_opens_no_window() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    assert all(regimes.drafting(0, t) for t in range(100))
    assert regimes.window is None and regimes.rates == {}


def test_under_load_it_measures_both_then_runs_the_faster() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    assert regimes.drafting(2, 0.0) is True  # nothing known: drafting is measured first
    t = _run(regimes, 2, 0.0, W, {True: 4.0, False: 10.0})
    assert regimes.drafting(2, t) is False  # then target-only
    # A window's rate is taken when it closes, from the rounds that ended by then.
    t = _run(regimes, 2, t, 2 * W, {True: 4.0, False: 10.0})
    assert regimes.drafting(2, t) is False  # both known: target-only is 2.5x faster
    assert regimes.rates[2][True][0] == 4.0 and regimes.rates[2][False][0] == 10.0
    assert regimes.status()["3-4"] == {"drafting_tok_s": 4.0, "target_only_tok_s": 10.0,
                                      "drafting": False, "remeasured_every_s": REFRESH}
    # It keeps target-only until drafting's rate is stale, then measures drafting for one
    # window, and goes back where drafting is still the slower ...
    told = []
    while t < 3 * REFRESH:
        told.append(regimes.drafting(2, t))
        regimes.observe(round((4.0 if told[-1] else 10.0) * 0.5), t, t + 0.5)
        t += 0.5
    drafted = [i for i, d in enumerate(told) if d]
    assert drafted and all(0.5 * i >= REFRESH - 3 * W for i in drafted[:1])
    assert len(drafted) <= 2 * (W / 0.5)  # one window per refresh period (two periods here)
    assert regimes.best[2] is False
    # ... and runs drafting where it has become the faster (load fell, easier text).
    t = _run(regimes, 2, t, 5 * REFRESH, {True: 20.0, False: 10.0})
    assert regimes.best[2] is True


def _window_starts(regimes: LoadRegimes, level: int, t: float, until: float,
                   rate: dict[bool, float], regime: bool) -> list[float]:
    """Like :func:`_run`; when each window of ``regime`` started."""
    starts: list[float] = []
    while t < until:
        drafting = regimes.drafting(level, t)
        window = regimes.window
        if drafting == regime and window is not None and window.start == t:
            starts.append(t)
        regimes.observe(round(rate[drafting] * 0.5), t, t + 0.5)
        t += 0.5
    return starts


def test_a_regime_that_keeps_losing_is_measured_ever_less_often_until_it_wins() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    slow_drafts = {True: 4.0, False: 10.0}
    starts = _window_starts(regimes, 2, 0.0, 30 * REFRESH, slow_drafts, True)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    # Measured first, then after 1, 2, 4 and 8 refresh periods (plus a window), then every 8.
    periods = [round(g / REFRESH) for g in gaps]
    assert periods[:5] == [1, 2, 4, 8, 8], gaps
    assert all(g <= 8 * REFRESH + 3 * W for g in gaps)
    assert regimes.status()["3-4"]["remeasured_every_s"] == 8 * REFRESH
    # Drafting wins its next window (load fell, easier text): it runs, and target-only is
    # measured after one period (the backoff was the loser's; the switch resets it).
    t = _run(regimes, 2, 30 * REFRESH, starts[-1] + 8 * REFRESH + 6 * W,
             {True: 20.0, False: 10.0})
    assert regimes.best[2] is True and regimes.period(2) == REFRESH
    alone = _window_starts(regimes, 2, t, t + 2 * REFRESH, {True: 20.0, False: 10.0}, False)
    assert len(alone) == 1 and alone[0] - t <= REFRESH + W


def test_a_small_difference_does_not_switch() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    t = _run(regimes, 3, 0.0, 2 * W, {True: 10.0, False: 10.5})
    assert regimes.drafting(3, t) is True and regimes.best.get(3, True) is True


def test_rounds_count_for_the_window_they_started_in() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    assert regimes.drafting(2, 0.0) is True
    # A drafting round that starts in the first window and ends in the second counts for the
    # first; a round of the second window does not.
    assert regimes.drafting(2, W) is False
    regimes.observe(30, 2.5, W + 2.0)
    regimes.observe(5, W + 0.1, W + 0.6)
    assert regimes.window is not None and regimes.window.tokens == 5
    assert regimes.ending is not None and regimes.ending.tokens == 30
    regimes.drafting(2, 2 * W)  # the first window's rate, complete when the second closes
    assert regimes.rates[2][True][0] == 30 / 2.5


def test_a_change_of_load_opens_a_window_at_the_new_level() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    regimes.drafting(2, 0.0)
    regimes.drafting(3, 1.0)
    assert regimes.window is not None and regimes.window.level == 3
    assert regimes.drafting(0, 1.5) is True and regimes.window is None


def test_where_target_only_won_at_a_lower_load_drafting_is_not_tried_at_a_higher() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    t = _run(regimes, 2, 0.0, 3 * W, {True: 4.0, False: 10.0})
    assert regimes.best[2] is False
    # Load rises: the first window at 5-8 streams runs target-only, and drafting is not
    # measured there while the 3-4 stream evidence is fresh.
    told = []
    while t < 3 * W + 2 * REFRESH:
        told.append(regimes.drafting(3, t))
        regimes.observe(round((3.0 if told[-1] else 8.0) * 0.5), t, t + 0.5)
        t += 0.5
    assert not any(told), told.index(True)
    assert True not in regimes.rates.get(3, {})
    assert regimes.status()["5-8"]["drafting"] is False
    # Once that evidence is older than EVIDENCE_REFRESHES periods, the level measures for itself.
    t += LoadRegimes.EVIDENCE_REFRESHES * REFRESH
    assert regimes.drafting(3, t) is True


def test_where_drafting_won_at_a_higher_load_target_only_is_not_tried_at_a_lower() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    t = _run(regimes, 3, 0.0, 3 * W, {True: 12.0, False: 10.0})
    assert regimes.rates[3][False][0] == 10.0 and regimes.best.get(3, True) is True
    t = _run(regimes, 2, t, t + REFRESH, {True: 15.0, False: 10.0})
    assert False not in regimes.rates.get(2, {})


def test_its_own_measurements_outweigh_another_level() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    t = _run(regimes, 2, 0.0, 3 * W, {True: 4.0, False: 10.0})
    # 5-8 streams measured both before 3-4 decided: its own decision (drafting) stands.
    regimes.rates[3] = {True: (9.0, t), False: (8.5, t)}
    assert regimes.drafting(3, t) is True


def test_levels_that_disagree_imply_nothing() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    regimes.rates = {1: {True: (4.0, 0.0), False: (10.0, 0.0)},
                     3: {True: (12.0, 0.0), False: (10.0, 0.0)}}
    regimes.best = {1: False}
    assert regimes.drafting(2, 1.0) is True  # measured first, as with nothing known


def test_where_one_stream_pauses_drafting_it_is_not_measured_under_load() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    regimes.alone(False, 0.0)  # one stream's cost lines: drafting does not pay even alone
    horizon = LoadRegimes.EVIDENCE_REFRESHES * REFRESH
    told = []
    t = 0.0
    while t < horizon:
        told.append(regimes.drafting(3, t))
        regimes.observe(round((2.0 if told[-1] else 6.0) * 0.5), t, t + 0.5)
        t += 0.5
    assert not any(told)
    assert True not in regimes.rates[3] and regimes.status()["5-8"]["drafting"] is False
    # Once that decision is older than the evidence horizon, the level measures for itself.
    t = _run(regimes, 3, t, t + 3 * W, {True: 2.0, False: 6.0})
    assert True in regimes.rates[3]


def test_one_stream_drafting_implies_nothing_under_load() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    regimes.alone(True, 0.0)
    assert regimes.drafting(2, 0.0) is True  # measured first, as with nothing known


def test_a_load_level_where_drafting_won_outweighs_one_stream_pausing() -> None:
    regimes = LoadRegimes(W, REFRESH, 0.1)
    t = _run(regimes, 2, 0.0, 3 * W, {True: 12.0, False: 10.0})
    assert regimes.best.get(2, True) is True
    regimes.alone(False, t)  # contradicted by a measurement: says nothing
    assert regimes.drafting(3, t) is True
