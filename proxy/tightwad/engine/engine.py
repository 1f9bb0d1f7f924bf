"""The request loop; no HTTP here.

:meth:`Engine.generate` takes token ids and yields events: :class:`TextDelta` (text that may be
sent, with the tokens it came from), then :class:`Finished` (reason, usage, statistics) or
:class:`Failed` (what went wrong, with the HTTP status it deserves). It validates the prompt,
leases a target slot for the request's lifetime (so a slot's prompt cache holds exactly that
request's context; more requests than slots queue), then dispatches: remote mode runs
speculation rounds (:class:`tightwad.engine.rounds.SpeculativeRun`, k from what earlier
requests learned: :mod:`tightwad.engine.learning`); when speculation is
impossible (tokenizer mismatch, a coordinator without the verify patch) and in the native and
off modes, the request is passed through as one streamed target ``/completion``. Upstream
failures become :class:`Failed` (:func:`failure`). Every statistic goes to
:class:`tightwad.engine.telemetry.Telemetry`.

Before a request starts, :meth:`Engine.admit` says whether the target takes its prompt and how
many tokens it may generate (so the API can answer 4xx, or open a stream at once, before the
request waits for a slot). A request whose fields speculation cannot keep exact (tools,
grammars, log-probabilities, penalties, ...) goes to the coordinator's own OpenAI endpoint
with its leased slot (:meth:`Engine.forward_openai`), the reasons counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tightwad import defaults
from tightwad.config import Config
from tightwad.decoding.acceptance import VerifyMismatch
from tightwad.decoding.detok import StopMatcher
from tightwad.engine.events import Event, Failed, Finished, Forwarded, GenerationRequest, TextDelta
from tightwad.engine.learning import Learning
from tightwad.engine.rounds import SpeculativeRun
from tightwad.engine.servers import Servers, TargetInfo
from tightwad.engine.telemetry import RequestStats, Telemetry
from tightwad.llamaserver.wire import (
    CompletionRequest,
    UpstreamDown,
    UpstreamError,
    UpstreamFailure,
    UpstreamTimeout,
    openai_finish,
    openai_usage,
)

__all__ = ["Admission", "Engine", "Event", "Failed", "Finished", "Forwarded",
           "GenerationRequest", "TextDelta", "failure"]

log = logging.getLogger("tightwad.engine.engine")


_PARTS = {"target": "the coordinator", "drafter": "the drafter"}


def failure(exc: UpstreamFailure) -> Failed:
    """How an upstream failure reaches the client: which part failed and how, never its
    address (that, and the whole detail, goes to the proxy's log)."""
    part = _PARTS.get(exc.server, "a model server")
    log.warning("%s failed: %s", part, exc)
    if isinstance(exc, UpstreamDown):
        return Failed(503, f"{part} is unavailable (no connection); retry shortly",
                      "upstream_unavailable", retry_after=5.0)
    if isinstance(exc, UpstreamTimeout):
        return Failed(503, f"{part} did not answer in time; retry shortly",
                      "upstream_unavailable", retry_after=5.0)
    if isinstance(exc, UpstreamError) and exc.status == 503:
        return Failed(503, f"{part} is not ready (loading, busy, or not answering sanely); "
                           "retry shortly",
                      "upstream_unavailable", retry_after=5.0)
    if isinstance(exc, UpstreamError) and 400 <= exc.status < 500:
        return Failed(400, f"{part} refused the request: {exc.message}",
                      "upstream_rejected")
    if isinstance(exc, UpstreamError) and exc.status == 200:  # an answer of the wrong shape
        return Failed(502, f"{part} gave an answer that could not be understood; see the "
                           "proxy's log", "bad_upstream_response")
    status = f" (HTTP {exc.status})" if isinstance(exc, UpstreamError) else ""
    return Failed(502, f"{part} failed{status}; see the proxy's log", "upstream_error")


def _queue_full(waiting: int, limit: int) -> Failed:
    return Failed(429, f"every coordinator slot is busy and {waiting} requests already wait "
                       f"(limits.max_queued {limit}); retry shortly", "queue_full",
                  retry_after=5.0)


def _queue_timeout(seconds: float) -> Failed:
    return Failed(503, f"no coordinator slot became free within {seconds:g} s "
                       "(limits.queue_timeout_s); retry shortly", "queue_timeout",
                  retry_after=5.0)


# What reading an answer of the wrong shape raises (null where a number belongs, ...).
_SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


_INPUTS = {"image_url": ("vision", "images"), "input_audio": ("audio", "audio")}


@dataclass(frozen=True)
class Admission:
    """The target takes the prompt: how many tokens the request may generate."""

    max_tokens: int
    requested: int | None
    clamped_by: str | None
    """Why ``max_tokens`` is less than requested: ``limits.max_tokens_cap`` or ``context``
    (None: not clamped)."""


def _refusal(request: GenerationRequest, info: TargetInfo) -> Failed | None:
    """Why the target cannot take this prompt at all, if it cannot."""
    return _prompt_refusal(request.prompt, info)


def _input_refusal(info: TargetInfo, inputs: Collection[str]) -> Failed | None:
    """Content parts beyond text that the served model does not take."""
    for part in inputs:
        modality, what = _INPUTS.get(part, (None, ""))
        if modality is not None and modality not in info.props.modalities:
            return Failed(400, f"the served model does not take {what} ({part} content "
                               "parts)", "unsupported_input")
    return None


def _prompt_refusal(prompt: Sequence[int], info: TargetInfo,
                    inputs: Collection[str] = ()) -> Failed | None:
    if len(prompt) >= info.props.n_ctx:
        return Failed(400, f"the prompt has {len(prompt)} tokens but the model's "
                           f"context per slot is {info.props.n_ctx}; shorten it",
                      "context_length_exceeded")
    if refused := _input_refusal(info, inputs):
        return refused
    n_vocab = info.props.n_vocab
    if n_vocab and any(t >= n_vocab for t in prompt):
        return Failed(400, f"the prompt holds token ids outside the vocabulary "
                           f"(0..{n_vocab - 1})", "invalid_token")
    return None


class Engine:
    """The proxy's generation side: request loops over :class:`Servers`, statistics in
    :class:`Telemetry`."""

    def __init__(self, config: Config, servers: Servers | None = None) -> None:
        self.config = config
        self.servers = servers or Servers(config)
        self.telemetry = Telemetry(lambda: self.servers.speculation_active)
        self.learning = Learning(config.speculation, self.telemetry)
        self._health: tuple[float, bool] | None = None
        self._health_look: asyncio.Future[bool] | None = None

    async def start(self) -> None:
        await self.servers.start()

    async def close(self) -> None:
        await self.servers.close()

    # -- for the API ----------------------------------------------------------------------

    async def healthy(self) -> bool:
        """The target answers its health check: looked at most once per
        ``defaults.HEALTH_CACHE_S``, and concurrent callers share one look (polling /health
        must not cost the coordinator a call per poll)."""
        if self._health is not None and \
                time.monotonic() - self._health[0] < defaults.HEALTH_CACHE_S:
            return self._health[1]
        if self._health_look is None or self._health_look.done():
            self._health_look = asyncio.ensure_future(self._look_at_health())
        return await asyncio.shield(self._health_look)

    async def _look_at_health(self) -> bool:
        healthy = await self.servers.target_healthy()
        self._health = (time.monotonic(), healthy)
        return healthy

    def queue_refusal(self) -> Failed | None:
        """429 when a request arriving now would wait for a coordinator slot behind
        ``limits.max_queued`` others (asked before its body is even read, and again when it
        would queue)."""
        pool = self.servers.target_slots
        limit = self.config.limits.max_queued
        if pool is not None and pool.busy and pool.waiting >= limit:
            return _queue_full(pool.waiting, limit)
        return None

    def slot_wanted(self) -> bool:
        """A request waits for a coordinator slot now."""
        pool = self.servers.target_slots
        return pool is not None and pool.waiting > 0

    async def _lease(self, prompt: Sequence[int]) -> int | Failed:
        """A coordinator slot, or why not: the queue is full, or none came free within
        ``limits.queue_timeout_s``."""
        if refused := self.queue_refusal():
            return refused
        limit_s = self.config.limits.queue_timeout_s
        with self.telemetry.waiting_for_slot(len(prompt)):
            try:
                return await asyncio.wait_for(self.servers.lease_target_slot(prompt), limit_s)
            except asyncio.TimeoutError:
                return _queue_timeout(limit_s)

    @property
    def speculation_active(self) -> bool:
        return self.servers.speculation_active

    async def tokenize(self, text: str) -> list[int]:
        return await self.servers.tokenize(text)

    async def render_chat(self, messages: Sequence[Mapping[str, object]],
                          extra: Mapping[str, Any] | None = None) -> list[int]:
        """The target's own chat template, tokenized once (docs/architecture.md)."""
        return (await self.chat_prompt(messages, extra))[1]

    async def chat_prompt(self, messages: Sequence[Mapping[str, object]],
                          extra: Mapping[str, Any] | None = None) -> tuple[str, list[int]]:
        """The prompt text the target's chat template makes of ``messages`` (with ``extra``
        request fields that shape it: tools, ``chat_template_kwargs``), and its tokens."""
        prompt = await self.servers.apply_template(messages, extra)
        return prompt, await self.tokenize(prompt)

    async def chat_template(self) -> str:
        """The target's chat template source."""
        return (await self.servers.target_info()).props.chat_template

    async def model_card(self) -> tuple[str, int, Mapping[str, Any]]:
        """The served model: its name, the context one request may use, the target's meta."""
        info = await self.servers.target_info()
        return await self.model_name(), info.props.n_ctx, info.props.meta

    async def forward(self, path: str, body: Any) -> tuple[int, Any]:
        """A target route passed on as it is (embeddings, tokenize, detokenize)."""
        return await self.servers.forward(path, body)

    async def refuse_inputs(self, inputs: Collection[str]) -> Failed | None:
        """Why the target cannot take content parts of the kinds ``inputs`` names (images,
        audio), if it cannot: asked before the prompt is rendered, which would fail."""
        return _input_refusal(await self.servers.target_info(), inputs)

    async def admit(self, prompt: Sequence[int], max_tokens: int | None,
                    inputs: Collection[str] = ()) -> Admission | Failed:
        """Whether the target takes ``prompt`` (and content parts of the kinds ``inputs``
        names), and how many tokens the request may generate: ``max_tokens`` (None: until the
        end of the context) within ``limits.max_tokens_cap`` and the context."""
        info = await self.servers.target_info()
        if refused := _prompt_refusal(prompt, info, inputs):
            return refused
        room = info.props.n_ctx - len(prompt)
        cap = self.config.limits.max_tokens_cap
        granted = min(room, cap) if cap is not None else room
        if max_tokens is not None:
            granted = min(granted, max_tokens)
        clamped = None
        if granted < (max_tokens if max_tokens is not None else room):
            clamped = "limits.max_tokens_cap" if cap is not None and granted == cap \
                else "context"
        return Admission(granted, max_tokens, clamped)

    async def model_name(self) -> str:
        info = await self.servers.target_info()
        name = info.props.model.replace("\\", "/").rsplit("/", 1)[-1]
        return name.removesuffix(".gguf") or "tightwad"

    def status(self) -> dict:
        return {**self.servers.status(), "speculation": self.learning.status(),
                "stats": self.telemetry.status(),
                "passed_through": self.telemetry.passed_through()}

    # -- generation -----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        """Run one request; always ends with :class:`Finished` or :class:`Failed`."""
        telemetry = self.telemetry
        stats = telemetry.request_started(self.config.speculation.mode)
        started = time.monotonic()
        slot: int | None = None
        try:
            info = await self.servers.target_info()
            leased = _refusal(request, info) or await self._lease(request.prompt)
            if isinstance(leased, Failed):
                telemetry.request_failed()
                yield leased
                return
            slot = leased
            telemetry.slot_taken(stats, time.monotonic() - started)
            if self.servers.speculation_possible(info):
                stats.speculative = self.servers.speculation_active
                learned = self.learning.pair(info.props.model, self.servers.drafter_model,
                                             info.verify_limit)
                events = SpeculativeRun(self.servers, telemetry, self.config.speculation,
                                        request, info, slot, stats, learned).events()
            else:
                events = self._passthrough(request, info, slot, stats)
            # aclosing: a client that goes away closes this generator, and that must close the
            # inner one at once (its finally frees the drafter slot and upstream streams).
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Finished):
                        telemetry.request_finished(stats, time.monotonic() - started)
                    yield event
        except UpstreamFailure as exc:
            telemetry.request_failed()
            yield failure(exc)
        except VerifyMismatch as exc:
            telemetry.request_failed()
            log.error("inconsistent verify answer: %s", exc)
            yield Failed(502, f"the coordinator's verify answer was inconsistent: {exc}",
                         "bad_upstream_response")
        finally:
            if slot is not None:
                self.servers.release_target_slot(slot, request.prompt)
                telemetry.slot_released()

    async def _passthrough(self, request: GenerationRequest, info: TargetInfo, slot: int,
                           stats: RequestStats) -> AsyncGenerator[Event, None]:
        matcher = StopMatcher(request.stop)
        stream = self.servers.stream(CompletionRequest(
            prompt=request.prompt, n_predict=min(request.max_tokens,
                                                 info.props.n_ctx - len(request.prompt)),
            sampling=request.sampling, seed=request.sampling.seed, id_slot=slot,
            ignore_eos=request.ignore_eos))
        try:
            async for chunk in stream:
                count = max(0, chunk.n_predicted - stats.tokens)
                self.telemetry.on_tokens(stats, count)
                scan = matcher.push(chunk.content)
                if scan.text or count:
                    yield TextDelta(scan.text, chunk.tokens, count)
                if scan.stopped or chunk.stop:
                    tail = "" if scan.stopped else matcher.flush()
                    if tail:
                        yield TextDelta(tail, ())
                    reason = ("stop" if scan.stopped or chunk.stop_type in ("eos", "word")
                              else "length")
                    yield Finished(reason, len(request.prompt), stats.tokens, stats)
                    return
        finally:
            await stream.aclose()

    async def forward_openai(self, path: str, body: Mapping[str, Any], prompt: Sequence[int],
                             reasons: Sequence[str], stream: bool
                             ) -> AsyncGenerator[Forwarded | Finished | Failed, None]:
        """A request passed through to the target's own OpenAI endpoint (``path``) on a
        leased slot, unspeculated, for ``reasons``: its chunks (or whole answer) as
        :class:`Forwarded`, then :class:`Finished` or :class:`Failed`."""
        telemetry = self.telemetry
        stats = telemetry.request_started(self.config.speculation.mode)
        telemetry.on_pass_through(reasons)
        started = time.monotonic()
        slot: int | None = None
        try:
            await self.servers.target_info()
            leased = await self._lease(prompt)
            if isinstance(leased, Failed):
                telemetry.request_failed()
                yield leased
                return
            slot = leased
            telemetry.slot_taken(stats, time.monotonic() - started)
            sent = {**body, "id_slot": slot}
            finish: str | None = None
            use: tuple[int, int] | None = None
            if stream:
                chunks = self.servers.openai_stream(path, sent)
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        finish = openai_finish(chunk) or finish
                        use = openai_usage(chunk) or use
                        yield Forwarded(chunk)
            else:
                answer = await self.servers.openai(path, sent)
                finish, use = openai_finish(answer), openai_usage(answer)
                yield Forwarded(answer)
            prompt_n, completion_n = use or (len(prompt), 0)
            telemetry.on_tokens(stats, completion_n)
            telemetry.request_finished(stats, time.monotonic() - started)
            yield Finished(finish or "stop", prompt_n, completion_n, stats)
        except UpstreamFailure as exc:
            telemetry.request_failed()
            yield failure(exc)
        except _SHAPE_ERRORS as exc:  # finish_reason or usage of the wrong shape
            telemetry.request_failed()
            yield failure(UpstreamError("target", 200, f"{path}: {exc!r}"))
        finally:
            if slot is not None:
                self.servers.release_target_slot(slot, prompt)
                telemetry.slot_released()
