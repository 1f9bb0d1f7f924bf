"""OpenAI request and response shapes, the pure part of the API: parse and validate request
bodies, build response objects and chunks. No I/O here.

Every request field is one of four kinds (:data:`FIELDS`; docs/proxy.md has the same table,
and tests/unit/test_openai_fields.py walks it against this parser):

- ``speculated``: honoured by the proxy's own decoding, with speculation;
- ``pass-through``: honoured by the coordinator's own OpenAI endpoint, unspeculated, because
  speculation cannot keep it exact (tools, grammars, log-probabilities, penalties, ...). The
  request keeps its leased slot; the reason (the field) is counted in ``/metrics`` and
  ``/tightwad/status``. A field at its neutral value (``presence_penalty: 0``, ``tools: []``,
  ``response_format: {"type": "text"}``) does not count;
- ``refused``: 400 naming the field, where honouring it is impossible and ignoring it would
  return something that looks obeyed but is not;
- ``metadata``: accepted, with no effect on the output (``user``; ``model``, since the pool
  serves one model and every answer names it).

A field the table does not list is passed through to the coordinator, which knows llama.cpp's
own extensions; it too is counted as a pass-through reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tightwad.config import LimitsConfig
from tightwad.decoding.sampling import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_TOP_K = 1 << 20  # beyond any vocabulary; keeps the value a small integer upstream
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20

SPECULATED = "speculated"
PASS_THROUGH = "pass-through"
REFUSED = "refused"
METADATA = "metadata"
KINDS = (SPECULATED, PASS_THROUGH, REFUSED, METADATA)
REASONING_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")


class ApiError(Exception):
    """An error answer: HTTP status plus the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ParsedRequest:
    """A validated ``/v1/chat/completions`` or ``/v1/completions`` body."""

    kind: str
    """``chat`` or ``completion``."""
    model: str | None
    messages: tuple[dict[str, Any], ...] = ()
    prompt_text: str | None = None
    prompt_tokens: tuple[int, ...] | None = None
    max_tokens: int | None = None
    """What the client asked for (None: until the end of the context)."""
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    passthrough: tuple[str, ...] = ()
    """Why the coordinator must answer this request itself (field names); empty: speculated."""
    template_extra: Mapping[str, Any] = field(default_factory=dict)
    """Fields that shape the prompt only, sent with the messages to ``/apply-template``."""
    input_at: Mapping[str, str] = field(default_factory=dict)
    """Where the first content part of each kind beyond text is (``image_url`` ->
    ``messages[0].content[1]``), to name it if the model does not take it."""
    reasoning: bool = True
    """Split ``<think>`` text into ``reasoning_content`` (``reasoning_format`` not ``none``)."""
    body: Mapping[str, Any] = field(default_factory=dict)
    """The body as the coordinator gets it when passed through (validated, roles mapped)."""


# -- field readers (None when absent or null) -----------------------------------------------


