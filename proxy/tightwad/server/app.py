"""The aiohttp app: OpenAI routes, SSE, health, status, metrics and error mapping.

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``. Bad input is a 4xx
decided here before anything reaches llama-server (which answers some malformed input with 500):
the body is read with its own size limit, also for chunked bodies (413), then decoded as strict
UTF-8 and parsed as JSON (400), then validated by :mod:`tightwad.server.openai_api` (400). A target that is
down gives 503 with ``Retry-After``; a stream already running ends with an error event and
``data: [DONE]``. A client that goes away cancels its request's upstream work: the runner
cancels the handler (``handler_cancellation=True``), which closes the engine's generator.
A client that takes longer than ``limits.body_timeout_s`` to send its body gets 408.

Shutdown (SIGTERM, a restart): the listening socket closes first, requests in flight get
``listen.shutdown_grace_s`` to finish, then each one still running ends cleanly at once (503
with ``Retry-After``, or an error event and ``[DONE]`` on a stream), whatever it was waiting
for upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tightwad.config import Config
from tightwad.engine.engine import (
    Engine,
    Event,
    Failed,
    Finished,
    GenerationRequest,
    TextDelta,
    failure,
)
from tightwad.engine.telemetry import Telemetry
from tightwad.llamaserver.wire import UpstreamFailure
from tightwad.server.auth import bearer_auth
from tightwad.server.lifecycle import SHUTTING_DOWN, Lifecycle
from tightwad.server.openai_api import (
    ApiError,
    ParsedRequest,
    chunk,
    error_body,
    parse_chat_request,
    parse_completion_request,
    response,
    usage,
    usage_chunk,
)

log = logging.getLogger("tightwad.server.app")

CONFIG = web.AppKey("config", Config)
ENGINE = web.AppKey("engine", Engine)
TELEMETRY = web.AppKey("telemetry", Telemetry)
STARTED = web.AppKey("started", int)

LIFECYCLE = web.AppKey("lifecycle", Lifecycle)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- errors and bodies ----------------------------------------------------------------------


def _error_response(error: ApiError) -> web.Response:
    return web.Response(status=error.status, content_type="application/json",
                        text=json.dumps(error.body()), headers=error.headers)


def _from_failed(failed: Failed) -> ApiError:
    kind = {400: "invalid_request_error", 503: "service_unavailable"}.get(failed.status,
                                                                        "server_error")
    headers = ({"Retry-After": str(int(failed.retry_after))}
               if failed.retry_after is not None else {})
    return ApiError(failed.status, failed.message, type=kind, code=failed.code, headers=headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request, limit: int, timeout_s: float = 30.0) -> Any:
    """The request body as JSON, at most ``limit`` bytes however it is sent, within
    ``timeout_s``."""
    too_large = ApiError(413, f"the request body exceeds {limit} bytes (limits.max_body_bytes)",
                         code="request_too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    data = bytearray()

    async def receive() -> None:
        async for piece in request.content.iter_any():
            data.extend(piece)
            if len(data) > limit:
                raise too_large

    try:
        await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body took longer than {timeout_s:g} s to arrive "
                            "(limits.body_timeout_s)", code="request_timeout",
                       headers={"Connection": "close"}) from None
    except (web.HTTPRequestEntityTooLarge, ValueError) as exc:
        raise too_large from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})",
                       code="invalid_encoding") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply", code="invalid_json") from None
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}",
                       code="invalid_json") from None
    if bad := _lone_surrogate(value):
        raise ApiError(400, f"the request body holds a string that is not valid Unicode (a "
                            f"lone surrogate escape such as \\ud800): {bad!r}",
                       code="invalid_encoding")
    return value


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) that cannot be encoded as UTF-8, if any: JSON's
    ``\\uXXXX`` escapes can name half a surrogate pair, which llama-server refuses with 500."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item[:40]
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OpenAI error JSON for everything, and the request counter."""
    try:
        resp = await handler(request)
    except ApiError as exc:
        resp = _error_response(exc)
    except web.HTTPException as exc:  # routing (404, 405) and aiohttp's own limits
        if exc.status < 400:
            raise
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        resp = _error_response(ApiError(exc.status, exc.reason, type=kind))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        resp = _error_response(ApiError(500, "internal error in the tightwad proxy; see its log",
                                        type="server_error"))
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "other"
    request.app[TELEMETRY].on_http_answer(endpoint, resp.status)
    return resp


# -- generation -----------------------------------------------------------------------------


async def _prompt_tokens(engine: Engine, parsed: ParsedRequest) -> list[int]:
    if parsed.kind == "chat":
        return await engine.render_chat(list(parsed.messages))
    if parsed.prompt_tokens is not None:
        return list(parsed.prompt_tokens)
    return await engine.tokenize(parsed.prompt_text or "")


async def _complete(request: web.Request, kind: str) -> web.StreamResponse:
    lifecycle = request.app[LIFECYCLE]
    if lifecycle.stopping.is_set():
        raise _from_failed(SHUTTING_DOWN)
    with lifecycle.request():
        return await _generate(request, kind, lifecycle)


