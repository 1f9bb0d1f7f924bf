"""A request's output bookkeeping: emitted tokens in, sendable text and the end out.

Honours end-of-generation tokens (unless ``ignore_eos``), stop strings (through
:class:`tightwad.detok.TextStream`, which also keeps multibyte characters whole) and
``max_tokens``, and holds back the text of tokens whose bytes arrive one round late (see
:attr:`tightwad.rounds.Outcome.token_bytes`) until :meth:`Output.resolve` supplies them.
"""

from __future__ import annotations

from typing import Sequence

from tightwad.detok import TextStream
from tightwad.events import Event, Finished, GenerationRequest, TextDelta
from tightwad.llama import Position
from tightwad.rounds import VerifyMismatch
from tightwad.stats import RequestStats


class Output:
    """Emitted tokens -> sendable text: end-of-generation, stop strings, max_tokens, and tokens
    whose bytes arrive one round late (see :attr:`tightwad.rounds.Outcome.token_bytes`)."""

    def __init__(self, request: GenerationRequest, eog: frozenset[int]) -> None:
        self.request = request
        self.eog = frozenset() if request.ignore_eos else eog
        self.text = TextStream(request.stop)
        self.count = 0
        self.pending: list[int] = []
        self.stopped = False

    def take(self, tokens: Sequence[int],
             token_bytes: Sequence[bytes | None]) -> tuple[TextDelta, str | None]:
        """Consume tokens until one ends the output; the reason when one did."""
        taken: list[int] = []
        text: list[str] = []
        for token, raw in zip(tokens, token_bytes):
            if self.count >= self.request.max_tokens:
                return TextDelta("".join(text), tuple(taken)), "length"
            taken.append(token)
            self.count += 1
            if token in self.eog:
                return TextDelta("".join(text), tuple(taken)), "stop"
            if raw is None or self.pending:
                self.pending.append(token)
                continue
            scan = self.text.push(raw)
            text.append(scan.text)
            if scan.stopped:
                self.stopped = True
                return TextDelta("".join(text), tuple(taken)), "stop"
        reason = "length" if self.count >= self.request.max_tokens else None
        return TextDelta("".join(text), tuple(taken)), reason

    def resolve(self, positions: Sequence[Position]) -> tuple[str, bool]:
        """The pending tokens' bytes, from prompt entries that score them; (text, stopped)."""
        ids = [p.token.id for p in positions]
        if ids != self.pending:
            raise VerifyMismatch(f"expected prompt entries for {self.pending}, got {ids}")
        self.pending = []
        text: list[str] = []
        for position in positions:
            scan = self.text.push(position.token.bytes)
            text.append(scan.text)
            if scan.stopped:
                self.stopped = True
                return "".join(text), True
        return "".join(text), False

    def finish(self, reason: str, stats: RequestStats) -> list[Event]:
        """What the stream still held back (a partial character, a possible stop string),
        then the end."""
        tail = self.text.finish()
        events: list[Event] = [TextDelta(tail.text, ())] if tail.text else []
        events.append(Finished(reason, len(self.request.prompt), self.count, stats))
        return events
