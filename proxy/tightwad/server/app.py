"""The aiohttp app: OpenAI routes (also without ``/v1``), SSE, CORS, health, status, metrics
and error mapping.

A completion request is parsed (:mod:`tightwad.server.openai_api` says which fields are
speculated and which need the coordinator's own endpoint), rendered and tokenized, then
admitted by the engine (the prompt fits; ``max_tokens``, a clamp said in the
``X-Tightwad-Max-Tokens-Clamped`` header). A stream opens right then, before the request waits
for a slot: headers and the role chunk, then an SSE comment every ``listen.sse_keepalive_s``
until the first token. Speculated chat text of a thinking model is split into
``reasoning_content`` (:mod:`tightwad.server.reasoning`); a passed-through request's answer is
the coordinator's, sent on under this answer's id and model name. Embeddings, tokenize and
detokenize go to the coordinator as they are.

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``. Bad input is a 4xx
decided here before anything reaches llama-server (which answers some malformed input with 500):
the body is read with its own size limit, also for chunked bodies (413), then decoded as strict
UTF-8 and parsed as JSON (400), then validated by :mod:`tightwad.server.openai_api` (400). A target that is
down gives 503 with ``Retry-After``; a stream already running ends with an error event and
``data: [DONE]``. A client that goes away cancels its request's upstream work: the runner
cancels the handler (``handler_cancellation=True``), which closes the engine's generator.
A client that takes longer than ``limits.body_timeout_s`` to send its body gets 408; one that
stops reading its stream loses it after ``listen.write_timeout_s`` (sooner while other
requests wait for its slot). An error after a stream
started (an upstream answer of the wrong shape, anything unexpected) ends it with an error event
and ``[DONE]``, never a second status line. A request that would wait behind
``limits.max_queued`` others for a slot gets 429 before its body is read.

Shutdown (SIGTERM, a restart): the listening socket closes first, requests in flight get
``listen.shutdown_grace_s`` to finish, then each one still running ends cleanly at once (503
with ``Retry-After``, or an error event and ``[DONE]`` on a stream), whatever it was waiting
for upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import socket
import sys
import termios
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tightwad.config import Config, ListenConfig
from tightwad.engine.engine import (
    Admission,
    Engine,
    Failed,
    Finished,
    Forwarded,
    GenerationRequest,
    TextDelta,
    failure,
)
from tightwad.engine.telemetry import Telemetry
from tightwad.llamaserver.wire import UpstreamError, UpstreamFailure, error_message, is_role_only
from tightwad.server import dashboard
from tightwad.server.auth import OPEN_PATHS, bearer_auth
from tightwad.server.cors import Cors
from tightwad.server.lifecycle import SHUTTING_DOWN, Lifecycle
from tightwad.server.openai_api import (
    ApiError,
    ParsedRequest,
    chunk,
    error_body,
    map_developer_role,
    model_object,
    parse_chat_request,
    parse_completion_request,
    response,
    usage,
    usage_chunk,
)
from tightwad.server.reasoning import ReasoningSplit, opens_thinking, thinking_template

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
    kind = {400: "invalid_request_error", 429: "rate_limit_error",
            503: "service_unavailable"}.get(failed.status, "server_error")
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
    """OpenAI error JSON for everything (an error event on a stream already open), and the
    request counter."""
    try:
        resp = await handler(request)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        if isinstance(exc, web.HTTPException) and exc.status < 400:
            raise
        error = _as_api_error(request, exc)
        sse: _Sse | None = request.get(_OPEN_STREAM)
        resp = await sse.end_with(error) if sse is not None else _error_response(error)
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "other"
    request.app[TELEMETRY].on_http_answer(endpoint, resp.status)
    return resp


def _as_api_error(request: web.Request, exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, web.HTTPException):  # routing (404, 405) and aiohttp's own limits
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return ApiError(exc.status, exc.reason, type=kind)
    log.exception("unexpected error on %s %s", request.method, request.path)
    return ApiError(500, "internal error in the tightwad proxy; see its log", type="server_error")


# -- generation -----------------------------------------------------------------------------

CLAMP_HEADER = "X-Tightwad-Max-Tokens-Clamped"


def _clamp_headers(admission: Admission) -> dict[str, str]:
    """The clamp, said: ``requested=N; granted=M; by=limits.max_tokens_cap|context``."""
    if admission.clamped_by is None:
        return {}
    asked = "none" if admission.requested is None else str(admission.requested)
    return {CLAMP_HEADER: f"requested={asked}; granted={admission.max_tokens}; "
                          f"by={admission.clamped_by}"}


STREAM_BUFFER_BYTES = 16 << 10
"""What a stream may leave unsent in the socket and in the transport before its writes wait for
the client (``listen.write_timeout_s`` at most)."""


STALLED_SHARE = 8
"""While another request waits for a coordinator slot, a stream whose client takes no byte for
``listen.write_timeout_s / STALLED_SHARE`` has stopped reading and gives its slot up: however
many waves of slots they come in, eight stalled streams ahead of a waiting request cost it at
most one write deadline (issue 15). A client that reads, however slowly, keeps its stream."""


def _unsent(transport: asyncio.WriteTransport) -> int:
    """Bytes not yet taken by the client: the transport's buffer and, where the OS tells
    (Linux), the socket's send queue, so a slow reader's every acknowledged byte counts."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and hasattr(termios, "TIOCOUTQ"):
        with contextlib.suppress(OSError):
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            unsent += int.from_bytes(queued, sys.byteorder, signed=True)
    return unsent