async def _generate(request: web.Request, kind: str,
                    lifecycle: Lifecycle) -> web.StreamResponse:
    config, engine = request.app[CONFIG], request.app[ENGINE]
    limits = config.limits
    body = await read_json(request, limits.max_body_bytes, limits.body_timeout_s)
    parse = parse_chat_request if kind == "chat" else parse_completion_request
    parsed = parse(body, config.limits)
    try:
        tokens = await _prompt_tokens(engine, parsed)
        model = await engine.model_name()
    except UpstreamFailure as exc:
        raise _from_failed(failure(exc)) from None
    events = engine.generate(GenerationRequest(
        prompt=tuple(tokens), max_tokens=parsed.max_tokens, sampling=parsed.sampling,
        stop=parsed.stop, ignore_eos=parsed.ignore_eos))
    ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    async with contextlib.aclosing(events):
        first = await lifecycle.next_event(events)
        if isinstance(first, Failed):
            raise _from_failed(first)
        if not parsed.stream:
            text: list[str] = []
            event: Event = first
            while True:
                if isinstance(event, TextDelta):
                    text.append(event.text)
                elif isinstance(event, Finished):
                    return web.json_response(response(
                        kind, ident, created, model, "".join(text), event.reason,
                        usage(event.prompt_tokens, event.completion_tokens)))
                else:
                    raise _from_failed(event)
                event = await lifecycle.next_event(events)
        return await _stream(request, parsed, events, first, ident, created, model, lifecycle)


async def _stream(request: web.Request, parsed: ParsedRequest, events: Any, first: Any,
                  ident: str, created: int, model: str,
                  lifecycle: Lifecycle) -> web.StreamResponse:
    kind = parsed.kind
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)

    async def send(obj: Any) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()
        await resp.write(b"data: " + data + b"\n\n")

    def piece(**kw: Any) -> dict[str, Any]:
        return chunk(kind, ident, created, model, include_usage=parsed.include_usage, **kw)

    try:
        if kind == "chat":
            await send(piece(role=True, text=""))
        event = first
        while True:
            if isinstance(event, TextDelta):
                if event.text:
                    await send(piece(text=event.text))
            elif isinstance(event, Finished):
                await send(piece(text=None if kind == "chat" else "", finish=event.reason))
                if parsed.include_usage:
                    await send(usage_chunk(kind, ident, created, model,
                                           usage(event.prompt_tokens, event.completion_tokens)))
                break
            else:
                failed = _from_failed(event)
                await send(error_body(failed.message, failed.type, None, failed.code))
                break
            event = await lifecycle.next_event(events)
        await send(b"[DONE]")
        await resp.write_eof()
    except ConnectionResetError:
        log.info("client went away during a stream; its generation is cancelled")
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "completion")


# -- the rest -------------------------------------------------------------------------------


async def models(request: web.Request) -> web.Response:
    try:
        name = await request.app[ENGINE].model_name()
    except UpstreamFailure as exc:
        raise _from_failed(failure(exc)) from None
    return web.json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": request.app[STARTED],
         "owned_by": "tightwad"}]})


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if not await engine.healthy():
        raise ApiError(503, "the coordinator (target llama-server) is not answering",
                       type="service_unavailable", code="upstream_unavailable",
                       headers={"Retry-After": "5"})
    return web.json_response({"status": "ok",
                              "speculation_active": engine.speculation_active})


async def status(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    spec = request.app[CONFIG].speculation
    return web.json_response({**engine.status(), "config": {
        "k_min": spec.k_min, "k_max": spec.k_max, "k_initial": spec.k_initial,
        "adaptive": spec.adaptive, "n_probs": spec.n_probs}})


async def metrics(request: web.Request) -> web.Response:
    telemetry = request.app[TELEMETRY]
    return web.Response(body=telemetry.prometheus(),
                        headers={"Content-Type": telemetry.content_type})


def create_app(config: Config, engine: Engine | None = None) -> web.Application:
    """The proxy app; the engine starts and stops with it."""
    engine = engine or Engine(config)
    token = config.auth.token.get_secret_value() if config.auth.token is not None else None
    app = web.Application(middlewares=[_errors, bearer_auth(token)],
                          client_max_size=config.limits.max_body_bytes)
    app[CONFIG] = config
    app[ENGINE] = engine
    app[TELEMETRY] = engine.telemetry
    app[STARTED] = int(time.time())

    app[LIFECYCLE] = Lifecycle()

    async def start(_: web.Application) -> None:
        await engine.start()

    async def drain(_: web.Application) -> None:
        grace = config.listen.shutdown_grace_s
        if left := await app[LIFECYCLE].drain(grace):
            log.warning("stopping: %d request(s) still running after %g s end with 503 "
                        "(shutting_down)", left, grace)

    async def stop(_: web.Application) -> None:
        await engine.close()

    app.on_startup.append(start)
    app.on_shutdown.append(drain)
    app.on_cleanup.append(stop)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/tightwad/status", status)
    app.router.add_get("/metrics", metrics)
    return app
