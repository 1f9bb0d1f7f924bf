"""Timed generations against one configuration's endpoint, with the speculation counters, the
link traffic each one caused and, for batches of simultaneous streams, a steady-state window
of the coordinator's batches and the RPC traffic per batch."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import re
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tightwad.pool.linkemu import LinkStats
from tightwad.pool.procs import LlamaServer, ProcessGroup

from .http import Stream, get_json, prometheus_sums, stream_post
from .relayproc import RelayProcess
from .sample import Sample
from .settings import WARMUP_TOKENS

DECODES = "llamacpp:n_decode_total"


def cpu_seconds(procs: list[tuple[str, int]]) -> dict[str, float]:
    """CPU seconds (user + system) the live processes ``(name, pid)`` have used so far, per
    role (the name up to its first digit or dash: ``worker``, ``coord``, ``drafter``,
    ``proxy``), plus this load generator's own (``client``) and the machine's steal time
    (``steal``, all CPUs: a noisy neighbour on a shared host): where a small machine's time
    goes under load."""
    tick = os.sysconf("SC_CLK_TCK")
    me = os.times()
    out = {"client": me.user + me.system}
    # The hypervisor's share: time this VM's CPUs were ready to run but given to others.
    with contextlib.suppress(OSError, IndexError, ValueError):
        out["steal"] = int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8]) / tick
    for name, pid in procs:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended
            continue
        role = re.split(r"[-\d]", name, maxsplit=1)[0]
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


@dataclass
class Endpoint:
    """How to ask one configuration for a generation, how to read its speculation stats, and
    the coordinator whose ``/metrics`` count its batches (None: no pool behind it)."""

    kind: str  # "llama" (/completion), "proxy" (/v1/completions + /tightwad/status), "legacy"
    url: str
    coordinator: str | None = None

    def generate(self, prompt_ids: list[int], prompt_text: str, n: int,
                 on_first: Callable[[Stream], None] | None = None) -> Stream:
        if self.kind == "llama":
            return stream_post(self.url, "/completion", {
                "prompt": prompt_ids, "n_predict": n, "temperature": 0, "ignore_eos": True,
                "stream": True, "return_tokens": True, "cache_prompt": True},
                on_first=on_first)
        if self.kind == "proxy":
            return stream_post(self.url, "/v1/completions", {
                "prompt": prompt_ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}, on_first=on_first)
        # tightwad 0.5.4 counts max_tokens in whitespace-separated words (len(chunk.split()))
        # and takes text prompts; see stats() for how its tokens are counted.
        return stream_post(self.url, "/v1/completions", {
            "prompt": prompt_text, "max_tokens": max(1, n // 6), "temperature": 0,
            "stream": True}, on_first=on_first)

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

    def decodes(self) -> float | None:
        """The coordinator's batches so far (llama-server ``--metrics``)."""
        if self.coordinator is None:
            return None
        return prometheus_sums(self.coordinator, (DECODES,))[DECODES]


