"""One remote-mode request as rounds of exact speculative decoding (docs/architecture.md).

Per round (:class:`SpeculativeRun`): plan k, draft k tokens on the drafter, verify them in one
target pass (``prompt_logprobs``, docs/verify-api.md), decide with
:func:`tightwad.decoding.acceptance.decide_round`, emit. k comes from what the requests of this
drafter/target pair learned, at the current load (:class:`tightwad.engine.learning.PairLearning`),
and every round teaches it. A round without a draft (drafting paused, or the drafter down,
slow, busy or erroring, see :meth:`tightwad.engine.servers.Servers.draft`) runs target-only: the
target's own next token, or, where the next rounds would not draft either, one streamed
generation that re-plans every ``TARGET_ONLY_BURST`` tokens and is cut when a draft may come
(:meth:`SpeculativeRun._target_only`). No HTTP here.

Overlapped drafting: while the target verifies a draft, the drafter continues it (the context
plus the whole draft, one token more than the next k). If the verify accepts every drafted token
and its own next token is the continuation's first, the rest is the next round's draft and that
round does not wait for the drafter. Otherwise the continuation is dropped. The draft is the
drafter's either way, so the output is what it is without overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from tightwad import defaults
from tightwad.config import SpeculationConfig
from tightwad.decoding.acceptance import Outcome, VerifyMismatch, decide_round, usable_draft
from tightwad.decoding.sampling import Rng, SamplingParams, SparseDist
from tightwad.decoding.speculation import round_timed
from tightwad.decoding.transcript import Transcript
from tightwad.engine.events import Event, Finished, GenerationRequest, TextDelta
from tightwad.engine.learning import PairLearning
from tightwad.engine.servers import NoDraft, Servers, TargetInfo
from tightwad.engine.telemetry import RequestStats, Round, Telemetry
from tightwad.llamaserver.wire import Completion, CompletionRequest, StreamChunk


@dataclass
class Draft:
    """The drafted tokens a round verifies (none: the round runs target-only)."""

    tokens: list[int] = field(default_factory=list)
    q: list[SparseDist] = field(default_factory=list)
    """The drafter's distribution at each token (sampling only)."""
    seconds: float | None = None
    """How long the drafter took; None when it was not asked."""


@dataclass
class Continuation:
    """The drafter's continuation of a draft, asked for while the target verifies it."""

    context_len: int
    """The context's length the continuation's first token extends (context + draft)."""
    draft: list[int]
    task: asyncio.Task[Draft]


def probs_wanted(params: SamplingParams, banned: frozenset[int], n_probs: int) -> int:
    """How long a top list each position needs: greedy needs only the argmax; sampling needs
    lists in which the chain's cut is exact (``n_probs``, the configured length, otherwise)."""
    if params.greedy:
        return 1 + len(banned)
    if 0 < params.top_k <= n_probs:
        return params.top_k + len(banned)
    return n_probs


