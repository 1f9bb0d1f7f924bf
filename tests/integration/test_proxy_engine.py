"""The decode loop (tightwad.engine.engine) against real servers: a 2-worker pool whose coordinator
verifies drafts, and a same-tokenizer drafter.

Greedy identity: the proxy's remote-mode output must equal the target's own greedy output.
Batched verification differs from one-token decoding by float noise (docs/verify-api.md,
Numerics), so at a near-tie of the target's top two tokens the argmax may flip. A divergence is
accepted only when the proxy's and the reference's tokens are the target's top two at that
position with log-probabilities within ``NEAR_TIE_TOL`` (twice the per-entry tolerance of
tests/test_verify.py: both entries may move);
such cases are counted and reported, anything else fails.

Sampling: a chi-square test over the first generated token after fixed prompts cannot tell the
proxy's output from the target sampling alone, while the same test detects a deliberately wrong
acceptance rule (always accept the draft).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

import tightwad.decoding.acceptance
from support import target_alone, tokenize
from tightwad.decoding.sampling import SamplingParams
from tightwad.decoding.speculation import Acceptance
from tightwad.engine.engine import Engine, Failed, Finished, GenerationRequest, TextDelta
from tightwad.pool.procs import LlamaServer
from tightwad_dev.inproc import NEAR_TIE_TOL, PROXY_SLOTS, greedy_text_verdict, proxy_config, top_two_gap

N_TOKENS = 128

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "東京の天気は",
    "Hello world",
    "import numpy as np",
    "1, 2, 3, 5, 8,",
    "The capital of France is",
    "Привет, как дела?",
    "😀 emoji party 🎉",
    "SELECT * FROM users WHERE",
    "In 1492, Columbus",
    "<html><body>",
    "Dear Sir or Madam,",
    "日本語のテキストと English mixed",
    "The mitochondria is",
    "for i in range(10):",
    "Breaking news:",
    "مرحبا بالعالم",
    "Once more, with feeling:",
]


@dataclass
class Run:
    tokens: list[int]
    text: str
    count: int
    finished: Finished | None
    failed: Failed | None = None


async def collect(engine: Engine, request: GenerationRequest) -> Run:
    tokens: list[int] = []
    text: list[str] = []
    count = 0
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            tokens += event.tokens
            count += event.count
            text.append(event.text)
        elif isinstance(event, Finished):
            assert event.completion_tokens == count
            return Run(tokens, "".join(text), count, event)
        else:
            return Run(tokens, "".join(text), count, None, event)
    raise AssertionError("the engine ended without Finished or Failed")


async def started(config: Any) -> Engine:
    engine = Engine(config)
    await engine.start()
    return engine


def compare_greedy(server: LlamaServer, prompt: list[int], ours: Run, ref: dict) -> str:
    """'same', or 'near-tie' (a flip the numerics allow); fails on anything else."""
    theirs = ref["tokens"]
    if ours.tokens == theirs:
        assert ours.text == ref["content"], "same tokens but different text: detokenization"
        return "same"
    j = next((i for i, (a, b) in enumerate(zip(ours.tokens, theirs)) if a != b),
             min(len(ours.tokens), len(theirs)))
    assert j < min(len(ours.tokens), len(theirs)), \
        f"outputs differ in length only ({len(ours.tokens)} vs {len(theirs)})"
    gap = top_two_gap(server, prompt + theirs[:j], ours.tokens[j], theirs[j])
    assert gap is not None and gap <= NEAR_TIE_TOL, (
        f"divergence at token {j}: proxy {ours.tokens[j]}, target alone {theirs[j]}, "
        f"not a near-tie of the target's top two (gap {gap})")
    return "near-tie"


# -- greedy -------------------------------------------------------------------------------


def test_greedy_remote_output_is_the_targets_own(spec_pool, record_property) -> None:
    coordinator = spec_pool.coordinator
    prompts = [tokenize(coordinator, p) for p in PROMPTS]
    with ThreadPoolExecutor(PROXY_SLOTS) as pool:
        refs = list(pool.map(lambda p: target_alone(coordinator, p, N_TOKENS), prompts))
    assert all(len(r["tokens"]) == N_TOKENS for r in refs), "reference stopped early"

    async def scenario() -> tuple[list[Run], dict, float]:
        engine = await started(proxy_config(coordinator, spec_pool.drafter))
        try:
            assert engine.speculation_active, engine.status()
            t0 = time.monotonic()
            runs = await asyncio.gather(*(
                collect(engine, GenerationRequest(prompt=tuple(p), max_tokens=N_TOKENS))
                for p in prompts))
            return runs, engine.status(), time.monotonic() - t0
        finally:
            await engine.close()

    runs, status, seconds = asyncio.run(scenario())
    verdicts = Counter(compare_greedy(coordinator, p, run, ref)
                       for p, run, ref in zip(prompts, runs, refs))
    stats = status["stats"]
    assert 0 < stats["accepted"] < stats["drafted"], stats  # acceptance neither 0 nor 1
    assert stats["tokens"] == N_TOKENS * len(PROMPTS)
    assert stats["tokens_per_round"] > 1.0, stats  # speculation actually saved passes
    assert stats["fallbacks"] == 0
    # Each near-tie was checked above; many of them would point at a numerics regression.
    assert verdicts["near-tie"] <= len(PROMPTS) // 4, verdicts
    for name, value in [("near_ties", verdicts["near-tie"]), ("acceptance", stats["acceptance"]),
                        ("tokens_per_round", stats["tokens_per_round"]),
                        ("proxy_tok_per_s", stats["tokens"] / seconds)]:
        record_property(name, value)
    print(f"\n{len(PROMPTS)} prompts x {N_TOKENS} tokens: {dict(verdicts)}; acceptance "
          f"{stats['acceptance']:.3f}, {stats['tokens_per_round']:.2f} tokens/round, "
          f"{stats['tokens'] / seconds:.0f} tok/s with {PROXY_SLOTS} concurrent")


def test_estimates_carry_over_between_requests(spec_pool) -> None:
    """One drafter/target pair, one set of estimates: every request reads and teaches it (the
    engine's PairLearning), and the output is still the target's own."""
    coordinator = spec_pool.coordinator
    prompts = [tokenize(coordinator, p) for p in PROMPTS[:4]]
    refs = [target_alone(coordinator, p, 48) for p in prompts]

    async def scenario() -> tuple[list[Run], list[dict], list[Any]]:
        engine = await started(proxy_config(coordinator, spec_pool.drafter))
        try:
            runs, seen, learned = [], [], []
            for p in prompts:
                runs.append(await collect(engine, GenerationRequest(prompt=tuple(p),
                                                                    max_tokens=48)))
                seen.append(engine.status()["speculation"])
                learned.append(engine.learning.current)
            return runs, seen, learned
        finally:
            await engine.close()

    runs, seen, learned = asyncio.run(scenario())
    for p, run, ref in zip(prompts, runs, refs):
        compare_greedy(coordinator, p, run, ref)
    assert all(x is learned[0] for x in learned), "a request started from scratch"
    pair = learned[0]
    stats = [run.finished.stats for run in runs]
    assert stats[0].drafted > 0  # nothing learned yet: the first request drafts
    # The pair's estimate holds every request's rounds, not only the last one's.
    assert pair.acceptance[True].drafted == sum(s.drafted for s in stats)
    assert pair.acceptance[True].accepted == sum(s.accepted for s in stats)
    learned_rounds = [s["rounds_learned"] for s in seen]
    assert learned_rounds == sorted(learned_rounds) and learned_rounds[0] > 0, learned_rounds
    first = seen[0]
    assert first["pair"]["target"] and first["pair"]["drafter"], first  # as the servers say
    assert first["pair"]["target"] != first["pair"]["drafter"]
    assert first["by_streams"]["1"]["verify"] is not None, first  # timed rounds, one stream
    assert all(s["k"] in s["buckets"] for s in seen), seen
    print(f"\nspeculation after {len(prompts)} requests: {seen[-1]}")


# -- sampling -------------------------------------------------------------------------------

SAMPLING = SamplingParams(temperature=1.0, top_k=40, top_p=1.0, min_p=0.0)
# Prompts after which draft and target tend to disagree on the first token; the test takes the
# one where they disagree most (total variation of the two sampling distributions), so that a
# rule that returns the draft's distribution instead of the target's is visible.
CHI_PROMPTS = ["Once upon a time", "In 1492", "The capital of France is", "<html>", "1, 2, 3,"]


def first_token_dist(server: LlamaServer, prompt: list[int]) -> dict[int, float]:
    from tightwad.decoding.sampling import apply_chain

    res = server.post("/completion", {"prompt": prompt, "n_predict": 1, "temperature": 0,
                                      "n_probs": SAMPLING.top_k, "cache_prompt": False})
    top = res["completion_probabilities"][0]["top_logprobs"]
    return apply_chain([(t["id"], t["logprob"]) for t in top], SAMPLING)


def most_disputed_prompt(target: LlamaServer, drafter: LlamaServer) -> tuple[list[int], float]:
    best: tuple[list[int], float] = ([], -1.0)
    for text in CHI_PROMPTS:
        prompt = tokenize(target, text)
        p, q = first_token_dist(target, prompt), first_token_dist(drafter, prompt)
        tv = 0.5 * sum(abs(p.get(t, 0.0) - q.get(t, 0.0)) for t in set(p) | set(q))
        if tv > best[1]:
            best = (prompt, tv)
    return best


def chi2_sf(x: float, dof: int) -> float:
    """P(X > x) for X ~ chi-square(dof): the regularized upper incomplete gamma Q(dof/2, x/2)."""
    a, z = dof / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    if z < a + 1:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        n = a
        while abs(term) > 1e-15 * abs(total):
            n += 1
            term *= z / n
            total += term
        return max(0.0, 1.0 - total * math.exp(-z + a * math.log(z) - math.lgamma(a)))
    # Lentz's continued fraction for Q
    tiny = 1e-300
    b = z + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h * math.exp(-z + a * math.log(z) - math.lgamma(a))


def target_draws(server: LlamaServer, prompt: tuple[int, ...], position: int,
                 seeds: range) -> Counter:
    """The target alone sampling ``position`` tokens after ``prompt`` (SAMPLING, a fresh seed
    per draw): how often each token came last."""
    def draw(seed: int) -> int:
        return target_alone(server, list(prompt), position, temperature=SAMPLING.temperature,
                            top_k=SAMPLING.top_k, top_p=SAMPLING.top_p, min_p=SAMPLING.min_p,
                            seed=seed)["tokens"][position - 1]

    with ThreadPoolExecutor(PROXY_SLOTS) as pool:
        return Counter(pool.map(draw, seeds))


def homogeneity_p(a: Counter, b: Counter) -> float:
    """Two-sample chi-square test of equal distributions; rare tokens pooled into one bin."""
    na, nb = sum(a.values()), sum(b.values())
    bins: dict[Any, tuple[int, int]] = {}
    for token in set(a) | set(b):
        key = token if a[token] + b[token] >= 10 else "rest"
        x, y = bins.get(key, (0, 0))
        bins[key] = (x + a[token], y + b[token])
    stat = 0.0
    for x, y in bins.values():
        total = x + y
        for observed, n in ((x, na), (y, nb)):
            expected = total * n / (na + nb)
            stat += (observed - expected) ** 2 / expected
    return chi2_sf(stat, len(bins) - 1)


def test_sampling_is_indistinguishable_from_the_target_and_a_wrong_rule_is_not(
        spec_pool, monkeypatch, record_property) -> None:
    coordinator = spec_pool.coordinator
    chosen, tv = most_disputed_prompt(coordinator, spec_pool.drafter)
    assert tv > 0.15, f"the test models' draft agrees with the target too well (TV {tv:.3f})"
    prompt = tuple(chosen)
    n_proxy, n_wrong = 800, 400

    alone = target_draws(coordinator, prompt, 1, range(1000, 1000 + n_proxy))

    async def first_tokens(n: int, seed0: int) -> tuple[Counter, dict]:
        engine = await started(proxy_config(coordinator, spec_pool.drafter,
                                            speculation={"adaptive": False, "k_initial": 1}))
        try:
            # max_tokens 2 with k = 1: the first token is the accepted draft or the residual draw.
            runs = await asyncio.gather(*(collect(engine, GenerationRequest(
                prompt=prompt, max_tokens=2, sampling=SamplingParams(
                    **{**vars(SAMPLING), "seed": seed0 + i}))) for i in range(n)))
            return Counter(run.tokens[0] for run in runs), engine.status()["stats"]
        finally:
            await engine.close()

    proxy, stats = asyncio.run(first_tokens(n_proxy, 1))
    assert stats["drafted"] == n_proxy and 0 < stats["accepted"] < n_proxy, stats
    p_ok = homogeneity_p(proxy, alone)

    def always_accept(draft, q, p, rng):  # the wrong rule: keep every drafted token
        return Acceptance(len(draft), len(draft), (*draft, rng.draw(p[len(draft)])))

    monkeypatch.setattr(tightwad.decoding.acceptance, "speculative_sample", always_accept)
    wrong, _ = asyncio.run(first_tokens(n_wrong, 50_000))
    p_wrong = homogeneity_p(wrong, alone)
    record_property("total_variation", tv)
    record_property("p_proxy", p_ok)
    record_property("p_wrong_rule", p_wrong)
    print(f"\nfirst token, TV(target, draft) {tv:.3f}: chi-square p proxy vs target {p_ok:.3g}, "
          f"always-accept vs target {p_wrong:.3g}")
    assert p_ok > 1e-3, f"proxy sampling differs from the target's (p = {p_ok:.3g})"
    assert p_wrong < 1e-6, f"the test cannot see a wrong acceptance rule (p = {p_wrong:.3g})"


def test_sampling_through_continued_drafts_is_the_targets(spec_pool, record_property) -> None:
    """Overlapped drafting: a round whose draft is the continuation the drafter wrote while the
    last verify ran samples the target's distribution too. The third token of 4 with k = 1 comes
    from the second round, which drafts from a continuation whenever the first round accepted its
    draft and the target's next token was the continuation's first."""
    coordinator = spec_pool.coordinator
    prompt = tuple(tokenize(coordinator, PROMPTS[0]))
    n = 600

    alone = target_draws(coordinator, prompt, 3, range(5000, 5000 + n))

    async def scenario() -> tuple[Counter, dict]:
        engine = await started(proxy_config(coordinator, spec_pool.drafter, speculation={
            "adaptive": False, "k_initial": 1, "overlap": True}))
        try:
            runs = await asyncio.gather(*(collect(engine, GenerationRequest(
                prompt=prompt, max_tokens=4, sampling=SAMPLING)) for _ in range(n)))
            assert all(run.failed is None for run in runs)
            return Counter(run.tokens[2] for run in runs), engine.status()["stats"]
        finally:
            await engine.close()

    proxy, stats = asyncio.run(scenario())
    # At temperature 1 the target's token after an accepted draft is the continuation's first
    # in ~10% of requests (59 of 600 measured): enough to see the path taken.
    assert stats["continuations_used"] >= n // 20, stats
    p_value = homogeneity_p(proxy, alone)
    record_property("p_continued", p_value)
    record_property("continuations_used", stats["continuations_used"])
    print(f"\nthird token through continued drafts ({stats['continuations_used']} used, "
          f"{stats['continuations_dropped']} dropped): chi-square p {p_value:.3g}")
    assert p_value > 1e-3, f"continued drafts change the distribution (p = {p_value:.3g})"


def test_chi2_sf_matches_known_quantiles() -> None:
    assert abs(chi2_sf(3.841, 1) - 0.05) < 1e-3
    assert abs(chi2_sf(18.307, 10) - 0.05) < 1e-3
    assert abs(chi2_sf(124.342, 100) - 0.05) < 1e-3
    assert chi2_sf(0.0, 3) == 1.0


# -- concurrency and slots ------------------------------------------------------------------


def mixed_requests(coordinator: LlamaServer) -> list[GenerationRequest]:
    hot = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02)
    requests = []
    for i, text in enumerate(PROMPTS[:8]):
        prompt = tuple(tokenize(coordinator, text))
        if i % 3 == 0:
            requests.append(GenerationRequest(prompt=prompt, max_tokens=48))
        elif i % 3 == 1:
            requests.append(GenerationRequest(prompt=prompt, max_tokens=40, sampling=
                                              SamplingParams(**{**vars(hot), "seed": 7 + i})))
        else:
            requests.append(GenerationRequest(prompt=prompt, max_tokens=64, stop=(" the", "\n")))
    return requests


def test_concurrent_mixed_requests_equal_each_request_alone(spec_pool) -> None:
    requests = mixed_requests(spec_pool.coordinator)

    async def scenario() -> tuple[list[Run], list[Run], int, int]:
        engine = await started(proxy_config(spec_pool.coordinator, spec_pool.drafter))
        try:
            alone = [await collect(engine, r) for r in requests]
            peak_busy = peak_waiting = 0

            async def watch() -> None:
                nonlocal peak_busy, peak_waiting
                slots = engine.servers.target_slots
                assert slots is not None
                while True:
                    peak_busy = max(peak_busy, slots.in_use)
                    peak_waiting = max(peak_waiting, slots.waiting)
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch())
            together = await asyncio.gather(*(collect(engine, r) for r in requests))
            watcher.cancel()
            return alone, list(together), peak_busy, peak_waiting
        finally:
            await engine.close()

    alone, together, peak_busy, peak_waiting = asyncio.run(scenario())
    for request, a, b in zip(requests, alone, together):
        assert a.failed is None and b.failed is None
        if request.sampling.greedy and b.tokens != a.tokens:
            # Concurrent slots share the target's batches, so the verify batches differ from
            # the lone run's: only a near-tie may flip.
            # Where one output is a prefix of the other, the shorter took a token there that
            # ended it (a stop string's), so only the longer's token is known.
            j = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y),
                     min(len(a.tokens), len(b.tokens)))
            longer = a.tokens if len(a.tokens) > len(b.tokens) else b.tokens
            gap = top_two_gap(spec_pool.coordinator, list(request.prompt) + longer[:j],
                              *((a.tokens[j], b.tokens[j]) if j < min(len(a.tokens),
                                len(b.tokens)) else (longer[j], None)))
            assert gap is not None and gap <= NEAR_TIE_TOL, \
                f"request {request.prompt[:4]}... differs among others at token {j}"
            continue
        assert (b.tokens, b.text, b.finished.reason) == (a.tokens, a.text, a.finished.reason), \
            f"request {request.prompt[:4]}... differs when run among others"
    assert peak_busy == PROXY_SLOTS and peak_waiting > 0  # 8 requests on 4 slots: some queued
    assert any(r.finished.reason == "stop" for r in alone), "no stop string was exercised"


def test_stop_strings_end_the_output_before_them(spec_pool) -> None:
    coordinator = spec_pool.coordinator
    prompt = tokenize(coordinator, PROMPTS[0])
    ref = target_alone(coordinator, prompt, 64)
    words = ref["content"].split(" ")
    stop = " " + words[len(words) // 2]  # a stop string the output certainly contains

    async def scenario() -> Run:
        engine = await started(proxy_config(coordinator, spec_pool.drafter))
        try:
            return await collect(engine, GenerationRequest(prompt=tuple(prompt), max_tokens=64,
                                                           stop=(stop,)))
        finally:
            await engine.close()

    run = asyncio.run(scenario())
    assert run.finished is not None and run.finished.reason == "stop"
    assert run.text == ref["content"][: ref["content"].index(stop)]


# -- degraded upstreams ---------------------------------------------------------------------


def test_foreign_drafter_disables_speculation_and_output_stays_correct(spec_pool, procs,
                                                                      models) -> None:
    foreign = procs.llama_server(models.foreign, name="foreign-drafter")
    coordinator = spec_pool.coordinator
    prompt = tokenize(coordinator, PROMPTS[1])
    ref = target_alone(coordinator, prompt, 32)

    async def scenario() -> tuple[Run, dict]:
        engine = await started(proxy_config(coordinator, foreign))
        try:
            return (await collect(engine, GenerationRequest(prompt=tuple(prompt), max_tokens=32)),
                    engine.status())
        finally:
            await engine.close()

    run, status = asyncio.run(scenario())
    check = status["tokenizer_check"]
    assert check["match"] is False and "differs" in check["reason"], check
    assert status["speculation_active"] is False
    assert run.text == ref["content"] and run.count == len(ref["tokens"])
    assert status["stats"]["drafted"] == 0
    assert status["stats"]["rounds"] == 0  # passed through: one streamed target request


def test_coordinator_without_verify_support_passes_through(spec_pool) -> None:
    # The drafter's server has no --verify-max-tokens: as a target it cannot verify.
    server = spec_pool.drafter
    prompt = tokenize(server, PROMPTS[2])
    ref = target_alone(server, prompt, 24)

    async def scenario() -> tuple[Run, dict]:
        engine = await started(proxy_config(server, spec_pool.drafter))
        try:
            return (await collect(engine, GenerationRequest(prompt=tuple(prompt), max_tokens=24)),
                    engine.status())
        finally:
            await engine.close()

    run, status = asyncio.run(scenario())
    assert status["target"]["verify_limit"] == 0 and "--verify-max-tokens" in \
        status["target"]["verify"]
    assert not status["speculation_active"]
    assert run.text == ref["content"] and run.count == len(ref["tokens"])


def test_stalled_drafter_costs_speed_not_answers_and_drafting_resumes(spec_pool, procs,
                                                                      models) -> None:
    drafter = procs.llama_server(models.draft, name="stalling-drafter", slots=PROXY_SLOTS)
    coordinator = spec_pool.coordinator
    prompt = tokenize(coordinator, PROMPTS[4])
    ref = target_alone(coordinator, prompt, 48)
    config = proxy_config(coordinator, drafter, drafter={"timeout_s": 0.3})

    async def scenario() -> tuple[Run, dict, Run, dict]:
        engine = await started(config)
        try:
            assert engine.speculation_active
            os.kill(drafter.pid, signal.SIGSTOP)  # hung, not dead: every draft call times out
            try:
                stalled = await collect(engine, GenerationRequest(prompt=tuple(prompt),
                                                                  max_tokens=48))
                during = engine.status()
            finally:
                os.kill(drafter.pid, signal.SIGCONT)
            engine.servers.drafter_gate.retry_at = 0.0  # do not wait out the backoff in a test
            again = await collect(engine, GenerationRequest(prompt=tuple(prompt), max_tokens=48))
            return stalled, during, again, engine.status()
        finally:
            await engine.close()

    stalled, during, again, after = asyncio.run(scenario())
    assert stalled.failed is None and stalled.tokens == ref["tokens"]
    assert stalled.finished.stats.fallbacks > 0 and stalled.finished.stats.drafted == 0
    # with the drafter out, the target streams its tokens (a round per 8), not one call each
    assert stalled.finished.stats.rounds <= 48 // 4, stalled.finished.stats
    assert during["drafter"]["available"] is False
    assert again.tokens == ref["tokens"]
    assert again.finished.stats.drafted > 0, "drafting did not resume"
    assert after["drafter"]["available"] is True and after["speculation_active"]


@pytest.mark.parametrize("mode", ["native", "off"])
def test_native_and_off_modes_pass_through(procs, models, mode: str) -> None:
    args = ["--spec-type", "draft-simple", "--spec-draft-model", str(models.draft)] \
        if mode == "native" else []
    target = procs.llama_server(models.target, name=f"{mode}-target", slots=2, args=args)
    prompt = tokenize(target, PROMPTS[0])
    ref = target_alone(target, prompt, 40)

    async def scenario() -> tuple[Run, dict]:
        engine = await started(proxy_config(target, None, speculation={"mode": mode},
                                            target={"slots": 2}))
        try:
            return (await collect(engine, GenerationRequest(prompt=tuple(prompt), max_tokens=40)),
                    engine.status())
        finally:
            await engine.close()

    run, status = asyncio.run(scenario())
    assert status["mode"] == mode and status["drafter"] is None
    assert not status["speculation_active"] and status["stats"]["rounds"] == 0
    assert run.finished.reason == "length" and run.count == 40
    if mode == "off":
        assert run.text == ref["content"]
    else:  # the coordinator's own speculation: its greedy output up to near-ties
        greedy_text_verdict(target, prompt, run.text, ref)
        assert "draft acceptance" in target.log_text()  # it did speculate itself
