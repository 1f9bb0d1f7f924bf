"""Token-level distributions as decoding works with them (llama-server's wire format parses
into these; see :mod:`tightwad.llamaserver.wire`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its natural-log probability under the raw (temperature 1) distribution."""

    id: int
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class Position:
    """One position of a sequence: the token that is there and the model's top-N at it."""

    token: TokenLogprob
    top: tuple[TokenLogprob, ...]

    def pairs(self) -> list[tuple[int, float]]:
        """``(id, logprob)`` of the top list, as :mod:`tightwad.decoding.sampling` takes it."""
        return [(t.id, t.logprob) for t in self.top]
