"""The benchmark's pure arithmetic: the speculative-decoding bound, efficiency, agreement, and
summary statistics. No I/O; ``bench/pool_bench.py`` does the measuring.

The bound is Leviathan et al. (2023): with per-position acceptance ``a`` (the chance that the
target accepts a drafted token given all earlier ones were accepted), draft length ``k`` and
cost ratio ``c`` (one draft token's time over one target step's time), a round emits on average
``E(a, k) = (1 - a^(k+1)) / (1 - a)`` tokens and speculation is ``S = E / (k c + 1)`` times as
fast as the target alone. That model assumes a verify of k + 1 tokens costs one target step and
that nothing else (network, HTTP, proxy) takes time; efficiency = measured / predicted says how
much of the bound a real system keeps.

The Leviathan bound also assumes a verify of k + 1 tokens costs one target step; on CPUs it costs
several. :func:`component_speedup` is the bound built from measured component costs instead (the
draft call and the verify of k tokens, each as timed on its own): what a round loop with no
overhead of its own could reach on this machine and link.

``a`` here is the per-position greedy agreement (:func:`agreement`), not llama.cpp's "draft
acceptance" accepted / drafted (:func:`draft_acceptance`), which falls as k grows even at a fixed
``a``: both are reported, and only ``a`` goes into the formula.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from typing import Any

from tightwad.decoding.speculation import expected_tokens, predicted_speedup

__all__ = [
    "agreement",
    "best_k",
    "bootstrap_ci",
    "check_target",
    "component_speedup",
    "cost_ratio",
    "draft_acceptance",
    "efficiency",
    "expected_draft_acceptance",
    "expected_tokens",
    "native_tokens_per_round",
    "predicted_speedup",
    "latency",
    "quantile",
    "rate",
    "ratio",
    "spread",
]

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_LEVEL = 0.95


def agreement(draft_argmax: Sequence[int], target_tokens: Sequence[int]) -> float:
    """Per-position greedy agreement: the fraction of positions where the draft's argmax, given
    the target's own prefix, equals the target's token (Leviathan's a at temperature 0)."""
    if len(draft_argmax) != len(target_tokens):
        raise ValueError(f"need as many draft guesses as target tokens, got "
                         f"{len(draft_argmax)} and {len(target_tokens)}")
    if not target_tokens:
        raise ValueError("no positions to compare")
    return sum(d == t for d, t in zip(draft_argmax, target_tokens)) / len(target_tokens)


def draft_acceptance(accepted: int, drafted: int) -> float | None:
    """llama.cpp's metric: accepted / drafted tokens (None when nothing was drafted)."""
    if not 0 <= accepted <= drafted:
        raise ValueError(f"need 0 <= accepted <= drafted, got {accepted}, {drafted}")
    return accepted / drafted if drafted else None


def expected_draft_acceptance(a: float, k: int) -> float:
    """accepted / drafted expected at per-position acceptance a and a fixed k: (E - 1) / k."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return (expected_tokens(a, k) - 1.0) / k


def cost_ratio(draft_s_per_token: float, target_s_per_token: float) -> float:
    """c = one draft token's time / one target step's time."""
    if draft_s_per_token < 0 or target_s_per_token <= 0:
        raise ValueError(f"need a draft time >= 0 and a target time > 0, got "
                         f"{draft_s_per_token}, {target_s_per_token}")
    return draft_s_per_token / target_s_per_token


def efficiency(measured_speedup: float, predicted: float) -> float:
    """measured / predicted speed-up (1.0: the system reaches the bound)."""
    if predicted <= 0:
        raise ValueError(f"predicted speed-up must be > 0, got {predicted}")
    return measured_speedup / predicted


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, None when either is missing or base is 0."""
    if value is None or base is None or base == 0:
        return None
    return value / base


def best_k(a: float, c: float, ks: Sequence[int]) -> int:
    """The k of ``ks`` with the highest predicted speed-up (ties: the smaller k)."""
    if not ks:
        raise ValueError("no k to choose from")
    return max(sorted(ks), key=lambda k: (predicted_speedup(a, k, c), -k))


def native_tokens_per_round(tokens: int, accepted: int) -> float | None:
    """Tokens per verify round when only totals are known (llama.cpp's timings): each round
    emits its accepted drafts plus one target token, so rounds = tokens - accepted."""
    if not 0 <= accepted <= tokens:
        raise ValueError(f"need 0 <= accepted <= tokens, got {accepted}, {tokens}")
    rounds = tokens - accepted
    return tokens / rounds if rounds else None


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    if not values:
        raise ValueError("no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    data = sorted(values)
    pos = (len(data) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median with its bootstrap 95% confidence interval, quartiles, extremes and count of
    repeated measurements."""
    if not values:
        raise ValueError("no values")
    lo, hi = bootstrap_ci(values)
    return {"median": statistics.median(values), "ci_lo": lo, "ci_hi": hi,
            "p25": quantile(values, 0.25), "p75": quantile(values, 0.75),
            "min": min(values), "max": max(values), "n": len(values)}


def bootstrap_ci(values: Sequence[float], level: float = BOOTSTRAP_LEVEL,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median: resample ``values`` with
    replacement, take each resample's median, and return the central ``level`` of them.
    Seeded, so a saved run's summary is reproducible; one value gives (value, value)."""
    if not values:
        raise ValueError("no values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    data = list(values)
    if len(data) == 1:
        return data[0], data[0]
    rng = random.Random(seed)
    medians = [statistics.median(rng.choices(data, k=len(data))) for _ in range(resamples)]
    tail = (1.0 - level) / 2
    return quantile(medians, tail), quantile(medians, 1.0 - tail)


def latency(values: Sequence[float]) -> dict[str, float]:
    """Per-request latency percentiles: p50, p99 (linear interpolation) and the maximum."""
    if not values:
        raise ValueError("no values")
    return {"p50": quantile(values, 0.5), "p99": quantile(values, 0.99), "max": max(values),
            "n": len(values)}


def rate(count: float, seconds: float) -> float:
    """``count`` per second over a window of ``seconds``."""
    if seconds <= 0:
        raise ValueError(f"need a window > 0 s, got {seconds}")
    return count / seconds


def component_speedup(a: float, k: int, step_ms: float, draft_ms: float,
                      verify_ms: float) -> float:
    """The bound from measured component costs: a round emits E(a, k) tokens and costs one
    draft call of k tokens (``draft_ms``) plus one verify of k tokens (``verify_ms``), against
    ``step_ms`` per token without speculation. Unlike :func:`predicted_speedup` it charges the
    verify what it really costs (several target steps on a CPU) and the draft its fixed part."""
    if step_ms <= 0 or draft_ms < 0 or verify_ms <= 0:
        raise ValueError(f"need step_ms > 0, draft_ms >= 0 and verify_ms > 0, got "
                         f"{step_ms}, {draft_ms}, {verify_ms}")
    return expected_tokens(a, k) * step_ms / (draft_ms + verify_ms)


def check_target(name: str, value: float | None, op: str, threshold: float,
                 unit: str = "x") -> dict[str, Any]:
    """One target of an issue as a measured line: PASS (True) when ``value op threshold``
    holds, MISS (False) when it does not, no verdict (None) when the value was not measured.
    ``unit`` says how to print the numbers: "x" (a ratio), "bytes" or "count"."""
    if op not in (">=", "<="):
        raise ValueError(f"op must be '>=' or '<=', got {op!r}")
    ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "unit": unit,
            "pass": ok}
