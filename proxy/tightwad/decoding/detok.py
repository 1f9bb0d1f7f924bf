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
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = [stops]
        self._stops = tuple(sorted({s for s in stops if s}, key=lambda s: (-len(s), s)))
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
        match = self._earliest(buffer)
        if match is not None:
            index, stop = match
            self._held, self._stop = "", stop
            return StopScan(buffer[:index], stop)
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return StopScan(buffer[: len(buffer) - keep])

    def flush(self) -> str:
        """End of stream without a stop: release what was held back."""
        if self._stop is not None:
            return ""
        text, self._held = self._held, ""
        return text

    def _earliest(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:  # longest first, so a tie on the start keeps the longest
            index = buffer.find(stop)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest


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
