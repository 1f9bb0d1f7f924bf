"""llama.cpp's default sampling chain over sparse (top-N) distributions, and seeded draws.

The proxy never sees a full vocabulary: llama-server reports, per position, the top-N tokens with
their raw log-probabilities (log softmax of the logits at temperature 1). Speculative sampling
needs the distributions the two models actually sample from, so this module replays the chain
llama-server runs for a request onto such a list.

The chain (pinned tree: ``common/common.h`` ``samplers``, ``common/sampling.cpp``,
``src/llama-sampler.cpp``) is ``penalties, dry, top_n_sigma, top_k, typ_p, top_p, min_p, xtc,
temperature, dist``. With llama-server's defaults every stage but top_k, top_p, min_p,
temperature and dist is disabled, and those are what :class:`SamplingParams` carries (the engine
must not send penalties, DRY, typical-p, XTC, top-n-sigma, logit biases or ``min_keep``). On a
list sorted by logit, each of top_k, top_p and min_p keeps a prefix:

- top_k keeps the first ``top_k`` tokens (``top_k <= 0``: all of them);
- top_p takes the softmax at temperature 1 of what top_k kept and keeps the shortest prefix whose
  cumulative probability reaches ``top_p`` (``top_p >= 1``: disabled);
- min_p keeps the tokens whose logit is at least ``max_logit + log(min_p)``, i.e. whose
  temperature-1 probability is at least ``min_p`` times the top one's (``min_p <= 0``: disabled);
- temperature divides the logits of what is left by ``T`` (``T <= 0``: only the highest logit
  survives: greedy) and dist samples from their softmax.

So top_p and min_p cut on the temperature-1 probabilities, BEFORE temperature reshapes them, and
all three are invariant to adding a constant to every logit, which is why log-probabilities stand
in for logits exactly.

When the result is exact given only the top N (:func:`top_n_suffices`): the chain keeps a
prefix of the sorted vocabulary; its length is ``min(n_k, n_p, n_m)`` for the three cuts above,
and the result is exact when that length is certainly <= N. Each cut is known or bounded:

- greedy (``temperature <= 0``): always exact for N >= 1 (the top token survives every cut);
- top_k: ``n_k = top_k`` exactly; so ``0 < top_k <= N`` alone makes the result exact;
- min_p: the unseen tokens have log-probabilities <= the N-th one, so if the N-th token falls
  below the min_p threshold, ``n_m`` is the number of listed tokens above it (exact);
- top_p: its softmax is over the ``n_k`` tokens top_k kept, whose total probability Z is 1 when
  top_k is disabled, the listed sum when ``top_k <= N``, and otherwise only bounded
  (``S_N <= Z <= min(1, S_N + (top_k - N) * p_N)``, every unseen token being at most ``p_N``).
  The cut is exact when the listed cumulative sums cross ``top_p * Z`` at the same index for
  every Z in that range.

A list that holds every candidate (``complete=True``: the server returned fewer than asked for,
or N is the vocabulary) is always enough. Float rounding is not replayed: a token whose
cumulative probability lies within float32 rounding of a cut can land on the other side, as can
the order of tokens with equal logits at a top-k boundary (llama.cpp leaves that unspecified too).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

TopLogprobs = Sequence[tuple[int, float]]
"""Top-N ``(token id, log-probability)`` pairs for one position, in any order."""

SparseDist = dict[int, float]
"""A normalized distribution over the listed token ids; tokens not present have probability 0."""

_UNBOUNDED = math.inf  # a cut that keeps more than the listed tokens, by an unknown amount


@dataclass(frozen=True)
class SamplingParams:
    """The sampling knobs the proxy forwards to llama-server, with llama-server's defaults."""

    temperature: float = 0.8
    """``<= 0`` means greedy (the highest log-probability; ties go to the lowest token id)."""
    top_k: int = 40
    """``<= 0`` disables top-k."""
    top_p: float = 0.95
    """``>= 1`` disables top-p."""
    min_p: float = 0.05
    """``<= 0`` disables min-p."""
    seed: int | None = None
    """Seed for the proxy's own draws (see :class:`Rng`); ``None`` draws fresh entropy."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must lie in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def _sorted(top: TopLogprobs) -> list[tuple[int, float]]:
    """Sort by log-probability (descending), ties by token id, rejecting what is not a list."""
    seen: set[int] = set()
    for token, logprob in top:
        if token in seen:
            raise ValueError(f"token {token} is listed twice in one position's top logprobs")
        if math.isnan(logprob):
            raise ValueError(f"token {token} has a NaN log-probability")
        seen.add(token)
    return sorted(((int(t), float(lp)) for t, lp in top), key=lambda e: (-e[1], e[0]))


def argmax(top: TopLogprobs) -> int:
    """The greedy token: the highest log-probability, ties broken by the lowest token id.

    llama.cpp breaks exact ties by array order, which its sorts leave unspecified; the lowest id
    makes the proxy deterministic. (Real ties are rarer than the ~1e-3 noise between batched and
    one-token evaluation, which can flip a near-tie either way.)
    """
    if not top:
        raise ValueError("cannot take the argmax of an empty top-logprobs list")
    return min(top, key=lambda e: (-e[1], e[0]))[0]


def _cut_bounds(entries: list[tuple[int, float]], params: SamplingParams,
                complete: bool) -> tuple[float, float]:
    """Bounds (lo, hi) on how many of the sorted vocabulary's tokens the chain keeps."""
    n = len(entries)
    if params.greedy:
        return 1, 1
    probs = [math.exp(lp) for _, lp in entries]

    # top_k (a complete list is the whole vocabulary, so nothing lies beyond it)
    n_k: float
    if params.top_k > 0:
        n_k = min(params.top_k, n) if complete else params.top_k
    else:
        n_k = n if complete else _UNBOUNDED
    lo, hi = n_k, n_k

    # top_p over the n_k tokens top_k kept; Z is their total temperature-1 probability.
    if params.top_p < 1.0:
        listed = int(min(n_k, n))
        cum = []
        total = 0.0
        for p in probs[:listed]:
            total += p
            cum.append(total)
        if n_k <= n:
            z_lo = z_hi = cum[-1] if cum else 0.0
        elif params.top_k <= 0:
            z_lo = z_hi = max(1.0, total)  # log-softmax over the whole vocabulary sums to 1
        else:
            unseen = (n_k - n) * (probs[-1] if probs else 1.0)
            z_lo, z_hi = total, min(1.0, total + unseen)
            z_hi = max(z_hi, z_lo)

        def crossing(z: float) -> float:
            target = params.top_p * z
            for i, c in enumerate(cum):
                if c >= target:
                    return i + 1
            return listed if n_k <= n else _UNBOUNDED

        p_hi = crossing(z_hi)
        p_lo = crossing(z_lo)
        if p_lo == _UNBOUNDED:
            p_lo = n + 1  # at least one unseen token is needed to reach the target
        lo, hi = min(lo, p_lo), min(hi, p_hi)

    # min_p: unseen tokens are no likelier than the last listed one.
    if params.min_p > 0.0 and entries:
        threshold = entries[0][1] + math.log(params.min_p)
        kept = sum(1 for _, lp in entries if lp >= threshold)
        if kept < n or complete:
            m_lo: float = max(kept, 1)
            m_hi: float = m_lo
        else:
            m_lo, m_hi = n, _UNBOUNDED
        lo, hi = min(lo, m_lo), min(hi, m_hi)
    return lo, hi


