"""Async client for llama-server: the only module that knows llama-server's JSON.

Every call has a deadline. Failures surface as three exception types the engine and the API map
to behaviour: :class:`UpstreamDown` (no connection, or the connection dropped mid-answer: the
process is gone), :class:`UpstreamTimeout` (no answer within the deadline) and
:class:`UpstreamError` (an HTTP error status, with the server's own message).

Sampling requests pin the whole chain (``samplers`` plus neutral penalties, DRY, XTC, typical-p,
top-n-sigma and mirostat), so an operator's server flags cannot make the server sample from
another distribution than the one :mod:`tightwad.sampling` replays.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Sequence

import aiohttp

from tightwad.sampling import SamplingParams

# The stages tightwad.sampling replays, in llama.cpp's default order; "dist" is appended by the
# server itself.
SAMPLERS = ("top_k", "top_p", "min_p", "temperature")
_NEUTRAL = {
    "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "dry_multiplier": 0.0, "typical_p": 1.0, "xtc_probability": 0.0, "top_n_sigma": -1.0,
    "mirostat": 0, "dynatemp_range": 0.0, "min_keep": 0, "logit_bias": [],
    "post_sampling_probs": False,
}


class UpstreamFailure(Exception):
    """A llama-server did not give a usable answer. ``server`` names which one."""

    def __init__(self, server: str, message: str) -> None:
        super().__init__(f"{server}: {message}")
        self.server = server
        self.detail = message


class UpstreamDown(UpstreamFailure):
    """Connection refused, reset or dropped: the server is not running or just died."""


class UpstreamTimeout(UpstreamFailure):
    """The server did not answer within the call's deadline."""


