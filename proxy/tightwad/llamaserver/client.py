"""Async client for llama-server (the proxy's): one session per server, a deadline on every
call, failures as the three :mod:`tightwad.llamaserver.wire` exception types the engine maps to
behaviour: :class:`UpstreamDown` (no connection, or the connection dropped mid-answer: the
process is gone), :class:`UpstreamTimeout` (no answer within the deadline) and
:class:`UpstreamError` (an HTTP error status, with the server's own message).
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp

from tightwad.decoding.sampling import SamplingParams
from tightwad.llamaserver.wire import (
    Completion,
    CompletionRequest,
    Props,
    StreamChunk,
    UpstreamDown,
    UpstreamError,
    UpstreamFailure,
    UpstreamTimeout,
    error_message,
    openai_error,
    parse_completion,
    parse_openai_event,
    parse_props,
    parse_stream_chunk,
)

T = TypeVar("T")

# What parsing a well-formed JSON value of the wrong shape raises (a list where an object
# belongs, null where a number does, "many" for a count).
_SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


class LlamaClient:
    """One llama-server. Create inside the event loop that uses it; :meth:`close` when done."""

    def __init__(self, base_url: str, *, name: str, timeout_s: float,
                 api_key: str | None = None, connections: int = 16) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = aiohttp.ClientSession(
            # Idle connections are dropped before llama-server's own 5 s keep-alive ends.
            headers=headers, connector=aiohttp.TCPConnector(limit=connections,
                                                            keepalive_timeout=3.0),
            # llama-server answers every call with JSON we parse ourselves.
            raise_for_status=False)

    async def close(self) -> None:
        await self._session.close()

    def _deadline(self, timeout_s: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)

    async def _send(self, method: str, url: str, body: Any,
                    timeout: aiohttp.ClientTimeout) -> tuple[int, str]:
        for attempt in (1, 2):
            try:
                async with self._session.request(method, url, json=body,
                                                 timeout=timeout) as resp:
                    return resp.status, await resp.text(errors="replace")
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A pooled keep-alive connection the server had already closed fails like
                # this; one retry on a fresh connection tells that apart from a dead server
                # (every call is safe to repeat).
                if attempt == 2 or isinstance(exc, aiohttp.ClientConnectorError):
                    raise
        raise AssertionError("unreachable")

    async def _call(self, method: str, path: str, body: Any = None,
                    timeout_s: float | None = None) -> Any:
        url = self.base_url + path
        try:
            status, text = await self._send(method, url, body, self._deadline(timeout_s))
            if status != 200:
                raise UpstreamError(self.name, status, error_message(status, text))
        except asyncio.TimeoutError:
            raise UpstreamTimeout(self.name, f"no answer to {path} within "
                                             f"{timeout_s or self.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:  # refused, reset, dropped mid-answer
            raise UpstreamDown(self.name, f"{path}: {exc.__class__.__name__}: {exc}") from None
        try:
            return json.loads(text)
        except ValueError:
            raise UpstreamError(self.name, 200, f"{path} answered with non-JSON: "
                                                f"{text[:200]!r}") from None

    def _field(self, data: Any, key: str, path: str) -> Any:
        if not isinstance(data, dict) or key not in data:
            raise UpstreamError(self.name, 200, f"{path} answered without '{key}'")
        return data[key]

    def _understood(self, path: str, parse: Callable[[], T]) -> T:
        """``parse()`` of an answer to ``path``; an answer of the wrong shape is an
        :class:`UpstreamError` (502 for the client, 503 until the server is sane at start-up),
        never an exception the proxy does not expect."""
        try:
            return parse()
        except _SHAPE_ERRORS as exc:
            raise UpstreamError(self.name, 200, f"{path} answer not understood: "
                                                f"{exc.__class__.__name__}: {exc}"[:300]) from None

    # -- server facts ---------------------------------------------------------------------

    async def health(self, timeout_s: float = 2.0) -> bool:
        """True when the server answers /health with 200 (loading or down: False)."""
        try:
            await self._call("GET", "/health", timeout_s=timeout_s)
            return True
        except UpstreamFailure:
            return False

    async def props(self, timeout_s: float | None = None) -> Props:
        """``/props`` and ``/v1/models``; an answer that cannot be read, or without a usable
        slot count and context size, is an :class:`UpstreamError` with status 503: the server
        is not ready (requests get 503 with Retry-After until it answers sanely)."""
        props = await self._call("GET", "/props", timeout_s=timeout_s)
        models = await self._call("GET", "/v1/models", timeout_s=timeout_s)
        try:
            parsed = self._understood("/props", lambda: parse_props(props, models))
        except UpstreamError as exc:
            raise UpstreamError(self.name, 503, exc.message) from None
        if parsed.total_slots < 1 or parsed.n_ctx < 1:
            raise UpstreamError(self.name, 503, f"/props answer not understood: "
                                                f"{parsed.total_slots} slots of {parsed.n_ctx} "
                                                "tokens")
        return parsed

    # -- text <-> tokens ------------------------------------------------------------------

    async def tokenize(self, text: str, *, add_special: bool = True,
                       parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` as the server tokenizes a prompt (BOS added, specials parsed)."""
        data = await self._call("POST", "/tokenize", {
            "content": text, "add_special": add_special, "parse_special": parse_special})
        tokens = self._field(data, "tokens", "/tokenize")
        return self._understood("/tokenize", lambda: [
            int(t["id"]) if isinstance(t, dict) else int(t) for t in tokens])

    async def tokenize_pieces(self, text: str) -> list[tuple[int, str]]:
        """``(id, piece)`` pairs without BOS, special tokens parsed (for probing a vocabulary)."""
        data = await self._call("POST", "/tokenize", {
            "content": text, "add_special": False, "parse_special": True, "with_pieces": True})
        tokens = self._field(data, "tokens", "/tokenize")
        return self._understood("/tokenize", lambda: [
            (int(t["id"]), t["piece"] if isinstance(t["piece"], str)
             else bytes(t["piece"]).decode("utf-8", "replace")) for t in tokens])

    async def detokenize(self, tokens: Sequence[int]) -> str:
        data = await self._call("POST", "/detokenize", {"tokens": list(tokens)})
        return str(self._field(data, "content", "/detokenize"))

    async def apply_template(self, messages: Sequence[Mapping[str, Any]],
                             extra: Mapping[str, Any] | None = None) -> str:
        """The prompt text the model's own chat template makes of ``messages``; ``extra``:
        other chat-request fields that shape it (tools, ``chat_template_kwargs``, ...)."""
        data = await self._call("POST", "/apply-template",
                                {**(extra or {}), "messages": list(messages)})
        return str(self._field(data, "prompt", "/apply-template"))

    # -- generation -----------------------------------------------------------------------

    async def complete(self, request: CompletionRequest,
                       timeout_s: float | None = None) -> Completion:
        """One non-streamed ``/completion``; a verify when ``request.prompt_logprobs > 0``."""
        data = await self._call("POST", "/completion", request.body(stream=False), timeout_s)
        return self._understood("/completion", lambda: parse_completion(data))

    async def complete_batch(self, requests: Sequence[CompletionRequest],
                             timeout_s: float | None = None) -> list[Completion]:
        """Several non-streamed ``/completion`` requests in ONE call, which the coordinator
        evaluates in one batch (patch 0004, docs/verify-api.md); the answers in order."""
        data = await self._call("POST", "/completion", [r.body(stream=False) for r in requests],
                                timeout_s)
        if not isinstance(data, list) or len(data) != len(requests):
            raise UpstreamError(self.name, 200, f"a batch of {len(requests)} completions "
                                                f"answered with {str(data)[:200]!r}")
        return self._understood("/completion", lambda: [parse_completion(item) for item in data])

    async def verify(self, context: Sequence[int], draft: Sequence[int], *, scored: int = 0,
                     sampling: SamplingParams = SamplingParams(temperature=0.0),
                     seed: int | None = None, n_probs: int = 1, id_slot: int = -1,
                     ignore_eos: bool = False, timeout_s: float | None = None) -> Completion:
        """Score ``draft`` after ``context`` in one pass (docs/verify-api.md): the answer's
        ``prompt_probs`` are the target's distributions at the last ``scored + len(draft)``
        prompt positions, and its one generated token is the target's token after the draft.
        ``scored`` extra positions cover context tokens whose entries are wanted too."""
        return await self.complete(CompletionRequest(
            prompt=[*context, *draft], n_predict=1, sampling=sampling, seed=seed,
            n_probs=n_probs, prompt_logprobs=scored + len(draft), id_slot=id_slot,
            ignore_eos=ignore_eos), timeout_s)

    async def stream(self, request: CompletionRequest,
                     chunk_timeout_s: float | None = None) -> AsyncGenerator[StreamChunk, None]:
        """A streamed ``/completion``; the deadline applies to each gap between chunks.

        Closing the generator early (``aclose``, cancellation) closes the connection, which
        makes llama-server stop generating for it.
        """
        url = self.base_url + "/completion"
        gap = chunk_timeout_s or self.timeout_s
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=gap, sock_read=gap)
        try:
            # Connection: close, as llama-server drops the connection after a streamed answer
            # although it announced keep-alive; a reused one would fail the next request.
            async with self._session.post(url, json=request.body(stream=True), timeout=timeout,
                                          headers={"Connection": "close"}) as resp:
                if resp.status != 200:
                    text = await resp.text(errors="replace")
                    raise UpstreamError(self.name, resp.status, error_message(resp.status, text))
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        if line.startswith(b"error:"):  # some server versions use this field
                            raise UpstreamError(self.name, 500, line[6:].decode(errors="replace"))
                        continue
                    data = json.loads(line[5:])
                    if not isinstance(data, dict) or not isinstance(data.get("content", ""), str):
                        raise ValueError(f"a streamed chunk that is not an object with text: "
                                         f"{line[5:105]!r}")
                    if "error" in data:
                        err = data["error"]
                        code, message = (err.get("code"), err.get("message", err)) \
                            if isinstance(err, dict) else (500, err)
                        raise UpstreamError(self.name, code if isinstance(code, int) else 500,
                                            str(message))
                    chunk = self._understood("/completion", functools.partial(parse_stream_chunk, data))
                    if chunk.stop:
                        break
                    yield chunk
                else:
                    raise UpstreamDown(self.name, "the stream ended without a final chunk")
                # Read to the end, so the connection goes back to the pool in a known state.
                await resp.read()
            yield chunk
        except asyncio.TimeoutError:
            raise UpstreamTimeout(self.name, f"no streamed data within {gap:g} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamDown(self.name, f"/completion stream: {exc.__class__.__name__}: "
                                          f"{exc}") from None
        except ValueError as exc:
            raise UpstreamError(self.name, 200, f"malformed streamed chunk: {exc}") from None

    # -- the OpenAI-compatible endpoints --------------------------------------------------

    async def openai(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """One non-streamed ``/v1/chat/completions`` or ``/v1/completions`` answer, as is."""
        data = await self._call("POST", path, dict(body, stream=False))
        if not isinstance(data, dict):
            raise UpstreamError(self.name, 200, f"{path} answered with {str(data)[:200]!r}")
        return data

    async def openai_stream(self, path: str, body: Mapping[str, Any],
                            chunk_timeout_s: float | None = None
                            ) -> AsyncGenerator[dict[str, Any], None]:
        """A streamed ``/v1/chat/completions`` or ``/v1/completions`` answer, chunk by chunk
        as the server sends them, until its ``[DONE]``; the deadline applies to each gap."""
        url = self.base_url + path
        gap = chunk_timeout_s or self.timeout_s
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=gap, sock_read=gap)
        try:
            # Connection: close, as for /completion streams (see stream()).
            async with self._session.post(url, json=dict(body, stream=True), timeout=timeout,
                                          headers={"Connection": "close"}) as resp:
                if resp.status != 200:
                    text = await resp.text(errors="replace")
                    raise UpstreamError(self.name, resp.status, error_message(resp.status, text))
                async for raw in resp.content:
                    event = parse_openai_event(raw)
                    if event is None:
                        continue
                    if isinstance(event, str):  # [DONE]
                        break
                    if failed := openai_error(event):
                        raise UpstreamError(self.name, *failed)
                    yield event
                else:
                    raise UpstreamDown(self.name, f"the {path} stream ended without [DONE]")
                await resp.read()
        except asyncio.TimeoutError:
            raise UpstreamTimeout(self.name, f"no streamed data within {gap:g} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamDown(self.name, f"{path} stream: {exc.__class__.__name__}: "
                                          f"{exc}") from None
        except ValueError as exc:
            raise UpstreamError(self.name, 200, f"malformed streamed chunk: {exc}") from None

    async def forward(self, path: str, body: Any) -> tuple[int, Any]:
        """POST ``body`` to ``path`` and return the status and JSON answer whatever the status
        (for routes the proxy passes on as they are: embeddings, tokenize, detokenize)."""
        try:
            status, text = await self._send("POST", self.base_url + path, body,
                                            self._deadline(None))
        except asyncio.TimeoutError:
            raise UpstreamTimeout(self.name, f"no answer to {path} within "
                                             f"{self.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamDown(self.name, f"{path}: {exc.__class__.__name__}: {exc}") from None
        try:
            return status, json.loads(text)
        except ValueError:
            if status == 200:
                raise UpstreamError(self.name, 200, f"{path} answered with non-JSON: "
                                                    f"{text[:200]!r}") from None
            return status, {"error": {"message": error_message(status, text), "code": status}}
