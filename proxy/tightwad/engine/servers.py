"""The two llama-servers as the engine sees them (:class:`Servers`): what the target is, its
calls, whether and how the drafter drafts, and the slot pools.

Probed lazily and again after the target went away (it may come back with another model):
the target's slots, context size, end-of-generation ids and verify support; the drafter's
tokenizer against the target's (:mod:`tightwad.llamaserver.vocab`).

The drafter fallback policy lives here, in :meth:`Servers.draft`: a drafter that is down, slow
past ``drafter.timeout_s``, busy or erroring gives :class:`NoDraft` (the round runs target-only)
instead of an exception. A failure closes a gate with exponential backoff; the first answer
afterwards triggers a new tokenizer check (the drafter may have been restarted with another
model).

Every verify goes through :class:`tightwad.engine.gather.VerifyGather`, keyed by the request's
target slot, so that the verifies of concurrent requests reach the coordinator together and run
in one of its batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tightwad.config import Config
from tightwad.decoding.sampling import SamplingParams
from tightwad.engine.gather import VerifyGather
from tightwad.llamaserver.client import LlamaClient
from tightwad.llamaserver.slots import SlotPool
from tightwad.llamaserver.vocab import PROBE_TEXT, TokenizerCheck, check_tokenizers, eog_ids
from tightwad.llamaserver.wire import (
    Completion,
    CompletionRequest,
    Props,
    StreamChunk,
    UpstreamDown,
    UpstreamError,
    UpstreamFailure,
    UpstreamTimeout,
    verify_limit_in,
)

log = logging.getLogger("tightwad.engine.servers")
T = TypeVar("T")


@dataclass
class TargetInfo:
    props: Props
    eog: frozenset[int]
    verify_limit: int
    """Most prompt tokens one verify may score (the draft, plus any token whose bytes are still
    unknown); 0 when the coordinator cannot verify."""
    verify_note: str


@dataclass(frozen=True)
class Drafted:
    """The drafter's answer, and how long it took."""

    completion: Completion
    seconds: float


@dataclass(frozen=True)
class NoDraft:
    """No draft this round: it runs target-only."""

    fallback: str | None
    """Why, as a counted fallback (``down``, ``busy``, ``timeout``, ``error``, ``refused``); None
    when drafting is off for the request (the tokenizers turned out to differ), which is no
    fallback."""
    retry: bool
    """Whether drafting is still worth trying for this request."""


@dataclass
class DrafterGate:
    """Backoff after drafter failures, so a dead drafter costs one refused connect per backoff
    period instead of one per round (and a hung one one deadline per period)."""

    first_s: float = 0.5
    longest_s: float = 15.0
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""

    def open(self) -> bool:
        return time.monotonic() >= self.retry_at

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, why: str) -> None:
        self.failures += 1
        self.last_error = why
        self.retry_at = time.monotonic() + min(self.longest_s,
                                               self.first_s * 2 ** (self.failures - 1))

    def reset(self) -> None:
        """The drafter answered: forget its failures."""
        self.failures, self.retry_at = 0, 0.0


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


