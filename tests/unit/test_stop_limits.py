"""Stop strings cannot burn the event loop (issue 15, point 6): a request's stop strings are
bounded in number and length (400 beyond, naming the limit), and matching them costs the same
per token however long they are.

The cost is counted as Python line events inside the matcher (deterministic, independent of
the machine), and also timed against the target of <= 1 ms of event-loop time per token.
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from tightwad import defaults
from tightwad.config import LimitsConfig, parse_config
from tightwad.decoding import detok
from tightwad.decoding.detok import StopMatcher
from tightwad.server.openai_api import ApiError, parse_chat_request, parse_completion_request

LIMITS = LimitsConfig()
CHAT = [{"role": "user", "content": "Hi"}]


# -- the bounds -------------------------------------------------------------------------------


def _refusal(body: dict[str, Any], limits: LimitsConfig = LIMITS) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_completion_request({"prompt": "Hi", **body}, limits)
    return caught.value


def test_defaults_come_from_defaults_py() -> None:
    assert LIMITS.max_stop_strings == defaults.MAX_STOP_STRINGS
    assert LIMITS.max_stop_chars == defaults.MAX_STOP_CHARS


def test_too_many_stop_strings_is_a_400_naming_the_limit() -> None:
    error = _refusal({"stop": ["x"] * (defaults.MAX_STOP_STRINGS + 1)})
    assert (error.status, error.param, error.code) == (400, "stop", "too_many_stop_strings")
    assert "limits.max_stop_strings" in error.message
    assert str(defaults.MAX_STOP_STRINGS) in error.message


@pytest.mark.parametrize("stop", ["a" * (defaults.MAX_STOP_CHARS + 1), "a" * 40_000])
def test_a_too_long_stop_string_is_a_400_naming_the_limit(stop: str) -> None:
    for value in (stop, ["ok", stop]):
        error = _refusal({"stop": value})
        assert (error.status, error.param, error.code) == (400, "stop", "stop_string_too_long")
        assert "limits.max_stop_chars" in error.message
        assert stop not in error.message  # the value is not echoed back


def test_the_bounds_are_config_keys_and_hold_for_chat_too() -> None:
    limits = parse_config({"limits": {"max_stop_strings": 3, "max_stop_chars": 3}}).limits
    assert _refusal({"stop": ["a", "b", "c", "d"]}, limits).code == "too_many_stop_strings"
    assert _refusal({"stop": "abcd"}, limits).code == "stop_string_too_long"
    with pytest.raises(ApiError):
        parse_chat_request({"messages": CHAT, "stop": "abcd"}, limits)
    parsed = parse_chat_request({"messages": CHAT, "stop": ["abc", "", "d"]}, limits)
    assert parsed.stop == ("abc", "d")


def test_at_the_bounds_is_accepted() -> None:
    stops = ["s" * defaults.MAX_STOP_CHARS] * defaults.MAX_STOP_STRINGS
    assert parse_completion_request({"prompt": "Hi", "stop": stops}, LIMITS).stop == tuple(stops)


# -- same answers as the plain definition ---------------------------------------------------


def _reference(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    """The definition, quadratic and obvious: after each piece, the earliest whole match in all
    text so far (longest on a tie); else release all but the longest suffix that starts a stop."""
    stops = sorted({s for s in stops if s}, key=lambda s: (-len(s), s))
    text, sent = "", 0
    released: list[str] = []
    for piece in pieces:
        text += piece
        found = [(text.find(s, 0), s) for s in stops if text.find(s, 0) >= 0]
        if found:
            index, stop = min(found, key=lambda f: (f[0], -len(f[1])))
            released.append(text[sent:index])
            return "".join(released), stop
        keep = max((k for s in stops for k in range(1, len(s))
                    if text.endswith(s[:k])), default=0)
        released.append(text[sent:len(text) - keep])
        sent = len(text) - keep
    released.append(text[sent:])
    return "".join(released), None


def _run(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        scan = matcher.push(piece)
        out.append(scan.text)
        if scan.stopped:
            return "".join(out), scan.stop
    out.append(matcher.flush())
    return "".join(out), None


def test_random_streams_match_the_definition() -> None:
    """The reference decides on all text so far, the matcher per push; they agree because a
    match found earlier would already have ended the stream."""
    rng = random.Random(15)
    for _ in range(3000):
        alphabet = "ab" if rng.random() < 0.7 else "abc\u00e9"
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
                 for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert _run(stops, pieces) == _reference(stops, pieces), (stops, pieces)


def test_every_split_of_a_self_overlapping_stop() -> None:
    stops, text = ["aabaab", "abaa"], "aabaabaabaaab"
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        pieces = [text[:i], text[i:j], text[j:]]
        assert _run(stops, pieces) == _reference(stops, pieces)


# -- the cost per token -----------------------------------------------------------------------


def _line_events(action: Callable[[], object]) -> int:
    """Python lines executed inside tightwad.decoding.detok while ``action`` runs."""
    count = 0
    module_file = detok.__file__

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if frame.f_code.co_filename != module_file:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        action()
    finally:
        sys.settrace(None)
    return count


def _attack(length: int, n_stops: int) -> tuple[list[str], list[str]]:
    """Stops that the generated text (all ``a``) keeps almost matching: one keeps a long partial
    match held back; the others share a long prefix with it but break off half-way, so every
    suffix of the held text looks like a candidate (first and last characters agree) and
    quadratic partial matching compares half of each one, each token."""
    half = length // 2
    keeper = "a" * (length - 3) + "z"
    stops = [keeper] + ["a" * half + chr(ord("b") + i) + "a" * (length - half - 2) + "z"
                        for i in range(n_stops - 1)]
    return stops, ["a"] * 400


def _primed(length: int, n_stops: int) -> tuple[StopMatcher, list[str]]:
    """A matcher already holding back the longest partial match."""
    stops, tokens = _attack(length, n_stops)
    matcher = StopMatcher(stops)
    matcher.push("a" * length)
    assert len(matcher.held) == length - 3
    return matcher, tokens


def _events_per_token(length: int, n_stops: int) -> float:
    matcher, tokens = _primed(length, n_stops)
    return _line_events(lambda: [matcher.push(t) for t in tokens]) / len(tokens)


def test_the_work_per_token_does_not_grow_with_the_stop_length() -> None:
    """Quadratic partial matching re-checks every suffix of the held text each token; linear
    matching advances one state per stop string."""
    short = _events_per_token(8, 4)
    for length in (64, defaults.MAX_STOP_CHARS, 40_000):
        assert _events_per_token(length, 4) <= 1.05 * short, length
    assert _events_per_token(64, 16) <= 4.2 * short  # linear in the number of stops


def test_the_attack_costs_at_most_a_millisecond_per_token() -> None:
    """The issue's attack (long stops, text that keeps almost matching them) at the largest
    request the bounds allow, timed: the target is <= 1 ms of event-loop time per token."""
    matcher, tokens = _primed(defaults.MAX_STOP_CHARS, defaults.MAX_STOP_STRINGS)
    tokens = tokens * 5
    started = time.process_time()
    for token in tokens:
        matcher.push(token)
    per_token_ms = (time.process_time() - started) * 1e3 / len(tokens)
    print(f"stop-string attack: {per_token_ms:.4f} ms per token "
          f"({defaults.MAX_STOP_STRINGS} stops of {defaults.MAX_STOP_CHARS} characters)")
    assert per_token_ms <= 1.0
