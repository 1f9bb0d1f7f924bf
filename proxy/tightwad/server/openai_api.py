"""OpenAI request and response shapes, the pure part of the API: parse and validate request
bodies, build response objects and chunks. No I/O here.

Honoured: ``messages`` (string content, or arrays of text parts), ``prompt`` (a string, token
ids, or a one-element array of either), ``max_tokens`` / ``max_completion_tokens`` (clamped to
``limits.max_tokens_cap``), ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``,
``stream``, ``stream_options.include_usage``, and llama.cpp's ``ignore_eos``. Sampling fields a
request leaves out take llama-server's defaults (temperature 0.8, top_k 40, top_p 0.95, min_p
0.05), so the proxy samples as the coordinator's own endpoint would.

Refused with 400, because ignoring them would return something that looks obeyed but is not:
``n`` / ``best_of`` > 1, ``logprobs`` / ``top_logprobs``, ``echo``, ``suffix``, ``tools``,
``logit_bias``, a ``response_format`` other than text, non-text content parts. Any other unknown
field is ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tightwad.config import LimitsConfig
from tightwad.decoding.sampling import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 16
MAX_TOP_K = 1 << 20  # beyond any vocabulary; keeps the value a small integer upstream


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
    max_tokens: int = 512
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


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


def _int(body: Mapping[str, Any], key: str, lo: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, f"'{key}' must be an integer", "invalid_type")
    if lo is not None and value < lo:
        raise _bad(key, f"'{key}' must be at least {lo}, got {value}")
    return value


def _bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _bad(key, f"'{key}' must be true or false", "invalid_type")
    return value


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad("stop", "'stop' must be a string or an array of strings", "invalid_type")
    if len(value) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} stop strings are supported")
    return tuple(s for s in value if s)


def _refuse_unsupported(body: Mapping[str, Any], kind: str) -> None:
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise _bad("n", "only n=1 is supported: send one request per completion")
    best_of = _int(body, "best_of", 1)
    if best_of is not None and best_of != 1:
        raise _bad("best_of", "only best_of=1 is supported")
    logprobs = body.get("logprobs")
    if logprobs not in (None, False, 0):
        raise _bad("logprobs", "logprobs are not supported by this server")
    if body.get("top_logprobs") not in (None, 0):
        raise _bad("top_logprobs", "top_logprobs are not supported by this server")
    if kind == "completion":
        if body.get("echo") not in (None, False):
            raise _bad("echo", "echo is not supported by this server")
        if body.get("suffix") not in (None, ""):
            raise _bad("suffix", "suffix (fill-in-the-middle) is not supported by this server")
    if body.get("tools") not in (None, []) or body.get("functions") not in (None, []):
        raise _bad("tools", "tool calling is not supported by this server")
    if body.get("logit_bias") not in (None, {}):
        raise _bad("logit_bias", "logit_bias is not supported by this server")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in (None, "text")):
        raise _bad("response_format", "only response_format {\"type\": \"text\"} is supported")


def _common(body: Mapping[str, Any], kind: str, limits: LimitsConfig) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    _refuse_unsupported(body, kind)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "'model' must be a string", "invalid_type")

    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    max_tokens = min(max_tokens, limits.max_tokens_cap)

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

    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "'stream_options' must be an object", "invalid_type")
    return {
        "model": model, "max_tokens": max_tokens, "sampling": sampling, "stop": _stops(body),
        "stream": bool(_bool(body, "stream")),
        "include_usage": bool(_bool(options or {}, "include_usage")),
        "ignore_eos": bool(_bool(body, "ignore_eos")),
    }


def _message(index: int, raw: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise _bad(where, f"{where} must be an object with 'role' and 'content'", "invalid_type")
    role = raw.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}")
    content = raw.get("content")
    if content is None:
        content = ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad(f"{where}.content[{j}]", "only text content parts "
                           "({\"type\": \"text\", \"text\": ...}) are supported")
            parts.append({"type": "text", "text": part["text"]})
        content = parts  # the template joins them as llama-server itself would
    elif not isinstance(content, str):
        raise _bad(f"{where}.content", f"{where}.content must be a string or an array of "
                   "text parts", "invalid_type")
    message: dict[str, Any] = {"role": role, "content": content}
    if isinstance(raw.get("name"), str):
        message["name"] = raw["name"]
    return message


def parse_chat_request(body: Any, limits: LimitsConfig) -> ParsedRequest:
    common = _common(body, "chat", limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty array", "invalid_type")
    return ParsedRequest(kind="chat", messages=tuple(_message(i, m)
                                                     for i, m in enumerate(messages)), **common)


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in value)


def parse_completion_request(body: Any, limits: LimitsConfig) -> ParsedRequest:
    common = _common(body, "completion", limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and (
            isinstance(prompt[0], str) or _is_tokens(prompt[0]) and prompt[0]):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return ParsedRequest(kind="completion", prompt_text=prompt, **common)
    if _is_tokens(prompt) and prompt:
        if any(t < 0 for t in prompt):
            raise _bad("prompt", "token ids must not be negative")
        return ParsedRequest(kind="completion", prompt_tokens=tuple(prompt), **common)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise _bad("prompt", "only one prompt per request is supported")
    raise _bad("prompt", "'prompt' must be a string or an array of token ids", "invalid_type")


# -- responses ------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(kind: str, ident: str, created: int, model: str, text: str, finish: str,
             use: dict[str, int]) -> dict[str, Any]:
    """A whole (non-streamed) answer."""
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": ident, "object": obj, "created": created, "model": model,
            "system_fingerprint": None, "choices": [choice], "usage": use}


def chunk(kind: str, ident: str, created: int, model: str, *, text: str | None = None,
          role: bool = False, finish: str | None = None,
          include_usage: bool = False) -> dict[str, Any]:
    """One streamed chunk with one choice (a delta, or the finish reason)."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
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
