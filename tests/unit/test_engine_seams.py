"""The engine's seams without llama-servers: an :class:`Engine` over a fake
:class:`~tightwad.engine.servers.Servers` (a toy model on both sides), the drafter fallback
policy of the real ``Servers`` against servers that refuse connections, :class:`Telemetry`
feeding both the status JSON and Prometheus from one call, and the verify-limit parser of
:mod:`tightwad.llamaserver.wire`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import pytest

from tightwad.config import Config, parse_config
from tightwad.decoding.sampling import SamplingParams
from tightwad.decoding.tokens import Position, TokenLogprob
from tightwad.engine.engine import Engine, Failed, Finished, GenerationRequest, TextDelta
from tightwad.engine.servers import Drafted, DrafterGate, NoDraft, Servers, TargetInfo
from tightwad.engine.telemetry import Round, Telemetry
from tightwad.llamaserver.wire import (
    Completion,
    CompletionRequest,
    Props,
    StreamChunk,
    verify_limit_in,
)

VOCAB = 26  # token i is the letter chr(97 + i); the toy model counts up the alphabet


def toy_next(context: Sequence[int]) -> int:
    return (context[-1] + 1) % VOCAB


def _entry(token: int) -> TokenLogprob:
    return TokenLogprob(token, chr(97 + token).encode(), 0.0)


def _position(context: Sequence[int], token: int) -> Position:
    """``token`` at the position after ``context``, with the toy model's choice as its top."""
    return Position(_entry(token), (_entry(toy_next(context)),))


class FakeServers(Servers):
    """The toy model as target; the drafter answers with ``draft_mode``: ``down`` (every
    draft falls back), ``right`` (drafts what the target would say), ``wrong``, or
    ``sometimes`` (wrong at every 4th position), and says it took ``draft_seconds``; a verify
    takes ``verify_sleep`` seconds. ``drafts`` records each draft's length, ``foreign`` each
    verified draft that is not what the drafter says after the verified context."""

    def __init__(self, config: Config, draft_mode: str, draft_seconds: float = 0.001,
                 verify_sleep: float = 0.0) -> None:
        super().__init__(config)
        self.draft_mode = draft_mode
        self.draft_seconds = draft_seconds
        self.verify_sleep = verify_sleep
        self.drafter_model = "toy-draft.gguf"
        self.drafts: list[int] = []
        self.foreign = 0
        self.verifies = 0
        self.streamed: list[int] = []  # tokens read from each target-only stream
        self.watch: Callable[[], int] | None = None  # read before each streamed token
        self.watched: list[int] = []
        self.leased: list[int] = []
        self.target_info_value = TargetInfo(
            Props(total_slots=1, n_ctx=64, model="toy.gguf", bos_token="", eos_token="",
                  chat_template="", build_info="", n_vocab=VOCAB),
            eog=frozenset(), verify_limit=8, verify_note="ok")

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @property
    def speculation_active(self) -> bool:
        return True

    def speculation_possible(self, info: TargetInfo) -> bool:
        return True

    async def target_info(self) -> TargetInfo:
        return self.target_info_value

    async def lease_target_slot(self, prompt: Sequence[int]) -> int:
        self.leased.append(0)
        return 0

    def release_target_slot(self, slot: int, prompt: Sequence[int]) -> None:
        self.leased.remove(slot)

    def try_lease_drafter_slot(self, prompt: Sequence[int]) -> int | None:
        return 0

    def release_drafter_slot(self, slot: int, prompt: Sequence[int]) -> None:
        pass

    async def verify(self, context: Sequence[int], draft: Sequence[int], *, scored: int = 0,
                     sampling: SamplingParams = SamplingParams(temperature=0.0),
                     seed: int | None = None, n_probs: int = 1, id_slot: int = -1,
                     ignore_eos: bool = False) -> Completion:
        self.verifies += 1
        if self.verify_sleep:
            await asyncio.sleep(self.verify_sleep)
        if draft and list(draft) != self._drafted(context, len(draft)):
            self.foreign += 1
        seq = [*context, *draft]
        first = len(seq) - scored - len(draft)
        generated = [*seq, toy_next(seq)]
        after = tuple(generated[len(seq):])
        return Completion(
            tokens=after, content="".join(chr(97 + t) for t in after), stop_type="limit",
            probs=tuple(_position(generated[:i], generated[i]) for i in range(len(seq),
                                                                              len(generated))),
            prompt_probs=tuple(_position(seq[:i], seq[i]) for i in range(first, len(seq))),
            has_prompt_probs=True)

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[StreamChunk, None]:
        """The toy model's tokens one chunk each, as llama-server streams them; records how
        many the engine read before it closed the stream."""
        self.streamed.append(0)
        seq = list(request.prompt)
        for n in range(1, request.n_predict + 1):
            seq.append(toy_next(seq))
            self.streamed[-1] += 1
            if self.watch is not None:
                self.watched.append(self.watch())
            yield StreamChunk(chr(97 + seq[-1]), (seq[-1],), False, n_predicted=n)
        yield StreamChunk("", (), True, "limit", request.n_predict)

    async def draft(self, request: CompletionRequest) -> Drafted | NoDraft:
        if self.draft_mode == "down":
            return NoDraft("down", retry=True)
        self.drafts.append(request.n_predict)
        tokens = tuple(self._drafted(request.prompt, request.n_predict))
        return Drafted(Completion(tokens=tokens, content="", stop_type="limit"),
                       self.draft_seconds)

    def _drafted(self, prompt: Sequence[int], n: int) -> list[int]:
        seq = list(prompt)
        for _ in range(n):
            nxt = toy_next(seq)
            right = self.draft_mode == "right" or (
                self.draft_mode == "sometimes" and len(seq) % 4 != 0)
            seq.append(nxt if right else (nxt + 1) % VOCAB)
        return seq[len(prompt):]