class UpstreamError(UpstreamFailure):
    """The server answered with an HTTP error status."""

    def __init__(self, server: str, status: int, message: str) -> None:
        super().__init__(server, f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its natural-log probability under the raw (temperature 1) distribution."""

    id: int
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class Position:
    """One position of a sequence: the token that is there and the model's top-N at it."""

    token: TokenLogprob
    top: tuple[TokenLogprob, ...]

    def pairs(self) -> list[tuple[int, float]]:
        """``(id, logprob)`` of the top list, as :mod:`tightwad.sampling` takes it."""
        return [(t.id, t.logprob) for t in self.top]


@dataclass(frozen=True)
class Timings:
    cache_n: int = 0
    prompt_n: int = 0
    predicted_n: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0


@dataclass(frozen=True)
class Completion:
    """A finished ``/completion`` answer."""

    tokens: tuple[int, ...]
    content: str
    stop_type: str
    """``eos`` (an end-of-generation token, included in ``tokens``), ``limit``, ``word``, ``none``."""
    probs: tuple[Position, ...] = ()
    """One entry per generated token (when ``n_probs`` was asked for)."""
    prompt_probs: tuple[Position, ...] = ()
    """One entry per trailing prompt token (``prompt_logprobs``, the verify patch)."""
    has_prompt_probs: bool = False
    """The server returned the ``prompt_probabilities`` field at all (a stock server does not)."""
    id_slot: int = -1
    timings: Timings = Timings()


@dataclass(frozen=True)
class StreamChunk:
    """One streamed piece of a ``/completion`` answer; the last one has ``stop`` set."""

    content: str
    tokens: tuple[int, ...]
    """Ids the chunk names. llama-server sends no chunk for a token after which the text ends
    inside a character, and the next chunk names only its own token: count with
    ``n_predicted``, not with these."""
    stop: bool
    stop_type: str = ""
    n_predicted: int = 0
    """Tokens generated so far (cumulative)."""


@dataclass(frozen=True)
class CompletionRequest:
    """A ``/completion`` call on token ids."""

    prompt: Sequence[int]
    n_predict: int
    sampling: SamplingParams = SamplingParams(temperature=0.0)
    seed: int | None = None
    """The server's own RNG seed (independent of ``sampling.seed``, the proxy's)."""
    n_probs: int = 0
    prompt_logprobs: int = 0
    id_slot: int = -1
    cache_prompt: bool = True
    ignore_eos: bool = False

    def body(self, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": list(self.prompt), "n_predict": self.n_predict,
            "temperature": self.sampling.temperature, "top_k": self.sampling.top_k,
            "top_p": self.sampling.top_p, "min_p": self.sampling.min_p,
            "samplers": list(SAMPLERS), **_NEUTRAL,
            "n_probs": self.n_probs, "id_slot": self.id_slot, "cache_prompt": self.cache_prompt,
            "ignore_eos": self.ignore_eos, "return_tokens": True, "stream": stream,
        }
        if self.seed is not None:
            body["seed"] = self.seed & 0xFFFFFFFF
        if self.prompt_logprobs:  # absent otherwise, so a stock server sees a stock request
            body["prompt_logprobs"] = self.prompt_logprobs
        return body


@dataclass(frozen=True)
class Props:
    """What ``/props`` and ``/v1/models`` tell about a server and its model."""

    total_slots: int
    n_ctx: int
    """Context size of ONE slot."""
    model: str
    bos_token: str
    eos_token: str
    chat_template: str
    build_info: str
    n_vocab: int | None = None
    vocab_type: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


def _token(entry: Mapping[str, Any]) -> TokenLogprob:
    return TokenLogprob(id=int(entry["id"]), bytes=bytes(entry.get("bytes") or b""),
                        logprob=float(entry["logprob"]))


def _position(entry: Mapping[str, Any]) -> Position:
    return Position(token=_token(entry),
                    top=tuple(_token(t) for t in entry.get("top_logprobs") or ()))


def _timings(raw: Mapping[str, Any] | None) -> Timings:
    raw = raw or {}
    return Timings(cache_n=int(raw.get("cache_n", 0)), prompt_n=int(raw.get("prompt_n", 0)),
                   predicted_n=int(raw.get("predicted_n", 0)),
                   prompt_ms=float(raw.get("prompt_ms", 0.0)),
                   predicted_ms=float(raw.get("predicted_ms", 0.0)))


def parse_completion(data: Mapping[str, Any]) -> Completion:
    """A ``/completion`` JSON answer (non-streamed, or the final streamed chunk) as a dataclass."""
    prompt_probs = data.get("prompt_probabilities")
    return Completion(
        tokens=tuple(int(t) for t in data.get("tokens") or ()),
        content=str(data.get("content", "")),
        stop_type=str(data.get("stop_type", "none")),
        probs=tuple(_position(p) for p in data.get("completion_probabilities") or ()),
        prompt_probs=tuple(_position(p) for p in prompt_probs or ()),
        has_prompt_probs=prompt_probs is not None,
        id_slot=int(data.get("id_slot", -1)),
        timings=_timings(data.get("timings")),
    )


def _error_message(status: int, text: str) -> str:
    try:
        err = json.loads(text).get("error", {})
        return str(err.get("message") or err) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return text.strip()[:500] or f"status {status}"


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
                raise UpstreamError(self.name, status, _error_message(status, text))
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

    # -- server facts ---------------------------------------------------------------------

    async def health(self, timeout_s: float = 2.0) -> bool:
        """True when the server answers /health with 200 (loading or down: False)."""
        try:
            await self._call("GET", "/health", timeout_s=timeout_s)
            return True
        except UpstreamFailure:
            return False

    async def props(self, timeout_s: float | None = None) -> Props:
        props = await self._call("GET", "/props", timeout_s=timeout_s)
        models = await self._call("GET", "/v1/models", timeout_s=timeout_s)
        data = (models.get("data") or [{}])[0] if isinstance(models, dict) else {}
        meta = data.get("meta") or {}
        settings = props.get("default_generation_settings") or {}
        return Props(
            total_slots=int(props.get("total_slots", 1)),
            n_ctx=int(settings.get("n_ctx") or meta.get("n_ctx") or 0),
            model=str(data.get("id") or props.get("model_alias") or props.get("model_path", "")),
            bos_token=str(props.get("bos_token", "")), eos_token=str(props.get("eos_token", "")),
            chat_template=str(props.get("chat_template", "")),
            build_info=str(props.get("build_info", "")),
            n_vocab=meta.get("n_vocab"), vocab_type=meta.get("vocab_type"), meta=meta)

    # -- text <-> tokens ------------------------------------------------------------------

    async def tokenize(self, text: str, *, add_special: bool = True,
                       parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` as the server tokenizes a prompt (BOS added, specials parsed)."""
        data = await self._call("POST", "/tokenize", {
            "content": text, "add_special": add_special, "parse_special": parse_special})
        return [int(t["id"]) if isinstance(t, dict) else int(t)
                for t in self._field(data, "tokens", "/tokenize")]

    async def tokenize_pieces(self, text: str) -> list[tuple[int, str]]:
        """``(id, piece)`` pairs without BOS, special tokens parsed (for probing a vocabulary)."""
        data = await self._call("POST", "/tokenize", {
            "content": text, "add_special": False, "parse_special": True, "with_pieces": True})
        return [(int(t["id"]), t["piece"] if isinstance(t["piece"], str)
                 else bytes(t["piece"]).decode("utf-8", "replace"))
                for t in self._field(data, "tokens", "/tokenize")]

    async def detokenize(self, tokens: Sequence[int]) -> str:
        data = await self._call("POST", "/detokenize", {"tokens": list(tokens)})
        return str(self._field(data, "content", "/detokenize"))

    async def apply_template(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text the model's own chat template makes of ``messages``."""
        data = await self._call("POST", "/apply-template", {"messages": list(messages)})
        return str(self._field(data, "prompt", "/apply-template"))

    # -- generation -----------------------------------------------------------------------

    async def complete(self, request: CompletionRequest,
                       timeout_s: float | None = None) -> Completion:
        """One non-streamed ``/completion``; a verify when ``request.prompt_logprobs > 0``."""
        data = await self._call("POST", "/completion", request.body(stream=False), timeout_s)
        try:
            return parse_completion(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UpstreamError(self.name, 200, f"/completion answer not understood: "
                                                f"{exc!r}") from None

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
                     chunk_timeout_s: float | None = None) -> AsyncIterator[StreamChunk]:
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
                    raise UpstreamError(self.name, resp.status, _error_message(resp.status, text))
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        if line.startswith(b"error:"):  # some server versions use this field
                            raise UpstreamError(self.name, 500, line[6:].decode(errors="replace"))
                        continue
                    data = json.loads(line[5:])
                    if "error" in data:
                        err = data["error"]
                        raise UpstreamError(self.name, int(err.get("code", 500)),
                                            str(err.get("message", err)))
                    chunk = StreamChunk(content=str(data.get("content", "")),
                                        tokens=tuple(int(t) for t in data.get("tokens") or ()),
                                        stop=bool(data.get("stop")),
                                        stop_type=str(data.get("stop_type", "")),
                                        n_predicted=int(data.get("tokens_predicted", 0)))
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
