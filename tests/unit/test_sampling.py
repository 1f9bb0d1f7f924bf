"""The sparse sampling chain against a literal full-vocabulary replay of llama.cpp's chain."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from tightwad.decoding.sampling import (
    Rng,
    SamplingParams,
    apply_chain,
    argmax,
    covered_mass,
    from_probs,
    normalize,
    sample,
    top_n_suffices,
)


def reference_chain(logits: dict[int, float], params: SamplingParams) -> dict[int, float]:
    """llama.cpp's top_k -> top_p -> min_p -> temperature -> dist, stage by stage, full vocab."""
    cur = sorted(logits.items(), key=lambda e: (-e[1], e[0]))
    if params.top_k > 0:
        cur = cur[: params.top_k]
    if params.top_p < 1.0:
        peak = cur[0][1]
        weights = [math.exp(lp - peak) for _, lp in cur]
        total = sum(weights)
        cum, last = 0.0, len(cur)
        for i, w in enumerate(weights):
            cum += w / total
            if cum >= params.top_p:
                last = i + 1
                break
        cur = cur[:last]
    if params.min_p > 0.0:
        threshold = cur[0][1] + math.log(params.min_p)
        cur = [e for e in cur if e[1] >= threshold]
    if params.temperature <= 0.0:
        return {cur[0][0]: 1.0}
    scaled = [(t, lp / params.temperature) for t, lp in cur]
    peak = max(s for _, s in scaled)
    weights = {t: math.exp(s - peak) for t, s in scaled}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def random_vocab(rng: random.Random, size: int, sharpness: float) -> dict[int, float]:
    """Log-softmax of random logits over ``size`` tokens (ids shuffled, not in rank order)."""
    ids = rng.sample(range(10 * size), size)
    logits = [rng.gauss(0.0, sharpness) for _ in ids]
    peak = max(logits)
    log_z = peak + math.log(sum(math.exp(x - peak) for x in logits))
    return {t: x - log_z for t, x in zip(ids, logits)}


def top_n(logprobs: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda e: -e[1])[:n]


def assert_same_dist(got: dict[int, float], want: dict[int, float]) -> None:
    assert set(got) == set(want)
    for token, p in want.items():
        assert got[token] == pytest.approx(p, rel=1e-9, abs=1e-12)


def test_defaults_are_llama_servers() -> None:
    params = SamplingParams()
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.8, 40, 0.95, 0.05)
    assert not params.greedy
    assert SamplingParams(temperature=0.0).greedy


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"temperature": math.nan},
                                    {"top_p": 1.5}, {"min_p": -0.01}])
def test_invalid_params_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_argmax_breaks_ties_by_lowest_id() -> None:
    assert argmax([(9, -1.0), (3, -0.5), (7, -0.5)]) == 3
    assert argmax([(2, -3.0), (5, -0.1)]) == 5
    with pytest.raises(ValueError):
        argmax([])


def test_greedy_is_exact_with_one_entry() -> None:
    params = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    assert top_n_suffices([(4, -2.0)], params)
    assert apply_chain([(1, -2.0), (4, -0.2), (2, -0.2)], params) == {2: 1.0}


def test_cuts_use_temperature_one_probabilities() -> None:
    # p = 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps two tokens at any temperature.
    top = [(10, math.log(0.5)), (11, math.log(0.3)), (12, math.log(0.15)), (13, math.log(0.05))]
    params = SamplingParams(temperature=5.0, top_k=0, top_p=0.75, min_p=0.0)
    dist = apply_chain(top, params)
    assert set(dist) == {10, 11}
    ratio = math.exp((math.log(0.5) - math.log(0.3)) / 5.0)
    assert dist[10] / dist[11] == pytest.approx(ratio)
    # min_p 0.35 keeps p >= 0.175 (of the TEMPERATURE-1 max), whatever the temperature.
    params = SamplingParams(temperature=0.3, top_k=0, top_p=1.0, min_p=0.35)
    assert set(apply_chain(top, params)) == {10, 11}
    assert top_n_suffices(top, params)


def test_top_k_within_n_is_exact() -> None:
    rng = random.Random(1)
    vocab = random_vocab(rng, 300, 0.3)  # flat: top_p / min_p cut far out
    params = SamplingParams(temperature=1.0, top_k=20, top_p=1.0, min_p=0.0)
    assert top_n_suffices(top_n(vocab, 20), params)
    assert not top_n_suffices(top_n(vocab, 19), params)
    assert_same_dist(apply_chain(top_n(vocab, 20), params), reference_chain(vocab, params))


def test_flat_distribution_without_top_k_needs_more() -> None:
    rng = random.Random(2)
    vocab = random_vocab(rng, 300, 0.3)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0)
    listed = top_n(vocab, 50)
    assert covered_mass([(t, math.exp(lp)) for t, lp in listed]) < 0.95
    assert not top_n_suffices(listed, params)
    # Approximation when unsure: renormalized over every listed token.
    assert len(apply_chain(listed, params)) == 50