class Servers:
    """The coordinator (target) and the drafter: clients, probed facts, slot pools."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.drafter_gate = DrafterGate()
        self.gather: VerifyGather[CompletionRequest, Completion] = VerifyGather(
            config.speculation.gather_ms / 1e3, alone_on=(UpstreamError,))
        self._info: TargetInfo | None = None
        self.target_slots: SlotPool | None = None
        self._target: LlamaClient | None = None
        self._drafter: LlamaClient | None = None
        self._tokenizer_check: TokenizerCheck | None = None
        self.drafter_model: str | None = None
        """The drafter's model as it reports it (known after the tokenizer check)."""
        self._check_error = ""
        self._checked_at = 0.0
        self._drafter_slots: SlotPool | None = None
        self._info_lock = asyncio.Lock()
        self._check_lock = asyncio.Lock()

    async def start(self) -> None:
        """Open the clients and probe; a server that is down is not fatal here."""
        cfg = self.config
        self._target = LlamaClient(cfg.target.url, name="target", timeout_s=cfg.target.timeout_s,
                                   api_key=_secret(cfg.target.api_key),
                                   connections=2 * cfg.target.slots + 4)
        if cfg.speculation.mode == "remote":
            self._drafter = LlamaClient(cfg.drafter.url, name="drafter",
                                        timeout_s=cfg.drafter.timeout_s,
                                        api_key=_secret(cfg.drafter.api_key),
                                        connections=2 * cfg.drafter.slots + 4)
        try:
            await self.target_info()
        except UpstreamFailure as exc:
            log.warning("target not ready at start-up (%s); requests get 503 until it is", exc)
        if (self._drafter is not None and self._info is not None
                and not await self._drafter_usable() and self._tokenizer_check is None):
                log.warning("drafter not ready at start-up (%s); decoding target-only until "
                            "it answers", self._check_error)

    async def close(self) -> None:
        for client in (self._target, self._drafter):
            if client is not None:
                await client.close()

    @property
    def speculation_active(self) -> bool:
        return (self.config.speculation.mode == "remote" and self._info is not None
                and self._info.verify_limit > 0 and self._tokenizer_check is not None
                and self._tokenizer_check.match)

    def speculation_possible(self, info: TargetInfo) -> bool:
        """Not known to be impossible: the check may still be pending while the drafter is down
        (rounds then run target-only until it answers)."""
        return (self.config.speculation.mode == "remote" and info.verify_limit > 0
                and (self._tokenizer_check is None or self._tokenizer_check.match))

    # -- the target -----------------------------------------------------------------------

    async def target_healthy(self) -> bool:
        return self._target is not None and await self._target.health()

    async def tokenize(self, text: str) -> list[int]:
        return await self._call_target(self._client().tokenize(text))

    async def apply_template(self, messages: Sequence[Mapping[str, Any]],
                             extra: Mapping[str, Any] | None = None) -> str:
        return await self._call_target(self._client().apply_template(messages, extra))

    async def openai(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """The target's own OpenAI endpoint, not streamed (a request passed through)."""
        return await self._call_target(self._client().openai(path, body))

    def openai_stream(self, path: str,
                      body: Mapping[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """The target's own OpenAI endpoint, streamed (``target.timeout_s`` between chunks)."""
        return self._target_stream(
            self._client().openai_stream(path, body, self.config.target.timeout_s))

    async def forward(self, path: str, body: Any) -> tuple[int, Any]:
        """A target route passed on as it is (status and JSON)."""
        return await self._call_target(self._client().forward(path, body))

    async def verify(self, context: Sequence[int], draft: Sequence[int], *, scored: int = 0,
                     sampling: SamplingParams = SamplingParams(temperature=0.0),
                     seed: int | None = None, n_probs: int = 1, id_slot: int = -1,
                     ignore_eos: bool = False) -> Completion:
        """The target scores ``draft`` after ``context`` in one pass
        (:meth:`tightwad.llamaserver.client.LlamaClient.verify`), sent together with the other
        requests' ready verifies (:attr:`gather`)."""
        client = self._client()
        request = CompletionRequest(  # as LlamaClient.verify builds it
            prompt=[*context, *draft], n_predict=1, sampling=sampling, seed=seed,
            n_probs=n_probs, prompt_logprobs=scored + len(draft), id_slot=id_slot,
            ignore_eos=ignore_eos)
        return await self._call_target(self.gather.send(id_slot, request, client.complete,
                                                        client.complete_batch))

    def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamChunk, None]:
        """A streamed target ``/completion`` (``target.timeout_s`` between chunks). Its slot
        steps out of verify gathering: no verify waits for one that streams."""
        self.gather.aside(request.id_slot)
        return self._target_stream(
            self._client().stream(request, chunk_timeout_s=self.config.target.timeout_s))

    async def _target_stream(self, chunks: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """``chunks`` as the target streams them; a dropped connection marks the target lost."""
        try:
            async for chunk in chunks:
                yield chunk
        except UpstreamDown:
            self._target_lost()
            raise
        finally:
            await chunks.aclose()

    async def lease_target_slot(self, prompt: Sequence[int]) -> int:
        """A target slot for this prompt's request (waits while all are busy)."""
        assert self.target_slots is not None, "target_info() first"
        slot = await self.target_slots.acquire(prompt)
        self.gather.join(slot)
        return slot

    def release_target_slot(self, slot: int, prompt: Sequence[int]) -> None:
        assert self.target_slots is not None
        self.gather.leave(slot)
        self.target_slots.release(slot, prompt)

    def _client(self) -> LlamaClient:
        assert self._target is not None, "Servers.start() first"
        return self._target

    async def _call_target(self, call: Awaitable[T]) -> T:
        """Await a target call; a vanished target is re-probed on the next request."""
        try:
            return await call
        except UpstreamDown:
            self._target_lost()
            raise

    def _target_lost(self) -> None:
        self._info = None
        self._tokenizer_check = None

    async def target_info(self) -> TargetInfo:
        if self._info is not None and \
                time.monotonic() - self._checked_at >= self.config.target.recheck_s:
            await self._recheck(self._info)
        if self._info is not None:
            return self._info
        target = self._client()
        async with self._info_lock:
            if self._info is None:
                props = await self._call_target(target.props())
                eog = await self._call_target(eog_ids(target, props))
                limit, note = await self._call_target(self._probe_verify())
                if limit > 0 and self.gather.enabled:
                    self.gather.batch_calls = await self._call_target(self._probe_batch())
                if self.target_slots is None:
                    size = min(self.config.target.slots, props.total_slots)
                    if size < self.config.target.slots:
                        log.warning("target.slots is %d but the coordinator has %d; using %d "
                                    "(raise its -np to serve more requests at once)",
                                    self.config.target.slots, props.total_slots, size)
                    self.target_slots = SlotPool(size)
                self._info = TargetInfo(props, eog, limit, note)
                self._checked_at = time.monotonic()
                log.info("target %s: %d slots of %d tokens, end-of-generation ids %s; "
                         "verify: %s", props.model, self.target_slots.size, props.n_ctx,
                         sorted(eog), note)
        return self._info

    async def _recheck(self, info: TargetInfo) -> None:
        """Forget what we know of the target when it now serves another model or build (a
        swap restarts the coordinator between two requests; nothing else tells us)."""
        self._checked_at = time.monotonic()  # one look at a time, even under load
        props = await self._call_target(self._client().props())
        was = info.props
        if (props.model, props.build_info, props.n_vocab) != (was.model, was.build_info,
                                                               was.n_vocab):
            log.info("the coordinator now serves %s (was %s); probing it again", props.model,
                     was.model)
            self._target_lost()

    async def _probe_verify(self) -> tuple[int, str]:
        """Whether the coordinator verifies a draft in one pass, and how long one may be."""
        if self.config.speculation.mode != "remote":
            return 0, "not used in this mode"
        target = self._client()
        k = self.config.speculation.k_max
        probe = await target.tokenize(PROBE_TEXT)
        prompt = (probe * (k // max(1, len(probe)) + 2))[: k + 1]
        try:
            res = await target.complete(CompletionRequest(
                prompt=prompt, n_predict=1, n_probs=1, prompt_logprobs=k, cache_prompt=False))
        except UpstreamError as exc:
            if limit := verify_limit_in(exc.message):
                note = (f"the coordinator verifies at most {limit} tokens, so drafts are capped "
                        f"at {limit}; start it with --verify-max-tokens {k} for "
                        f"speculation.k_max {k}")
                log.warning(note)
                return limit, note
            note = (f"the coordinator refused a verify ({exc.message}); start it with "
                    f"--verify-max-tokens {k}. Speculation is OFF")
            log.error(note)
            return 0, note
        if not res.has_prompt_probs:
            note = ("the coordinator lacks the verify patch (no prompt_probabilities in its "
                    "answer); run tightwad's patched llama-server. Speculation is OFF")
            log.error(note)
            return 0, note
        return k, f"ok, drafts of up to {k} tokens"

    async def _probe_batch(self) -> bool:
        """Whether the coordinator takes several completions in one call (patch 0004), so a
        gathered group of verifies runs in one of its batches."""
        target = self._client()
        probe = await target.tokenize(PROBE_TEXT)
        try:
            await target.complete_batch([CompletionRequest(prompt=probe[:4] or [0], n_predict=1,
                                                           cache_prompt=False)])
        except UpstreamError as exc:
            log.warning("the coordinator takes no batch of completions (%s): gathered verifies "
                        "go as separate requests, and its loop splits them over two batches "
                        "or more; run tightwad's patched llama-server (patch 0004)", exc.message)
            return False
        return True

    # -- the drafter ----------------------------------------------------------------------

    def try_lease_drafter_slot(self, prompt: Sequence[int]) -> int | None:
        """A free drafter slot for this prompt's request, or None (none free, or the drafter's
        pool is not known yet)."""
        if self._drafter_slots is None:
            return None
        return self._drafter_slots.try_acquire(prompt)

    def release_drafter_slot(self, slot: int, prompt: Sequence[int]) -> None:
        assert self._drafter_slots is not None
        self._drafter_slots.release(slot, prompt)

    async def draft(self, request: CompletionRequest) -> Drafted | NoDraft:
        """The drafter's answer to ``request``, or why this round goes without one.
        ``request.id_slot`` is the request's leased drafter slot; -1 (none free) counts as
        busy."""
        gate = self.drafter_gate
        if self._drafter is None:
            return NoDraft(None, retry=False)
        if not gate.open():
            return NoDraft("down", retry=True)
        if not await self._drafter_usable():
            if self._tokenizer_check is not None:  # a mismatch, found just now
                return NoDraft(None, retry=False)
            gate.failed(self._check_error)
            return NoDraft("down", retry=True)
        if request.id_slot < 0:
            return NoDraft("busy", retry=True)
        t0 = time.monotonic()
        try:
            res = await self._drafter.complete(request, timeout_s=self.config.drafter.timeout_s)
        except UpstreamError as exc:
            if 400 <= exc.status < 500:  # about this request (e.g. the drafter's context)
                log.warning("drafter refused a draft (%s); the request goes on target-only",
                            exc.message)
                return NoDraft("refused", retry=False)
            gate.failed(str(exc))
            return NoDraft("error", retry=True)
        except UpstreamFailure as exc:
            if not gate.failing:
                log.warning("drafter unavailable (%s); decoding target-only until it answers",
                            exc)
            gate.failed(str(exc))
            return NoDraft("timeout" if isinstance(exc, UpstreamTimeout) else "down",
                           retry=True)
        seconds = time.monotonic() - t0
        if gate.failing:  # back after failing: it may run another model now
            gate.reset()
            log.info("drafter answers again; speculation resumes")
            self._tokenizer_check = None
            if not await self._drafter_usable():
                return NoDraft(None, retry=self._tokenizer_check is None)
        return Drafted(res, seconds)

    async def _drafter_usable(self) -> bool:
        """Run the tokenizer check if it is pending; True when drafts may be used."""
        if self._tokenizer_check is not None:
            return self._tokenizer_check.match
        if self._drafter is None or self._target is None:
            return False
        async with self._check_lock:
            if self._tokenizer_check is None:
                try:
                    info = await self.target_info()
                    drafter_props = await self._drafter.props()
                    check = await check_tokenizers(self._target, info.props, self._drafter,
                                                   drafter_props)
                except UpstreamFailure as exc:
                    self._check_error = str(exc)
                    return False
                self._check_error = ""
                self.drafter_model = drafter_props.model
                if self._drafter_slots is None:
                    self._drafter_slots = SlotPool(
                        min(self.config.drafter.slots, drafter_props.total_slots))
                self._tokenizer_check = check
                if check.match:
                    log.info("drafter %s: %s", drafter_props.model, check.reason)
                else:
                    log.error("TOKENIZER MISMATCH between drafter and target, speculation is "
                              "OFF: %s. Serve a draft model with the target's tokenizer.",
                              check.reason)
        return self._tokenizer_check is not None and self._tokenizer_check.match

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        info, check = self._info, self._tokenizer_check
        slots = self.target_slots
        return {
            "mode": self.config.speculation.mode,
            "speculation_active": self.speculation_active,
            "target": {
                "url": self.config.target.url, "ready": info is not None,
                "model": info.props.model if info else None,
                "slots": slots.size if slots else None,
                "slots_in_use": slots.in_use if slots else 0,
                "queued": slots.waiting if slots else 0,
                "n_ctx": info.props.n_ctx if info else None,
                "eog_ids": sorted(info.eog) if info else None,
                "verify_limit": info.verify_limit if info else None,
                "verify": info.verify_note if info else None,
                "verify_gather": self.gather.status(),
            },
            "drafter": None if self._drafter is None else {
                "url": self.config.drafter.url,
                "available": not self.drafter_gate.failing and not self._check_error,
                "last_error": self.drafter_gate.last_error or self._check_error or None,
                "slots": self._drafter_slots.size if self._drafter_slots else None,
            },
            "tokenizer_check": None if check is None else {
                "match": check.match, "reason": check.reason,
                "target_fingerprint": check.target_fingerprint,
                "drafter_fingerprint": check.drafter_fingerprint,
            },
        }