class SpeculativeRun:
    """One request's rounds, from its leased target slot to :class:`Finished`. Upstream
    failures propagate to the engine; the drafter slot it may lease is released by
    :meth:`events`' end."""

    def __init__(self, servers: Servers, telemetry: Telemetry, config: SpeculationConfig,
                 request: GenerationRequest, info: TargetInfo, slot: int,
                 stats: RequestStats, learned: PairLearning) -> None:
        self.servers = servers
        self.telemetry = telemetry
        self.request = request
        self.info = info
        self.slot = slot
        self.stats = stats
        self.params = request.sampling
        self.rng = Rng(self.params.seed)
        self.banned = info.eog if request.ignore_eos else frozenset()
        self.n_probs = probs_wanted(self.params, self.banned, config.n_probs)
        self.learned = learned
        self.streams = 1  # streams in flight when this round started: its load
        self.transcript = Transcript(request.max_tokens, request.stop,
                                     frozenset() if request.ignore_eos else info.eog)
        self.context = list(request.prompt)
        self.drafter_slot: int | None = None
        self.may_draft = True  # False once this request's drafting is hopeless (a mismatch)
        self.target_only_next = False  # the last round cut its verify short
        self.appended = 0  # tokens added to the context by the last round
        self.overlap = config.overlap
        self.paused = False  # drafting paused at this load (this round's plan)
        self.round_started = 0.0  # when this round was planned (monotonic)
        self.drafter_out = False  # the last draft failed: the drafter is down or erring
        self.planned: int | None = None  # the next round's k, planned when a stream was cut
        self.ended: str | None = None  # why the output ended inside a streamed segment

    async def events(self) -> AsyncGenerator[Event, None]:
        """:class:`TextDelta` per round that produced text, then :class:`Finished`."""
        ahead: Continuation | None = None
        try:
            reason: str | None = None
            while reason is None:
                if self._room() <= 0:
                    reason = "length"
                    break
                pending = len(self.transcript.pending)
                k = self._plan_k(pending) if self.planned is None else self.planned
                self.planned = None
                draft = await self._continued(ahead, k)
                ahead = None
                if draft is None:
                    draft = await self._draft(k)
                if not draft.tokens and not pending and self._alone_ahead():
                    async for streamed in self._target_only():
                        yield streamed
                    reason = self.ended
                    continue
                verifying = asyncio.ensure_future(self._verify(draft, pending))
                ahead = self._continue(draft)
                verify, verify_s = await verifying
                if pending:  # the bytes of last round's final token, scored as a prompt token
                    resolved = self.transcript.resolve(verify.prompt_probs[:pending])
                    verify = dataclasses.replace(verify,
                                                 prompt_probs=verify.prompt_probs[pending:])
                    if resolved.text or resolved.output:
                        yield TextDelta(resolved.text, resolved.output)
                    if resolved.reason:
                        reason = resolved.reason
                        break
                outcome = self._decide(draft, verify, verify_s, pending)
                delta, reason = self._emit(draft, outcome, verify_s)
                if delta is not None:
                    yield delta
            if ahead is not None:
                await self._drop(ahead)
                ahead = None
            async for event in self._finish(reason):
                yield event
        finally:
            if ahead is not None:
                ahead.task.cancel()
                with contextlib.suppress(BaseException):
                    await ahead.task
            if self.drafter_slot is not None:
                self.servers.release_drafter_slot(self.drafter_slot, self.request.prompt)

    def _room(self) -> int:
        """How many more tokens this request may generate (0: it ends on length)."""
        if self.transcript.count >= self.request.max_tokens:
            return 0
        return self.info.props.n_ctx - len(self.context)

    def _plan_k(self, pending: int) -> int:
        """This round's draft length: the learned k at the current load, within what is left
        of max_tokens, the context and the coordinator's verify limit (the pending tokens count
        against it). A seeded sampling request keeps k_initial (its random stream depends on
        k); k never changes the output otherwise."""
        self.streams = max(1, self.telemetry.in_flight)
        self.round_started = time.monotonic()
        k = self.learned.round_k(self.params, self.streams)
        self.stats.last_k = k
        self.paused = k == 0 and not self.learned.plan.drafting
        return min(k, self.request.max_tokens - self.transcript.count - 1,
                   self._room() - 1, self.info.verify_limit - pending)

    async def _draft(self, k: int) -> Draft:
        if k <= 0 or not self.may_draft or self.target_only_next:
            self.target_only_next = False
            return Draft()
        self.target_only_next = False
        if self.drafter_slot is None:
            self.drafter_slot = self.servers.try_lease_drafter_slot(self.request.prompt)
        draft = await self._ask_drafter(self.context, k)
        return Draft(draft.tokens[:k], draft.q[:k], draft.seconds)

    async def _ask_drafter(self, prompt: list[int], n: int, *, ahead: bool = False) -> Draft:
        """Up to ``n`` drafted tokens after ``prompt`` (none when the drafter gives none).
        ``ahead``: a continuation, whose failure makes no round run target-only."""
        params = self.params
        seed = None if params.greedy else int(self.rng.uniform() * 2 ** 32)
        got = await self.servers.draft(CompletionRequest(
            prompt=prompt, n_predict=n, sampling=params, seed=seed,
            n_probs=0 if params.greedy else self.n_probs,
            id_slot=-1 if self.drafter_slot is None else self.drafter_slot,
            ignore_eos=bool(self.banned)))
        if isinstance(got, NoDraft):
            self.may_draft = got.retry
            if not ahead:
                self.drafter_out = got.fallback in ("down", "timeout", "error")
                if got.fallback is not None:
                    self.telemetry.on_fallback(self.stats, got.fallback)
            return Draft()
        if not ahead:
            self.drafter_out = False
        tokens, q = usable_draft(got.completion, params, self.n_probs, self.banned)
        return Draft(tokens, q, got.seconds)

    def _continue(self, draft: Draft) -> Continuation | None:
        """Start the drafter on the continuation of ``draft`` while the target verifies it, when
        the next round may use it: the request has its own drafter slot (its cache holds this
        conversation, and no other request waits behind it), there is room for another round,
        and it is not a seeded sampling request (a continuation's seed comes from the request's
        random stream, which its seed fixes as it is without overlap)."""
        if (not self.overlap or not draft.tokens or self.drafter_slot is None
                or not self.may_draft or self.learned.fixed(self.params)):
            return None
        after = len(draft.tokens) + 1  # tokens this round adds when the continuation is used
        k = min(self.learned.peek_k(self.params),
                self.request.max_tokens - self.transcript.count - after - 1,
                self.info.props.n_ctx - len(self.context) - after - 1)
        if k <= 0:
            return None
        prompt = self.context + draft.tokens
        return Continuation(len(prompt), list(draft.tokens),
                            asyncio.ensure_future(self._ask_drafter(prompt, k + 1, ahead=True)))

    async def _continued(self, ahead: Continuation | None, k: int) -> Draft | None:
        """This round's draft from the last round's continuation, when the verify went the way
        it guessed (every drafted token accepted, then the continuation's first token); None:
        draft now."""
        if ahead is None:
            return None
        drafted = await ahead.task
        n = ahead.context_len
        usable = (k > 0 and self.may_draft and not self.target_only_next
                  and len(drafted.tokens) > 1 and len(self.context) == n + 1
                  and self.context[n] == drafted.tokens[0]
                  and self.context[n - len(ahead.draft):n] == ahead.draft)
        self.telemetry.on_continuation(usable)
        if not usable:
            return None
        # Its seconds are the drafter's cost, which k is planned from, though the round did
        # not wait for all of them.
        return Draft(drafted.tokens[1:k + 1], drafted.q[1:k + 1], drafted.seconds)

    async def _drop(self, ahead: Continuation) -> None:
        """Wait for a continuation the request no longer needs (its drafter slot is released
        only once the drafter is done with it)."""
        with contextlib.suppress(Exception):
            await ahead.task
        self.telemetry.on_continuation(False)

    def _alone_ahead(self) -> bool:
        """Whether the rounds after this one would not draft either: drafting paused at this
        load, hopeless for this request, or the drafter down (it is asked again every
        ``TARGET_ONLY_BURST`` tokens). Not after a busy drafter, a cut verify, or a round that
        measures target-only speed: a draft may come next round."""
        return self.paused or not self.may_draft or self.drafter_out

    async def _target_only(self) -> AsyncGenerator[TextDelta, None]:
        """Target-only decoding as ONE streamed generation on the request's slot: the
        server's own tokens (the target's, greedy or sampled), each step in the coordinator's
        shared batch, with no call per token and no round that scores them again. Every
        ``TARGET_ONLY_BURST`` tokens the next round is planned, and the stream is cut (closing
        it stops the server) when that round may draft. Sets :attr:`ended` when the output
        ended."""
        params = self.params
        self.ended = None
        stream = self.servers.stream(CompletionRequest(
            prompt=self.context, n_predict=max(1, min(
                self.request.max_tokens - self.transcript.count, self._room())),
            sampling=params, seed=None if params.greedy else int(self.rng.uniform() * 2 ** 32),
            id_slot=self.slot, ignore_eos=self.request.ignore_eos))
        group, since, named = 0, self.round_started, 0
        self.appended = 0
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                named += len(chunk.tokens)
                if named != chunk.n_predicted:  # a coordinator without patch 0006
                    raise VerifyMismatch(f"the stream named {named} tokens of "
                                         f"{chunk.n_predicted} generated")
                taken = self.transcript.take(chunk.tokens, _chunk_bytes(chunk))
                self.telemetry.on_streamed(self.stats, len(taken.tokens))
                self.context.extend(taken.tokens)
                self.appended += len(taken.tokens)
                group += len(taken.tokens)
                if taken.text or taken.output:
                    yield TextDelta(taken.text, taken.output)
                if taken.reason or chunk.stop or group >= defaults.TARGET_ONLY_BURST:
                    self._streamed(group, since)
                    group, since = 0, time.monotonic()
                if taken.reason:
                    self.ended = taken.reason
                    return
                if chunk.stop:
                    return
                if not group:  # a group ended: plan the next round; cut where it may draft
                    k = self._plan_k(0)
                    if k > 0 and self.may_draft:  # (k > 0: not paused)
                        self.planned = k
                        return
        if group:
            self._streamed(group, since)

    def _streamed(self, tokens: int, since: float) -> None:
        """Count ``tokens`` a stream gave since ``since`` as one target-only round."""
        now = time.monotonic()
        seconds = now - since
        # The request's first round evaluates its whole prompt: not a step's cost.
        self.learned.observe_round(self.params.greedy, self.streams, 0, 0, None,
                                   seconds / max(1, tokens), self.stats.rounds > 0)
        self.learned.observe_tokens(tokens, since, now)
        self.telemetry.on_round(self.stats, Round(drafted=0, accepted=0, tokens=tokens,
                                                  draft_seconds=None, verify_seconds=seconds,
                                                  counted=True))

    async def _verify(self, draft: Draft, pending: int) -> tuple[Completion, float]:
        """One target pass over the draft (and the ``pending`` tokens whose bytes are still
        unknown); the answer and its seconds."""
        params = self.params
        seed = None if params.greedy else int(self.rng.uniform() * 2 ** 32)
        # A step with nothing to score is the server's own draw: its top list would only give
        # the new token's bytes, which the next round's verify scores anyway. Asking for none
        # keeps the step on the coordinator's top-n path (a plain generation with n_probs
        # fetches the full logits).
        n_probs = self.n_probs if draft.tokens or pending else 0
        t0 = time.monotonic()
        verify = await self.servers.verify(
            self.context, draft.tokens, scored=pending, sampling=params, seed=seed,
            n_probs=n_probs, id_slot=self.slot, ignore_eos=self.request.ignore_eos)
        return verify, time.monotonic() - t0

    def _decide(self, draft: Draft, verify: Completion, verify_s: float,
                pending: int) -> Outcome:
        """The round's tokens, and the controller's next k."""
        outcome = decide_round(draft.tokens, draft.q, verify, self.params, self.rng,
                               self.n_probs, self.banned)
        self.target_only_next = outcome.cut
        drafted = len(draft.tokens)
        timed = round_timed(self.stats.rounds, verify.timings.prompt_n, drafted,
                            self.appended, pending)
        self.learned.observe_round(self.params.greedy, self.streams, drafted, outcome.accepted,
                                   draft.seconds, verify_s, timed)
        return outcome

    def _emit(self, draft: Draft, outcome: Outcome,
              verify_s: float) -> tuple[TextDelta | None, str | None]:
        """Append the round's tokens; the text to send (if any) and why the output ended
        (None: it goes on)."""
        taken = self.transcript.take(outcome.tokens, outcome.token_bytes)
        self.context.extend(taken.tokens)
        self.appended = len(taken.tokens)
        self.learned.observe_tokens(len(taken.tokens), self.round_started, time.monotonic())
        self.telemetry.on_round(self.stats, Round(
            drafted=len(draft.tokens), accepted=outcome.accepted, tokens=len(taken.tokens),
            draft_seconds=draft.seconds, verify_seconds=verify_s))
        self.stats.alpha = self.learned.acceptance[self.params.greedy].mean
        delta = TextDelta(taken.text, taken.output) if taken.text or taken.output else None
        return delta, taken.reason

    async def _finish(self, reason: str) -> AsyncGenerator[Event, None]:
        transcript = self.transcript
        if transcript.pending:  # the last token ended inside a character: ask for its bytes
            m = len(transcript.pending)
            res = await self.servers.verify(self.context, [], scored=m, id_slot=self.slot)
            resolved = transcript.resolve(res.prompt_probs[-m:])
            if resolved.text or resolved.output:
                yield TextDelta(resolved.text, resolved.output)
        if tail := transcript.finish():
            yield TextDelta(tail, ())
        yield Finished(reason, len(self.request.prompt), transcript.count, self.stats)


def _chunk_bytes(chunk: StreamChunk) -> list[bytes | None]:
    """Each streamed token's bytes as the transcript takes them. A chunk's text is its last
    token's and that of those before it in the chunk (after which the text ended inside a
    character, so it waited). It all goes to the last token: the text is exact, and a stop
    string (which ends at a character's end) ends in the token it really ends in, except where
    it ends in whole characters of an earlier token of the chunk (one that holds whole
    characters, then part of one): the output then counts that chunk's later tokens too. The
    final chunk names tokens without text (the generation ended inside a character): unknown,
    resolved by the request's last call."""
    n = len(chunk.tokens)
    if not n or (chunk.stop and not chunk.content):
        return [None] * n
    return [*[b""] * (n - 1), chunk.content.encode()]
