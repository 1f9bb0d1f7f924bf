"""Timed generations against one configuration's endpoint, with the speculation counters and
the link traffic each one caused."""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time
from dataclasses import dataclass

from tightwad.pool.procs import LlamaServer, ProcessGroup
from tightwad_dev.linkemu import LinkStats, RelayThread

from .http import Stream, get_json, prometheus_sums, stream_post
from .sample import Sample


@dataclass
class Endpoint:
    """How to ask one configuration for a generation, and how to read its speculation stats."""

    kind: str  # "llama" (/completion), "proxy" (/v1/completions + /tightwad/status), "legacy"
    url: str

    def generate(self, prompt_ids: list[int], prompt_text: str, n: int) -> Stream:
        if self.kind == "llama":
            return stream_post(self.url, "/completion", {
                "prompt": prompt_ids, "n_predict": n, "temperature": 0, "ignore_eos": True,
                "stream": True, "return_tokens": True, "cache_prompt": True})
        if self.kind == "proxy":
            return stream_post(self.url, "/v1/completions", {
                "prompt": prompt_ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}})
        # tightwad 0.5.4 counts max_tokens in whitespace-separated words (len(chunk.split()))
        # and takes text prompts; see stats() for how its tokens are counted.
        return stream_post(self.url, "/v1/completions", {
            "prompt": prompt_text, "max_tokens": max(1, n // 6), "temperature": 0,
            "stream": True})

    def stats(self) -> dict[str, float]:
        """Cumulative speculation counters (proxies only)."""
        if self.kind == "proxy":
            s = get_json(self.url, "/tightwad/status")["stats"]
            sums = prometheus_sums(self.url, ("tightwad_draft_seconds_sum",
                                              "tightwad_verify_seconds_sum"))
            return {"drafted": s["drafted"], "accepted": s["accepted"], "rounds": s["rounds"],
                    "tokens": s["tokens"], "fallbacks": s["fallbacks"],
                    "draft_ms": 1e3 * sums["tightwad_draft_seconds_sum"],
                    "verify_ms": 1e3 * sums["tightwad_verify_seconds_sum"]}
        if self.kind == "legacy":
            s = get_json(self.url, "/v1/tightwad/status")["stats"]
            return {"drafted": s["total_drafted"], "accepted": s["total_accepted"],
                    "rounds": s["total_rounds"],
                    # Its own total_tokens_output counts words; the tokens it emitted are the
                    # accepted drafts plus one target token (bonus or resample) per round.
                    "tokens": s["total_accepted"] + s["total_bonus"] + s["total_resampled"]}
        return {}


class Bench:
    """The samples of one run, and (a)'s greedy tokens that the others are compared with."""

    def __init__(self, args: argparse.Namespace, group: ProcessGroup, relays: RelayThread,
                 n_pool: int, prompts: list[tuple[str, list[int]]]) -> None:
        self.args = args
        self.group = group
        self.relays = relays
        self.n_pool = n_pool  # relays[:n_pool] are the pool's workers
        self.prompts = prompts
        self.samples: list[Sample] = []
        self.reference: dict[int, list[int]] = {}  # (a)'s greedy tokens per prompt

    def links(self) -> tuple[LinkStats, LinkStats]:
        """(RPC traffic: pool workers + junk rpc-server, drafter HTTP traffic)."""
        stats = self.relays.stats()
        rpc = sum(stats[: self.n_pool + 1], LinkStats())
        return rpc, stats[self.n_pool + 1]

    def measure(self, config: str, k: str, ep: Endpoint, *, streams: int = 1) -> None:
        """Warm-up, then ``reps`` rounds over the prompts (one batch of ``streams`` at a time)."""
        n = self.args.tokens
        reps = self.args.reps
        if streams == 1:
            for text, ids in self.prompts:  # warm-up: caches, connections
                ep.generate(ids, text, n)
            for rep in range(reps):
                for i, (text, ids) in enumerate(self.prompts):
                    self._one(config, k, ep, i, rep, text, ids)
            return
        ep.generate(self.prompts[0][1], self.prompts[0][0], n)
        for rep in range(reps):
            self._batch(config, k, ep, rep, streams)

    def _one(self, config: str, k: str, ep: Endpoint, i: int, rep: int, text: str,
             ids: list[int]) -> None:
        before_links, before_stats = self.links(), ep.stats()
        s = ep.generate(ids, text, self.args.tokens)
        after_links, after_stats = self.links(), ep.stats()
        delta = {key: after_stats[key] - before_stats[key] for key in after_stats}
        tokens, drafted, accepted, rounds = self._counts(ep, s, delta)
        rpc, draft = (after_links[0] - before_links[0]), (after_links[1] - before_links[1])
        sample = Sample(config, k, i, rep, 1, tokens, s.elapsed, s.ttft, drafted, accepted,
                        rounds, rpc.as_dict(), draft.as_dict(), s.text, s.token_ids)
        if ep.kind == "proxy":
            sample.extra = {"draft_ms": delta["draft_ms"], "verify_ms": delta["verify_ms"],
                            "fallbacks": delta["fallbacks"]}
        self.samples.append(sample)

    def take_reference(self, single: LlamaServer) -> None:
        """(a)'s greedy tokens per prompt, from a plain (non-streamed) request: llama-server's
        stream drops the tokens of an incomplete UTF-8 character at the very end."""
        for i, (_, ids) in enumerate(self.prompts):
            res = single.post("/completion", {
                "prompt": ids, "n_predict": self.args.tokens, "temperature": 0,
                "ignore_eos": True, "return_tokens": True, "cache_prompt": False}, timeout=300)
            self.reference[i] = res["tokens"]

    def _counts(self, ep: Endpoint, s: Stream,
                delta: dict[str, float]) -> tuple[int, int | None, int | None, int | None]:
        if ep.kind == "llama":
            timings = s.final.get("timings", {})
            tokens = int(timings.get("predicted_n") or len(s.token_ids))
            if "draft_n" in timings:
                return tokens, int(timings["draft_n"]), int(timings["draft_n_accepted"]), None
            return tokens, None, None, None
        if ep.kind == "proxy":
            tokens = int(s.final.get("usage", {}).get("completion_tokens") or delta["tokens"])
        else:
            tokens = int(delta["tokens"])
        return tokens, int(delta["drafted"]), int(delta["accepted"]), int(delta["rounds"])

    def _batch(self, config: str, k: str, ep: Endpoint, rep: int, streams: int) -> None:
        chosen = [self.prompts[(rep + j) % len(self.prompts)] for j in range(streams)]
        before_links, before_stats = self.links(), ep.stats()
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            results = list(pool.map(lambda p: ep.generate(p[1], p[0], self.args.tokens),
                                    chosen))
        elapsed = time.perf_counter() - started
        after_links, after_stats = self.links(), ep.stats()
        delta = {key: after_stats[key] - before_stats[key] for key in after_stats}
        tokens = drafted = accepted = 0
        rounds: int | None = None
        for s in results:
            t, d, a, r = self._counts(ep, s, {**delta, "tokens": 0})
            tokens += t
            drafted += d or 0
            accepted += a or 0
        if ep.kind in ("proxy", "legacy"):
            drafted, accepted = int(delta["drafted"]), int(delta["accepted"])
            rounds = int(delta["rounds"])
        ttfts = [s.ttft for s in results if s.ttft is not None]
        self.samples.append(Sample(
            config, k, -1, rep, streams, tokens, elapsed,
            statistics.median(ttfts) if ttfts else None, drafted, accepted, rounds,
            (after_links[0] - before_links[0]).as_dict(),
            (after_links[1] - before_links[1]).as_dict()))