def top_n_suffices(top: TopLogprobs, params: SamplingParams, *, complete: bool = False) -> bool:
    """Whether :func:`apply_chain` on ``top`` equals the chain on the full vocabulary.

    ``complete`` says the list holds every candidate token. When this returns False the engine
    should ask for more (a larger ``n_probs``) or fall back (e.g. let the server sample).
    """
    entries = _sorted(top)
    if not entries:
        return False
    lo, hi = _cut_bounds(entries, params, complete)
    return lo == hi and hi <= len(entries)


def apply_chain(top: TopLogprobs, params: SamplingParams, *, complete: bool = False) -> SparseDist:
    """The distribution llama.cpp's default chain samples from, as ``{token id: probability}``.

    ``top`` holds raw log-probabilities (temperature 1, as llama-server reports them without
    ``post_sampling_probs``). Exact when :func:`top_n_suffices` says so; otherwise the chain is
    applied as if the listed tokens were all there is beyond the cuts that are known, which keeps
    every listed token the true chain might keep (an approximation, renormalized).
    """
    entries = _sorted(top)
    if not entries:
        raise ValueError("cannot sample from an empty top-logprobs list")
    if params.greedy:
        return {argmax(entries): 1.0}
    _, hi = _cut_bounds(entries, params, complete)
    kept = entries[: int(min(hi, len(entries)))]
    scaled = [lp / params.temperature for _, lp in kept]
    peak = scaled[0]
    weights = [math.exp(s - peak) for s in scaled]
    total = math.fsum(weights)
    return {token: w / total for (token, _), w in zip(kept, weights) if w > 0.0}


def normalize(weights: Mapping[int, float]) -> SparseDist:
    """Scale non-negative weights to sum to 1, dropping zeros; raises if nothing is left."""
    total = math.fsum(w for w in weights.values() if w > 0.0)
    if not total > 0.0:
        raise ValueError("cannot normalize a distribution whose weights are all zero")
    return {t: w / total for t, w in weights.items() if w > 0.0}


def from_probs(probs: Iterable[tuple[int, float]]) -> SparseDist:
    """A distribution from ``post_sampling_probs`` output (probabilities after the chain).

    llama-server lists at most ``n_probs`` of the kept tokens, so this is exact only when the
    returned probabilities already sum to ~1 (check with :func:`covered_mass`).
    """
    return normalize(dict(probs))


def covered_mass(probs: Iterable[tuple[int, float]]) -> float:
    """Total probability of the listed tokens (~1.0: the list is the whole support)."""
    return math.fsum(p for _, p in probs)


class Rng:
    """The proxy's own random stream: reproducible for a request that carries ``seed``.

    It cannot replay llama-server's mt19937 stream, so a seed fixes the proxy's output for a
    given pair of models and prompt, not the output llama-server alone would give.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def uniform(self) -> float:
        """A float in [0, 1)."""
        return self._random.random()

    def draw(self, dist: Mapping[int, float]) -> int:
        """Sample a token from a (not necessarily normalized) sparse distribution."""
        # A canonical order, so the same seed gives the same token whatever the dict order.
        items = sorted(((t, w) for t, w in dist.items() if w > 0.0), key=lambda e: (-e[1], e[0]))
        if not items:
            raise ValueError("cannot draw from a distribution with no positive weight")
        target = self.uniform() * math.fsum(w for _, w in items)
        running = 0.0
        for token, weight in items:
            running += weight
            if running > target:
                return token
        return items[-1][0]  # rounding left target at the very top


def sample(top: TopLogprobs, params: SamplingParams, rng: Rng) -> int:
    """One token as llama-server would pick it from these log-probabilities (greedy or drawn)."""
    if params.greedy:
        return argmax(top)
    return rng.draw(apply_chain(top, params))
