"""The request field table of docs/proxy.md walked against the parser: every field the doc
lists is handled as the doc says (speculated, passed through, refused with 400 naming it, or
accepted as metadata), and the doc lists every field the parser knows. Also: what the
pass-through body carries, and the reasoning split."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tightwad.config import LimitsConfig
from tightwad.server.openai_api import (
    FIELDS,
    MESSAGE_PASS_THROUGH,
    PASS_THROUGH,
    REFUSED,
    ApiError,
    ParsedRequest,
    map_developer_role,
    parse_chat_request,
    parse_completion_request,
)
from tightwad.server.reasoning import ReasoningSplit, opens_thinking, thinking_template

DOC = Path(__file__).resolve().parents[2] / "docs" / "proxy.md"
LIMITS = LimitsConfig()
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}

# A value of each field that asks for something (not its neutral value).
SAMPLES: dict[str, Any] = {
    "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 5,
    "max_completion_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
    "seed": 3, "stop": ["x"], "stream": True, "stream_options": {"include_usage": True},
    "ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False},
    "reasoning_effort": "low", "reasoning_format": "none",
    "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False,
    "response_format": {"type": "json_object"}, "json_schema": {"type": "object"},
    "grammar": "root ::= \"a\"", "logprobs": True, "top_logprobs": 3, "n_probs": 3,
    "logit_bias": {"15": -100}, "presence_penalty": 0.5, "frequency_penalty": 0.5,
    "repeat_penalty": 1.1, "repeat_last_n": 32, "mirostat": 2, "mirostat_tau": 5.0,
    "mirostat_eta": 0.1, "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2,
    "dry_penalty_last_n": 64, "dry_sequence_breakers": ["\n"], "xtc_probability": 0.5,
    "xtc_threshold": 0.1, "typical_p": 0.9, "top_n_sigma": 2.0, "dynatemp_range": 0.5,
    "dynatemp_exponent": 1.5, "min_keep": 2, "samplers": ["top_k", "temperature"],
    "continue_final_message": True, "add_generation_prompt": False,
    "n": 2, "best_of": 2, "echo": True, "suffix": "end", "functions": [{"name": "f"}],
    "function_call": "auto", "modalities": ["text", "audio"], "audio": {"voice": "x"},
    "prediction": {"type": "content", "content": "x"}, "store": True,
    "model": "anything", "user": "someone", "metadata": {"a": "b"},
}


def doc_table() -> dict[str, tuple[str, str]]:
    """Field -> (routes, kind) from docs/proxy.md's field table."""
    text = DOC.read_text()
    start = text.index("<!-- field-table:")
    rows: dict[str, tuple[str, str]] = {}
    for line in text[start:].splitlines()[3:]:
        if not line.startswith("|"):
            break
        field, routes, kind = (c.strip() for c in line.strip("|").split("|")[:3])
        rows[field.strip("`")] = (routes, kind)
    return rows


def _base(kind: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}]} if kind == "chat" \
        else {"prompt": "hi"}


def _parse(kind: str, body: dict[str, Any]) -> ParsedRequest:
    parse = parse_chat_request if kind == "chat" else parse_completion_request
    return parse(body, LIMITS)


def test_the_doc_lists_every_field_the_parser_knows() -> None:
    assert set(doc_table()) == set(FIELDS) == set(SAMPLES)


@pytest.mark.parametrize("field", sorted(SAMPLES))
def test_each_field_does_what_the_doc_says(field: str) -> None:
    routes, kind = doc_table()[field]
    on = {"chat": ["chat"], "completions": ["completion"],
          "both": ["chat", "completion"]}[routes]
    assert FIELDS[field].kind == kind and sorted(FIELDS[field].routes) == sorted(on)
    for route in ("chat", "completion"):
        body = {**_base(route), field: SAMPLES[field]}
        if field == "tool_choice" or field == "parallel_tool_calls":
            body["tools"] = [TOOL]
        if route not in on:  # another route's field is refused, naming it
            with pytest.raises(ApiError) as err:
                _parse(route, body)
            # tool_choice and parallel_tool_calls mean something only with tools
            assert err.value.status == 400 and err.value.param in (field, body.get("tools")
                                                                   and "tools")
            continue
        if kind == REFUSED:
            with pytest.raises(ApiError) as err:
                _parse(route, body)
            assert err.value.status == 400 and err.value.param == field
            continue
        parsed = _parse(route, body)
        if kind == PASS_THROUGH and field not in ("tool_choice", "parallel_tool_calls"):
            assert field in parsed.passthrough
        elif kind == PASS_THROUGH:
            assert "tools" in parsed.passthrough
        else:
            assert parsed.passthrough == (), (field, parsed.passthrough)