class Bench:
    """The samples of one run, and (a)'s greedy tokens that the others are compared with."""

    def __init__(self, args: argparse.Namespace, relays: RelayProcess, n_pool: int,
                 prompts: list[tuple[str, list[int]]],
                 group: ProcessGroup | None = None) -> None:
        self.args = args
        self.relays = relays
        self.group = group  # whose processes' CPU time the steady-state windows read
        self.n_pool = n_pool  # relays[:n_pool] are the pool's workers
        self.prompts = prompts
        self.samples: list[Sample] = []
        self.reference: dict[int, list[int]] = {}  # (a)'s greedy tokens per prompt
        self.solo_text: dict[tuple[str, str, int], str] = {}  # (config, k, prompt) -> text

    def links(self) -> tuple[LinkStats, LinkStats]:
        """(RPC traffic: pool workers + junk rpc-server + worker to worker, drafter HTTP
        traffic)."""
        stats = self.relays.stats()
        rpc = sum([*stats[: self.n_pool + 1], *stats[self.n_pool + 2:]], LinkStats())
        return rpc, stats[self.n_pool + 1]

    def warm_up(self, ep: Endpoint, streams: int = 1) -> None:
        """Caches, connections and the graph of a batch of ``streams``: one short request per
        prompt (one stream), or one short batch of ``streams``."""
        n = min(WARMUP_TOKENS, self.args.tokens)
        if streams == 1:
            for text, ids in self.prompts:
                ep.generate(ids, text, n)
            return
        chosen = [self.prompts[j % len(self.prompts)] for j in range(streams)]
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            list(pool.map(lambda p: ep.generate(p[1], p[0], n), chosen))

    def solo(self, config: str, k: str, ep: Endpoint, rep: int) -> None:
        """One request per prompt, one at a time."""
        for i, (text, ids) in enumerate(self.prompts):
            self._one(config, k, ep, i, rep, text, ids)

    def _one(self, config: str, k: str, ep: Endpoint, i: int, rep: int, text: str,
             ids: list[int]) -> None:
        before_links, before_stats = self.links(), ep.stats()
        s = ep.generate(ids, text, self.args.tokens)
        after_links, after_stats = self.links(), ep.stats()
        delta = {key: after_stats[key] - before_stats[key] for key in after_stats}
        tokens, drafted, accepted, rounds = self._counts(ep, s, delta)
        rpc, draft = (after_links[0] - before_links[0]), (after_links[1] - before_links[1])
        sample = Sample(config, k, i, rep, 1, tokens, s.elapsed, s.ttft, drafted, accepted,
                        rounds, rpc.as_dict(), draft.as_dict(), s.text, s.token_ids,
                        latencies_s=[s.elapsed])
        if ep.kind == "proxy":
            sample.extra = {"draft_ms": delta["draft_ms"], "verify_ms": delta["verify_ms"],
                            "fallbacks": delta["fallbacks"]}
        self.solo_text.setdefault((config, k, i), s.text)
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

    def _snapshot(self, ep: Endpoint, streams: list[Stream | None]) -> dict[str, Any]:
        """Counters at one instant of a batch: time, RPC traffic, coordinator batches and the
        tokens generated so far (from the streams, or the proxy's own count)."""
        stats = ep.stats()
        tokens = stats["tokens"] if ep.kind == "proxy" else sum(
            s.n_tokens for s in streams if s is not None)
        # Live ones only: a stopped one's pid may be another process's by now.
        procs = [(p.name, p.pid) for p in (self.group.procs if self.group else []) if p.alive()]
        cpu = cpu_seconds([*procs, ("relay", self.relays.pid)])
        return {"t": time.perf_counter(), "rpc": self.links()[0], "decodes": ep.decodes(),
                "tokens": tokens, "cpu": cpu}

    def batch(self, config: str, k: str, ep: Endpoint, rep: int, streams: int) -> None:
        """``streams`` simultaneous requests (prompts rotating with ``rep``), with per-request
        latencies and the steady-state window between the last first token and the first
        end."""
        chosen = [(i % len(self.prompts), self.prompts[i % len(self.prompts)])
                  for i in range(rep, rep + streams)]
        started_n = 0
        lock = threading.Lock()
        all_started, first_done = threading.Event(), threading.Event()
        live: list[Stream | None] = [None] * streams

        def run(j: int) -> Stream:
            def on_first(stream: Stream) -> None:
                nonlocal started_n
                with lock:
                    live[j] = stream  # its token count is read live by the snapshots
                    started_n += 1
                    if started_n == streams:
                        all_started.set()

            text, ids = chosen[j][1]
            try:
                return ep.generate(ids, text, self.args.tokens, on_first=on_first)
            finally:
                first_done.set()
                all_started.set()  # a stream that failed or ended early ends the wait

        before_links, before_stats = self.links(), ep.stats()
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            futures = [pool.submit(run, j) for j in range(streams)]
            all_started.wait()
            w0 = None if first_done.is_set() else self._snapshot(ep, live)
            first_done.wait()
            w1 = self._snapshot(ep, live) if w0 is not None else None
            results = [f.result() for f in futures]
        elapsed = time.perf_counter() - started
        after_links, after_stats = self.links(), ep.stats()
        delta = {key: after_stats[key] - before_stats[key] for key in after_stats}
        tokens = drafted = accepted = 0
        rounds: int | None = None
        same = different = 0
        for (i, _), s in zip(chosen, results):
            t, d, a, _r = self._counts(ep, s, {**delta, "tokens": 0})
            tokens += t
            drafted += d or 0
            accepted += a or 0
            solo = self.solo_text.get((config, k, i))
            if solo is not None:
                same += s.text == solo
                different += s.text != solo
        if ep.kind in ("proxy", "legacy"):
            drafted, accepted = int(delta["drafted"]), int(delta["accepted"])
            rounds = int(delta["rounds"])
        ttfts = [s.ttft for s in results if s.ttft is not None]
        self.samples.append(Sample(
            config, k, -1, rep, streams, tokens, elapsed,
            statistics.median(ttfts) if ttfts else None, drafted, accepted, rounds,
            (after_links[0] - before_links[0]).as_dict(),
            (after_links[1] - before_links[1]).as_dict(),
            latencies_s=[s.elapsed for s in results], window=window(w0, w1),
            solo_same=same, solo_different=different,
            regimes=(get_json(ep.url, "/tightwad/status")["speculation"].get("load_regimes")
                     if ep.kind == "proxy" else None)))


def window(w0: dict[str, Any] | None, w1: dict[str, Any] | None) -> dict[str, Any] | None:
    """The steady-state window between two snapshots of a batch."""
    if w0 is None or w1 is None or w1["t"] <= w0["t"]:
        return None
    rpc = w1["rpc"] - w0["rpc"]
    decodes = (None if w0["decodes"] is None or w1["decodes"] is None
               else w1["decodes"] - w0["decodes"])
    cpu = {role: w1["cpu"][role] - w0["cpu"][role]
           for role in w1.get("cpu", {}) if role in w0.get("cpu", {})}
    return {"seconds": w1["t"] - w0["t"], "tokens": w1["tokens"] - w0["tokens"],
            "decodes": decodes, "rpc_round_trips": rpc.round_trips,
            "rpc_bytes": rpc.bytes_up + rpc.bytes_down, "cpu_s": cpu}
