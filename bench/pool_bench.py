#!/usr/bin/env python3
"""The pool over an emulated link, side by side, against the speculative-decoding bound.

ONE run, the same prompts and the same link profile for every configuration:

- ``a``  the target on one plain llama-server (no pool, no network);
- ``b``  the pool: 4 ``ggml-rpc-server`` workers behind link relays, a coordinator llama-server;
- ``c``  the pool + llama.cpp's native speculation, draft on the coordinator's CPU
         (``--spec-type draft-simple --spec-draft-model ... --spec-draft-device none``);
- ``c2`` the same, with the draft on a junk host's own ``ggml-rpc-server`` behind its own relay
         (``--spec-draft-device RPC4``, target layers kept off it with ``--tensor-split``);
- ``d``  the pool + Tightwad remote-draft speculation through the proxy
         (``python -m tightwad.server``), the drafter llama-server behind its own relay;
- ``e``  the original Tightwad 0.5.4 proxy (its own virtualenv) against the same pool and drafter.

Draft lengths k in ``--ks`` for c, c2 and d, plus each one's own choice (d: the adaptive rule;
c/c2: llama.cpp's default ``--spec-draft-n-max``); concurrency ``--concurrency`` streams for a,
b, c and d. Every request is greedy (temperature 0, ``ignore_eos``) with ``--tokens`` tokens.

Measured per configuration: generated tok/s and time to first token (median and quartiles over
prompts x repetitions), acceptance (accepted/drafted) and tokens per verify round, RPC round
trips and bytes per generated token (from the relays), ratios to (b). For c and d: the
Leviathan bound S = E(a, k) / (k c + 1) for the measured per-position agreement a and cost
ratio c (:mod:`tightwad.benchmath`), and efficiency = measured / predicted. Greedy outputs are
compared with (a)'s. A profile of one remote-draft round splits its time into draft, network,
verify and proxy overhead.

Writes JSON (``--json``), a plot (``--plot``) and a markdown report (``--markdown``)::

    .venv/bin/python bench/pool_bench.py --profile wifi --json bench-wifi.json \\
        --plot docs/benchmarks.png --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tightwad import benchmath as bm
from tightwad import build as llama_build
from tightwad.linkemu import PROFILES, LinkStats, RelayThread, adjust_profile
from tightwad.testing.benchmodels import BenchPair, ensure_bench_models
from tightwad.testing.procs import HttpService, LlamaServer, ProcessGroup, free_port

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Once upon a time, in a land far away, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The weather today is sunny with a light wind, and",
    "Please write a short story about a robot that learns to cook.",
    "A pool of old machines can serve one large language model when",
    "It is important to measure things before believing them, so",
    "The user asked the assistant a question, and the assistant",
]
VERIFY_MAX_TOKENS = 32
SLOTS = 8
CTX = 8192  # split over SLOTS slots: 1024 each
NATIVE_DEFAULT = "default"
ADAPTIVE = "adaptive"
LEGACY_VERSION = "0.5.4"
DEFAULT_LEGACY_VENV = "~/.cache/tightwad/tightwad-054-venv"
LABELS = {
    "a": "target alone, one server",
    "b": "pool direct",
    "c": "pool + llama.cpp native speculation, draft on the coordinator",
    "c2": "pool + llama.cpp native speculation, draft on a junk host's rpc-server",
    "d": "pool + Tightwad remote draft (this proxy)",
    "e": f"pool + original Tightwad {LEGACY_VERSION} proxy",
}


# --- HTTP streaming ---------------------------------------------------------------------------


@dataclass
class Stream:
    """One streamed generation as the client saw it."""

    started: float
    first: float | None = None  # first chunk carrying output
    ended: float = 0.0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)  # last JSON object with stats

    @property
    def elapsed(self) -> float:
        return self.ended - self.started

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.started


def stream_post(url: str, path: str, body: dict[str, Any], timeout: float = 600) -> Stream:
    """POST with ``stream: true`` and read the SSE answer (llama-server or OpenAI shapes)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    out = Stream(started=time.perf_counter())
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from {url}{path}: {resp.read()[:500]!r}")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            obj = json.loads(payload)
            if "error" in obj:
                raise RuntimeError(f"error event from {url}{path}: {obj['error']}")
            if "choices" in obj:  # OpenAI text_completion chunk
                piece = "".join(c.get("text") or "" for c in obj["choices"])
                if obj.get("usage"):
                    out.final = obj
            else:  # llama-server /completion chunk
                piece = obj.get("content") or ""
                out.token_ids += obj.get("tokens") or []
                if obj.get("stop"):
                    out.final = obj
            if out.first is None and (piece or obj.get("tokens")):
                out.first = time.perf_counter()
            out.text += piece
        out.ended = time.perf_counter()
    finally:
        conn.close()
    return out


def _http(url: str, method: str, path: str, body: Any = None, timeout: float = 300) -> Any:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, None if body is None else json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from {url}{path}: {data[:300]!r}")
        return json.loads(data)
    finally:
        conn.close()


def get_json(url: str, path: str, timeout: float = 30) -> Any:
    return _http(url, "GET", path, timeout=timeout)


def post_json(url: str, path: str, body: Any, timeout: float = 300) -> Any:
    return _http(url, "POST", path, body, timeout=timeout)