@pytest.mark.parametrize("field, neutral", [
    ("presence_penalty", 0), ("frequency_penalty", 0.0), ("repeat_penalty", 1),
    ("tools", []), ("response_format", {"type": "text"}), ("logprobs", False),
    ("top_logprobs", 0), ("logit_bias", {}), ("mirostat", 0), ("n", 1), ("echo", False),
    ("add_generation_prompt", True), ("store", False), ("modalities", ["text"]),
])
def test_a_neutral_value_keeps_speculation(field: str, neutral: Any) -> None:
    route = "completion" if field == "echo" else "chat"
    assert _parse(route, {**_base(route), field: neutral}).passthrough == ()


@pytest.mark.parametrize("field, bad", [
    ("tools", [{"type": "function"}]), ("tools", "all"), ("tool_choice", "always"),
    ("tool_choice", {"type": "function", "function": {"name": "other"}}),
    ("response_format", {"type": "yaml"}), ("response_format", {"type": "json_schema"}),
    ("logit_bias", {"the": 5}), ("logit_bias", {"5": 1000}), ("top_logprobs", 2 ** 70),
    ("presence_penalty", "high"), ("mirostat", 7), ("samplers", "top_k"),
    ("json_schema", []), ("reasoning_format", "verbose"), ("user", 5),
])
def test_bad_values_of_pass_through_fields_are_400_naming_them(field: str, bad: Any) -> None:
    body = {**_base("chat"), field: bad}
    if field == "tool_choice":
        body["tools"] = [TOOL]
    with pytest.raises(ApiError) as err:
        _parse("chat", body)
    assert err.value.status == 400 and err.value.param.startswith(field.split("[")[0])


def test_message_fields_only_the_coordinator_keeps_pass_through() -> None:
    parsed = _parse("chat", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:x"}}]},
        {"role": "assistant", "content": None, "reasoning_content": "hmm", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], "tools": [TOOL]})
    assert set(parsed.passthrough) == {"tools", *MESSAGE_PASS_THROUGH} - {"input_audio"}
    assert parsed.body["messages"][2]["tool_call_id"] == "c1"
    assert parsed.body["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_unknown_fields_go_to_the_coordinator_and_are_named() -> None:
    parsed = _parse("chat", {**_base("chat"), "cache_prompt": False, "nothing": None})
    assert parsed.passthrough == ("cache_prompt",)
    assert parsed.body["cache_prompt"] is False and "nothing" not in parsed.body


def test_a_named_tool_choice_is_required_over_that_tool() -> None:
    other = {"type": "function", "function": {"name": "other"}}
    parsed = _parse("chat", {**_base("chat"), "tools": [TOOL, other], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}})
    assert parsed.body["tool_choice"] == "required" and parsed.body["tools"] == [TOOL]


def test_no_max_tokens_means_none_until_the_engine_says() -> None:
    assert _parse("chat", _base("chat")).max_tokens is None
    assert _parse("chat", {**_base("chat"), "max_tokens": 7,
                           "max_completion_tokens": 9}).max_tokens == 9
    assert parse_chat_request(_base("chat"), LimitsConfig(default_max_tokens=64)).max_tokens == 64


def test_developer_becomes_system_where_the_template_lacks_it() -> None:
    messages = ({"role": "developer", "content": "be brief"}, {"role": "user", "content": "x"})
    assert [m["role"] for m in map_developer_role(messages, "{{ messages }}")] == [
        "system", "user"]
    assert map_developer_role(messages, "{% if role == 'developer' %}") == messages


def _split(pieces: list[str], opened: str | None = None) -> tuple[str, str]:
    split = ReasoningSplit(opened)
    out = [split.push(p) for p in pieces] + [split.finish()]
    return "".join(r for r, _ in out), "".join(c for _, c in out)


@pytest.mark.parametrize("pieces, opened, expected", [
    (["<think>plan</think>\n\nanswer"], None, ("plan", "answer")),
    (["<thi", "nk>pl", "an</th", "ink>", " ans", "wer"], None, ("plan", "answer")),
    (["  no tags here"], None, ("", "  no tags here")),
    (["<b>bold</b>"], None, ("", "<b>bold</b>")),
    (["still thinking"], "\n", ("\nstill thinking", "")),
    (["done</think>", "ok"], "", ("done", "ok")),
    (["a < b </thin"], "", ("a < b </thin", "")),
    ([""], None, ("", "")),
])
def test_reasoning_is_split_from_the_answer_however_it_is_cut(
        pieces: list[str], opened: str | None, expected: tuple[str, str]) -> None:
    assert _split(pieces, opened) == expected
    # Cut at every character, the same.
    assert _split(list("".join(pieces)), opened) == expected


def test_which_templates_think() -> None:
    assert thinking_template("{{ '<think>' }} ... {{ '</think>' }}")
    assert not thinking_template("<|im_start|>{{ message.content }}")
    assert opens_thinking("<|Assistant|><think>\n") == "\n"
    assert opens_thinking("<think>x</think>") is None


def test_the_doc_names_the_clamp_header() -> None:
    from tightwad.server.app import CLAMP_HEADER
    assert re.search(re.escape(CLAMP_HEADER) + r": requested=", DOC.read_text())