def _config(**speculation: Any) -> Config:
    return parse_config({"speculation": {"mode": "remote", "k_max": 4, **speculation}}, env={})


def _generate(engine: Engine, prompt: Sequence[int], max_tokens: int) -> tuple[str, Finished]:
    async def main() -> tuple[str, Finished]:
        text: list[str] = []
        async for event in engine.generate(GenerationRequest(tuple(prompt), max_tokens)):
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, Failed):
                raise AssertionError(event)
            else:
                return "".join(text), event
        raise AssertionError("no Finished event")

    return asyncio.run(main())


def _metric(engine: Engine, line_start: str) -> float:
    text = engine.telemetry.prometheus().decode()
    return float(next(line for line in text.splitlines()
                      if line.startswith(line_start)).split()[-1])


def test_a_failing_drafter_gives_the_target_alone_output_and_counted_fallbacks() -> None:
    servers = FakeServers(_config(), "down")
    engine = Engine(_config(), servers=servers)
    servers.watch = lambda: int(engine.status()["stats"]["tokens"])
    text, finished = _generate(engine, [0], 20)
    assert text == "bcdefghijklmnopqrstu"
    # The token count is live within a stream, not only at its 8-token rounds.
    assert servers.watched == list(range(20)), servers.watched
    assert (finished.reason, finished.completion_tokens) == ("length", 20)
    stats = finished.stats
    # With the drafter down, the target streams its own tokens, and the stream is cut every
    # TARGET_ONLY_BURST (8) tokens to try the drafter again: 8, 8, then the 4 left. No verify.
    assert servers.streamed == [8, 8, 4], servers.streamed
    assert servers.verifies == 0
    assert stats.drafted == 0 and stats.rounds == 3 and stats.fallbacks == 3
    status = engine.status()["stats"]
    assert status["fallbacks"] == 3 and status["drafted"] == 0 and status["tokens"] == 20
    assert _metric(engine, 'tightwad_drafter_fallbacks_total{reason="down"}') == 3
    assert servers.leased == [], "the target slot was not released"


@pytest.mark.parametrize("mode", ["right", "wrong"])
def test_drafts_change_speed_only(mode: str) -> None:
    engine = Engine(_config(), servers=FakeServers(_config(), mode))
    text, finished = _generate(engine, [0], 10)
    assert text == "bcdefghijk"
    stats = finished.stats
    assert stats.fallbacks == 0 and stats.drafted > 0
    assert (stats.accepted == stats.drafted) if mode == "right" else stats.accepted == 0
    # a wrong draft gains nothing: a token a round, or several once drafting pauses
    assert stats.rounds < 10 if mode == "right" else stats.rounds <= 10
    assert engine.status()["stats"]["accepted"] == stats.accepted
    assert _metric(engine, "tightwad_accepted_tokens_total") == stats.accepted