def prometheus_sums(url: str, names: Sequence[str]) -> dict[str, float]:
    """Unlabelled samples of the proxy's /metrics (Prometheus text format)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = {name: 0.0 for name in names}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found


# --- one configuration's endpoint -------------------------------------------------------------


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
        # and takes text prompts; see legacy_stats for how its tokens are counted.
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


@dataclass
class Sample:
    """One measured generation (or, with concurrency > 1, one batch of simultaneous ones)."""

    config: str
    k: str
    prompt: int
    rep: int
    streams: int
    tokens: int
    elapsed_s: float
    ttft_s: float | None
    drafted: int | None
    accepted: int | None
    rounds: int | None
    rpc: dict[str, int]
    draft_link: dict[str, int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.elapsed_s


# --- the bench --------------------------------------------------------------------------------


class Bench:
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

    def measure(self, config: str, k: str, ep: Endpoint, *, record: bool = True,
                streams: int = 1) -> None:
        """Warm-up, then ``reps`` rounds over the prompts (one batch of ``streams`` at a time)."""
        n = self.args.tokens
        reps = self.args.reps
        if streams == 1:
            for i, (text, ids) in enumerate(self.prompts):  # warm-up: caches, connections
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


# --- processes --------------------------------------------------------------------------------


def start_coordinator(group: ProcessGroup, model: Path, rpc: Sequence[str], name: str,
                      extra: Sequence[str] = ()) -> LlamaServer:
    return group.llama_server(model, name=name, rpc=rpc, ctx=CTX, slots=SLOTS, timeout=900,
                              args=["--verify-max-tokens", str(VERIFY_MAX_TOKENS), *extra])


def start_proxy(group: ProcessGroup, coordinator: LlamaServer, drafter_url: str,
                k: str, k_max: int) -> HttpService:
    if k == ADAPTIVE:
        spec = {"K_MIN": "1", "K_MAX": str(k_max), "K_INITIAL": str(min(4, k_max)),
                "ADAPTIVE": "true"}
    else:
        spec = {"K_MIN": k, "K_MAX": k, "K_INITIAL": k, "ADAPTIVE": "false"}
    env = {"TIGHTWAD_DRAFTER__URL": drafter_url, "TIGHTWAD_DRAFTER__TIMEOUT_S": "30",
           "TIGHTWAD_LIMITS__DEFAULT_MAX_TOKENS": "4096",
           **{f"TIGHTWAD_SPECULATION__{key}": value for key, value in spec.items()}}
    proxy = group.tightwad_proxy(target=coordinator, mode="remote", slots=SLOTS,
                                 name=f"proxy-k{k}", env=env, timeout=120)
    deadline = time.monotonic() + 60
    while not (status := get_json(proxy.url, "/tightwad/status")).get("speculation_active"):
        if time.monotonic() > deadline:
            proxy.stop()
            raise RuntimeError(f"the proxy does not speculate: {json.dumps(status)[:800]}")
        time.sleep(0.2)
    return proxy


def start_legacy(group: ProcessGroup, venv: Path, coordinator: LlamaServer,
                 drafter_url: str, home: Path) -> HttpService:
    port = free_port()
    code = ("import uvicorn\n"
            "from tightwad.config import load_proxy_from_env\n"
            "from tightwad.proxy import create_app\n"
            "c = load_proxy_from_env()\n"
            "uvicorn.run(create_app(c), host=c.host, port=c.port, log_level='warning')\n")
    env = {"TIGHTWAD_DRAFT_URL": drafter_url, "TIGHTWAD_TARGET_URL": coordinator.url,
           "TIGHTWAD_DRAFT_BACKEND": "llamacpp", "TIGHTWAD_TARGET_BACKEND": "llamacpp",
           "TIGHTWAD_HOST": "127.0.0.1", "TIGHTWAD_PORT": str(port), "HOME": str(home),
           "TIGHTWAD_CHAT_TEMPLATE": "chatml", "VIRTUAL_ENV": str(venv), "PYTHONPATH": ""}
    proxy: HttpService = group._spawn(HttpService, "legacy-proxy",
                                      [str(venv / "bin" / "python"), "-c", code], env, port=port)
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(OSError, RuntimeError):
            get_json(proxy.url, "/v1/models", timeout=5)
            return proxy
        if not proxy.alive():
            raise proxy.fail(f"exited with code {proxy.popen.returncode}")
        if time.monotonic() > deadline:
            raise proxy.fail("did not answer within 120 s")
        time.sleep(0.2)


def legacy_venv(path: Path, install: bool) -> tuple[Path | None, str]:
    """The 0.5.4 virtualenv, created with pip when asked; (None, why) when unavailable."""
    python = path / "bin" / "python"
    check = [str(python), "-c", "import tightwad.proxy, uvicorn; from importlib.metadata "
             "import version; print(version('tightwad'))"]
    if python.exists():
        res = subprocess.run(check, capture_output=True, text=True, timeout=120)
        if res.returncode == 0 and res.stdout.strip() == LEGACY_VERSION:
            return path, ""
    if not install:
        return None, (f"no tightwad {LEGACY_VERSION} virtualenv at {path}; pass "
                      "--install-legacy to create it with pip")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(path / "bin" / "pip"), "install", "-q",
                    f"tightwad=={LEGACY_VERSION}"], check=True)
    return path, ""


# --- analysis ---------------------------------------------------------------------------------


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
    return {"a": bm.agreement(guesses, targets), "positions": len(targets)}


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


def profile_round(single: LlamaServer, coordinator: LlamaServer, drafter_url: str,
                  prompts: list[tuple[str, list[int]]], reference: dict[int, list[int]],
                  k: int, reps: int) -> dict[str, Any]:
    """Time the parts of one remote-draft round by hand: a draft of k tokens through the
    drafter's link, a verify of context + k on the pooled coordinator, and the same verify on
    the single server (the compute alone, no network)."""
    rows: dict[str, list[float]] = {key: [] for key in (
        "draft_wall_ms", "draft_server_ms", "verify_wall_ms", "verify_server_ms",
        "verify_compute_ms", "verify_prompt_n", "draft_decode_ms_per_token")}
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
            for server in (coordinator, single):
                server.post("/completion", {**verify, "prompt": ctx, "prompt_logprobs": 0})
                t0 = time.perf_counter()
                res = server.post("/completion", verify)
                walls.append(((time.perf_counter() - t0) * 1e3, res["timings"]))
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
    return {"k": k, **{key: bm.spread(v) for key, v in rows.items()}}


def summarize(bench: Bench, a: float, c: float, ks_all: list[str]) -> dict[str, Any]:
    """Per (config, k, streams): spreads, totals, ratios, bound and efficiency."""
    groups: dict[tuple[str, str, int], list[Sample]] = {}
    for s in bench.samples:
        groups.setdefault((s.config, s.k, s.streams), []).append(s)
    rows = []
    for (config, k, streams), ss in groups.items():
        tokens = sum(s.tokens for s in ss)
        drafted = sum(s.drafted or 0 for s in ss) if any(s.drafted is not None for s in ss) \
            else None
        accepted = sum(s.accepted or 0 for s in ss) if drafted is not None else None
        rounds = sum(s.rounds or 0 for s in ss) if any(s.rounds for s in ss) else None
        if rounds is None and config in ("c", "c2") and accepted is not None:
            per_round = bm.native_tokens_per_round(tokens, accepted)
        else:
            per_round = tokens / rounds if rounds else None
        rpc_rt = sum(s.rpc["round_trips"] for s in ss)
        rpc_bytes = sum(s.rpc["bytes_up"] + s.rpc["bytes_down"] for s in ss)
        draft_rt = sum(s.draft_link["round_trips"] for s in ss)
        draft_bytes = sum(s.draft_link["bytes_up"] + s.draft_link["bytes_down"] for s in ss)
        ttfts = [s.ttft_s for s in ss if s.ttft_s is not None]
        row: dict[str, Any] = {
            "config": config, "k": k, "streams": streams, "n": len(ss),
            "tok_s": bm.spread([s.tok_s for s in ss]),
            "ttft_ms": bm.spread([t * 1e3 for t in ttfts]) if ttfts else None,
            "tokens": tokens, "drafted": drafted, "accepted": accepted,
            "acceptance": bm.draft_acceptance(accepted, drafted) if drafted else None,
            "tokens_per_round": per_round,
            "rpc_round_trips_per_token": rpc_rt / tokens,
            "rpc_bytes_per_token": rpc_bytes / tokens,
            "draft_link_round_trips_per_token": draft_rt / tokens,
            "draft_link_bytes_per_token": draft_bytes / tokens,
        }
        if config == "d":
            extra = [s.extra for s in ss if s.extra]
            if extra and rounds:
                row["draft_ms_per_round"] = sum(e["draft_ms"] for e in extra) / rounds
                row["verify_ms_per_round"] = sum(e["verify_ms"] for e in extra) / rounds
                row["elapsed_ms_per_round"] = 1e3 * sum(s.elapsed_s for s in ss) / rounds
                row["fallbacks"] = sum(e["fallbacks"] for e in extra)
        rows.append(row)

    def find(config: str, k: str = "-", streams: int = 1) -> dict[str, Any] | None:
        return next((r for r in rows if (r["config"], r["k"], r["streams"])
                     == (config, k, streams)), None)

    base = find("b")
    base_tok_s = base["tok_s"]["median"] if base else None
    for row in rows:
        if row["streams"] == 1:
            row["vs_b"] = bm.ratio(row["tok_s"]["median"], base_tok_s)
        else:
            own = find("a", "-", row["streams"])
            row["vs_a_same_streams"] = bm.ratio(row["tok_s"]["median"],
                                                own["tok_s"]["median"] if own else None)
        k_num = row_k(row)
        if row["config"] in ("c", "d") and row["streams"] == 1 and k_num and row["vs_b"]:
            predicted = bm.predicted_speedup(a, k_num, c)
            row["k_used"] = k_num
            row["predicted_speedup"] = predicted
            row["efficiency"] = bm.efficiency(row["vs_b"], predicted)
            row["expected_acceptance"] = bm.expected_draft_acceptance(a, k_num)
    rows.sort(key=lambda r: (r["streams"], r["config"], k_order(r["k"], ks_all)))
    return {"rows": rows}


def row_k(row: dict[str, Any]) -> int | None:
    """The k a row ran at: fixed k, llama.cpp's default, or the adaptive rule's mean."""
    k = row["k"]
    if k.isdigit():
        return int(k)
    if k == NATIVE_DEFAULT:
        return row.get("native_default_k")
    if k == ADAPTIVE and row.get("drafted") and row.get("tokens_per_round"):
        rounds = row["tokens"] / row["tokens_per_round"]
        return max(1, round(row["drafted"] / rounds))
    return None


def k_order(k: str, ks_all: list[str]) -> int:
    return ks_all.index(k) if k in ks_all else -1


# --- output: markdown and plot ----------------------------------------------------------------


def fmt(x: float | None, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def fmt_spread(s: dict[str, float] | None, spec: str = ".1f") -> str:
    if not s:
        return "-"
    return f"{s['median']:{spec}} ({s['p25']:{spec}}-{s['p75']:{spec}})"


def fmt_bytes(n: float) -> str:
    return f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n:.0f} B"


def config_table(result: dict[str, Any]) -> str:
    head = ("| Config | k | tok/s median (IQR) | vs (b) | TTFT ms | accepted/drafted | "
            "tokens/round (E(a,k)) | RPC round trips/token | RPC bytes/token | draft-link "
            "round trips/token | predicted S | efficiency | output = (a) |")
    rows = [head, "|" + "---|" * 13]
    a = result["bound"]["a"]
    for r in result["summary"]["rows"]:
        if r["streams"] != 1:
            continue
        k = r["k"] if r["k"] != NATIVE_DEFAULT else f"default ({r.get('k_used', '?')})"
        if r["k"] == ADAPTIVE and r.get("k_used"):
            k = f"adaptive (mean {r['k_used']})"
        same = result["outputs"].get(f"{r['config']}/{r['k']}", {}).get("verdict", "-")
        k_fixed = int(r["k"]) if r["k"].isdigit() else (
            r.get("k_used") if r["k"] == NATIVE_DEFAULT else None)
        per_round = fmt(r["tokens_per_round"])
        if k_fixed and r["tokens_per_round"] is not None:
            per_round += f" ({bm.expected_tokens(a, k_fixed):.2f})"
        rows.append(
            f"| ({r['config']}) {LABELS[r['config']]} | {k} | {fmt_spread(r['tok_s'])} | "
            f"{fmt(r.get('vs_b'))}x | {fmt_spread(r['ttft_ms'], '.0f')} | "
            f"{fmt(r['acceptance'])} | {per_round} | "
            f"{r['rpc_round_trips_per_token']:.2f} | {fmt_bytes(r['rpc_bytes_per_token'])} | "
            f"{r['draft_link_round_trips_per_token']:.2f} | "
            f"{fmt(r.get('predicted_speedup'))} | {fmt(r.get('efficiency'))} | {same} |")
    return "\n".join(rows)


def concurrency_table(result: dict[str, Any]) -> str:
    rows = ["| Config | streams | aggregate tok/s median (IQR) | vs (a) at the same streams | "
            "accepted/drafted |", "|---|---|---|---|---|"]
    picked = []
    for r in result["summary"]["rows"]:
        if r["config"] not in result["concurrency_configs"]:
            continue
        if r["k"] not in ("-", ADAPTIVE, NATIVE_DEFAULT):
            continue
        picked.append(r)
    for r in sorted(picked, key=lambda r: (r["config"], r["streams"])):
        own = next((x for x in result["summary"]["rows"] if x["config"] == "a"
                    and x["streams"] == r["streams"]), None)
        vs = bm.ratio(r["tok_s"]["median"], own["tok_s"]["median"] if own else None)
        k = "" if r["k"] == "-" else f", k {r['k']}"
        rows.append(f"| ({r['config']}) {LABELS[r['config']]}{k} | {r['streams']} | "
                    f"{fmt_spread(r['tok_s'])} | {fmt(vs)}x | {fmt(r['acceptance'])} |")
    return "\n".join(rows)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers the report quotes, all from the summary."""
    rows = [r for r in result["summary"]["rows"] if r["streams"] == 1]

    def best(config: str) -> dict[str, Any] | None:
        mine = [r for r in rows if r["config"] == config]
        return max(mine, key=lambda r: r["tok_s"]["median"]) if mine else None

    def get(config: str, k: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["config"] == config and r["k"] == k), None)

    d_adaptive, d_best = get("d", ADAPTIVE), best("d")
    out: dict[str, Any] = {}
    for name, row in (("d_adaptive", d_adaptive), ("d_best", d_best), ("c_best", best("c")),
                      ("c2_best", best("c2")), ("e", best("e")), ("b", get("b", "-")),
                      ("a", get("a", "-"))):
        if row:
            out[name] = {"k": row["k"], "tok_s": row["tok_s"]["median"],
                         "vs_b": row.get("vs_b"), "efficiency": row.get("efficiency"),
                         "predicted_speedup": row.get("predicted_speedup"),
                         "acceptance": row.get("acceptance")}
    for ref in ("c_best", "c2_best", "e", "a"):
        if "d_adaptive" in out and ref in out:
            out[f"d_adaptive_vs_{ref.removesuffix('_best')}"] = bm.ratio(
                out["d_adaptive"]["tok_s"], out[ref]["tok_s"])
        if "d_best" in out and ref in out:
            out[f"d_best_vs_{ref.removesuffix('_best')}"] = bm.ratio(
                out["d_best"]["tok_s"], out[ref]["tok_s"])
    bound = result["bound"]
    out["bound_best_k"] = bound["best_k"]
    out["bound_best_speedup"] = bound["best_speedup"]
    return out


