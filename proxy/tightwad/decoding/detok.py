"""Incremental, UTF-8-safe detokenization and stop strings for streamed output.

A token is a run of bytes, not of characters: byte-level vocabularies split one CJK character or
emoji over two or three tokens. llama-server reports each token's raw ``bytes``;
:class:`IncrementalDecoder` turns them into text as soon as characters are complete, so nothing
is lost or garbled at a split. :class:`StopMatcher` then holds back just enough text to recognise
a stop string that straddles increments, and ends the output right before it (as OpenAI does).

Neither holds back grapheme clusters: a combining mark or a zero-width-joiner sequence may arrive
in a later increment than its base character, which is harmless for clients that concatenate the
deltas (and they must). Stop strings match on code points, so a stop string made of a base
character alone also matches the start of a decomposed accented character.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class IncrementalDecoder:
    """Token bytes in, completed text out.

    Bytes that can still become a character are kept for the next token; bytes that cannot
    (invalid UTF-8) become U+FFFD exactly where a one-shot ``bytes.decode("utf-8", "replace")``
    of the whole stream would put them, and an incomplete character left at the end becomes
    U+FFFD only in :meth:`flush`.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_bytes: bytes | bytearray | Iterable[int]) -> str:
        """Add one token's bytes (``bytes`` or llama-server's list of ints); return new text."""
        return self._decoder.decode(bytes(token_bytes), final=False)

    def flush(self) -> str:
        """End of stream: whatever is left, an incomplete character becoming U+FFFD."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished character are waiting for the next token."""
        return bool(self._decoder.getstate()[0])


@dataclass(frozen=True)
class StopScan:
    """What one :meth:`StopMatcher.push` released."""

    text: str
    """Text that can be sent now (never any part of a stop string)."""
    stop: str | None = None
    """The stop string that ended the output, or None while it goes on."""

    @property
    def stopped(self) -> bool:
        return self.stop is not None


class StopMatcher:
    """Finds stop strings in streamed text without ever sending part of one.

    Fed increments with :meth:`push`, it releases the text that can no longer be the start of a
    stop string and holds back a possible partial match. Once a stop string matches, the output
    ends right before it; later pushes release nothing. If several stop strings match, the one
    that starts first wins (the longest, if they start together). Empty stop strings are ignored:
    they would match before any output.

    Matching is linear: each stop string keeps its Knuth-Morris-Pratt state (how much of it the
    text seen so far ends with), so a push costs O(len(text)) per stop string, however long the
    stop strings are; no suffix of the held text is ever compared again (with quadratic partial
    matching, one long stop string cost milliseconds of event-loop time per token).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = [stops]
        self._stops = tuple(sorted({s for s in stops if s}, key=lambda s: (-len(s), s)))
        self._fail = [_failure(stop) for stop in self._stops]
        self._state = [0] * len(self._stops)
        self._held = ""
        self._stop: str | None = None

    @property
    def stop(self) -> str | None:
        """The stop string that matched, if one did."""
        return self._stop

    @property
    def held(self) -> str:
        """Text kept back because it may be the start of a stop string."""
        return self._held

    def push(self, text: str) -> StopScan:
        if self._stop is not None:
            return StopScan("", self._stop)
        buffer = self._held + text
        base = len(self._held)
        best: tuple[int, str] | None = None
        for i, stop in enumerate(self._stops):  # longest first: a tie on the start keeps it
            state, end = _advance(stop, self._fail[i], self._state[i], text)
            self._state[i] = state
            if end >= 0:
                start = base + end + 1 - len(stop)
                if best is None or start < best[0]:
                    best = (start, stop)
        if best is not None:
            index, stop = best
            self._held, self._stop = "", stop
            return StopScan(buffer[:index], stop)
        # Each state is the longest suffix of the text so far that starts its stop string.
        keep = max(self._state, default=0)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return StopScan(buffer[: len(buffer) - keep])

    def flush(self) -> str:
        """End of stream without a stop: release what was held back."""
        if self._stop is not None:
            return ""
        text, self._held = self._held, ""
        self._state = [0] * len(self._stops)
        return text


def _failure(stop: str) -> list[int]:
    """KMP failure function: for each prefix of ``stop``, the length of its longest proper
    prefix that is also its suffix."""
    fail = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return fail


def _advance(stop: str, fail: list[int], state: int, text: str) -> tuple[int, int]:
    """Feed ``text`` to ``stop``'s matcher in ``state``: (the new state, the index in ``text``
    where the first whole match ends, or -1). Amortised O(1) per character."""
    for pos, char in enumerate(text):
        while state and stop[state] != char:
            state = fail[state - 1]
        if stop[state] == char:
            state += 1
            if state == len(stop):
                return state, pos
    return state, -1


class TextStream:
    """Decoder and stop matcher together: token bytes in, sendable text out."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = IncrementalDecoder()
        self._matcher = StopMatcher(stops)

    def push(self, token_bytes: bytes | bytearray | Iterable[int]) -> StopScan:
        return self._matcher.push(self._decoder.push(token_bytes))

    def finish(self) -> StopScan:
        """End of generation: the decoder's remainder, then whatever the matcher held."""
        scan = self._matcher.push(self._decoder.flush())
        if scan.stopped:
            return scan
        return StopScan(scan.text + self._matcher.flush())