async def _drained(transport: asyncio.BaseTransport, timeout_s: float,
                   contended: Callable[[], bool]) -> None:
    """Until ``transport`` holds at most STREAM_BUFFER_BYTES unsent (a poll: asyncio has no
    public wait for a transport's buffer). TimeoutError after ``timeout_s``, or sooner when
    ``contended()`` (a request waits for a slot) and the client took nothing for
    ``timeout_s / STALLED_SHARE``."""
    assert isinstance(transport, asyncio.WriteTransport)
    loop = asyncio.get_running_loop()
    started = progressed = loop.time()
    unsent = _unsent(transport)
    while not transport.is_closing() and \
            transport.get_write_buffer_size() > STREAM_BUFFER_BYTES:
        await asyncio.sleep(0.05)
        now, left = loop.time(), _unsent(transport)
        if left < unsent:
            progressed = now
        unsent = left
        if now - started >= timeout_s or \
                (now - progressed >= timeout_s / STALLED_SHARE and contended()):
            raise asyncio.TimeoutError


class _Sse:
    """One SSE answer: opened at once, chunks, comment lines while waiting, ``[DONE]``.

    Every write has a deadline (``listen.write_timeout_s``): a client that stops reading
    blocks the write once the socket buffers are full, and past the deadline its connection
    is dropped (ConnectionResetError, as when a client goes away), which ends the generation
    and frees its slots.
    """

    def __init__(self, request: web.Request, headers: dict[str, str],
                 write_timeout_s: float, contended: Callable[[], bool]) -> None:
        self.request = request
        self.write_timeout_s = write_timeout_s
        self.contended = contended
        self.resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no", **headers})

    async def open(self) -> None:
        await self.resp.prepare(self.request)
        self.request[_OPEN_STREAM] = self
        # A stream is a trickle (a token is ~200 bytes): small buffers cost nothing, bound what
        # a client that stops reading holds, and let the write deadline notice it soon.
        sock = self.request.transport.get_extra_info("socket") \
            if self.request.transport is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_BUFFER_BYTES)

    async def _write(self, data: bytes, eof: bool = False) -> None:
        write = self.resp.write_eof(data) if eof else self.resp.write(data)
        try:
            await asyncio.wait_for(write, self.write_timeout_s)
            # aiohttp waits for the socket only every 64 KiB written; wait here as soon as
            # more than STREAM_BUFFER_BYTES are unsent (the client is not keeping up).
            transport = self.request.transport
            if transport is not None and \
                    transport.get_write_buffer_size() > STREAM_BUFFER_BYTES:
                await _drained(transport, self.write_timeout_s, self.contended)
        except asyncio.TimeoutError:
            log.warning("a client stopped reading its stream (listen.write_timeout_s %g s, "
                        "shorter while others wait for its slot); ending it", self.write_timeout_s)
            if self.request.transport is not None:
                self.request.transport.abort()
            raise ConnectionResetError("the client stopped reading") from None

    async def send(self, obj: Any) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()
        await self._write(b"data: " + data + b"\n\n")

    async def keepalive(self) -> None:
        await self._write(b": keep-alive\n\n")

    async def fail(self, failed: Failed) -> None:
        await self._error(_from_failed(failed))

    async def _error(self, error: ApiError) -> None:
        await self.send(error_body(error.message, error.type, None, error.code))

    async def done(self) -> None:
        await self._write(b"data: [DONE]\n\n", eof=True)

    async def end_with(self, error: ApiError) -> web.StreamResponse:
        """End the open stream with ``error`` and ``[DONE]`` (after an unexpected error: the
        status line is long sent); a client that is gone by now just loses it."""
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await self._error(error)
            await self.done()
        return self.resp