def write_markdown(result: dict[str, Any], path: Path, plot: Path | None) -> None:
    s = result["settings"]
    h = result["headline"]
    m = result["machine"]
    models = result["models"]
    bound = result["bound"]
    prof = result.get("profile")
    lines = [
        "# Benchmarks: the pool over an emulated link, against the speculative-decoding bound",
        "",
        "Generated by `bench/pool_bench.py` from one run; every number below is its output "
        f"(its JSON: `{result.get('json_path') or '--json'}`; `--render JSON` writes this "
        "page and the plot again from it). Rerun the command to check them.",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        f"- **Link**: {result['link']}, emulated by `tightwad.linkemu` relays between the "
        f"coordinator and each of the {s['workers']} RPC workers, the junk host's rpc-server "
        "(c2) and the drafter (d, e); the proxy and the coordinator share a host.",
        f"- **Machine**: {m['cpus']} CPU cores ({m['cpu_model']}), no GPU, {m['system']}; "
        f"every process (workers, coordinator, drafter, proxy, relays) on these cores with "
        f"{s['threads']} thread each. The machine was shared with other work and noisy "
        f"(load average {m['loadavg_start'][0]:.2f} at the start, "
        f"{m['loadavg_end'][0]:.2f} at the end). Absolute speeds depend on that load, and so "
        "do ratios between configurations measured minutes apart"
        + (" (see Repeatability below)." if result.get("repeats") else "."),
        f"- **llama.cpp**: {result['llama_cpp']}.",
        f"- **Models** (`tightwad.testing.benchmodels`, random weights, DESIGN 7b): target "
        f"{models['target']['n_layer']} layers x {models['target']['n_embd']} wide, deeper "
        f"layers scaled by {models['target']['deep_layer_scale']}, "
        f"{models['target']['mb']} MB f16; draft = its first {models['draft']['n_layer']} "
        f"layers + the same embeddings and output ({models['draft']['mb']} MB); byte-level "
        f"BPE vocabulary of {models['n_vocab']} tokens, ChatML template.",
        f"- **Workload**: {s['prompts']} prompts x {s['reps']} repetitions (after one warm-up "
        f"each), {s['tokens']} generated tokens per request, greedy (temperature 0, "
        f"`ignore_eos`); concurrency runs: {s['reps']} batches per level.",
        "",
        "## Agreement and cost of the pair",
        "",
        f"- Per-position greedy agreement a = **{bound['a']:.3f}** (Leviathan's alpha: the "
        f"draft's argmax at each of {result['agreement']['positions']} positions of the "
        f"target's own greedy output). llama.cpp's \"draft acceptance\" accepted/drafted is a "
        f"different number that falls with k; both are in the tables.",
        f"- Cost ratio c = **{bound['c']:.3f}**: the draft's decode time per token "
        f"({result['costs']['draft_ms_per_token']['median']:.2f} ms on its own server) over one "
        f"step of the pool (b) ({result['costs']['pool_ms_per_token']:.2f} ms). On one machine "
        f"without the network the draft costs "
        f"{result['costs']['draft_over_single_target']:.3f} of the target.",
        f"- Bound S = E(a, k) / (k c + 1), E = (1 - a^(k+1)) / (1 - a): best k in the sweep "
        f"{bound['best_k']}, S = {bound['best_speedup']:.2f}x over (b).",
        "",
        "## Results, one stream",
        "",
        config_table(result),
        "",
        "tok/s = generated tokens / request time (time to first token included); IQR = "
        "interquartile range over prompts x repetitions. RPC round trips and bytes count all "
        "traffic between the coordinator and the rpc-servers; the draft link is the proxy's "
        "traffic to the drafter. Predicted S and efficiency only for (c) and (d): (c2) drafts "
        "over the network, which the bound's c does not model. \"output = (a)\": the greedy "
        "text equals the single server's (for d, a difference at a near-tie of the target's "
        "top two tokens is reported as such, DESIGN 5).",
        "",
        "## Concurrency",
        "",
        concurrency_table(result),
        "",
        "Aggregate tok/s = all tokens of a batch of simultaneous streams / the batch's wall "
        "time.",
        "",
        "## Headline",
        "",
    ]
    d = h.get("d_adaptive")
    if d:
        lines.append(f"- (d) Tightwad remote draft, adaptive k: **{d['tok_s']:.1f} tok/s, "
                     f"{fmt(d['vs_b'])}x the pool direct (b)**; accepted/drafted "
                     f"{fmt(d['acceptance'])}.")
    if h.get("d_best"):
        db = h["d_best"]
        lines.append(f"- (d) at its best fixed k = {db['k']}: {db['tok_s']:.1f} tok/s, "
                     f"{fmt(db['vs_b'])}x (b); predicted {fmt(db['predicted_speedup'])}x, "
                     f"efficiency **{fmt(db['efficiency'])}** of the bound.")
    if d and h.get("d_best") and d["tok_s"] < 0.9 * h["d_best"]["tok_s"]:
        lines.append(f"- The adaptive rule fell short of the best fixed k in this run: "
                     f"{d['tok_s']:.1f} against {h['d_best']['tok_s']:.1f} tok/s "
                     f"({fmt(bm.ratio(d['tok_s'], h['d_best']['tok_s']))}x).")
    for key, label in (("c", "(c) native, draft on the coordinator"),
                       ("c2", "(c2) native, draft on the junk host's rpc-server"),
                       ("e", f"(e) Tightwad {LEGACY_VERSION}"), ("a", "(a) the target alone")):
        if f"d_adaptive_vs_{key}" in h:
            ref = h[key if key in ("e", "a") else f"{key}_best"]
            lines.append(f"- (d) adaptive / {label} (k = {ref['k']}, {ref['tok_s']:.1f} "
                         f"tok/s): **{fmt(h[f'd_adaptive_vs_{key}'])}x**; (d) best fixed k / "
                         f"it: {fmt(h.get(f'd_best_vs_{key}'))}x.")
    if prof:
        lines += ["", "## Where the time of one remote-draft round goes", "",
                  profile_text(result)]
    if result.get("repeats"):
        runs = [result, *result["repeats"]]
        lines += ["", "## Repeatability: the same benchmark run again", "",
                  f"Run 1 is the run above; the others are later runs of the same script on "
                  f"the same machine (JSON: "
                  f"{', '.join(f'`{p}`' for p in result.get('repeat_paths', [])) or 'not kept'})."
                  " Each configuration is measured in its own time window, so load from other "
                  "work on the shared machine moves whole configurations up or down together; "
                  "compare the rows before trusting any single ratio.", "",
                  repeat_table(runs)]
    eq = result["outputs"]
    lines += ["", "## Greedy outputs", "",
              "Each configuration's text for every prompt compared with (a)'s: "
              + "; ".join(f"{key}: {v['verdict']}" for key, v in sorted(eq.items())) + ".",
              ""]
    if result.get("legacy_note"):
        lines += [result["legacy_note"], ""]
    if plot:
        rel = os.path.relpath(plot, path.parent)
        lines += [f"![tok/s per configuration and the k sweep]({rel})", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def profile_text(result: dict[str, Any]) -> str:
    p = result["profile"]
    k = p["k"]
    draft_wall = p["draft_wall_ms"]["median"]
    draft_server = p["draft_server_ms"]["median"]
    verify_wall = p["verify_wall_ms"]["median"]
    verify_compute = p["verify_compute_ms"]["median"]
    row = p.get("proxy_round")
    lines = [
        f"Measured by hand at k = {k} ({p['verify_wall_ms']['n']} rounds, medians): the "
        f"draft call through the drafter's link took {draft_wall:.1f} ms, of which the "
        f"drafter computed {draft_server:.1f} ms ("
        f"{p['draft_decode_ms_per_token']['median']:.2f} ms per drafted token; the rest, "
        f"{draft_wall - draft_server:.1f} ms, is the link round trip and HTTP); the verify of context + k on the pooled "
        f"coordinator took {verify_wall:.1f} ms, against {verify_compute:.1f} ms for the same "
        f"verify on the single server (compute alone), so the pool's network adds "
        f"{verify_wall - verify_compute:.1f} ms per verify.",
    ]
    if row:
        lines.append(
            f" Through the proxy at k = {k}, a round took {row['elapsed_ms_per_round']:.1f} ms "
            f"of request time: {row['draft_ms_per_round']:.1f} ms drafting and "
            f"{row['verify_ms_per_round']:.1f} ms verifying as the proxy timed them, leaving "
            f"{row['elapsed_ms_per_round'] - row['draft_ms_per_round'] - row['verify_ms_per_round']:.1f}"
            " ms of proxy overhead (tokenizing, accepting, streaming, the first-token path).")
    b = result["costs"]["pool_ms_per_token"]
    if row:
        bound_round = (k * result["bound"]["c"] + 1) * b
        lines.append(
            f" Per round the bound allows (k c + 1) x one pool step = {bound_round:.1f} ms and "
            f"expects E(a, k) = {bm.expected_tokens(result['bound']['a'], k):.2f} tokens; the "
            f"proxy's rounds at k = {k} emitted {row['tokens_per_round']:.2f} tokens in "
            f"{row['elapsed_ms_per_round']:.1f} ms: the token side reaches "
            f"{row['tokens_per_round'] / bm.expected_tokens(result['bound']['a'], k):.0%} of "
            "the bound (the last rounds of a request are cut short by max_tokens), the time "
            f"side {bound_round / row['elapsed_ms_per_round']:.0%}: the gap is the cost of a "
            "round.")
    lines.append(
        f" The bound assumes a verify costs one target step ({b:.1f} ms) and a draft "
        f"token c x that; here a verify costs {verify_wall / b:.2f} steps and the draft call "
        f"has a fixed {draft_wall - draft_server:.1f} ms on top, which is where the gap to the "
        "bound comes from.")
    return "".join(lines)


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["summary"]["rows"] if r["streams"] == 1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    bars = []
    for config in ("a", "b", "c", "c2", "d", "e"):
        mine = [r for r in rows if r["config"] == config]
        if not mine:
            continue
        picks = [max(mine, key=lambda r: r["tok_s"]["median"])]
        adaptive = next((r for r in mine if r["k"] == ADAPTIVE), None)
        if adaptive and adaptive is not picks[0]:
            picks.append(adaptive)
        for pick in picks:
            label = f"({config})" + ("" if pick["k"] == "-" else f"\nk={pick['k']}")
            bars.append((label, pick["tok_s"]))
    xs = range(len(bars))
    med = [b[1]["median"] for b in bars]
    err = [[b[1]["median"] - b[1]["p25"] for b in bars], [b[1]["p75"] - b[1]["median"]
                                                          for b in bars]]
    left.bar(xs, med, yerr=err, capsize=4, color="#4c72b0")
    left.set_xticks(list(xs), [b[0] for b in bars])
    left.set_ylabel("generated tok/s (median, IQR)")
    left.set_title(f"One stream, link {result['settings']['profile']} (best k of each; "
                   "(d) also adaptive)", fontsize=10)

    base = next((r for r in rows if r["config"] == "b"), None)
    base_tok_s = base["tok_s"]["median"] if base else 0
    for config, marker in (("c", "s"), ("c2", "^"), ("d", "o")):
        pts = sorted((int(r["k"]), r["tok_s"]["median"]) for r in rows
                     if r["config"] == config and r["k"].isdigit())
        if pts:
            right.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                       label=f"({config}) measured")
    bound = result["bound"]
    if base_tok_s:
        ks = list(range(1, max(result["settings"]["ks"] + [1]) + 1))
        right.plot(ks, [base_tok_s * bm.predicted_speedup(bound["a"], k, bound["c"])
                        for k in ks], "k--",
                   label=f"bound: (b) x E(a,k)/(kc+1), a={bound['a']:.2f}, c={bound['c']:.3f}")
        right.axhline(base_tok_s, color="grey", lw=1, label="(b) pool direct")
    adaptive = next((r for r in rows if r["config"] == "d" and r["k"] == ADAPTIVE), None)
    if adaptive:
        right.axhline(adaptive["tok_s"]["median"], color="C2", ls=":",
                      label="(d) adaptive k")
    right.set_xscale("log", base=2)
    right.set_xlabel("draft length k")
    right.set_ylabel("generated tok/s (median)")
    right.set_title("k sweep against the Leviathan bound")
    right.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- helpers ----------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def binary_version(path: Path) -> str:
    res = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("version")]
    return lines[0] if lines else "unknown"


