"""Incremental UTF-8 decoding of token bytes, and stop strings across increments."""

from __future__ import annotations

import itertools
import random

import pytest

from tightwad.decoding.detok import IncrementalDecoder, StopMatcher, TextStream

SAMPLES = [
    "héllo wörld",
    "日本語のテキスト",                      # 3-byte CJK
    "🎉🦙",                                  # 4-byte emoji
    "👨\u200d👩\u200d👧 family",             # ZWJ sequence
    "🇯🇵🇫🇷",                                # regional-indicator flags
    "👍🏽",                                   # skin-tone modifier
    "e\u0301 a\u0308\u0323 한국어",          # combining marks, Hangul
    "mixed: a世🎉b\u00e9",
]


def decode_pieces(pieces: list[bytes]) -> tuple[str, list[str]]:
    decoder = IncrementalDecoder()
    outputs = [decoder.push(piece) for piece in pieces]
    outputs.append(decoder.flush())
    return "".join(outputs), outputs


@pytest.mark.parametrize("text", SAMPLES)
def test_every_split_point_round_trips(text: str) -> None:
    data = text.encode()
    for cut in range(len(data) + 1):
        joined, outputs = decode_pieces([data[:cut], data[cut:]])
        assert joined == text
        assert all("\ufffd" not in out for out in outputs)


@pytest.mark.parametrize("text", SAMPLES)
def test_one_byte_per_token_round_trips(text: str) -> None:
    data = text.encode()
    joined, outputs = decode_pieces([data[i:i + 1] for i in range(len(data))])
    assert joined == text
    # Text comes out as soon as each character is complete, not at the end.
    assert outputs[-1] == ""


def test_every_two_cut_split_of_mixed_text() -> None:
    data = "a世🎉\u00e9".encode()
    for i, j in itertools.combinations(range(len(data) + 1), 2):
        assert decode_pieces([data[:i], data[i:j], data[j:]])[0] == "a世🎉\u00e9"


def test_partial_character_is_held_until_complete() -> None:
    decoder = IncrementalDecoder()
    ideograph = "世".encode()
    assert decoder.push(b"x" + ideograph[:2]) == "x"
    assert decoder.pending
    assert decoder.push(ideograph[2:]) == "世"
    assert not decoder.pending
    assert decoder.push([0xF0, 0x9F]) == ""  # llama-server's list-of-ints form
    assert decoder.push([0x8E, 0x89]) == "🎉"


def test_incomplete_tail_becomes_replacement_only_at_flush() -> None:
    decoder = IncrementalDecoder()
    assert decoder.push(b"ok\xe4\xb8") == "ok"
    assert decoder.flush() == "\ufffd"
    assert decoder.push(b"fresh") == "fresh"  # flush resets


def test_random_splits_match_a_one_shot_decode() -> None:
    """Also with invalid bytes: same U+FFFD placement as decoding the whole stream at once."""
    rng = random.Random(17)
    alphabet = [c.encode() for c in "a世🎉éß\u0301"] + [b"\xff", b"\xc0", b"\xe4\xb8", b"\x80"]
    for _ in range(300):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 6))))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        assert decode_pieces(pieces)[0] == data.decode("utf-8", errors="replace")


# --- stop strings ----------------------------------------------------------------------------


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    matcher = StopMatcher(stops)
    released = []
    for piece in pieces:
        scan = matcher.push(piece)
        released.append(scan.text)
        if scan.stopped:
            return "".join(released), scan.stop
    released.append(matcher.flush())
    return "".join(released), None


def test_stop_straddling_increments_is_cut_before_it() -> None:
    assert run_matcher(["</s>"], ["Hello <", "/", "s> more"]) == ("Hello ", "</s>")


def test_partial_match_is_held_then_released() -> None:
    matcher = StopMatcher(["</s>"])
    assert matcher.push("a <").text == "a "
    assert matcher.held == "<"
    assert matcher.push("b").text == "<b"
    assert matcher.push("</").text == ""
    assert matcher.flush() == "</"


@pytest.mark.parametrize("text,stops,expected", [
    ("one two\n\nthree", ["\n\n"], "one two"),
    ("abaabab", ["abab"], "aba"),                       # overlapping prefixes
    ("x END y STOP", ["STOP", "END"], "x "),            # earliest start wins
    ("日本語。次の文", ["。"], "日本語"),
    ("party 🎉🎉 time", ["🎉🎉"], "party "),
    ("no stop here", ["zzz"], "no stop here"),
])
def test_every_split_gives_the_same_answer(text: str, stops: list[str], expected: str) -> None:
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        got, stop = run_matcher(stops, [text[:i], text[i:j], text[j:]])
        assert got == expected
        assert (stop is None) == (expected == text)


def test_same_start_reports_the_longest() -> None:
    assert run_matcher(["ab", "abc"], ["xabcd"]) == ("x", "abc")


def test_nothing_after_a_stop() -> None:
    matcher = StopMatcher(["."])
    assert matcher.push("Done. Extra").text == "Done"
    later = matcher.push("more text")
    assert (later.text, later.stop) == ("", ".")
    assert matcher.flush() == ""


def test_empty_stops_are_ignored_and_a_bare_string_works() -> None:
    assert run_matcher(["", ""], ["abc"]) == ("abc", None)
    matcher = StopMatcher("ab")  # a single string, not its characters
    assert matcher.push("xa b").text == "xa b"


def test_stream_with_split_characters_and_stop() -> None:
    stream = TextStream(["世界"])
    data = "你好世界！".encode()
    out = []
    for i in range(len(data)):
        scan = stream.push(data[i:i + 1])
        out.append(scan.text)
        if scan.stopped:
            break
    assert "".join(out) == "你好"
    assert scan.stop == "世界"


def test_stream_finish_releases_held_text_and_bad_tail() -> None:
    stream = TextStream(["<|end|>"])
    assert stream.push(b"answer <|e").text == "answer "
    final = stream.finish()
    assert (final.text, final.stop) == ("<|e", None)
    stream = TextStream([])
    assert stream.push(b"x\xf0\x9f").text == "x"
    assert stream.finish().text == "\ufffd"