# The request's SSE answer once its headers are sent: an error after that point must end the
# stream (an error event and [DONE]), never start a second answer inside its body.
_OPEN_STREAM: web.RequestKey[_Sse] = web.RequestKey("open_stream", _Sse)


async def _next(lifecycle: Lifecycle, events: Any, sse: _Sse | None, every_s: float) -> Any:
    """The next event; on an open stream, a keep-alive comment each ``every_s`` of waiting
    (queued for a slot, the prompt being evaluated)."""
    if sse is None:
        return await lifecycle.next_event(events)
    step = asyncio.ensure_future(lifecycle.next_event(events))
    try:
        while True:
            done, _ = await asyncio.wait((step,), timeout=every_s)
            if done:
                return step.result()
            await sse.keepalive()
    finally:
        if not step.done():
            step.cancel()
            await asyncio.wait((step,))


async def _complete(request: web.Request, kind: str) -> web.StreamResponse:
    lifecycle = request.app[LIFECYCLE]
    if lifecycle.stopping.is_set():
        raise _from_failed(SHUTTING_DOWN)
    with lifecycle.request():
        return await _generate(request, kind, lifecycle)


async def _prompt(engine: Engine, parsed: ParsedRequest,
                  forward: dict[str, Any]) -> tuple[list[int], ReasoningSplit | None]:
    """The request's prompt tokens, and for a thinking model's chat the reasoning split.
    A chat's messages go into ``forward`` (the pass-through body) with roles mapped."""
    if parsed.kind != "chat":
        if parsed.prompt_tokens is not None:
            return list(parsed.prompt_tokens), None
        return await engine.tokenize(parsed.prompt_text or ""), None
    template = await engine.chat_template()
    messages = map_developer_role(parsed.messages, template)
    forward["messages"] = list(messages)
    # Passed through, everything that shapes the prompt (tools too) renders it.
    extra = ({k: v for k, v in forward.items() if k != "messages"}
             if parsed.passthrough else parsed.template_extra)
    text, tokens = await engine.chat_prompt(messages, extra)
    split = ReasoningSplit(opens_thinking(text)) \
        if parsed.reasoning and thinking_template(template) else None
    return tokens, split


async def _generate(request: web.Request, kind: str,
                    lifecycle: Lifecycle) -> web.StreamResponse:
    config, engine = request.app[CONFIG], request.app[ENGINE]
    limits = config.limits
    if refused := engine.queue_refusal():  # before its body is read and tokenized
        raise _from_failed(refused)
    body = await read_json(request, limits.max_body_bytes, limits.body_timeout_s)
    parse = parse_chat_request if kind == "chat" else parse_completion_request
    parsed = parse(body, config.limits)
    forward = dict(parsed.body)
    try:
        # Images to a model without vision: refused before the template fails on them.
        admission: Admission | Failed | None = await engine.refuse_inputs(parsed.passthrough)
        if admission is None:
            tokens, split = await _prompt(engine, parsed, forward)
            admission = await engine.admit(tokens, parsed.max_tokens, parsed.passthrough)
        model = await engine.model_name()
    except UpstreamFailure as exc:
        raise _from_failed(failure(exc)) from None
    if isinstance(admission, Failed):
        error = _from_failed(admission)
        if admission.code == "unsupported_input":  # name the content part
            error.param = next((where for reason, where in parsed.input_at.items()
                                if reason in admission.message), None)
        raise error
    assert isinstance(admission, Admission)
    reply = _Reply(request, parsed, model, _clamp_headers(admission), lifecycle,
                   config.listen)
    if parsed.passthrough:
        for key in ("max_completion_tokens", "n_predict"):
            forward.pop(key, None)
        forward["max_tokens"] = admission.max_tokens
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        return await reply.relay(engine.forward_openai(path, forward, tokens,
                                                       parsed.passthrough, parsed.stream))
    return await reply.answer(engine.generate(GenerationRequest(
        prompt=tuple(tokens), max_tokens=admission.max_tokens, sampling=parsed.sampling,
        stop=parsed.stop, ignore_eos=parsed.ignore_eos)), split)


