"""The decode loop (tightwad.engine) against real servers: a 2-worker pool whose coordinator
verifies drafts, and a same-tokenizer drafter.

Greedy identity: the proxy's remote-mode output must equal the target's own greedy output.
Batched verification differs from one-token decoding by float noise (docs/verify-api.md,
Numerics), so at a near-tie of the target's top two tokens the argmax may flip. A divergence is
accepted only when the proxy's and the reference's tokens are the target's top two at that
position with log-probabilities within ``TOL`` (the tolerance of tests/test_verify.py); such
cases are counted and reported, anything else fails.

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

import tightwad.rounds
from conftest import PROXY_SLOTS, proxy_config
from tightwad.engine import Engine, Failed, Finished, GenerationRequest, TextDelta
from tightwad.sampling import SamplingParams
from tightwad.speculation import Acceptance
from tightwad.testing.procs import LlamaServer

TOL = 1e-2  # natural-log tolerance for a near-tie, as in tests/test_verify.py
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
    finished: Finished | None
    failed: Failed | None = None


async def collect(engine: Engine, request: GenerationRequest) -> Run:
    tokens: list[int] = []
    text: list[str] = []
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            tokens += event.tokens
            text.append(event.text)
        elif isinstance(event, Finished):
            return Run(tokens, "".join(text), event)
        else:
            return Run(tokens, "".join(text), None, event)
    raise AssertionError("the engine ended without Finished or Failed")


async def started(config: Any) -> Engine:
    engine = Engine(config)
    await engine.start()
    return engine


def tokenize(server: LlamaServer, text: str) -> list[int]:
    return server.post("/tokenize", {"content": text, "add_special": True,
                                     "parse_special": True})["tokens"]


def target_alone(server: LlamaServer, prompt: list[int], n: int, **sampling: Any) -> dict:
    """What the target generates by itself: one plain (non-speculative) request."""
    return server.post("/completion", {
        "prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": False,
        "return_tokens": True, **sampling}, timeout=300)


def near_tie(server: LlamaServer, context: list[int], ours: int, theirs: int) -> float | None:
    """The top-2 gap at a diverging position when both tokens are the top two, else None."""
    res = server.post("/completion", {"prompt": context, "n_predict": 1, "temperature": 0,
                                      "n_probs": 5, "cache_prompt": False})
    top = {t["id"]: t["logprob"] for t in res["completion_probabilities"][0]["top_logprobs"]}
    best = sorted(top, key=top.get, reverse=True)[:2]  # type: ignore[arg-type]
    if sorted(best) != sorted({ours, theirs}) or len(best) < 2:
        return None
    return abs(top[ours] - top[theirs])


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
    gap = near_tie(server, prompt + theirs[:j], ours.tokens[j], theirs[j])
    assert gap is not None and gap <= TOL, (
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
            assert engine.up.speculation_active, engine.status()
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
    assert verdicts["same"] >= len(PROMPTS) - 2, verdicts
    for name, value in [("near_ties", verdicts["near-tie"]), ("acceptance", stats["acceptance"]),
                        ("tokens_per_round", stats["tokens_per_round"]),
                        ("proxy_tok_per_s", stats["tokens"] / seconds)]:
        record_property(name, value)
    print(f"\n{len(PROMPTS)} prompts x {N_TOKENS} tokens: {dict(verdicts)}; acceptance "
          f"{stats['acceptance']:.3f}, {stats['tokens_per_round']:.2f} tokens/round, "
          f"{stats['tokens'] / seconds:.0f} tok/s with {PROXY_SLOTS} concurrent")


# -- sampling -------------------------------------------------------------------------------

SAMPLING = SamplingParams(temperature=1.0, top_k=40, top_p=1.0, min_p=0.0)
CHI_PROMPT = "Hello world"  # the draft's first-token distribution differs a lot here (TV ~0.35)


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
    prompt = tuple(tokenize(coordinator, CHI_PROMPT))
    n_proxy, n_wrong = 800, 400

    # Target alone, sampling its first token: n_predict 1, a fresh seed per draw.
    def draw(seed: int) -> int:
        return target_alone(coordinator, list(prompt), 1, temperature=SAMPLING.temperature,
                            top_k=SAMPLING.top_k, top_p=SAMPLING.top_p, min_p=SAMPLING.min_p,
                            seed=seed)["tokens"][0]

    with ThreadPoolExecutor(PROXY_SLOTS) as pool:
        alone = Counter(pool.map(draw, range(1000, 1000 + n_proxy)))

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

    monkeypatch.setattr(tightwad.rounds, "speculative_sample", always_accept)
    wrong, _ = asyncio.run(first_tokens(n_wrong, 50_000))
    p_wrong = homogeneity_p(wrong, alone)
    record_property("p_proxy", p_ok)
    record_property("p_wrong_rule", p_wrong)
    print(f"\nchi-square p: proxy vs target {p_ok:.3g}, always-accept vs target {p_wrong:.3g}")
    assert p_ok > 1e-3, f"proxy sampling differs from the target's (p = {p_ok:.3g})"
    assert p_wrong < 1e-6, f"the test cannot see a wrong acceptance rule (p = {p_wrong:.3g})"


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
                slots = engine.up.target_slots
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
    assert run.tokens == ref["tokens"] and run.text == ref["content"]
    assert status["stats"]["drafted"] == 0


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
    assert run.tokens == ref["tokens"] and run.text == ref["content"]


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
            assert engine.up.speculation_active
            os.kill(drafter.pid, signal.SIGSTOP)  # hung, not dead: every draft call times out
            try:
                stalled = await collect(engine, GenerationRequest(prompt=tuple(prompt),
                                                                  max_tokens=48))
                during = engine.status()
            finally:
                os.kill(drafter.pid, signal.SIGCONT)
            engine.up.gate.retry_at = 0.0  # do not wait out the backoff in a test
            again = await collect(engine, GenerationRequest(prompt=tuple(prompt), max_tokens=48))
            return stalled, during, again, engine.status()
        finally:
            await engine.close()

    stalled, during, again, after = asyncio.run(scenario())
    assert stalled.failed is None and stalled.tokens == ref["tokens"]
    assert stalled.finished.stats.fallbacks > 0 and stalled.finished.stats.drafted == 0
    assert during["drafter"]["available"] is False
    assert again.tokens == ref["tokens"]
    assert again.finished.stats.drafted > 0, "drafting did not resume"
    assert after["drafter"]["available"] is True and after["speculation_active"]
