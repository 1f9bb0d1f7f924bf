"""The graph's top n (patch 0005-graph-top-n.patch, docs/verify-api.md "Top n on the device").

With ``--output-top-n N`` the coordinator reduces each output row to its top N tokens on the RPC
worker that holds the output layer, so a verify moves (k + 1) x 3N floats over the link instead
of (k + 1) x n_vocab. These tests run a real 2-worker pool with the 128k-vocabulary test target,
each worker behind a counting link relay, and hold the new path to the full-logits path:

- the same positions through both paths (a request with ``n_probs`` > N takes the full path on
  the same server): ids and order equal, log-probabilities within test_verify.py's tolerance;
  a scored token outside the top N reports the most negative float;
- a sampled verify (top_k <= N) samples the same token from the same seed;
- bytes: a k = 8 verify moves <= 64 KB from the workers (the full path ~4.6 MB), a plain
  greedy step a few KB instead of n_vocab x 4;
- a server without the flag answers stock-shaped requests exactly as one with it (JSON equal
  apart from timings), greedy generation included;
- through the proxy's speculation loop, greedy output is the target's own and the verifies move
  kilobytes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import target_alone, tokenize
from tightwad.engine.engine import Engine, Finished, GenerationRequest, TextDelta
from tightwad.pool.linkemu import LinkStats, RelayThread
from tightwad.pool.procs import LlamaServer, ProcessGroup
from tightwad_dev.inproc import NEAR_TIE_TOL, proxy_config, top_two_gap
from tightwad_dev.models import ModelSet

TOP_N = 16
FULL = TOP_N + 1  # n_probs above the server's N: the same request through the full logits
VERIFY_MAX = 32
# test_verify.py's tolerance (natural log): |a - b| <= TOL + RTOL * |a|. Both paths here see
# the same logits, so they differ only by the softmax's rounding; the test prints the largest.
TOL = 1e-2
RTOL = 2e-3
TIE = 1e-5  # entries this close may come in either order (the full path's sort is unstable)
LOWEST = -3.0e38  # llama-server's log of a probability it does not have (the most negative float)
PAYLOAD_LIMIT = 64 * 1024

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "東京の天気は",
]

pytestmark = pytest.mark.timeout(600)


def close(got: float, want: float) -> bool:
    return abs(got - want) <= TOL + RTOL * max(abs(got), abs(want))


@dataclass
class TopNPool:
    server: LlamaServer  # --output-top-n TOP_N, workers behind counting relays
    stock: LlamaServer  # the same without the flag, on workers of its own
    drafter: LlamaServer
    relays: RelayThread
    n_vocab: int

    def post(self, body: dict, server: LlamaServer | None = None) -> tuple[dict, LinkStats]:
        """One ``/completion`` and the bytes it moved over the flagged pool's links."""
        before = self.relays.stats()
        res = (server or self.server).post("/completion", body, timeout=300)
        after = self.relays.stats()
        moved = sum((a - b for a, b in zip(after, before)), LinkStats())
        return res, moved


