"""A request's emitted tokens and their text: end-of-generation, stop strings, ``max_tokens``.

Stop strings and whole multibyte characters are handled by :class:`tightwad.decoding.detok.TextStream`.
The text of tokens whose bytes arrive one round late (see
:attr:`tightwad.decoding.acceptance.Outcome.token_bytes`) is held back until
:meth:`Transcript.resolve` supplies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tightwad.decoding.acceptance import VerifyMismatch
from tightwad.decoding.detok import TextStream
from tightwad.decoding.tokens import Position


@dataclass(frozen=True)
class Taken:
    """What one :meth:`Transcript.take` consumed."""

    text: str
    """Text that may be sent now."""
    tokens: tuple[int, ...]
    """The tokens consumed (their text may come later)."""
    reason: str | None
    """``stop`` or ``length`` when the output ended, else None."""
    output: tuple[int, ...] = ()
    """The tokens that are now certainly part of the output: those consumed whose text is known
    (a held-back token is given by :meth:`Transcript.resolve`, unless a stop string ended the
    output before it), so the output's ids and count do not depend on where rounds ended."""


class Transcript:
    """Emitted tokens -> sendable text, and when the output ends."""

    def __init__(self, max_tokens: int, stop: Sequence[str], eog: frozenset[int]) -> None:
        """``eog``: the ids that end the output (empty under ``ignore_eos``)."""
        self.max_tokens = max_tokens
        self.eog = eog
        self.text = TextStream(stop)
        self.count = 0
        self.pending: list[int] = []
        self.stopped = False

    def take(self, tokens: Sequence[int], token_bytes: Sequence[bytes | None]) -> Taken:
        """Consume tokens until one ends the output."""
        taken: list[int] = []
        text: list[str] = []

        def result(reason: str | None) -> Taken:
            known = len(taken) - len(self.pending)
            return Taken("".join(text), tuple(taken), reason, tuple(taken[:max(0, known)]))

        for token, raw in zip(tokens, token_bytes):
            if self.count >= self.max_tokens:
                return result("length")
            taken.append(token)
            self.count += 1
            if token in self.eog and not self.pending:
                return result("stop")
            if raw is None or self.pending:
                self.pending.append(token)
                if token in self.eog:
                    return result("stop")
                continue
            scan = self.text.push(raw)
            text.append(scan.text)
            if scan.stopped:
                self.stopped = True
                return result("stop")
        return result("length" if self.count >= self.max_tokens else None)

    def resolve(self, positions: Sequence[Position]) -> Taken:
        """The pending tokens' bytes, from prompt entries that score them: their text, the ids
        now certainly in the output (``output``), and ``stop`` if a stop string ended it (the
        pending tokens after that one are not part of the output, nor counted)."""
        ids = [p.token.id for p in positions]
        if ids != self.pending:
            raise VerifyMismatch(f"expected prompt entries for {self.pending}, got {ids}")
        self.pending = []
        text: list[str] = []
        for i, position in enumerate(positions):
            if position.token.id in self.eog:
                self.count -= len(ids) - i - 1
                return Taken("".join(text), tuple(ids), "stop", tuple(ids[:i + 1]))
            scan = self.text.push(position.token.bytes)
            text.append(scan.text)
            if scan.stopped:
                self.stopped = True
                self.count -= len(ids) - i - 1
                return Taken("".join(text), tuple(ids), "stop", tuple(ids[:i + 1]))
        return Taken("".join(text), tuple(ids), None, tuple(ids))

    def finish(self) -> str:
        """What the stream still held back (a partial character, a possible stop string)."""
        return self.text.finish().text
