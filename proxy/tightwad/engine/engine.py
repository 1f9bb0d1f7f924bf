"""The request loop; no HTTP here.

:meth:`Engine.generate` takes token ids and yields events: :class:`TextDelta` (text that may be
sent, with the tokens it came from), then :class:`Finished` (reason, usage, statistics) or
:class:`Failed` (what went wrong, with the HTTP status it deserves). It validates the prompt,
leases a target slot for the request's lifetime (so a slot's prompt cache holds exactly that
request's context; more requests than slots queue), then dispatches: remote mode runs
speculation rounds (:class:`tightwad.engine.rounds.SpeculativeRun`); when speculation is
impossible (tokenizer mismatch, a coordinator without the verify patch) and in the native and
off modes, the request is passed through as one streamed target ``/completion``. Upstream
failures become :class:`Failed` (:func:`failure`). Every statistic goes to
:class:`tightwad.engine.telemetry.Telemetry`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Mapping, Sequence

from tightwad.config import Config
from tightwad.decoding.acceptance import VerifyMismatch
from tightwad.decoding.detok import StopMatcher
from tightwad.engine.events import Event, Failed, Finished, GenerationRequest, TextDelta
from tightwad.engine.rounds import SpeculativeRun
from tightwad.engine.servers import Servers, TargetInfo
from tightwad.engine.telemetry import RequestStats, Telemetry
from tightwad.llamaserver.wire import (
    CompletionRequest,
    UpstreamDown,
    UpstreamError,
    UpstreamFailure,
    UpstreamTimeout,
)

__all__ = ["Engine", "Event", "Failed", "Finished", "GenerationRequest", "TextDelta", "failure"]

log = logging.getLogger("tightwad.engine.engine")


def failure(exc: UpstreamFailure) -> Failed:
    """How an upstream failure reaches the client."""
    if isinstance(exc, (UpstreamDown, UpstreamTimeout)) or (
            isinstance(exc, UpstreamError) and exc.status == 503):
        return Failed(503, f"the model server is unavailable ({exc}); retry shortly",
                      "upstream_unavailable", retry_after=5.0)
    if isinstance(exc, UpstreamError) and 400 <= exc.status < 500:
        return Failed(400, f"the model server refused the request: {exc.message}",
                      "upstream_rejected")
    return Failed(502, f"the model server failed: {exc}", "upstream_error")


def _refusal(request: GenerationRequest, info: TargetInfo) -> Failed | None:
    """Why the target cannot take this prompt at all, if it cannot."""
    if len(request.prompt) >= info.props.n_ctx:
        return Failed(400, f"the prompt has {len(request.prompt)} tokens but the model's "
                           f"context per slot is {info.props.n_ctx}; shorten it",
                      "context_length_exceeded")
    n_vocab = info.props.n_vocab
    if n_vocab and any(t >= n_vocab for t in request.prompt):
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

    async def start(self) -> None:
        await self.servers.start()

    async def close(self) -> None:
        await self.servers.close()

    # -- for the API ----------------------------------------------------------------------

    async def healthy(self) -> bool:
        """The target answers its health check."""
        return await self.servers.target_healthy()

    @property
    def speculation_active(self) -> bool:
        return self.servers.speculation_active

    async def tokenize(self, text: str) -> list[int]:
        return await self.servers.tokenize(text)

    async def render_chat(self, messages: Sequence[Mapping[str, object]]) -> list[int]:
        """The target's own chat template, tokenized once (docs/architecture.md)."""
        prompt = await self.servers.apply_template(messages)
        return await self.tokenize(prompt)

    async def model_name(self) -> str:
        info = await self.servers.target_info()
        name = info.props.model.replace("\\", "/").rsplit("/", 1)[-1]
        return name.removesuffix(".gguf") or "tightwad"

    def status(self) -> dict:
        return {**self.servers.status(), "stats": self.telemetry.status()}

    # -- generation -----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        """Run one request; always ends with :class:`Finished` or :class:`Failed`."""
        telemetry = self.telemetry
        stats = telemetry.request_started(self.config.speculation.mode)
        started = time.monotonic()
        slot: int | None = None
        try:
            info = await self.servers.target_info()
            if refused := _refusal(request, info):
                telemetry.request_failed()
                yield refused
                return
            with telemetry.waiting_for_slot(len(request.prompt)):
                slot = await self.servers.lease_target_slot(request.prompt)
            telemetry.slot_taken(stats, time.monotonic() - started)
            if self.servers.speculation_possible(info):
                stats.speculative = self.servers.speculation_active
                events = SpeculativeRun(self.servers, telemetry, self.config.speculation,
                                        request, info, slot, stats).events()
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