@pytest.fixture(scope="module")
def pool(bin_dir: Path, models: ModelSet,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[TopNPool]:
    with ProcessGroup(bin_dir=bin_dir, log_dir=tmp_path_factory.mktemp("logs-topn")) as group:
        workers = [group.rpc_worker(name=f"worker{i}") for i in range(2)]
        with RelayThread([w.endpoint for w in workers], "none") as relays:
            server = group.llama_server(
                models.target, name="coordinator", rpc=relays.endpoints, slots=2, timeout=300,
                args=["--verify-max-tokens", str(VERIFY_MAX), "--output-top-n", str(TOP_N)])
            stock = group.llama_server(
                models.target, name="stock", slots=2, timeout=300,
                rpc=[group.rpc_worker(name=f"stock-worker{i}") for i in range(2)],
                args=["--verify-max-tokens", str(VERIFY_MAX)])
            drafter = group.llama_server(models.draft, name="drafter", slots=2)
            n_vocab = server.get("/v1/models")["data"][0]["meta"]["n_vocab"]
            yield TopNPool(server, stock, drafter, relays, n_vocab)
            group.close()  # before the relays go: a coordinator that loses a worker aborts


def body(prompt: list[int], *, n_predict: int, n_probs: int, slot: int = 0, **extra) -> dict:
    return {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "n_probs": n_probs,
            "cache_prompt": True, "id_slot": slot, "return_tokens": True, **extra}


def greedy(pool: TopNPool, prompt: list[int], n: int, *, slot: int = 1) -> list[int]:
    res, _ = pool.post(body(prompt, n_predict=n, n_probs=0, slot=slot, ignore_eos=True))
    assert len(res["tokens"]) == n
    return res["tokens"]


def same_position(top: dict, full: dict, stats: dict[str, float]) -> None:
    """One position's entry from the top-n path against the full path's."""
    assert top["id"] == full["id"]
    got, want = top["top_logprobs"], full["top_logprobs"]
    assert len(got) == TOP_N and len(want) == FULL
    for i, (g, w) in enumerate(zip(got, want)):
        stats["max_diff"] = max(stats["max_diff"], abs(g["logprob"] - w["logprob"]))
        assert close(g["logprob"], w["logprob"]), (i, g, w)
        if g["id"] != w["id"]:  # only an exact tie may swap (ours: lowest id first)
            assert abs(g["logprob"] - w["logprob"]) <= TIE and g["id"] in {x["id"] for x in want}
            stats["ties"] += 1
        else:
            assert g["bytes"] == w["bytes"]
    listed = {t["id"]: t["logprob"] for t in got}
    if top["id"] in listed:
        assert top["logprob"] == listed[top["id"]]
        assert close(top["logprob"], full["logprob"])
    else:  # outside the top N: not computed, reported as llama-server reports a lost probability
        assert top["logprob"] <= LOWEST
        assert full["logprob"] <= got[-1]["logprob"] + TOL
        stats["outside"] += 1
    stats["positions"] += 1


def test_top_n_equals_the_full_logits_on_the_same_positions(pool: TopNPool) -> None:
    stats = {"positions": 0, "ties": 0, "outside": 0, "max_diff": 0.0}
    for text in PROMPTS:
        prompt = tokenize(pool.server, text)
        cont = greedy(pool, prompt, 17)
        for k in (1, 4, 8, 16):
            # a wrong last draft token: a rejection, whose token may lie outside the top N
            draft = cont[:k - 1] + [(cont[k - 1] + 7919) % pool.n_vocab]
            top, _ = pool.post(body(prompt + draft, n_predict=1, n_probs=TOP_N,
                                    prompt_logprobs=k))
            full, _ = pool.post(body(prompt + draft, n_predict=1, n_probs=FULL,
                                     prompt_logprobs=k))
            assert full["timings"]["prompt_n"] == k + 1  # the same k + 1 rows, from the cache
            assert len(top["prompt_probabilities"]) == len(full["prompt_probabilities"]) == k
            for t, f in zip(top["prompt_probabilities"], full["prompt_probabilities"]):
                same_position(t, f, stats)
            # the accepted prefix agrees with greedy decoding
            for j in range(k - 1):
                assert top["prompt_probabilities"][j]["top_logprobs"][0]["id"] == cont[j]
            assert top["tokens"] == full["tokens"]
            if full["completion_probabilities"]:
                (t,), (f,) = top["completion_probabilities"], full["completion_probabilities"]
                same_position(t, f, stats)
    print(f"\ncompared {stats['positions']:.0f} positions: max |logprob diff| "
          f"{stats['max_diff']:.2e}, swapped ties {stats['ties']:.0f}, scored tokens outside "
          f"the top {TOP_N}: {stats['outside']:.0f}")
    assert stats["outside"] > 0, "no rejected token fell outside the top N: the test lost its edge"


def test_a_sampled_verify_draws_the_same_token(pool: TopNPool) -> None:
    prompt = tokenize(pool.server, PROMPTS[1])
    cont = greedy(pool, prompt, 8)
    sampled = {"temperature": 0.9, "top_k": 10, "top_p": 0.95, "min_p": 0.02,
               "samplers": ["top_k", "top_p", "min_p", "temperature"]}
    stats = {"positions": 0, "ties": 0, "outside": 0, "max_diff": 0.0}
    drawn = set()
    for seed in range(8):
        req = body(prompt + cont, n_predict=1, n_probs=TOP_N, prompt_logprobs=8, seed=seed,
                   **sampled)
        top, moved_top = pool.post(req)
        full, moved_full = pool.post({**req, "n_probs": FULL})
        assert top["tokens"] == full["tokens"], seed
        drawn.add(top["tokens"][0])
        for t, f in zip(top["prompt_probabilities"], full["prompt_probabilities"]):
            same_position(t, f, stats)
        assert moved_top.bytes_down <= PAYLOAD_LIMIT < moved_full.bytes_down
    assert len(drawn) > 1, "the seeds all drew one token: the test cannot tell a sampler from argmax"


def test_a_k8_verify_moves_kilobytes_instead_of_megabytes(pool: TopNPool) -> None:
    prompt = tokenize(pool.server, PROMPTS[0])
    draft = greedy(pool, prompt, 8)
    moved = {}
    for n_probs in (1, FULL, 1, FULL):  # the second of each is warm: graph and buffers in place
        _, moved[n_probs] = pool.post(body(prompt + draft, n_predict=1, n_probs=n_probs,
                                           prompt_logprobs=8))
    full_logits = 9 * pool.n_vocab * 4
    print(f"\nk = 8 verify, bytes from the workers: top {TOP_N}: {moved[1].bytes_down}, "
          f"full logits: {moved[FULL].bytes_down} (9 x n_vocab x 4 = {full_logits})")
    assert moved[1].bytes_down <= PAYLOAD_LIMIT
    assert moved[FULL].bytes_down >= full_logits


def test_plain_greedy_decoding_moves_kilobytes_per_token(pool: TopNPool) -> None:
    prompt = tokenize(pool.server, PROMPTS[2])
    n = 16
    runs = {}
    for n_probs in (0, 1, 0, 1):  # n_probs 0: the top n; 1: stock-shaped lists, full logits
        runs[n_probs] = pool.post(body(prompt, n_predict=n, n_probs=n_probs, slot=0,
                                       cache_prompt=False, ignore_eos=True))
    (top, moved_top), (full, moved_full) = runs[0], runs[1]
    assert top["tokens"] == full["tokens"]
    per_token_top = moved_top.bytes_down / n
    per_token_full = moved_full.bytes_down / n
    print(f"\nplain greedy decoding, bytes from the workers per token: top {TOP_N}: "
          f"{per_token_top:.0f}, full logits: {per_token_full:.0f}")
    assert per_token_top * 10 <= per_token_full
    assert per_token_full >= pool.n_vocab * 4


def test_stock_requests_answer_as_without_the_flag(pool: TopNPool) -> None:
    """Greedy generation (the top-n path on the flagged server) and every request shape that
    keeps the full logits give the same JSON, timings aside."""
    shapes = {
        "greedy": {"temperature": 0},
        "greedy, ignore_eos": {"temperature": 0, "ignore_eos": True},
        "greedy with n_probs": {"temperature": 0, "n_probs": 5},
        "sampled": {"temperature": 0.8, "seed": 42},
        "sampled with n_probs": {"temperature": 0.8, "seed": 7, "n_probs": 3},
        "greedy with a repeat penalty": {"temperature": 0, "repeat_penalty": 1.3},
    }
    for text in PROMPTS:
        prompt = tokenize(pool.stock, text)
        for why, extra in shapes.items():
            req = {"prompt": prompt, "n_predict": 24, "cache_prompt": False,
                   "return_tokens": True, **extra}
            want = pool.stock.post("/completion", req, timeout=300)
            got = pool.server.post("/completion", req, timeout=300)
            for res in (want, got):
                res.pop("timings")
            assert got == want, (why, text)


def test_a_batch_mixing_top_n_and_full_rows_falls_back_to_full_logits(pool: TopNPool) -> None:
    """A verify on one slot and a request that needs the full logits on the other, at once:
    whatever batches the server forms, each answer equals the one it gets alone."""
    prompt = tokenize(pool.server, PROMPTS[3])
    cont = greedy(pool, prompt, 12)
    alone_verify, _ = pool.post(body(prompt + cont[:8], n_predict=1, n_probs=4,
                                     prompt_logprobs=8, slot=0))
    other = body(prompt, n_predict=12, n_probs=3, slot=1, cache_prompt=False, ignore_eos=True)
    alone_other, _ = pool.post(other)
    results: dict[str, dict] = {}

    def run(name: str, req: dict) -> None:
        results[name] = pool.server.post("/completion", req, timeout=300)

    threads = [threading.Thread(target=run, args=("verify", body(
        prompt + cont[:8], n_predict=1, n_probs=4, prompt_logprobs=8, slot=0, cache_prompt=False))),
        threading.Thread(target=run, args=("other", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results["verify"]["tokens"] == alone_verify["tokens"]
    assert results["other"]["tokens"] == alone_other["tokens"] == cont
    for got, want in zip(results["verify"]["prompt_probabilities"],
                         alone_verify["prompt_probabilities"]):
        assert [t["id"] for t in got["top_logprobs"]] == [t["id"] for t in want["top_logprobs"]]
        assert all(close(g["logprob"], w["logprob"])
                   for g, w in zip(got["top_logprobs"], want["top_logprobs"]))


def test_greedy_speculation_through_the_proxy_is_the_targets_own(pool: TopNPool) -> None:
    """The proxy's own verifies (greedy: n_probs 1 + banned) take the top-n path."""
    n_tokens = 64
    prompts = [tokenize(pool.stock, p) for p in PROMPTS]
    refs = [target_alone(pool.stock, p, n_tokens, ignore_eos=True) for p in prompts]

    async def scenario() -> tuple[list[list[int]], dict]:
        engine = Engine(proxy_config(pool.server, pool.drafter, target={"slots": 2},
                                     drafter={"slots": 2}))
        await engine.start()
        try:
            assert engine.speculation_active, engine.status()
            outs = []
            for prompt in prompts:
                tokens: list[int] = []
                async for event in engine.generate(GenerationRequest(
                        prompt=tuple(prompt), max_tokens=n_tokens, ignore_eos=True)):
                    if isinstance(event, TextDelta):
                        tokens += event.tokens
                    else:
                        assert isinstance(event, Finished), event
                        break
                outs.append(tokens)
            return outs, engine.status()
        finally:
            await engine.close()

    before = pool.relays.stats()
    outs, status = asyncio.run(scenario())
    moved = sum((a - b for a, b in zip(pool.relays.stats(), before)), LinkStats())
    for prompt, ours, ref in zip(prompts, outs, refs):
        theirs = ref["tokens"]
        if ours != theirs:  # only a near-tie of the target's top two may part them
            j = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            gap = top_two_gap(pool.stock, prompt + theirs[:j], ours[j], theirs[j])
            assert gap is not None and gap <= NEAR_TIE_TOL, (j, gap)
    stats = status["stats"]
    assert stats["accepted"] > 0 and stats["fallbacks"] == 0, stats
    per_token = moved.bytes_down / (n_tokens * len(prompts))
    print(f"\nthrough the proxy: {stats['tokens_per_round']:.2f} tokens per round, "
          f"{per_token:.0f} bytes from the workers per generated token")
    assert per_token <= 16 * 1024, "the verifies took the full logits"
