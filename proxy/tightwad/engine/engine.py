"""One request's decode loop; no HTTP here.

:meth:`Engine.generate` takes token ids and yields events: :class:`TextDelta` (text that may be
sent, with the tokens it came from), then :class:`Finished` (reason, usage, statistics) or
:class:`Failed` (what went wrong, with the HTTP status it deserves).

Remote mode (DESIGN section 3): per round, draft k tokens on the drafter, verify them in one
target pass (``prompt_logprobs``, docs/verify-api.md), accept with :mod:`tightwad.decoding.acceptance`, emit.
k adapts per request (:class:`tightwad.decoding.speculation.AdaptiveK`). A drafter that is down, slow past
``drafter.timeout_s``, busy or erroring costs speed only: the round runs target-only (one token
from the target, a counted fallback), and drafting resumes once the drafter answers again
(:class:`tightwad.engine.upstream.DrafterGate`). When speculation is impossible (tokenizer mismatch, a
coordinator without the verify patch) and in the native and off modes, a request is passed
through as one streamed target ``/completion``.

Each request leases its own target slot (and a drafter slot when one is free) for its lifetime,
so a slot's prompt cache holds exactly that request's context; more requests than slots queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from tightwad.config import Config
from tightwad.decoding.acceptance import VerifyMismatch, decide_round, usable_draft
from tightwad.decoding.detok import StopMatcher
from tightwad.decoding.sampling import Rng, SamplingParams, SparseDist
from tightwad.decoding.speculation import AcceptanceEstimate, AdaptiveK, round_timed
from tightwad.decoding.transcript import Transcript
from tightwad.engine.events import Event, Failed, Finished, GenerationRequest, TextDelta
from tightwad.engine.metrics import Metrics
from tightwad.engine.stats import GlobalStats, RequestStats
from tightwad.engine.upstream import TargetInfo, Upstream
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


@dataclass
class _Draft:
    tokens: list[int] = field(default_factory=list)
    q: list[SparseDist] = field(default_factory=list)
    seconds: float | None = None


class Engine:
    """The proxy's generation side: decode loops over :class:`~tightwad.engine.upstream.Upstream`."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.stats = GlobalStats()
        self.up = Upstream(config, self.metrics)

    async def start(self) -> None:
        await self.up.start()

    async def close(self) -> None:
        await self.up.close()

    # -- for the API ----------------------------------------------------------------------

    async def tokenize(self, text: str) -> list[int]:
        assert self.up.target is not None
        return await self.up.call_target(self.up.target.tokenize(text))

    async def render_chat(self, messages: Sequence[dict]) -> list[int]:
        """The target's own chat template, tokenized once (DESIGN section 3, step 2)."""
        assert self.up.target is not None
        prompt = await self.up.call_target(self.up.target.apply_template(messages))
        return await self.tokenize(prompt)

    async def model_name(self) -> str:
        info = await self.up.target_info()
        name = info.props.model.replace("\\", "/").rsplit("/", 1)[-1]
        return name.removesuffix(".gguf") or "tightwad"

    def status(self) -> dict:
        return {**self.up.status(), "stats": self.stats.as_dict()}

    # -- generation -----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Run one request; always ends with :class:`Finished` or :class:`Failed`."""
        stats = RequestStats(mode=self.config.speculation.mode)
        started = time.monotonic()
        self.stats.requests += 1
        slots = None
        slot = -1
        try:
            info = await self.up.target_info()
            if len(request.prompt) >= info.props.n_ctx:
                self.stats.failed += 1
                yield Failed(400, f"the prompt has {len(request.prompt)} tokens but the model's "
                                  f"context per slot is {info.props.n_ctx}; shorten it",
                             "context_length_exceeded")
                return
            n_vocab = info.props.n_vocab
            if n_vocab and any(t >= n_vocab for t in request.prompt):
                self.stats.failed += 1
                yield Failed(400, f"the prompt holds token ids outside the vocabulary "
                                  f"(0..{n_vocab - 1})", "invalid_token")
                return
            slots = self.up.target_slots
            assert slots is not None
            self.metrics.prompt_tokens.inc(len(request.prompt))
            self.metrics.queued.inc()
            try:
                slot = await slots.acquire(request.prompt)
            finally:
                self.metrics.queued.dec()
            stats.queued_seconds = time.monotonic() - started
            self.metrics.in_flight.inc()
            if self.up.speculation_possible(info):
                events = self._remote(request, info, slot, stats)
            else:
                events = self._passthrough(request, info, slot, stats)
            # aclosing: a client that goes away closes this generator, and that must close the
            # inner one at once (its finally frees the drafter slot and upstream streams).
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Finished):
                        stats.elapsed_seconds = time.monotonic() - started
                    yield event
        except UpstreamFailure as exc:
            self.stats.failed += 1
            if isinstance(exc, UpstreamDown) and exc.server == "target":
                self.up.target_lost()
            yield failure(exc)
        except VerifyMismatch as exc:
            self.stats.failed += 1
            log.error("inconsistent verify answer: %s", exc)
            yield Failed(502, f"the coordinator's verify answer was inconsistent: {exc}",
                         "bad_upstream_response")
        finally:
            if slots is not None and slot >= 0:
                slots.release(slot, request.prompt)
                self.metrics.in_flight.dec()

    async def _passthrough(self, request: GenerationRequest, info: TargetInfo, slot: int,
                           stats: RequestStats) -> AsyncIterator[Event]:
        assert self.up.target is not None
        matcher = StopMatcher(request.stop)
        stream = self.up.target.stream(CompletionRequest(
            prompt=request.prompt, n_predict=min(request.max_tokens,
                                                 info.props.n_ctx - len(request.prompt)),
            sampling=request.sampling, seed=request.sampling.seed, id_slot=slot,
            ignore_eos=request.ignore_eos), chunk_timeout_s=self.config.target.timeout_s)
        try:
            async for chunk in stream:
                count = max(0, chunk.n_predicted - stats.tokens)
                stats.tokens += count
                self.metrics.on_tokens(count)
                scan = matcher.push(chunk.content)
                if scan.text or count:
                    yield TextDelta(scan.text, chunk.tokens, count)
                if scan.stopped or chunk.stop:
                    tail = "" if scan.stopped else matcher.flush()
                    if tail:
                        yield TextDelta(tail, ())
                    self.stats.tokens += stats.tokens
                    reason = ("stop" if scan.stopped or chunk.stop_type in ("eos", "word")
                              else "length")
                    yield Finished(reason, len(request.prompt), stats.tokens, stats)
                    return
        finally:
            await stream.aclose()

    async def _remote(self, request: GenerationRequest, info: TargetInfo, slot: int,
                      stats: RequestStats) -> AsyncIterator[Event]:
        target = self.up.target
        assert target is not None
        cfg = self.config.speculation
        params = request.sampling
        rng = Rng(params.seed)
        banned = info.eog if request.ignore_eos else frozenset()
        # Greedy needs only the argmax; sampling needs lists in which the chain's cut is exact.
        if params.greedy:
            n_probs = 1 + len(banned)
        elif 0 < params.top_k <= cfg.n_probs:
            n_probs = params.top_k + len(banned)
        else:
            n_probs = cfg.n_probs
        k_max = max(1, min(cfg.k_max, info.verify_limit))
        k_min = min(cfg.k_min, k_max)
        # A seeded sampling request keeps k fixed: k follows measured timings, and the random
        # stream a round consumes depends on k, so an adaptive k would make seeds irreproducible.
        adaptive = cfg.adaptive and (params.greedy or params.seed is None)
        control = AdaptiveK(k=max(k_min, min(cfg.k_initial, k_max)), k_min=k_min, k_max=k_max,
                            adaptive=adaptive, acceptance=AcceptanceEstimate.with_prior())
        stats.speculative = self.up.speculation_active
        out = Transcript(request.max_tokens, request.stop,
                         frozenset() if request.ignore_eos else info.eog)
        context = list(request.prompt)
        draft_slot: int | None = None
        may_draft = True  # False once this request's drafting is hopeless (e.g. a mismatch)
        target_only_next = False
        appended = 0  # tokens added to the context by the last round
        try:
            while True:
                room = info.props.n_ctx - len(context)
                if out.count >= request.max_tokens or room <= 0:
                    async for event in self._finish(out, "length", context, slot, stats,
                                                  len(request.prompt)):
                        yield event
                    return
                pending = len(out.pending)
                k = min(control.k, request.max_tokens - out.count - 1, room - 1,
                        info.verify_limit - pending)
                draft = _Draft()
                if k > 0 and may_draft and not target_only_next:
                    if draft_slot is None and self.up.drafter_slots is not None:
                        draft_slot = self.up.drafter_slots.try_acquire(request.prompt)
                    draft, may_draft = await self._draft(context, k, params, n_probs, banned,
                                                         draft_slot, rng, stats)
                target_only_next = False

                seed = None if params.greedy else int(rng.uniform() * 2 ** 32)
                t0 = time.monotonic()
                verify = await self.up.call_target(target.verify(
                    context, draft.tokens, scored=pending, sampling=params, seed=seed,
                    n_probs=n_probs, id_slot=slot, ignore_eos=request.ignore_eos))
                verify_s = time.monotonic() - t0
                if pending:  # the bytes of last round's final token, scored as a prompt token
                    text, stopped = out.resolve(verify.prompt_probs[:pending])
                    verify = dataclasses.replace(verify, prompt_probs=verify.prompt_probs[pending:])
                    if text:
                        yield TextDelta(text, ())
                    if stopped:
                        async for event in self._finish(out, "stop", context, slot, stats,
                                                  len(request.prompt)):
                            yield event
                        return
                outcome = decide_round(draft.tokens, draft.q, verify, params, rng, n_probs, banned)
                target_only_next = outcome.cut

                drafted = len(draft.tokens)
                if drafted:
                    timed = round_timed(stats.rounds, verify.timings.prompt_n, drafted,
                                        appended, pending)
                    control = control.observe(drafted, outcome.accepted, draft.seconds or 0.0,
                                              verify_s, timed=timed)
                    stats.drafted += drafted
                    stats.accepted += outcome.accepted
                stats.rounds += 1
                stats.verify_seconds += verify_s
                stats.draft_seconds += draft.seconds or 0.0
                stats.last_k, stats.alpha = control.k, control.acceptance.mean
                self.metrics.on_round(drafted, outcome.accepted, draft.seconds, verify_s)

                taken = out.take(outcome.tokens, outcome.token_bytes)
                reason = taken.reason
                context.extend(taken.tokens)
                appended = len(taken.tokens)
                stats.tokens += len(taken.tokens)
                self.stats.add_round(drafted, outcome.accepted, len(taken.tokens),
                                     draft.seconds, verify_s)
                self.metrics.on_tokens(len(taken.tokens))
                if taken.text or taken.tokens:
                    yield TextDelta(taken.text, taken.tokens)
                if reason is not None:
                    async for event in self._finish(out, reason, context, slot, stats,
                                                  len(request.prompt)):
                        yield event
                    return
        finally:
            if draft_slot is not None and self.up.drafter_slots is not None:
                self.up.drafter_slots.release(draft_slot, request.prompt)

    async def _finish(self, out: Transcript, reason: str, context: list[int], slot: int,
                      stats: RequestStats, prompt_tokens: int) -> AsyncIterator[Event]:
        if out.pending:  # the last token ended inside a character: ask for its bytes
            assert self.up.target is not None
            m = len(out.pending)
            res = await self.up.call_target(self.up.target.verify(context, [], scored=m,
                                                                  id_slot=slot))
            text, _ = out.resolve(res.prompt_probs[-m:])
            if text:
                yield TextDelta(text, ())
        if tail := out.finish():
            yield TextDelta(tail, ())
        yield Finished(reason, prompt_tokens, out.count, stats)

    async def _draft(self, context: list[int], k: int, params: SamplingParams, n_probs: int,
                     banned: frozenset[int], slot: int | None, rng: Rng,
                     stats: RequestStats) -> tuple[_Draft, bool]:
        """k tokens from the drafter, or an empty draft (a counted fallback) when it cannot.
        The flag says whether drafting is still worth trying for this request."""
        up = self.up
        assert up.drafter is not None
        seed = None if params.greedy else int(rng.uniform() * 2 ** 32)
        if not up.gate.open():
            return self._fallback("down", stats), True
        if not await up.drafter_usable():
            if up.tokenizer_check is not None:  # a mismatch, found just now
                return _Draft(), False
            up.gate.failed(up.check_error)
            return self._fallback("down", stats), True
        if slot is None:
            return self._fallback("busy", stats), True
        t0 = time.monotonic()
        try:
            res = await up.drafter.complete(CompletionRequest(
                prompt=context, n_predict=k, sampling=params, seed=seed,
                n_probs=0 if params.greedy else n_probs, id_slot=slot, ignore_eos=bool(banned)),
                timeout_s=self.config.drafter.timeout_s)
        except UpstreamError as exc:
            if 400 <= exc.status < 500:  # about this request (e.g. the drafter's context)
                log.warning("drafter refused a draft (%s); the request goes on target-only",
                            exc.message)
                return self._fallback("refused", stats), False
            up.gate.failed(str(exc))
            return self._fallback("error", stats), True
        except UpstreamFailure as exc:
            if up.gate.failures == 0:
                log.warning("drafter unavailable (%s); decoding target-only until it answers",
                            exc)
            up.gate.failed(str(exc))
            return self._fallback("timeout" if isinstance(exc, UpstreamTimeout) else "down",
                                  stats), True
        if up.gate.succeeded():
            up.drafter_recovered()
            if not await up.drafter_usable():
                return _Draft(), up.tokenizer_check is None
        tokens, q = usable_draft(res, params, n_probs, banned)
        return _Draft(tokens[:k], q[:k], time.monotonic() - t0), True

    def _fallback(self, reason: str, stats: RequestStats) -> _Draft:
        stats.fallbacks += 1
        self.stats.fallbacks += 1
        self.metrics.on_fallback(reason)
        return _Draft()
