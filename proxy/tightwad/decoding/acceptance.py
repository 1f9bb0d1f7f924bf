"""One speculation round, the pure part: from a draft and a verify answer to the tokens to emit.

The engine does the I/O (draft on the drafter, verify on the coordinator); this module turns the
two answers into an :class:`Outcome` with :mod:`tightwad.decoding.speculation`:

- temperature 0: the target's token at each position is the argmax of its top list (the
  generated token after the whole draft is the server's own greedy choice), then
  :func:`~tightwad.decoding.speculation.greedy_verify`;
- temperature > 0: q and p are the post-chain distributions (:func:`tightwad.decoding.sampling.apply_chain`)
  of the drafter's and the target's top lists, then
  :func:`~tightwad.decoding.speculation.speculative_sample`. The token after the whole draft is the one the
  target server sampled itself: an exact draw from p_k, whatever the length of its top list.

Exactness when only top-N lists are known: a draft is cut before the first position whose q is not
exactly known from its list (:func:`usable_draft`), and verification stops before the first
position whose p is not (:func:`decide_round`); the round then emits its accepted tokens without a
correction or bonus token and asks for a target-only step next (the server samples that one
itself). Cutting at a position that depends only on earlier tokens keeps the output distribution
exact. With ``top_k <= n_probs`` (the engine's default request) every list is exact.

``banned`` ids (end-of-generation tokens under ``ignore_eos``) are removed from every list first,
as the server's own ``ignore_eos`` bias removes them from its distribution.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from tightwad.decoding.sampling import Rng, SamplingParams, SparseDist, apply_chain, argmax, top_n_suffices
from tightwad.decoding.speculation import greedy_verify, speculative_sample
from tightwad.decoding.tokens import Position

_CUT = -1  # stands in for the target's token at a position whose p is not exactly known


class ServerAnswer(Protocol):
    """What a round reads from a llama-server answer (a draft, or a verify)."""

    @property
    def tokens(self) -> Sequence[int]:
        """The generated tokens."""
        ...

    @property
    def probs(self) -> Sequence[Position]:
        """One entry per generated token."""
        ...

    @property
    def prompt_probs(self) -> Sequence[Position]:
        """One entry per scored trailing prompt token (the verify)."""
        ...


class VerifyMismatch(ValueError):
    """The verify answer does not describe the draft that was sent (a server bug)."""


@dataclass(frozen=True)
class Outcome:
    """What one round decided."""

    tokens: tuple[int, ...]
    """Tokens to emit, in order."""
    token_bytes: tuple[bytes | None, ...]
    """Their bytes, as the target reports them (empty for unrendered special tokens). None for
    a generated token the server did not report: llama-server leaves out the entry of a
    generated token after which the text ends inside a multibyte character, and a step asked
    for no lists has none. The engine learns those bytes from the next verify, where the token
    is part of the prompt."""
    drafted: int
    accepted: int
    cut: bool = False
    """Verification stopped early (an inexact p): the next round should be a target-only step."""


def _pairs(position: Position, banned: Collection[int]) -> list[tuple[int, float]]:
    return [(t.id, t.logprob) for t in position.top if t.id not in banned]


def _dist(position: Position, params: SamplingParams, n_probs: int,
          banned: Collection[int]) -> SparseDist | None:
    """The post-chain distribution at ``position``, or None when its list cannot tell exactly."""
    pairs = _pairs(position, banned)
    if not pairs:
        return None
    if params.greedy:
        return {argmax(pairs): 1.0}
    complete = len(position.top) < n_probs  # the server listed every candidate it had
    if not top_n_suffices(pairs, params, complete=complete):
        return None
    return apply_chain(pairs, params, complete=complete)


def usable_draft(draft: ServerAnswer, params: SamplingParams, n_probs: int,
                 banned: Collection[int] = ()) -> tuple[list[int], list[SparseDist]]:
    """The prefix of the drafter's tokens that can be verified, with q for each (sampling only).

    Greedy: every drafted token, no q. Sampling: up to the first position whose q is not exact.
    llama-server leaves out the probabilities of a token after which the text ends inside a
    multibyte character, so its list can be shorter than the tokens and shifted: the draft also
    ends where the listed ids stop matching the tokens (such a token starts an incomplete
    character, which its completing successor cannot equal).
    """
    tokens = list(draft.tokens)
    if params.greedy:
        return tokens, []
    q: list[SparseDist] = []
    for token, position in zip(tokens, draft.probs):
        if position.token.id != token:
            break
        dist = _dist(position, params, n_probs, banned)
        if dist is None:
            break
        q.append(dist)
    return tokens[: len(q)], q


def _byte_map(verify: ServerAnswer) -> dict[int, bytes]:
    known: dict[int, bytes] = {}
    for position in (*verify.prompt_probs, *verify.probs):
        for entry in (position.token, *position.top):
            known.setdefault(entry.id, entry.bytes)
    return known


def decide_round(draft: Sequence[int], q: Sequence[SparseDist], verify: ServerAnswer,
           params: SamplingParams, rng: Rng, n_probs: int,
           banned: Collection[int] = ()) -> Outcome:
    """Accept/reject ``draft`` against the target's verify answer.

    ``verify`` is the answer to context + draft with ``prompt_logprobs = len(draft)`` and
    ``n_predict = 1``; for an empty draft, a plain step (the server's own token, the target's
    by construction).
    """
    k = len(draft)
    if len(verify.prompt_probs) != k:
        raise VerifyMismatch(f"verify returned {len(verify.prompt_probs)} prompt positions for "
                             f"a draft of {k}")
    got = [p.token.id for p in verify.prompt_probs]
    if got != list(draft):
        raise VerifyMismatch(f"verify scored tokens {got} for the draft {list(draft)}")
    if len(verify.tokens) != 1:
        raise VerifyMismatch(f"verify generated {len(verify.tokens)} tokens instead of 1")
    after = verify.tokens[0]

    p: list[SparseDist] = []
    for position in verify.prompt_probs:
        dist = _dist(position, params, n_probs, banned)
        if dist is None:
            break
        p.append(dist)
    exact = len(p)
    p.append({after if exact == k else _CUT: 1.0})

    if params.greedy:
        targets = [next(iter(d)) for d in p]
        decided = greedy_verify(draft[:exact], targets)
    else:
        decided = speculative_sample(draft[:exact], q[:exact], p, rng)

    tokens = decided.tokens
    cut = bool(tokens) and tokens[-1] == _CUT
    if cut:
        tokens = tokens[:-1]
    known = _byte_map(verify)
    missing = [t for t in tokens[:-1] if t not in known]
    if missing:  # only the generated token can lack an entry; the others are all listed
        raise VerifyMismatch(f"no bytes reported for tokens {missing}")
    return Outcome(tokens=tuple(tokens), token_bytes=tuple(known.get(t) for t in tokens),
                   drafted=k, accepted=decided.accepted, cut=cut)
