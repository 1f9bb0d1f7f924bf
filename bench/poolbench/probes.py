"""Direct measurements of the model pair, outside any configuration: the draft's per-position
agreement with the target, its decode cost, and the parts of one remote-draft round."""

from __future__ import annotations

import time
from typing import Any

from tightwad.pool.linkemu import LinkStats
from tightwad.pool.procs import LlamaServer
from tightwad_dev import benchmath as bm

from .http import post_json
from .relayproc import RelayProcess
from .settings import VERIFY_MAX_TOKENS


def measure_agreement(drafter: LlamaServer, prompts: list[tuple[str, list[int]]],
                      reference: dict[int, list[int]]) -> dict[str, Any]:
    """Per-position greedy agreement: the draft's argmax at each position of the target's own
    greedy output (one batched pass per window via prompt_logprobs), against the target token."""
    guesses: list[int] = []
    targets: list[int] = []
    for i, (_, ids) in enumerate(prompts):
        toks = reference[i]
        for start in range(0, len(toks), VERIFY_MAX_TOKENS):
            end = min(start + VERIFY_MAX_TOKENS, len(toks))
            res = drafter.post("/completion", {
                "prompt": ids + toks[:end], "n_predict": 1, "temperature": 0, "n_probs": 1,
                "prompt_logprobs": end - start, "cache_prompt": False}, timeout=300)
            guesses += [p["top_logprobs"][0]["id"] for p in res["prompt_probabilities"]]
            targets += toks[start:end]
    return {"alpha": bm.agreement(guesses, targets), "positions": len(targets)}


def draft_step_ms(drafter: LlamaServer, prompts: list[tuple[str, list[int]]],
                  n: int) -> dict[str, float]:
    """The draft model's decode time per token on its own server (median over prompts x 3)."""
    per_token = []
    for _ in range(3):
        for _, ids in prompts:
            res = drafter.post("/completion", {"prompt": ids, "n_predict": n, "temperature": 0,
                                               "ignore_eos": True, "cache_prompt": False},
                               timeout=300)
            per_token.append(res["timings"]["predicted_ms"] / res["timings"]["predicted_n"])
    return bm.spread(per_token)


def profile_rounds(single: LlamaServer, coordinator: LlamaServer, drafter_url: str,
                   relays: RelayProcess, n_pool: int, prompts: list[tuple[str, list[int]]],
                   reference: dict[int, list[int]], ks: list[int],
                   reps: int) -> dict[str, Any]:
    """The parts of one round per k, timed by hand: a draft of k tokens through the drafter's
    link, a verify of context + k on the pooled coordinator (wall time, and the RPC bytes and
    round trips it moved, counted by the relays), and the same verify on the single server
    (the compute alone, no network). Each k's shapes run once untimed first (a warm graph)."""
    return {"per_k": {str(k): profile_round(single, coordinator, drafter_url, relays, n_pool,
                                            prompts, reference, k, reps) for k in ks}}


def profile_round(single: LlamaServer, coordinator: LlamaServer, drafter_url: str,
                  relays: RelayProcess, n_pool: int, prompts: list[tuple[str, list[int]]],
                  reference: dict[int, list[int]], k: int, reps: int) -> dict[str, Any]:
    """One k of :func:`profile_rounds`: medians over prompts x ``reps`` after a warm-up."""
    rows: dict[str, list[float]] = {key: [] for key in (
        "draft_wall_ms", "draft_server_ms", "verify_wall_ms", "verify_server_ms",
        "verify_compute_ms", "verify_prompt_n", "draft_decode_ms_per_token",
        "verify_rpc_bytes_down", "verify_rpc_bytes_up", "verify_rpc_round_trips",
        "verify_peer_bytes")}

    def pool_traffic() -> tuple[LinkStats, LinkStats]:
        """(the workers' links to the coordinator, the links between workers: the relays
        after the pool's, the junk host's and the drafter's)."""
        stats = relays.stats()
        return sum(stats[:n_pool], LinkStats()), sum(stats[n_pool + 2:], LinkStats())

    for rep in range(reps + 1):
        for i, (_, ids) in enumerate(prompts):
            ctx = ids + reference[i][: len(reference[i]) // 2]
            body = {"prompt": ctx, "n_predict": k, "temperature": 0, "ignore_eos": True,
                    "cache_prompt": True, "id_slot": 0}
            post_json(drafter_url, "/completion", {**body, "prompt": ctx[:-1], "n_predict": 1})
            t0 = time.perf_counter()
            d = post_json(drafter_url, "/completion", {**body, "return_tokens": True})
            draft_wall = (time.perf_counter() - t0) * 1e3
            draft = d["tokens"]
            verify = {"prompt": ctx + draft, "n_predict": 1, "temperature": 0, "n_probs": 1,
                      "prompt_logprobs": len(draft), "cache_prompt": True, "id_slot": 0}
            walls = []
            traffic = between = LinkStats()
            for server in (coordinator, single):
                server.post("/completion", {**verify, "prompt": ctx, "prompt_logprobs": 0})
                before = pool_traffic() if server is coordinator else (LinkStats(), LinkStats())
                t0 = time.perf_counter()
                res = server.post("/completion", verify)
                walls.append(((time.perf_counter() - t0) * 1e3, res["timings"]))
                if server is coordinator:
                    after = pool_traffic()
                    traffic, between = after[0] - before[0], after[1] - before[1]
            if rep == 0:
                continue  # warm-up
            rows["draft_wall_ms"].append(draft_wall)
            rows["draft_server_ms"].append(d["timings"]["prompt_ms"] + d["timings"]["predicted_ms"])
            rows["verify_wall_ms"].append(walls[0][0])
            rows["verify_server_ms"].append(walls[0][1]["prompt_ms"] + walls[0][1]["predicted_ms"])
            rows["verify_compute_ms"].append(walls[1][1]["prompt_ms"]
                                             + walls[1][1]["predicted_ms"])
            rows["verify_prompt_n"].append(walls[0][1]["prompt_n"])
            rows["draft_decode_ms_per_token"].append(
                d["timings"]["predicted_ms"] / max(1, d["timings"]["predicted_n"]))
            rows["verify_rpc_bytes_down"].append(traffic.bytes_down)
            rows["verify_rpc_bytes_up"].append(traffic.bytes_up)
            rows["verify_rpc_round_trips"].append(traffic.round_trips)
            rows["verify_peer_bytes"].append(between.bytes_up)
    return {"k": k, **{key: bm.spread(v) for key, v in rows.items()}}