def _number(body: Mapping[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(key, f"'{key}' must be a number", "invalid_type")
    if not lo <= value <= hi:
        raise _bad(key, f"'{key}' must lie between {lo:g} and {hi:g}, got {value:g}")
    return float(value)


def _int(body: Mapping[str, Any], key: str, lo: int | None = None,
         hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, f"'{key}' must be an integer", "invalid_type")
    if lo is not None and value < lo:
        raise _bad(key, f"'{key}' must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise _bad(key, f"'{key}' must be at most {hi}, got {value}")
    return value


def _bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _bad(key, f"'{key}' must be true or false", "invalid_type")
    return value


def _str(body: Mapping[str, Any], key: str, choices: tuple[str, ...] = ()) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(key, f"'{key}' must be a string", "invalid_type")
    if choices and value not in choices:
        raise _bad(key, f"'{key}' must be one of {', '.join(choices)}")
    return value


def _object(body: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(key, f"'{key}' must be an object", "invalid_type")
    return value


def _stops(body: Mapping[str, Any], limits: LimitsConfig) -> tuple[str, ...]:
    """The stop strings, within ``limits.max_stop_strings`` and ``limits.max_stop_chars`` (a
    request's stop strings cost the proxy per generated token, and the coordinator too)."""
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad("stop", "'stop' must be a string or an array of strings", "invalid_type")
    if len(value) > limits.max_stop_strings:
        raise _bad("stop", f"'stop' holds {len(value)} strings; at most "
                           f"{limits.max_stop_strings} are allowed (limits.max_stop_strings)",
                   "too_many_stop_strings")
    for i, stop in enumerate(value):
        if len(stop) > limits.max_stop_chars:
            raise _bad("stop", f"stop string {i} has {len(stop)} characters; at most "
                               f"{limits.max_stop_chars} are allowed (limits.max_stop_chars)",
                       "stop_string_too_long")
    return tuple(s for s in value if s)


# -- the field table ------------------------------------------------------------------------
# A check reads and validates its field; it returns True when the value asks for something
# (so a pass-through field counts as a reason, a refused field is refused), False when the
# value is neutral.

Check = Callable[[Mapping[str, Any], str], bool]


def _present(body: Mapping[str, Any], key: str) -> bool:
    return body.get(key) is not None


def _num_check(lo: float, hi: float, neutral: float | None) -> Check:
    def check(body: Mapping[str, Any], key: str) -> bool:
        value = _number(body, key, lo, hi)
        return value is not None and value != neutral
    return check


def _int_check(lo: int, hi: int, neutral: int | None = None) -> Check:
    def check(body: Mapping[str, Any], key: str) -> bool:
        value = _int(body, key, lo, hi)
        return value is not None and value != neutral
    return check


def _bool_check(body: Mapping[str, Any], key: str) -> bool:
    return bool(_bool(body, key))


def _str_check(body: Mapping[str, Any], key: str) -> bool:
    return bool(_str(body, key))


def _one_check(body: Mapping[str, Any], key: str) -> bool:
    """``n`` / ``best_of``: only one completion per request."""
    return _int(body, key, 1, 1 << 20) not in (None, 1)


def _json_schema_check(body: Mapping[str, Any], key: str) -> bool:
    return bool(_object(body, key))


def _logprobs_check(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if isinstance(value, bool) or value is None:
        return bool(value)
    # /v1/completions' legacy form: how many top entries per token.
    return bool(_int(body, key, 0, MAX_TOP_LOGPROBS))


def _logit_bias_check(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, dict) or len(value) > 1 << 16:
        raise _bad(key, "'logit_bias' must be an object of token ids to numbers",
                   "invalid_type")
    for token, bias in value.items():
        if not token.isascii() or not token.isdigit() or len(token) > 9:
            raise _bad(key, f"logit_bias key {token[:20]!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or \
                not math.isfinite(bias) or not -100 <= bias <= 100:
            raise _bad(key, "logit_bias values must be numbers between -100 and 100")
    return bool(value)


def _string_list_check(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, list) or len(value) > 64 or \
            not all(isinstance(s, str) and len(s) <= 256 for s in value):
        raise _bad(key, f"'{key}' must be an array of strings", "invalid_type")
    return True


def _tools_check(body: Mapping[str, Any], key: str) -> bool:
    tools = body.get(key)
    if tools is None:
        return False
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise _bad(key, f"'tools' must be an array of at most {MAX_TOOLS} tools",
                   "invalid_type")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function"
                and isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]
                and isinstance(fn.get("parameters", {}), dict)
                and isinstance(fn.get("description", ""), str)):
            raise _bad(f"tools[{i}]", f"tools[{i}] must be {{\"type\": \"function\", "
                       "\"function\": {\"name\": ..., \"parameters\": {...}}}")
    return bool(tools)


def _tool_choice_check(body: Mapping[str, Any], key: str) -> bool:
    choice = body.get(key)
    if choice is None:
        return False
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad(key, "'tool_choice' must be none, auto, required or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        return False  # it matters only with tools, which count themselves
    fn = choice.get("function") if isinstance(choice, dict) else None
    _tools_check(body, "tools")
    names = {t["function"]["name"] for t in body.get("tools") or ()}
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
        raise _bad(key, "'tool_choice' must be none, auto, required or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if fn["name"] not in names:
        raise _bad(key, f"tool_choice names {fn['name']!r}, which is not among the tools")
    return False


def _response_format_check(body: Mapping[str, Any], key: str) -> bool:
    fmt = body.get(key)
    if fmt is None:
        return False
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in (None, "text"):
        if not isinstance(fmt, dict):
            raise _bad(key, "'response_format' must be an object", "invalid_type")
        return False
    if kind == "json_object":
        if not isinstance(fmt.get("schema", {}), dict):
            raise _bad(key, "response_format.schema must be an object")
        return True
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not (isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict)):
            raise _bad(key, "response_format json_schema must be {\"type\": \"json_schema\", "
                            "\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        return True
    raise _bad(key, "response_format.type must be text, json_object or json_schema")


def _chat_template_kwargs_check(body: Mapping[str, Any], key: str) -> bool:
    return bool(_object(body, key))


def _refuse_true(body: Mapping[str, Any], key: str) -> bool:
    return body.get(key) not in (None, False)


def _refuse_non_empty(body: Mapping[str, Any], key: str) -> bool:
    return body.get(key) not in (None, "", [], {})


def _modalities_check(body: Mapping[str, Any], key: str) -> bool:
    return body.get(key) not in (None, ["text"])


def _stream_options_check(body: Mapping[str, Any], key: str) -> bool:
    options = _object(body, key)
    _bool(options or {}, "include_usage")
    return options is not None


@dataclass(frozen=True)
class FieldRule:
    kind: str
    check: Check
    routes: tuple[str, ...] = ("chat", "completion")


_BOTH = ("chat", "completion")
_CHAT = ("chat",)
_COMPLETION = ("completion",)


def _rule(kind: str, check: Check, routes: tuple[str, ...] = _BOTH) -> FieldRule:
    return FieldRule(kind, check, routes)


FIELDS: dict[str, FieldRule] = {
    # honoured with speculation (read in _common / the parsers)
    "messages": _rule(SPECULATED, _present, _CHAT),
    "prompt": _rule(SPECULATED, _present, _COMPLETION),
    "max_tokens": _rule(SPECULATED, _present),
    "max_completion_tokens": _rule(SPECULATED, _present),
    "temperature": _rule(SPECULATED, _present),
    "top_p": _rule(SPECULATED, _present),
    "top_k": _rule(SPECULATED, _present),
    "min_p": _rule(SPECULATED, _present),
    "seed": _rule(SPECULATED, _present),
    "stop": _rule(SPECULATED, _present),
    "stream": _rule(SPECULATED, _present),
    "stream_options": _rule(SPECULATED, _stream_options_check),
    "ignore_eos": _rule(SPECULATED, _present),
    "chat_template_kwargs": _rule(SPECULATED, _chat_template_kwargs_check, _CHAT),
    "reasoning_effort": _rule(SPECULATED, _str_check, _CHAT),
    "reasoning_format": _rule(SPECULATED, lambda b, k: bool(_str(b, k, REASONING_FORMATS)),
                              _CHAT),
    # honoured by the coordinator, unspeculated
    "tools": _rule(PASS_THROUGH, _tools_check, _CHAT),
    "tool_choice": _rule(PASS_THROUGH, _tool_choice_check, _CHAT),
    "parallel_tool_calls": _rule(PASS_THROUGH, lambda b, k: bool(_bool(b, k) is not None
                                                                and b.get("tools")), _CHAT),
    "response_format": _rule(PASS_THROUGH, _response_format_check, _CHAT),
    "json_schema": _rule(PASS_THROUGH, _json_schema_check),
    "grammar": _rule(PASS_THROUGH, _str_check),
    "logprobs": _rule(PASS_THROUGH, _logprobs_check),
    "top_logprobs": _rule(PASS_THROUGH, _int_check(0, MAX_TOP_LOGPROBS, 0), _CHAT),
    "n_probs": _rule(PASS_THROUGH, _int_check(0, 1024, 0)),
    "logit_bias": _rule(PASS_THROUGH, _logit_bias_check),
    "presence_penalty": _rule(PASS_THROUGH, _num_check(-2.0, 2.0, 0.0)),
    "frequency_penalty": _rule(PASS_THROUGH, _num_check(-2.0, 2.0, 0.0)),
    "repeat_penalty": _rule(PASS_THROUGH, _num_check(0.0, 10.0, 1.0)),
    "repeat_last_n": _rule(PASS_THROUGH, _int_check(-1, 1 << 20)),
    "mirostat": _rule(PASS_THROUGH, _int_check(0, 2, 0)),
    "mirostat_tau": _rule(PASS_THROUGH, _num_check(0.0, 100.0, None)),
    "mirostat_eta": _rule(PASS_THROUGH, _num_check(0.0, 10.0, None)),
    "dry_multiplier": _rule(PASS_THROUGH, _num_check(0.0, 100.0, 0.0)),
    "dry_base": _rule(PASS_THROUGH, _num_check(0.0, 100.0, None)),
    "dry_allowed_length": _rule(PASS_THROUGH, _int_check(0, 1 << 20)),
    "dry_penalty_last_n": _rule(PASS_THROUGH, _int_check(-1, 1 << 20)),
    "dry_sequence_breakers": _rule(PASS_THROUGH, _string_list_check),
    "xtc_probability": _rule(PASS_THROUGH, _num_check(0.0, 1.0, 0.0)),
    "xtc_threshold": _rule(PASS_THROUGH, _num_check(0.0, 1.0, None)),
    "typical_p": _rule(PASS_THROUGH, _num_check(0.0, 1.0, 1.0)),
    "top_n_sigma": _rule(PASS_THROUGH, _num_check(-1.0, 100.0, -1.0)),
    "dynatemp_range": _rule(PASS_THROUGH, _num_check(0.0, 10.0, 0.0)),
    "dynatemp_exponent": _rule(PASS_THROUGH, _num_check(0.0, 10.0, None)),
    "min_keep": _rule(PASS_THROUGH, _int_check(0, 1 << 20, 0)),
    "samplers": _rule(PASS_THROUGH, _string_list_check),
    "continue_final_message": _rule(PASS_THROUGH, _bool_check, _CHAT),
    "add_generation_prompt": _rule(PASS_THROUGH, lambda b, k: _bool(b, k) is False, _CHAT),
    # refused
    "n": _rule(REFUSED, _one_check),
    "best_of": _rule(REFUSED, _one_check, _COMPLETION),
    "echo": _rule(REFUSED, _refuse_true, _COMPLETION),
    "suffix": _rule(REFUSED, _refuse_non_empty, _COMPLETION),
    "functions": _rule(REFUSED, _refuse_non_empty, _CHAT),
    "function_call": _rule(REFUSED, _refuse_non_empty, _CHAT),
    "modalities": _rule(REFUSED, _modalities_check, _CHAT),
    "audio": _rule(REFUSED, _refuse_non_empty, _CHAT),
    "prediction": _rule(REFUSED, _refuse_non_empty, _CHAT),
    "store": _rule(REFUSED, _refuse_true, _CHAT),
    # accepted, no effect on the output
    "model": _rule(METADATA, _str_check),
    "user": _rule(METADATA, _str_check),
    "metadata": _rule(METADATA, lambda b, k: bool(_object(b, k))),
}

_REFUSALS = {
    "n": "only n=1 is supported: send one request per completion",
    "best_of": "only best_of=1 is supported",
    "echo": "echo is not supported by this server",
    "suffix": "suffix (fill-in-the-middle) is not supported by this server",
    "functions": "the legacy 'functions' field is not supported: send 'tools'",
    "function_call": "the legacy 'function_call' field is not supported: send 'tool_choice'",
    "modalities": "only text output is supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "store": "this server does not store completions",
}

# Message fields and content parts that only the coordinator's own template handling keeps.
MESSAGE_PASS_THROUGH = ("tool_calls", "tool_call_id", "reasoning_content", "image_url",
                        "input_audio", "role tool")


def classify(body: Mapping[str, Any], kind: str) -> tuple[str, ...]:
    """Validate every known field of ``body``; the pass-through reasons it gives. Refused
    fields raise :class:`ApiError` naming the field."""
    reasons = []
    for key in body:
        rule = FIELDS.get(key)
        if rule is None:
            if body[key] is not None:
                reasons.append(key)  # unknown here: the coordinator may know it
            continue
        asks = rule.check(body, key)
        if asks and kind not in rule.routes:
            route = "/v1/chat/completions" if kind == "completion" else "/v1/completions"
            raise _bad(key, f"'{key}' belongs to {route}, not to this route")
        if asks and rule.kind == REFUSED:
            raise _bad(key, _REFUSALS[key])
        if asks and rule.kind == PASS_THROUGH:
            reasons.append(key)
    return tuple(reasons)


def _common(body: Mapping[str, Any], kind: str, limits: LimitsConfig) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    reasons = classify(body, kind)
    model = body.get("model")

    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    if max_tokens is None:
        max_tokens = limits.default_max_tokens

    defaults = SamplingParams()
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    min_p = _number(body, "min_p", 0.0, 1.0)
    top_k = _int(body, "top_k")
    if top_k is not None and not -1 <= top_k <= MAX_TOP_K:
        raise _bad("top_k", f"'top_k' must lie between -1 and {MAX_TOP_K} (0 or -1: disabled)")
    seed = _int(body, "seed")
    sampling = SamplingParams(
        temperature=defaults.temperature if temperature is None else temperature,
        top_k=defaults.top_k if top_k is None else top_k,
        top_p=defaults.top_p if top_p is None else top_p,
        min_p=defaults.min_p if min_p is None else min_p,
        seed=seed)
    options = body.get("stream_options") or {}
    return {
        "model": model, "max_tokens": max_tokens, "sampling": sampling,
        "stop": _stops(body, limits),
        "stream": bool(_bool(body, "stream")),
        "include_usage": bool(_bool(options, "include_usage")),
        "ignore_eos": bool(_bool(body, "ignore_eos")), "passthrough": reasons,
    }


def _content_part(where: str, j: int, part: Any) -> tuple[dict[str, Any], str | None]:
    """A validated content part, and the pass-through reason it gives (None for text)."""
    at = f"{where}.content[{j}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}, None
    if kind == "image_url":
        image = part.get("image_url")
        if isinstance(image, str):
            image = {"url": image}
        if isinstance(image, dict) and isinstance(image.get("url"), str) and image["url"]:
            return {"type": "image_url", "image_url": image}, "image_url"
    if kind == "input_audio":
        audio = part.get("input_audio")
        if isinstance(audio, dict) and isinstance(audio.get("data"), str) and \
                isinstance(audio.get("format"), str):
            return {"type": "input_audio", "input_audio": audio}, "input_audio"
    raise _bad(at, "content parts must be {\"type\": \"text\", \"text\": ...}, "
                   "{\"type\": \"image_url\", \"image_url\": {\"url\": ...}} or "
                   "{\"type\": \"input_audio\", \"input_audio\": {\"data\": ..., \"format\": ...}}")


def _tool_calls(where: str, calls: Any) -> list[dict[str, Any]]:
    if not isinstance(calls, list) or not calls:
        raise _bad(f"{where}.tool_calls", f"{where}.tool_calls must be a non-empty array",
                   "invalid_type")
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)
                and isinstance(fn.get("arguments", ""), (str, dict))):
            raise _bad(f"{where}.tool_calls[{i}]", f"{where}.tool_calls[{i}] must be "
                       "{\"type\": \"function\", \"id\": ..., \"function\": {\"name\": ..., "
                       "\"arguments\": ...}}")
    return calls


def _message(index: int, raw: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """A validated message, and the pass-through reasons it gives (each with where)."""
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise _bad(where, f"{where} must be an object with 'role' and 'content'", "invalid_type")
    role = raw.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}")
    reasons: dict[str, str] = {}
    content = raw.get("content")
    if content is None:
        content = ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            clean, reason = _content_part(where, j, part)
            parts.append(clean)
            if reason:
                reasons.setdefault(reason, f"{where}.content[{j}]")
        content = parts  # the template joins them as llama-server itself would
    elif not isinstance(content, str):
        raise _bad(f"{where}.content", f"{where}.content must be a string or an array of "
                   "content parts", "invalid_type")
    message: dict[str, Any] = {"role": role, "content": content}
    if isinstance(raw.get("name"), str):
        message["name"] = raw["name"]
    if raw.get("tool_calls") is not None:
        message["tool_calls"] = _tool_calls(where, raw["tool_calls"])
        reasons["tool_calls"] = f"{where}.tool_calls"
    if role == "tool":
        reasons["role tool"] = f"{where}.role"
        if raw.get("tool_call_id") is not None:
            if not isinstance(raw["tool_call_id"], str):
                raise _bad(f"{where}.tool_call_id", "tool_call_id must be a string",
                           "invalid_type")
            message["tool_call_id"] = raw["tool_call_id"]
            reasons["tool_call_id"] = f"{where}.tool_call_id"
    if isinstance(raw.get("reasoning_content"), str) and raw["reasoning_content"]:
        message["reasoning_content"] = raw["reasoning_content"]
        reasons["reasoning_content"] = f"{where}.reasoning_content"
    return message, reasons


def map_developer_role(messages: tuple[dict[str, Any], ...],
                       template: str) -> tuple[dict[str, Any], ...]:
    """``developer`` messages as ``system`` ones where the chat template does not know the
    role (OpenAI's newer name for the system prompt)."""
    if "developer" in template:
        return messages
    return tuple({**m, "role": "system"} if m["role"] == "developer" else m for m in messages)


def _forward_body(body: Mapping[str, Any], messages: tuple[dict[str, Any], ...] | None
                  ) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if v is not None}
    if messages is not None:
        out["messages"] = list(messages)
    choice = out.get("tool_choice")
    if isinstance(choice, dict):
        # The pinned llama-server reads tool_choice as a string only: a named function is
        # "required" over the one tool, which is what OpenAI's form means.
        name = choice["function"]["name"]
        out["tool_choice"] = "required"
        out["tools"] = [t for t in out["tools"] if t["function"]["name"] == name]
    return out


def parse_chat_request(body: Any, limits: LimitsConfig) -> ParsedRequest:
    common = _common(body, "chat", limits)
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _bad("messages", "'messages' must be a non-empty array", "invalid_type")
    parsed = [_message(i, m) for i, m in enumerate(raw_messages)]
    messages = tuple(m for m, _ in parsed)
    reasons = list(common.pop("passthrough"))
    input_at: dict[str, str] = {}
    for _, why in parsed:
        for reason, where in why.items():
            input_at.setdefault(reason, where)
    reasons += sorted(set(input_at) - set(reasons))
    extra = {k: body[k] for k in ("chat_template_kwargs", "reasoning_effort")
             if body.get(k) is not None}
    return ParsedRequest(kind="chat", messages=messages, passthrough=tuple(dict.fromkeys(reasons)),
                         template_extra=extra, input_at=input_at,
                         reasoning=body.get("reasoning_format") != "none",
                         body=_forward_body(body, messages), **common)


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in value)


def parse_completion_request(body: Any, limits: LimitsConfig) -> ParsedRequest:
    common = _common(body, "completion", limits)
    forward = _forward_body(body, None)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and (
            isinstance(prompt[0], str) or _is_tokens(prompt[0]) and prompt[0]):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return ParsedRequest(kind="completion", prompt_text=prompt, body=forward, **common)
    if _is_tokens(prompt) and prompt:
        if any(t < 0 for t in prompt):
            raise _bad("prompt", "token ids must not be negative")
        return ParsedRequest(kind="completion", prompt_tokens=tuple(prompt), body=forward,
                             **common)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise _bad("prompt", "only one prompt per request is supported")
    raise _bad("prompt", "'prompt' must be a string or an array of token ids", "invalid_type")


# -- responses ------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(kind: str, ident: str, created: int, model: str, text: str, finish: str,
             use: dict[str, int], reasoning: str = "") -> dict[str, Any]:
    """A whole (non-streamed) answer."""
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning:
            message["reasoning_content"] = reasoning
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": ident, "object": obj, "created": created, "model": model,
            "system_fingerprint": None, "choices": [choice], "usage": use}


def chunk(kind: str, ident: str, created: int, model: str, *, text: str | None = None,
          reasoning: str | None = None, role: bool = False, finish: str | None = None,
          include_usage: bool = False) -> dict[str, Any]:
    """One streamed chunk with one choice (a delta, or the finish reason)."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if reasoning is not None:
            delta["reasoning_content"] = reasoning
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    body = {"id": ident, "object": obj, "created": created, "model": model,
            "system_fingerprint": None, "choices": [choice]}
    if include_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last
    return body


def usage_chunk(kind: str, ident: str, created: int, model: str,
                use: dict[str, int]) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": ident, "object": obj, "created": created, "model": model,
            "system_fingerprint": None, "choices": [], "usage": use}


def model_object(name: str, created: int, context_length: int,
                 meta: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of ``/v1/models``: OpenAI's fields, the context one request may use (a
    coordinator slot's), and the coordinator's own ``meta`` (vocabulary, trained context,
    parameters, size)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "tightwad",
            "context_length": context_length, "meta": dict(meta)}