def test_a_second_request_starts_from_what_the_first_learned() -> None:
    config = _config(k_initial=1, overlap=False)  # buckets 1, 2, 4; one draft call a round
    # Verifies cost round trips, drafts almost nothing, and every draft is right: k = 4 pays.
    servers = FakeServers(config, "right", verify_sleep=0.005)
    engine = Engine(config, servers=servers)
    text, first = _generate(engine, [0], 16)
    assert text == "bcdefghijklmnopq"
    first_drafts = list(servers.drafts)
    assert first_drafts[:2] == [1, 1], first_drafts  # nothing learned yet: k_initial
    learned = engine.status()["speculation"]
    assert learned["k"] == 4 and learned["rounds_learned"] == len(first_drafts)
    assert learned["pair"] == {"target": "toy.gguf", "drafter": "toy-draft.gguf",
                               "verify_limit": 8}
    assert first.stats.alpha > 0.6  # above the prior: every draft was right
    assert learned["alpha"]["greedy"] == pytest.approx(first.stats.alpha, abs=1e-4)

    servers.drafts.clear()
    text, second = _generate(engine, [3], 16)
    assert text == "efghijklmnopqrst"
    assert servers.drafts[0] == 4, servers.drafts  # from the first round on
    assert second.stats.rounds < first.stats.rounds
    assert engine.status()["speculation"]["rounds_learned"] == len(first_drafts) + len(
        servers.drafts)


@pytest.mark.parametrize("mode", ["right", "sometimes", "wrong"])
def test_overlapped_drafting_uses_a_continuation_only_where_the_verify_went_its_way(
        mode: str) -> None:
    results = {}
    for overlap in (False, True):
        config = _config(k_initial=2, adaptive=False, overlap=overlap)
        servers = FakeServers(config, mode)
        engine = Engine(config, servers=servers)
        text, finished = _generate(engine, [0], 24)
        status = engine.status()["stats"]
        results[overlap] = (text, finished.stats.drafted, finished.stats.accepted)
        # every verified draft is the drafter's own after the context the target verified
        assert servers.foreign == 0
        used, dropped = status["continuations_used"], status["continuations_dropped"]
        if not overlap:
            assert used == dropped == 0
        elif mode == "right":  # every verify accepts all and the target's next token
            assert used > 0 and dropped <= 1, status  # (the last one: no next round)
        elif mode == "wrong":
            assert used == 0 and dropped > 0, status
        else:
            assert used > 0 and dropped > 0, status
        assert _metric(engine, 'tightwad_draft_continuations_total{used="true"}') == used
    assert results[True] == results[False]  # same text, same drafts verified, same acceptance
    assert results[True][0] == "bcdefghijklmnopqrstuvwxyz"[:24]


def test_where_drafting_cannot_pay_rounds_go_without_a_draft_and_it_says_so() -> None:
    config = _config(probe_every=0)
    # A drafter that takes a second a draft and is always wrong: never worth it.
    servers = FakeServers(config, "wrong", draft_seconds=1.0, verify_sleep=0.002)
    engine = Engine(config, servers=servers)
    text, first = _generate(engine, [0], 6)
    assert text == "bcdefg" and first.stats.drafted > 0  # nothing known yet: it drafted
    drafts, verifies = len(servers.drafts), servers.verifies
    text, second = _generate(engine, [0], 6)
    assert text == "bcdefg"  # the target's own output all the same
    assert len(servers.drafts) == drafts and second.stats.drafted == 0  # no draft asked
    assert second.stats.fallbacks == 0  # paused, not failing
    # paused: the target's tokens in one stream, not one call per token
    assert second.stats.rounds == 1 and servers.streamed[-1] == 6, servers.streamed
    assert servers.verifies == verifies  # and no verify
    status = engine.status()["speculation"]
    assert status["drafting"] is False, status
    assert status["reason"].startswith("compute-bound at 1 stream: best k=1 predicts")
    assert status["by_streams"]["1"]["target_only_measured"] is True
    assert _metric(engine, 'tightwad_speculation_paused{reason="compute_bound"}') == 1.0
    assert _metric(engine, "tightwad_speculation_k") == 1.0


def test_a_prompt_longer_than_the_context_is_refused_and_counted() -> None:
    engine = Engine(_config(), servers=FakeServers(_config(), "right"))

    async def main() -> list[Any]:
        return [e async for e in engine.generate(GenerationRequest(tuple(range(64)), 4))]

    [event] = asyncio.run(main())
    assert isinstance(event, Failed) and event.code == "context_length_exceeded"
    assert engine.status()["stats"]["requests"] == 1 and engine.status()["stats"]["failed"] == 1