def token_text(server: LlamaServer, prompt: list[int], tokens: list[int]) -> str:
    """The text of ``tokens`` after ``prompt`` as a client of the proxy receives it: their raw
    bytes (read from the verify API's per-position entries) decoded as UTF-8 with replacement,
    exactly what the proxy's incremental decoder emits (llama-server's own stream instead
    drops an incomplete character at the end)."""
    raw = b""
    for start in range(0, len(tokens), VERIFY_MAX_TOKENS):
        end = min(start + VERIFY_MAX_TOKENS, len(tokens))
        res = server.post("/completion", {
            "prompt": prompt + tokens[:end], "n_predict": 1, "temperature": 0, "n_probs": 1,
            "prompt_logprobs": end - start, "cache_prompt": False}, timeout=300)
        for entry, token in zip(res["prompt_probabilities"], tokens[start:end]):
            if entry["id"] != token:
                raise RuntimeError(f"verify entry {entry['id']} for token {token}")
            raw += bytes(entry["bytes"])
    return raw.decode("utf-8", errors="replace")


def compare_outputs(bench: Bench, single: LlamaServer) -> dict[str, dict[str, Any]]:
    """Each (config, k)'s greedy output per prompt against (a)'s: the streamed text of the same
    llama-server stream format (b, c, c2), or the text decoded from (a)'s tokens as the proxy
    emits it (d: a difference must sit at a near-tie of the target's top two tokens; e: its
    text must be a prefix of (a)'s or extend it)."""
    from tightwad.testing.inproc import greedy_text_verdict

    out: dict[str, dict[str, Any]] = {}
    texts: dict[int, str] = {}
    a_text = {s.prompt: s.text for s in bench.samples
              if s.config == "a" and s.streams == 1 and s.rep == 0}
    for s in bench.samples:
        if s.streams != 1 or s.config == "a" or s.rep != 0:
            continue
        ref = bench.reference[s.prompt]
        prompt = bench.prompts[s.prompt][1]
        key = f"{s.config}/{s.k}"
        entry = out.setdefault(key, {"same": 0, "near_tie": 0, "different": 0, "details": []})
        if s.config not in ("d", "e"):
            # Same server, same stream format: llama-server's streamed text (which leaves out
            # bytes of incomplete characters, and their tokens) must be (a)'s streamed text.
            verdict = "same" if s.text == a_text[s.prompt] else "different"
            entry[verdict] += 1
            continue
        if s.prompt not in texts:
            texts[s.prompt] = token_text(single, prompt, ref)
        expected = texts[s.prompt]
        if s.config == "e":
            mine = s.text.rstrip("\ufffd")
            same = expected.startswith(mine) or mine.startswith(expected.rstrip("\ufffd"))
            verdict = "same" if same else "different"
        elif s.text == expected:
            verdict = "same"
        else:
            try:
                verdict = greedy_text_verdict(single, prompt, s.text, {
                    "content": expected, "tokens": ref}).replace("-", "_")
            except AssertionError as exc:
                verdict = "different"
                entry["details"].append(str(exc)[:300])
        entry[verdict] += 1
    for key, entry in out.items():
        n = entry["same"] + entry["near_tie"] + entry["different"]
        prefix = " (as a prefix)" if key.startswith("e/") else ""
        if entry["different"]:
            entry["verdict"] = f"{entry['different']}/{n} differ"
        elif entry["near_tie"]:
            entry["verdict"] = f"same ({entry['near_tie']}/{n} at a near-tie)"
        else:
            entry["verdict"] = f"same{prefix} ({n}/{n})"
    return out