class _Reply:
    """One completion's answer: JSON, or a stream opened before the first token."""

    def __init__(self, request: web.Request, parsed: ParsedRequest, model: str,
                 headers: dict[str, str], lifecycle: Lifecycle, listen: ListenConfig) -> None:
        self.request = request
        self.parsed = parsed
        self.kind = parsed.kind
        self.model = model
        self.headers = headers
        self.lifecycle = lifecycle
        self.keepalive_s = listen.sse_keepalive_s
        self.ident = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.sse = _Sse(request, headers, listen.write_timeout_s,
                        request.app[ENGINE].slot_wanted) if parsed.stream else None

    def _piece(self, **kw: Any) -> dict[str, Any]:
        return chunk(self.kind, self.ident, self.created, self.model,
                     include_usage=self.parsed.include_usage, **kw)

    async def _open(self) -> None:
        """Headers, and for chat the role chunk, before anything is generated."""
        if self.sse is not None:
            await self.sse.open()
            if self.kind == "chat":
                await self.sse.send(self._piece(role=True, text=""))

    async def answer(self, events: Any, split: ReasoningSplit | None) -> web.StreamResponse:
        """Speculated (or plainly decoded) text events as OpenAI's answer or chunks."""
        sse = self.sse
        reasoning: list[str] = []
        text: list[str] = []
        async with contextlib.aclosing(events):
            try:
                await self._open()
                while True:
                    event = await _next(self.lifecycle, events, sse, self.keepalive_s)
                    if isinstance(event, TextDelta):
                        think, said = split.push(event.text) if split else ("", event.text)
                    elif isinstance(event, Finished):
                        think, said = split.finish() if split else ("", "")
                    elif sse is None:
                        raise _from_failed(event)
                    else:
                        await sse.fail(event)
                        break
                    if sse is None:
                        reasoning.append(think)
                        text.append(said)
                    elif think or said:
                        await sse.send(self._piece(text=said if said else None,
                                                   reasoning=think if think else None))
                    if not isinstance(event, Finished):
                        continue
                    use = usage(event.prompt_tokens, event.completion_tokens)
                    if sse is None:
                        return web.json_response(response(
                            self.kind, self.ident, self.created, self.model, "".join(text),
                            event.reason, use, "".join(reasoning)), headers=self.headers)
                    await sse.send(self._piece(text=None if self.kind == "chat" else "",
                                               finish=event.reason))
                    if self.parsed.include_usage:
                        await sse.send(usage_chunk(self.kind, self.ident, self.created,
                                                   self.model, use))
                    break
                await sse.done()
            except ConnectionResetError:
                log.info("client went away during a stream; its generation is cancelled")
        assert sse is not None
        return sse.resp

    def _restamp(self, data: dict[str, Any]) -> dict[str, Any]:
        """The coordinator's chunk or answer under this answer's id and model name."""
        return {**data, "id": self.ident, "model": self.model}

    async def relay(self, events: Any) -> web.StreamResponse:
        """A passed-through request: the coordinator's own OpenAI answer or chunks, as
        they are but for the id and model name."""
        sse = self.sse
        answer: dict[str, Any] | None = None
        async with contextlib.aclosing(events):
            try:
                await self._open()
                while True:
                    event = await _next(self.lifecycle, events, sse, self.keepalive_s)
                    if isinstance(event, Forwarded):
                        if sse is None:
                            answer = self._restamp(event.data)
                        elif not (self.kind == "chat" and is_role_only(event.data)):
                            await sse.send(self._restamp(event.data))
                    elif isinstance(event, Finished):
                        if sse is None:
                            return web.json_response(answer, headers=self.headers)
                        break
                    elif sse is None:
                        raise _from_failed(event)
                    else:
                        await sse.fail(event)
                        break
                await sse.done()
            except ConnectionResetError:
                log.info("client went away during a stream; its generation is cancelled")
        assert sse is not None
        return sse.resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "completion")