# -- the drafter fallback policy of the real Servers ----------------------------------------


def _refused_url() -> str:
    """A loopback address where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_drafter_that_cannot_be_checked_falls_back_then_waits_out_its_backoff() -> None:
    config = parse_config({"target": {"url": _refused_url()},
                           "drafter": {"url": _refused_url()},
                           "speculation": {"mode": "remote"}}, env={})

    async def main() -> tuple[list[Drafted | NoDraft], dict[str, Any]]:
        servers = Servers(config)
        await servers.start()  # both down: not fatal
        try:
            request = CompletionRequest(prompt=[1, 2], n_predict=2, id_slot=0)
            first = await servers.draft(request)  # the tokenizer check fails: gate closes
            second = await servers.draft(request)  # within the backoff: no call at all
            return [first, second], servers.status()
        finally:
            await servers.close()

    answers, status = asyncio.run(main())
    assert answers == [NoDraft("down", retry=True), NoDraft("down", retry=True)]
    assert status["drafter"]["available"] is False and status["drafter"]["last_error"]
    assert not status["speculation_active"]


def test_the_drafter_gate_backs_off_and_resets() -> None:
    gate = DrafterGate(first_s=10.0)
    assert gate.open() and not gate.failing
    gate.failed("refused")
    assert not gate.open() and gate.failing and gate.last_error == "refused"
    gate.reset()
    assert gate.open() and not gate.failing


# -- telemetry ------------------------------------------------------------------------------


def test_one_round_feeds_the_request_the_status_and_prometheus() -> None:
    active = [True]
    telemetry = Telemetry(lambda: active[0])
    stats = telemetry.request_started("remote")
    telemetry.on_round(stats, Round(drafted=4, accepted=3, tokens=4, draft_seconds=0.01,
                                    verify_seconds=0.02))
    telemetry.on_fallback(stats, "busy")
    telemetry.on_http_answer("/v1/completions", 200)

    assert (stats.rounds, stats.drafted, stats.accepted, stats.tokens, stats.fallbacks) == (
        1, 4, 3, 4, 1)
    status = telemetry.status()
    assert {k: status[k] for k in ("requests", "rounds", "drafted", "accepted", "tokens",
                                   "fallbacks")} == {"requests": 1, "rounds": 1, "drafted": 4,
                                                     "accepted": 3, "tokens": 4, "fallbacks": 1}
    assert status["acceptance"] == status["recent_acceptance"] == 0.75
    assert status["mean_draft_ms"] == pytest.approx(10.0)
    assert status["mean_verify_ms"] == pytest.approx(20.0)

    series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in telemetry.prometheus().decode().splitlines()
              if line and not line.startswith("#")}
    assert series["tightwad_rounds_total"] == 1
    assert series["tightwad_draft_tokens_total"] == 4
    assert series["tightwad_accepted_tokens_total"] == 3
    assert series["tightwad_tokens_generated_total"] == 4
    assert series["tightwad_acceptance_ratio"] == 0.75
    assert series['tightwad_drafter_fallbacks_total{reason="busy"}'] == 1
    assert series['tightwad_requests_total{endpoint="/v1/completions",status="200"}'] == 1
    assert series["tightwad_verify_seconds_count"] == 1
    assert series["tightwad_speculation_active"] == 1.0
    active[0] = False
    assert b"tightwad_speculation_active 0.0" in telemetry.prometheus()


def test_status_keys_stay_those_clients_read() -> None:
    assert set(Telemetry().status()) == {
        "requests", "failed", "tokens", "rounds", "drafted", "accepted", "fallbacks",
        "acceptance", "recent_acceptance", "tokens_per_round", "mean_draft_ms",
        "mean_verify_ms", "continuations_used", "continuations_dropped"}


# -- llama-server's verify limit ------------------------------------------------------------


@pytest.mark.parametrize(("message", "limit"), [
    ("prompt_logprobs (33) exceeds the server limit (32), see --verify-max-tokens", 32),
    ("prompt_logprobs (9) exceeds the server limit (0), see --verify-max-tokens", 0),
    ("prompt_logprobs is not supported", None),
    ("the server limit (abc)", None),
    ("the server limit (", None),
])
def test_verify_limit_in_a_refusal(message: str, limit: int | None) -> None:
    assert verify_limit_in(message) == limit