@contextlib.contextmanager
def stopping(proc: Any) -> Iterator[Any]:
    try:
        yield proc
    finally:
        proc.stop()


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="wifi", choices=list(PROFILES),
                   help="link emulated to every worker and to the drafter (default wifi)")
    p.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--prompts", type=int, default=4,
                   help=f"how many of the {len(PROMPTS)} built-in prompts")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per prompt")
    p.add_argument("--ks", default="1,2,4,8,16,32", help="draft lengths of the sweep")
    p.add_argument("--concurrency", default="1,4,8", help="simultaneous streams")
    p.add_argument("--configs", default="a,b,c,c2,d,e", help="which configurations to run")
    p.add_argument("--workers", type=int, default=4, help="RPC workers of the pool")
    p.add_argument("--threads", type=int, default=1, help="threads per llama.cpp process")
    p.add_argument("--legacy-venv", type=Path, default=Path(DEFAULT_LEGACY_VENV),
                   help=f"virtualenv holding tightwad {LEGACY_VERSION} for (e)")
    p.add_argument("--install-legacy", action="store_true",
                   help=f"create that virtualenv with pip install tightwad=={LEGACY_VERSION}")
    p.add_argument("--bin-dir", type=Path, help="llama.cpp binaries (default: the cached build)")
    p.add_argument("--json", type=Path, help="write everything measured")
    p.add_argument("--plot", type=Path, help="write the PNG plot")
    p.add_argument("--markdown", type=Path, help="write the markdown report")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="measure nothing: write --plot and --markdown from a saved --json")
    p.add_argument("--also", type=Path, action="append", default=[], metavar="JSON",
                   help="with --render: other runs' JSON, compared in a repeatability table")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the process logs (and the workers' tensor caches) after success")
    args = p.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.configs = [c for c in args.configs.split(",") if c]
    if unknown := set(args.configs) - set(LABELS):
        p.error(f"unknown configurations: {sorted(unknown)}")
    if not {"a", "b"} <= set(args.configs):
        p.error("(a) and (b) are the references: --configs must include a and b")
    if not all(1 <= k <= VERIFY_MAX_TOKENS for k in args.ks):
        p.error(f"every k must lie in 1..{VERIFY_MAX_TOKENS}")
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must lie in 1..{len(PROMPTS)}")
    if max(args.concurrency) > SLOTS:
        p.error(f"at most {SLOTS} streams (the servers' slots)")
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def repeat_table(runs: list[dict[str, Any]]) -> str:
    """Headline numbers of several runs of this benchmark side by side."""
    rows = ["| Run | command | load avg start / end | (a) tok/s | (b) tok/s | (c) best k: x(b) | "
            "(c2) best k: x(b) | (d) best k: x(b), efficiency | (d) adaptive: x(b) | "
            "(e): x(b) | (d) adaptive / (c) best | (d) best / (c) best | (d) adaptive / (c2) "
            "best | (d) adaptive / (e) |", "|" + "---|" * 14]
    for i, run in enumerate(runs, 1):
        h, m = run["headline"], run["machine"]

        def vs(name: str) -> str:
            x = h.get(name)
            return f"k={x['k']}: {fmt(x['vs_b'])}x" if x else "-"

        d_best = h.get("d_best") or {}
        rows.append(
            f"| {i} | `{run['command'].split('pool_bench.py ', 1)[-1]}` | "
            f"{m['loadavg_start'][0]:.1f} / {m['loadavg_end'][0]:.1f} | "
            f"{h['a']['tok_s']:.1f} | {h['b']['tok_s']:.1f} | {vs('c_best')} | {vs('c2_best')} | "
            f"k={d_best.get('k')}: {fmt(d_best.get('vs_b'))}x, {fmt(d_best.get('efficiency'))} | "
            f"{fmt((h.get('d_adaptive') or {}).get('vs_b'))}x | "
            f"{fmt((h.get('e') or {}).get('vs_b'))}x | {fmt(h.get('d_adaptive_vs_c'))}x | "
            f"{fmt(h.get('d_best_vs_c'))}x | {fmt(h.get('d_adaptive_vs_c2'))}x | "
            f"{fmt(h.get('d_adaptive_vs_e'))}x |")
    return "\n".join(rows)


def render(args: argparse.Namespace) -> int:
    """Write the plot and the markdown again from a saved ``--json`` (no measuring)."""
    result = json.loads(args.render.read_text())
    result["json_path"] = "" if args.render.is_absolute() else str(args.render)
    result["repeats"] = [json.loads(path.read_text()) for path in args.also]
    result["repeat_paths"] = [str(path) for path in args.also if not path.is_absolute()]
    print(config_table(result), flush=True)
    if args.plot:
        write_plot(result, args.plot)
    if args.markdown:
        write_markdown(result, args.markdown, args.plot)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args)
    command = shlex.join([".venv/bin/python", "bench/pool_bench.py",
                          *(sys.argv[1:] if argv is None else argv)])
    cache = llama_build.default_cache_dir()
    if args.bin_dir:
        bin_dir, build_name = args.bin_dir, "custom (--bin-dir)"
    else:
        build = llama_build.ensure_build("cpu", cache=cache)
        bin_dir, build_name = build.bin_dir, build.path.name
    pair: BenchPair = ensure_bench_models(cache / "models")
    profile = adjust_profile(args.profile)
    machine = {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "system": platform.platform(),
               "python": platform.python_version(), "loadavg_start": os.getloadavg()}
    venv, legacy_why = (None, "not requested")
    if "e" in args.configs:
        venv, legacy_why = legacy_venv(args.legacy_venv.expanduser(), args.install_legacy)
        if venv is None:
            log(f"(e) skipped: {legacy_why}")
    log(f"pool_bench: {command}")
    log(f"link {profile.describe()}; {machine['cpus']} CPUs, load {machine['loadavg_start']}")
    ks = [str(k) for k in args.ks]
    result: dict[str, Any] = {
        "command": command, "settings": {**{k: v for k, v in vars(args).items()
                                            if k not in ("legacy_venv", "bin_dir", "json",
                                                         "plot", "markdown",
                                                         "keep_logs", "render",
                                                         "also")}},
        "machine": machine, "link": profile.describe(),
        "llama_cpp": f"{binary_version(bin_dir / 'llama-server')}, build {build_name}",
        "models": {
            "target": {"file": pair.target.name, "mb": round(pair.target.stat().st_size / 1e6, 1),
                       **{key: getattr(pair.target_spec, key) for key in (
                           "n_layer", "n_embd", "n_head", "n_ff", "deep_layer_scale",
                           "n_core_layers", "output_scale", "seed")}},
            "draft": {"file": pair.draft.name, "mb": round(pair.draft.stat().st_size / 1e6, 1),
                      "n_layer": pair.draft_spec.n_written_layers},
        },
        "legacy_note": "" if venv or "e" not in args.configs else f"(e) not run: {legacy_why}",
    }
    started = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="tightwad-pool-bench-"))
    with ProcessGroup(bin_dir=bin_dir, log_dir=log_dir, threads=args.threads) as group:
        relays: RelayThread | None = None
        try:
            workers = [group.rpc_worker(name=f"worker{i}", cache=True)
                       for i in range(args.workers)]
            junk = group.rpc_worker(name="junk-rpc", cache=True)
            single = group.llama_server(pair.target, name="single", ctx=CTX, slots=SLOTS,
                                        args=["--verify-max-tokens", str(VERIFY_MAX_TOKENS)])
            drafter = group.llama_server(pair.draft, name="drafter", ctx=CTX, slots=SLOTS,
                                         args=["--verify-max-tokens", str(VERIFY_MAX_TOKENS)])
            relays = RelayThread([*(w.endpoint for w in workers), junk.endpoint,
                                  f"{drafter.host}:{drafter.port}"], profile, seed=0).start()
            pool_rpc = relays.endpoints[: args.workers]
            junk_rpc = relays.endpoints[args.workers]
            drafter_url = f"http://{relays.endpoints[args.workers + 1]}"
            result["models"]["n_vocab"] = single.get("/v1/models")["data"][0]["meta"]["n_vocab"]
            prompts = [(text, single.post("/tokenize", {"content": text,
                                                        "add_special": True})["tokens"])
                       for text in PROMPTS[: args.prompts]]
            bench = Bench(args, group, relays, args.workers, prompts)

            log("(a) the target alone")
            single_ep = Endpoint("llama", single.url)
            bench.measure("a", "-", single_ep)
            bench.take_reference(single)
            result["agreement"] = measure_agreement(drafter, prompts, bench.reference)
            log(f"per-position agreement a = {result['agreement']['a']:.3f}")
            draft_ms = draft_step_ms(drafter, prompts, 32)
            single_ms = statistics.median(
                1e3 * s.elapsed_s / s.tokens for s in bench.samples if s.config == "a")

            log("(b) pool direct")
            coordinator = start_coordinator(group, pair.target, pool_rpc, "coordinator")
            with stopping(coordinator):
                pool_ep = Endpoint("llama", coordinator.url)
                bench.measure("b", "-", pool_ep)
                b_rows = [s for s in bench.samples if s.config == "b"]
                pool_ms = statistics.median(
                    1e3 * s.elapsed_s / s.tokens for s in b_rows)
                result["costs"] = {"draft_ms_per_token": draft_ms, "pool_ms_per_token": pool_ms,
                                   "single_ms_per_token": single_ms,
                                   "draft_over_single_target": draft_ms["median"] / single_ms}
                a = result["agreement"]["a"]
                c = bm.cost_ratio(draft_ms["median"], pool_ms)
                best = bm.best_k(a, c, args.ks)
                result["bound"] = {"a": a, "c": c, "best_k": best,
                                   "best_speedup": bm.predicted_speedup(a, best, c),
                                   "per_k": {k: bm.predicted_speedup(a, k, c)
                                             for k in args.ks}}
                log(f"c = {c:.3f}; bound best k {best}, "
                    f"S = {result['bound']['best_speedup']:.2f}")
                if "d" in args.configs:
                    for k in [*ks, ADAPTIVE]:
                        log(f"(d) remote draft, k = {k}")
                        proxy = start_proxy(group, coordinator, drafter_url, k,
                                            max(args.ks))
                        with stopping(proxy):
                            ep = Endpoint("proxy", proxy.url)
                            bench.measure("d", k, ep)
                            if k == ADAPTIVE:
                                for n in args.concurrency:
                                    if n > 1:
                                        log(f"(d) adaptive, {n} streams")
                                        bench.measure("d", k, ep, streams=n)
                if venv is not None:
                    log(f"(e) tightwad {LEGACY_VERSION}")
                    home = log_dir / "legacy-home"
                    home.mkdir(exist_ok=True)
                    legacy = start_legacy(group, venv, coordinator, drafter_url, home)
                    with stopping(legacy):
                        bench.measure("e", "8", Endpoint("legacy", legacy.url))
                    result["legacy_note"] = (
                        f"(e) ran tightwad {LEGACY_VERSION} as installed by pip, configured by "
                        "its environment variables (TIGHTWAD_DRAFT_URL, TIGHTWAD_TARGET_URL, "
                        "llamacpp backends, default max_draft_tokens 8). It takes text "
                        "prompts, counts max_tokens in whitespace-separated words and verifies "
                        "by letting the target generate k + 1 tokens; its tokens are counted "
                        "from its own statistics (accepted + bonus + resampled), and its "
                        "requests ask for tokens/6 words. Its text differs from (a) "
                        "because it re-tokenizes text every round.")
                for n in args.concurrency:
                    if n > 1:
                        log(f"(b) {n} streams")
                        bench.measure("b", "-", pool_ep, streams=n)
                if "d" in args.configs:
                    prof_k = best
                    result["profile"] = profile_round(single, coordinator, drafter_url,
                                                      prompts, bench.reference, prof_k,
                                                      max(1, args.reps))
            for n in args.concurrency:
                if n > 1:
                    log(f"(a) {n} streams")
                    bench.measure("a", "-", single_ep, streams=n)

            native_ks = [*ks, NATIVE_DEFAULT]
            for config in ("c", "c2"):
                if config not in args.configs:
                    continue
                for k in native_ks:
                    log(f"({config}) native speculation, k = {k}")
                    extra = ["--spec-type", "draft-simple", "--spec-draft-model",
                             str(pair.draft), "--spec-draft-p-min", "0"]
                    if k != NATIVE_DEFAULT:
                        extra += ["--spec-draft-n-max", k]
                    rpc = list(pool_rpc)
                    if config == "c":
                        extra += ["--spec-draft-device", "none"]
                    else:
                        rpc.append(junk_rpc)
                        extra += ["--spec-draft-device", f"RPC{args.workers}",
                                  "--spec-draft-ngl", "all",
                                  "--tensor-split", ",".join(["1"] * args.workers + ["0"])]
                    coord = start_coordinator(group, pair.target, rpc,
                                              f"coordinator-{config}-k{k}", extra)
                    with stopping(coord):
                        ep = Endpoint("llama", coord.url)
                        bench.measure(config, k, ep)
                        if config == "c" and k == NATIVE_DEFAULT:
                            for n in args.concurrency:
                                if n > 1:
                                    log(f"(c) default k, {n} streams")
                                    bench.measure("c", k, ep, streams=n)
            result["native_default_k"] = native_default_k(bin_dir)
            result["outputs"] = compare_outputs(bench, single)
        except BaseException:
            log(f"failed; process logs in {log_dir}")
            raise
        finally:
            if relays is not None:
                relays.close()

    if not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()
    result["elapsed_s"] = time.monotonic() - started
    result["samples"] = [{key: value for key, value in asdict(s).items()
                          if key not in ("text", "token_ids")} for s in bench.samples]
    summary = summarize(bench, result["bound"]["a"], result["bound"]["c"],
                        ["-", *ks, ADAPTIVE, NATIVE_DEFAULT])
    for row in summary["rows"]:
        if row["k"] == NATIVE_DEFAULT:
            row["native_default_k"] = result["native_default_k"]
            k_num = row_k(row)
            if k_num:
                row["k_used"] = k_num
                if row["config"] == "c" and row["streams"] == 1 and row.get("vs_b"):
                    row["predicted_speedup"] = bm.predicted_speedup(
                        result["bound"]["a"], k_num, result["bound"]["c"])
                    row["efficiency"] = bm.efficiency(row["vs_b"], row["predicted_speedup"])
    result["summary"] = summary
    result["a_tok_s"] = next(r["tok_s"]["median"] for r in summary["rows"]
                             if r["config"] == "a" and r["streams"] == 1)
    result["concurrency_configs"] = ["a", "b", "c", "d"]
    if result.get("profile"):
        result["profile"]["proxy_round"] = next(
            (r for r in summary["rows"] if r["config"] == "d" and r["streams"] == 1
             and r["k"] == str(result["profile"]["k"]) and "draft_ms_per_round" in r), None)
    result["headline"] = headline(result)
    log(f"done in {result['elapsed_s'] / 60:.1f} min")
    print(config_table(result), flush=True)
    print(json.dumps(result["headline"], indent=1), flush=True)
    result["json_path"] = str(args.json) if args.json and not args.json.is_absolute() else ""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        write_plot(result, args.plot)
    if args.markdown:
        write_markdown(result, args.markdown, args.plot)
    return 0


def native_default_k(bin_dir: Path) -> int | None:
    """llama.cpp's default --spec-draft-n-max, read from its --help."""
    res = subprocess.run([str(bin_dir / "llama-server"), "--help"], capture_output=True,
                         text=True, timeout=60)
    for line in (res.stdout + res.stderr).splitlines():
        if "--spec-draft-n-max" in line:
            idx = (res.stdout + res.stderr).splitlines().index(line)
            text = " ".join((res.stdout + res.stderr).splitlines()[idx:idx + 3])
            if "default:" in text:
                value = text.split("default:", 1)[1].split(")", 1)[0].strip()
                if value.isdigit():
                    return int(value)
    return None


if __name__ == "__main__":
    sys.exit(main())
