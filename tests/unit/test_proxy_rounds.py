"""The pure parts of the proxy's request path: a round's accept step on llama-server answers
(tightwad.decoding.acceptance), the output bookkeeping (tightwad.decoding.transcript), OpenAI
request parsing (tightwad.server.openai_api) and the slot pool. No processes; the llama-server
answers are built as the server shapes them."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from tightwad.config import LimitsConfig
from tightwad.decoding.acceptance import VerifyMismatch, decide_round, usable_draft
from tightwad.decoding.sampling import Rng, SamplingParams
from tightwad.decoding.tokens import Position, TokenLogprob
from tightwad.decoding.transcript import Transcript
from tightwad.llamaserver.slots import SlotPool
from tightwad.llamaserver.wire import Completion, parse_completion
from tightwad.server.openai_api import ApiError, parse_chat_request, parse_completion_request

GREEDY = SamplingParams(temperature=0.0)
SAMPLE = SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0)


def tok(i: int, lp: float = -1.0) -> TokenLogprob:
    return TokenLogprob(i, f"<{i}>".encode(), lp)


def pos(token: int, top: list[tuple[int, float]]) -> Position:
    logprob = dict(top).get(token, -20.0)
    return Position(tok(token, logprob), tuple(tok(t, lp) for t, lp in top))


def verify_answer(draft: list[int], tops: list[list[tuple[int, float]]], after: int,
                  after_listed: bool = True) -> Completion:
    """A verify answer: one prompt entry per draft token, then the generated token."""
    prompt = tuple(pos(t, top) for t, top in zip(draft, tops[:-1]))
    probs = (pos(after, tops[-1]),) if after_listed else ()
    return Completion(tokens=(after,), content="", stop_type="limit", probs=probs,
                      prompt_probs=prompt, has_prompt_probs=True)


def test_greedy_round_keeps_the_matching_prefix_and_the_targets_token() -> None:
    draft = [5, 6, 7]
    tops = [[(5, -0.1)], [(9, -0.2)], [(7, -0.3)], [(8, -0.1)]]
    out = decide_round(draft, [], verify_answer(draft, tops, after=8), GREEDY, Rng(0), 1)
    assert out.tokens == (5, 9) and out.accepted == 1 and out.drafted == 3
    assert out.token_bytes == (b"<5>", b"<9>")


def test_greedy_round_with_every_draft_accepted_takes_the_servers_bonus_token() -> None:
    draft = [5, 6]
    tops = [[(5, -0.1)], [(6, -0.2)], [(11, -0.1)]]
    out = decide_round(draft, [], verify_answer(draft, tops, after=11), GREEDY, Rng(0), 1)
    assert out.tokens == (5, 6, 11) and out.accepted == 2 and not out.cut


def test_unlisted_bonus_token_is_emitted_with_its_bytes_pending() -> None:
    # llama-server leaves out the entry of a token that ends inside a UTF-8 character.
    draft = [5]
    tops = [[(5, -0.1)], [(12, -0.1)]]
    out = decide_round(draft, [], verify_answer(draft, tops, after=12, after_listed=False), GREEDY,
                 Rng(0), 1)
    assert out.tokens == (5, 12) and out.token_bytes == (b"<5>", None)


def test_a_target_only_step_emits_the_servers_token_with_the_bytes_it_listed() -> None:
    # No draft: the server's own token; with a list its bytes are known, without one it waits
    # for the next verify.
    step = Completion(tokens=(7,), content="", stop_type="limit", probs=(pos(7, [(7, -0.1)]),),
                      prompt_probs=(), has_prompt_probs=True)
    out = decide_round([], [], step, GREEDY, Rng(0), 1)
    assert out.tokens == (7,) and out.token_bytes == (b"<7>",)
    assert (out.drafted, out.accepted, out.cut) == (0, 0, False)
    bare = decide_round([], [], dataclasses.replace(step, probs=()), GREEDY, Rng(0), 1)
    assert bare.tokens == (7,) and bare.token_bytes == (None,)
    several = dataclasses.replace(step, tokens=(7, 8), prompt_probs=(pos(7, [(7, -0.1)]),))
    for draft in ([], [7]):  # every verify generates exactly one token
        with pytest.raises(VerifyMismatch):
            decide_round(draft, [], several if draft else dataclasses.replace(
                several, prompt_probs=()), GREEDY, Rng(0), 1)


def test_verify_for_other_tokens_is_refused() -> None:
    tops = [[(5, -0.1)], [(6, -0.1)]]
    with pytest.raises(VerifyMismatch):
        decide_round([4], [], verify_answer([5], tops, after=6), GREEDY, Rng(0), 1)


def test_banned_tokens_are_not_the_greedy_choice() -> None:
    draft = [5]
    tops = [[(99, -0.1), (5, -0.2)], [(7, -0.1)]]
    out = decide_round(draft, [], verify_answer(draft, tops, after=7), GREEDY, Rng(0), 2,
                 banned={99})
    assert out.tokens == (5, 7)


def test_sampling_round_cuts_where_the_targets_list_is_not_exact() -> None:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0)
    # Position 0: the listed mass crosses top_p inside the list (exact); position 1: the
    # two listed tokens hold 2% of the mass, so the cut lies among unseen tokens.
    tops = [[(5, math.log(0.9)), (6, math.log(0.05))],
            [(7, math.log(0.01)), (8, math.log(0.01))],
            [(9, -0.1)]]
    draft = [5, 7]
    q = [{5: 1.0}, {7: 1.0}]
    out = decide_round(draft, q, verify_answer(draft, tops, after=9), params, Rng(1), 2)
    assert out.cut and out.tokens == (5,) and out.accepted == 1


def test_usable_draft_stops_where_the_drafters_list_is_shifted() -> None:
    # Token 21 ended inside a character, so the server listed 22's entry right after 20's.
    listed = (pos(20, [(20, -0.1), (1, -2.0), (2, -3.0)]),
              pos(22, [(22, -0.1), (1, -2.0), (2, -3.0)]))
    draft = Completion(tokens=(20, 21, 22), content="", stop_type="limit", probs=listed)
    tokens, q = usable_draft(draft, SAMPLE, 3)
    assert tokens == [20] and len(q) == 1 and abs(sum(q[0].values()) - 1) < 1e-12
    assert usable_draft(draft, GREEDY, 0) == ([20, 21, 22], [])


def test_parse_completion_reads_the_verify_fields() -> None:
    data = {"tokens": [3], "content": "x", "stop_type": "limit", "id_slot": 2,
            "completion_probabilities": [{"id": 3, "token": "x", "bytes": [120], "logprob": -1.0,
                                          "top_logprobs": []}],
            "prompt_probabilities": [{"id": 1, "token": "a", "bytes": [97], "logprob": -2.0,
                                      "top_logprobs": [{"id": 4, "token": "b", "bytes": [98],
                                                        "logprob": -0.5}]}],
            "timings": {"cache_n": 5, "prompt_n": 2, "predicted_n": 1}}
    c = parse_completion(data)
    assert c.has_prompt_probs and c.prompt_probs[0].pairs() == [(4, -0.5)]
    assert c.prompt_probs[0].token.bytes == b"a" and c.timings.prompt_n == 2 and c.id_slot == 2
    assert not parse_completion({"tokens": [1]}).has_prompt_probs


# -- the engine's output bookkeeping ----------------------------------------------------------


def output(max_tokens: int = 10, stop: tuple[str, ...] = (), ignore_eos: bool = False) -> Transcript:
    return Transcript(max_tokens, stop, eog=frozenset() if ignore_eos else frozenset({0}))


def test_output_stops_at_end_of_generation_unless_ignored() -> None:
    taken = output().take([7, 0, 8], [b"a", b"", b"b"])
    assert taken.reason == "stop" and taken.tokens == (7, 0) and taken.text == "a"
    taken = output(ignore_eos=True).take([7, 0, 8], [b"a", b"", b"b"])
    assert taken.reason is None and taken.tokens == (7, 0, 8) and taken.text == "ab"


def test_output_honours_max_tokens_and_stop_strings() -> None:
    taken = output(max_tokens=2).take([7, 8, 9], [b"a", b"b", b"c"])
    assert taken.reason == "length" and taken.tokens == (7, 8)
    out = output(stop=("STOP",))
    taken = out.take([7, 8, 9], [b"ab", b"ST", b"OPxyz"])
    assert taken.reason == "stop" and taken.text == "ab"
    assert out.finish() == "" and out.count == 3


def test_output_keeps_multibyte_characters_whole_and_resolves_pending_bytes() -> None:
    out = output()
    snowman = "☃".encode()  # three bytes, split over tokens
    taken = out.take([5, 6], [snowman[:1], None])  # the second token's bytes come later
    assert taken.text == "" and out.pending == [6] and taken.output == (5,)
    resolved = out.resolve([Position(TokenLogprob(6, snowman[1:], -1.0), ())])
    assert resolved.text == "☃" and resolved.reason is None and out.pending == []
    assert resolved.output == (6,) and out.count == 2
    assert out.finish() == ""


def test_a_stop_string_in_held_back_tokens_ends_the_output_where_it_does_in_text() -> None:
    # A target-only burst: every token's bytes come a round later. The stop string is in the
    # second: the third is neither output nor counted, as when the rounds had ended there.
    out = output(stop=("b",))
    taken = out.take([5, 6, 7], [None, None, None])
    assert taken.output == () and taken.reason is None and out.count == 3
    resolved = out.resolve([Position(TokenLogprob(t, raw, -1.0), ())
                            for t, raw in ((5, b"a"), (6, b"b"), (7, b"c"))])
    assert resolved.reason == "stop" and resolved.output == (5, 6) and out.count == 2
    assert resolved.text + out.finish() == "a"
    # An end-of-generation token among them ends it too.
    out = output()
    assert out.take([5, 0, 7], [None, None, None]).reason == "stop" and out.count == 2
    resolved = out.resolve([Position(TokenLogprob(t, raw, -1.0), ())
                            for t, raw in ((5, b"a"), (0, b""))])
    assert resolved.reason == "stop" and resolved.output == (5, 0) and out.count == 2


# -- OpenAI request parsing -------------------------------------------------------------------

LIMITS = LimitsConfig(max_tokens_cap=100, default_max_tokens=20)


def test_chat_request_is_parsed_with_llama_server_defaults() -> None:
    req = parse_chat_request({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}],
        "max_tokens": 1000, "stop": "END", "stream": True,
        "stream_options": {"include_usage": True}, "unknown_field": 1}, LIMITS)
    # The parser keeps what was asked; the engine's admission clamps it (and says so).
    assert req.max_tokens == 1000 and req.stop == ("END",) and req.stream and req.include_usage
    assert req.passthrough == ("unknown_field",)  # the coordinator may know it
    assert req.sampling == SamplingParams()
    assert req.messages[0]["content"][1] == {"type": "text", "text": "there"}


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": "yes"}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 1.5}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": 10 ** 30}, "top_k"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}, "max_tokens"),
])
def test_bad_chat_requests_are_400_naming_the_parameter(body: dict, param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat_request(body, LIMITS)
    assert err.value.status == 400 and err.value.param == param


def test_completion_prompt_forms() -> None:
    assert parse_completion_request({"prompt": "hi"}, LIMITS).prompt_text == "hi"
    assert parse_completion_request({"prompt": [1, 2]}, LIMITS).prompt_tokens == (1, 2)
    assert parse_completion_request({"prompt": ["hi"]}, LIMITS).prompt_text == "hi"
    assert parse_completion_request({"prompt": [[3, 4]]}, LIMITS).prompt_tokens == (3, 4)
    for bad in ({"prompt": ["a", "b"]}, {"prompt": 5}, {"prompt": [-1]}, {"prompt": "x",
                                                                         "echo": True}):
        with pytest.raises(ApiError):
            parse_completion_request(bad, LIMITS)
    with pytest.raises(ApiError):
        parse_completion_request([1, 2], LIMITS)


# -- slot leasing -----------------------------------------------------------------------------


def test_slot_pool_leases_each_slot_once_and_queues_the_rest() -> None:
    async def scenario() -> tuple[list[int], int]:
        pool = SlotPool(2)
        held: list[int] = []
        peak_waiting = 0

        async def user(i: int) -> None:
            nonlocal peak_waiting
            async with pool.lease() as slot:
                assert slot not in held
                held.append(slot)
                peak_waiting = max(peak_waiting, pool.waiting)
                await asyncio.sleep(0.01)
                held.remove(slot)

        await asyncio.gather(*(user(i) for i in range(6)))
        return sorted([pool.try_acquire(), pool.try_acquire()]), peak_waiting  # type: ignore

    slots, peak = asyncio.run(scenario())
    assert slots == [0, 1] and peak >= 1
