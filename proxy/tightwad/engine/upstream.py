"""The two llama-servers as the engine sees them: clients, what each is, whether the drafter may
be used, and the slot pools.

Probed lazily and again after the target went away (it may come back with another model):
the target's slots, context size, end-of-generation ids and verify support; the drafter's
tokenizer against the target's (:mod:`tightwad.llamaserver.vocab`). A drafter failure closes a gate with
exponential backoff; its first answer afterwards triggers a new tokenizer check (it may have
been restarted with another model).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, TypeVar

from tightwad.config import Config
from tightwad.engine.metrics import Metrics
from tightwad.llamaserver.client import LlamaClient
from tightwad.llamaserver.slots import SlotPool
from tightwad.llamaserver.vocab import PROBE_TEXT, TokenizerCheck, check_tokenizers, eog_ids
from tightwad.llamaserver.wire import CompletionRequest, Props, UpstreamDown, UpstreamError, UpstreamFailure

log = logging.getLogger("tightwad.engine.upstream")
T = TypeVar("T")


@dataclass
class TargetInfo:
    props: Props
    eog: frozenset[int]
    verify_limit: int
    """Most prompt tokens one verify may score (the draft, plus any token whose bytes are still
    unknown); 0 when the coordinator cannot verify."""
    verify_note: str


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

    def failed(self, why: str) -> None:
        self.failures += 1
        self.last_error = why
        self.retry_at = time.monotonic() + min(self.longest_s,
                                               self.first_s * 2 ** (self.failures - 1))

    def succeeded(self) -> bool:
        """Record an answer; True when the drafter just came back from failing."""
        recovered = self.failures > 0
        self.failures, self.retry_at = 0, 0.0
        return recovered


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


class Upstream:
    """Clients and facts for the coordinator (target) and the drafter."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.gate = DrafterGate()
        self.target: LlamaClient | None = None
        self.drafter: LlamaClient | None = None
        self.tokenizer_check: TokenizerCheck | None = None
        self.check_error = ""
        self.info: TargetInfo | None = None
        self._checked_at = 0.0
        self.target_slots: SlotPool | None = None
        self.drafter_slots: SlotPool | None = None
        self._info_lock = asyncio.Lock()
        self._check_lock = asyncio.Lock()

    async def start(self) -> None:
        """Open the clients and probe; a server that is down is not fatal here."""
        cfg = self.config
        self.target = LlamaClient(cfg.target.url, name="target", timeout_s=cfg.target.timeout_s,
                                  api_key=_secret(cfg.target.api_key),
                                  connections=2 * cfg.target.slots + 4)
        if cfg.speculation.mode == "remote":
            self.drafter = LlamaClient(cfg.drafter.url, name="drafter",
                                       timeout_s=cfg.drafter.timeout_s,
                                       api_key=_secret(cfg.drafter.api_key),
                                       connections=2 * cfg.drafter.slots + 4)
        try:
            await self.target_info()
        except UpstreamFailure as exc:
            log.warning("target not ready at start-up (%s); requests get 503 until it is", exc)
        if self.drafter is not None and self.info is not None:
            if not await self.drafter_usable() and self.tokenizer_check is None:
                log.warning("drafter not ready at start-up (%s); decoding target-only until "
                            "it answers", self.check_error)
        self._publish()

    async def close(self) -> None:
        for client in (self.target, self.drafter):
            if client is not None:
                await client.close()

    async def call_target(self, call: Awaitable[T]) -> T:
        """Await a target call; a vanished target is re-probed on the next request."""
        try:
            return await call
        except UpstreamDown:
            self.target_lost()
            raise

    def target_lost(self) -> None:
        self.info = None
        self.tokenizer_check = None
        self._publish()

    @property
    def speculation_active(self) -> bool:
        return (self.config.speculation.mode == "remote" and self.info is not None
                and self.info.verify_limit > 0 and self.tokenizer_check is not None
                and self.tokenizer_check.match)

    def speculation_possible(self, info: TargetInfo) -> bool:
        """Not known to be impossible: the check may still be pending while the drafter is down
        (rounds then run target-only until it answers)."""
        return (self.config.speculation.mode == "remote" and info.verify_limit > 0
                and (self.tokenizer_check is None or self.tokenizer_check.match))

    def _publish(self) -> None:
        self.metrics.speculating.set(1 if self.speculation_active else 0)

    # -- the target -----------------------------------------------------------------------

    async def target_info(self) -> TargetInfo:
        if self.info is not None and \
                time.monotonic() - self._checked_at >= self.config.target.recheck_s:
            await self._recheck(self.info)
        if self.info is not None:
            return self.info
        assert self.target is not None, "Upstream.start() first"
        async with self._info_lock:
            if self.info is None:
                props = await self.call_target(self.target.props())
                eog = await self.call_target(eog_ids(self.target, props))
                limit, note = await self.call_target(self._probe_verify())
                if self.target_slots is None:
                    size = min(self.config.target.slots, props.total_slots)
                    if size < self.config.target.slots:
                        log.warning("target.slots is %d but the coordinator has %d; using %d "
                                    "(raise its -np to serve more requests at once)",
                                    self.config.target.slots, props.total_slots, size)
                    self.target_slots = SlotPool(size)
                self.info = TargetInfo(props, eog, limit, note)
                self._checked_at = time.monotonic()
                log.info("target %s: %d slots of %d tokens, end-of-generation ids %s; "
                         "verify: %s", props.model, self.target_slots.size, props.n_ctx,
                         sorted(eog), note)
                self._publish()
        return self.info

    async def _recheck(self, info: TargetInfo) -> None:
        """Forget what we know of the target when it now serves another model or build (a
        swap restarts the coordinator between two requests; nothing else tells us)."""
        assert self.target is not None
        self._checked_at = time.monotonic()  # one look at a time, even under load
        props = await self.call_target(self.target.props())
        was = info.props
        if (props.model, props.build_info, props.n_vocab) != (was.model, was.build_info,
                                                               was.n_vocab):
            log.info("the coordinator now serves %s (was %s); probing it again", props.model,
                     was.model)
            self.target_lost()

    async def _probe_verify(self) -> tuple[int, str]:
        """Whether the coordinator verifies a draft in one pass, and how long one may be."""
        if self.config.speculation.mode != "remote":
            return 0, "not used in this mode"
        assert self.target is not None
        k = self.config.speculation.k_max
        probe = await self.target.tokenize(PROBE_TEXT)
        prompt = (probe * (k // max(1, len(probe)) + 2))[: k + 1]
        try:
            res = await self.target.complete(CompletionRequest(
                prompt=prompt, n_predict=1, n_probs=1, prompt_logprobs=k, cache_prompt=False))
        except UpstreamError as exc:
            found = re.search(r"server limit \((\d+)\)", exc.message)
            limit = int(found.group(1)) if found else 0
            if limit >= 1:
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

    # -- the drafter ----------------------------------------------------------------------

    async def drafter_usable(self) -> bool:
        """Run the tokenizer check if it is pending; True when drafts may be used."""
        if self.tokenizer_check is not None:
            return self.tokenizer_check.match
        if self.drafter is None or self.target is None:
            return False
        async with self._check_lock:
            if self.tokenizer_check is None:
                try:
                    info = await self.target_info()
                    drafter_props = await self.drafter.props()
                    check = await check_tokenizers(self.target, info.props, self.drafter,
                                                   drafter_props)
                except UpstreamFailure as exc:
                    self.check_error = str(exc)
                    return False
                self.check_error = ""
                if self.drafter_slots is None:
                    self.drafter_slots = SlotPool(
                        min(self.config.drafter.slots, drafter_props.total_slots))
                self.tokenizer_check = check
                if check.match:
                    log.info("drafter %s: %s", drafter_props.model, check.reason)
                else:
                    log.error("TOKENIZER MISMATCH between drafter and target, speculation is "
                              "OFF: %s. Serve a draft model with the target's tokenizer.",
                              check.reason)
                self._publish()
        return self.tokenizer_check is not None and self.tokenizer_check.match

    def drafter_recovered(self) -> None:
        """The drafter answers again after failing: it may run another model now."""
        log.info("drafter answers again; speculation resumes")
        self.tokenizer_check = None

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        info, check = self.info, self.tokenizer_check
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
            },
            "drafter": None if self.drafter is None else {
                "url": self.config.drafter.url,
                "available": self.gate.failures == 0 and not self.check_error,
                "last_error": self.gate.last_error or self.check_error or None,
                "slots": self.drafter_slots.size if self.drafter_slots else None,
            },
            "tokenizer_check": None if check is None else {
                "match": check.match, "reason": check.reason,
                "target_fingerprint": check.target_fingerprint,
                "drafter_fingerprint": check.drafter_fingerprint,
            },
        }