def test_complete_list_always_suffices() -> None:
    rng = random.Random(3)
    vocab = random_vocab(rng, 30, 0.5)
    params = SamplingParams(temperature=1.3, top_k=0, top_p=1.0, min_p=0.0)
    listed = top_n(vocab, 30)
    assert not top_n_suffices(listed, params)
    assert top_n_suffices(listed, params, complete=True)
    assert_same_dist(apply_chain(listed, params, complete=True), reference_chain(vocab, params))


def test_suffices_is_sound_and_often_true() -> None:
    """Whenever top_n_suffices says yes, the sparse chain equals the full-vocabulary chain."""
    rng = random.Random(1234)
    exact = inexact = 0
    for _ in range(400):
        vocab = random_vocab(rng, 400, rng.choice([0.5, 1.5, 3.0, 6.0]))
        params = SamplingParams(temperature=rng.choice([0.0, 0.5, 0.8, 1.0, 1.7]),
                                top_k=rng.choice([0, 5, 40, 100]),
                                top_p=rng.choice([1.0, 0.9, 0.95, 0.5]),
                                min_p=rng.choice([0.0, 0.05, 0.1]))
        n = rng.choice([10, 40, 100])
        listed = top_n(vocab, n)
        if top_n_suffices(listed, params):
            exact += 1
            assert_same_dist(apply_chain(listed, params), reference_chain(vocab, params))
            assert sum(apply_chain(listed, params).values()) == pytest.approx(1.0)
        else:
            inexact += 1
            assert len(reference_chain(vocab, params)) > 0
        if 0 < params.top_k <= n or params.greedy:
            assert top_n_suffices(listed, params)
    assert exact > 150 and inexact > 20  # both branches really exercised


def test_top_k_beyond_n_bounds_the_top_p_normalizer() -> None:
    # Peaked: 3 listed tokens hold 0.97; top_k 40 > N, top_p 0.9 is crossed at token 2 for any
    # normalizer in [0.97, 1] (0.6 + 0.33 = 0.93 >= 0.9 * 1.0).
    top = [(1, math.log(0.6)), (2, math.log(0.33)), (3, math.log(0.04))]
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, min_p=0.0)
    assert top_n_suffices(top, params)
    assert set(apply_chain(top, params)) == {1, 2}
    # top_p 0.98 is crossed at token 3 if Z = 0.97 (only the listed tokens are in the top 40)
    # but by an unseen token if Z = 1: unknown here.
    assert not top_n_suffices(top, SamplingParams(temperature=1.0, top_k=40, top_p=0.98,
                                                  min_p=0.0))
    # With top_k 3 the normalizer is the listed sum, so the same top_p is exact.
    assert top_n_suffices(top, SamplingParams(temperature=1.0, top_k=3, top_p=0.98, min_p=0.0))


def test_zero_probability_entries_and_bad_lists() -> None:
    lowest = -3.4028234663852886e38  # what llama-server reports for p == 0
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert apply_chain([(1, 0.0), (2, lowest)], params, complete=True) == {1: 1.0}
    with pytest.raises(ValueError, match="twice"):
        apply_chain([(1, -1.0), (1, -2.0)], params)
    with pytest.raises(ValueError, match="empty"):
        apply_chain([], params)
    assert not top_n_suffices([], params)


def test_from_probs_and_normalize() -> None:
    assert from_probs([(5, 0.2), (6, 0.6)]) == pytest.approx({5: 0.25, 6: 0.75})
    assert normalize({1: 2.0, 2: 0.0, 3: 2.0}) == {1: 0.5, 3: 0.5}
    with pytest.raises(ValueError):
        normalize({1: 0.0})


def test_seeded_rng_is_reproducible_and_order_independent() -> None:
    dist = {7: 0.5, 3: 0.3, 9: 0.2}
    shuffled = dict(reversed(list(dist.items())))
    a, b, c = Rng(42), Rng(42), Rng(43)
    first = [a.draw(dist) for _ in range(50)]
    assert first == [b.draw(shuffled) for _ in range(50)]
    assert first != [c.draw(dist) for _ in range(50)]


def test_draws_follow_the_distribution() -> None:
    rng = Rng(5)
    dist = {7: 0.5, 3: 0.3, 9: 0.2}
    counts = Counter(rng.draw(dist) for _ in range(20000))
    for token, p in dist.items():
        assert counts[token] / 20000 == pytest.approx(p, abs=0.015)
    with pytest.raises(ValueError):
        rng.draw({1: 0.0})


def test_sample_is_greedy_at_temperature_zero() -> None:
    top = [(1, -0.1), (2, -2.5)]
    rng = Rng(0)
    assert {sample(top, SamplingParams(temperature=0.0), rng) for _ in range(20)} == {1}
    drawn = {sample(top, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), rng)
             for _ in range(200)}
    assert drawn == {1, 2}