# -- the rest -------------------------------------------------------------------------------


async def _model_card(request: web.Request) -> dict[str, Any]:
    try:
        name, n_ctx, meta = await request.app[ENGINE].model_card()
    except UpstreamFailure as exc:
        raise _from_failed(failure(exc)) from None
    return model_object(name, request.app[STARTED], n_ctx, meta)


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [await _model_card(request)]})


async def model(request: web.Request) -> web.Response:
    card = await _model_card(request)
    if request.match_info["model"] != card["id"]:
        raise ApiError(404, f"the model {request.match_info['model']!r} does not exist; this "
                            f"pool serves {card['id']!r}", param="model",
                       code="model_not_found")
    return web.json_response(card)


async def _forward(request: web.Request, path: str, what: str) -> web.Response:
    """A coordinator route passed on as it is: its status and JSON, OpenAI error JSON on
    failure (naming what the coordinator said)."""
    config, engine = request.app[CONFIG], request.app[ENGINE]
    body = await read_json(request, config.limits.max_body_bytes, config.limits.body_timeout_s)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    try:
        status, answer = await engine.forward(path, body)
        name = await engine.model_name()
    except UpstreamFailure as exc:
        raise _from_failed(failure(exc)) from None
    if status == 200:
        if isinstance(answer, dict) and "model" in answer:
            answer = {**answer, "model": name}
        return web.json_response(answer)
    message = error_message(status, json.dumps(answer))
    if status == 501:
        raise ApiError(501, f"the coordinator does not serve {what}: {message}",
                       type="not_supported_error", code=f"{what}_not_served")
    if 400 <= status < 500:
        raise ApiError(400 if status not in (404, 413) else status,
                       f"the model server refused the request: {message}",
                       code="upstream_rejected")
    raise _from_failed(failure(UpstreamError("target", status, message)))


async def embeddings(request: web.Request) -> web.Response:
    return await _forward(request, "/v1/embeddings", "embeddings")


async def tokenize(request: web.Request) -> web.Response:
    return await _forward(request, "/tokenize", "tokenize")


async def detokenize(request: web.Request) -> web.Response:
    return await _forward(request, "/detokenize", "detokenize")


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if not await engine.healthy():
        raise ApiError(503, "the coordinator (target llama-server) is not answering",
                       type="service_unavailable", code="upstream_unavailable",
                       headers={"Retry-After": "5"})
    return web.json_response({"status": "ok",
                              "speculation_active": engine.speculation_active})


def status_body(request: web.Request) -> dict[str, Any]:
    engine = request.app[ENGINE]
    spec = request.app[CONFIG].speculation
    return {**engine.status(), "config": {
        "k_min": spec.k_min, "k_max": spec.k_max, "k_initial": spec.k_initial,
        "adaptive": spec.adaptive, "n_probs": spec.n_probs}}


async def status(request: web.Request) -> web.Response:
    return web.json_response(status_body(request))


async def metrics(request: web.Request) -> web.Response:
    telemetry = request.app[TELEMETRY]
    return web.Response(body=telemetry.prometheus(),
                        headers={"Content-Type": telemetry.content_type})


def create_app(config: Config, engine: Engine | None = None) -> web.Application:
    """The proxy app; the engine starts and stops with it."""
    engine = engine or Engine(config)
    token = config.auth.token.get_secret_value() if config.auth.token is not None else None
    cors = Cors(config.listen.cors_origins, expose=(CLAMP_HEADER,))
    app = web.Application(middlewares=[cors.middleware, _errors,
                                       bearer_auth(token, OPEN_PATHS | dashboard.PUBLIC_PATHS)],
                          client_max_size=config.limits.max_body_bytes)
    app.on_response_prepare.append(cors.on_prepare)
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
    for prefix in ("/v1", ""):  # clients such as LiteLLM leave out /v1
        app.router.add_post(prefix + "/chat/completions", chat_completions)
        app.router.add_post(prefix + "/completions", completions)
        app.router.add_post(prefix + "/embeddings", embeddings)
        app.router.add_get(prefix + "/models", models)
        app.router.add_get(prefix + "/models/{model:.+}", model)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/health", health)
    app.router.add_get("/tightwad/status", status)
    app.router.add_get("/metrics", metrics)
    dashboard.add_routes(app, engine, status_body)
    return app
