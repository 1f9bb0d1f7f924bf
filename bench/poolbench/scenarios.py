"""The measuring run: the servers every configuration shares, then the configurations
INTERLEAVED: each repetition visits every (configuration, k) once, in an order rotated per
repetition, each on a freshly started coordinator (and proxy), so load from other work on a
shared machine spreads over all configurations instead of moving one of them. Then the round
profile per k, on a fresh coordinator with every shape warmed first."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tightwad.pool.linkemu import LinkProfile
from tightwad.pool.procs import LlamaServer, ProcessGroup
from tightwad_dev import benchmath as bm
from tightwad_dev.benchmodels import BenchPair

from .greedy import compare_outputs
from .measure import Bench, Endpoint
from .probes import draft_step_ms, measure_agreement, profile_rounds
from .relayproc import RelayProcess
from .services import (
    drafter_args,
    native_default_k,
    native_spec_args,
    start_coordinator,
    start_legacy,
    start_proxy,
)
from .settings import (
    ADAPTIVE,
    CONCURRENCY_UNITS,
    CTX,
    LEGACY_VERSION,
    NATIVE_DEFAULT,
    PROMPTS,
    SLOTS,
    VERIFY_MAX_TOKENS,
)
from .summary import speedup_bound

LEGACY_NOTE = (
    f"(e) ran tightwad {LEGACY_VERSION} as installed by pip, configured by "
    "its environment variables (TIGHTWAD_DRAFT_URL, TIGHTWAD_TARGET_URL, "
    "llamacpp backends, default max_draft_tokens 8). It takes text "
    "prompts, counts max_tokens in whitespace-separated words and verifies "
    "by letting the target generate k + 1 tokens; its tokens are counted "
    "from its own statistics (accepted + bonus + resampled), and its "
    "requests ask for tokens/6 words. Its text differs from (a) "
    "because it re-tokenizes text every round.")


PROFILE_PROMPTS = 4  # the round profile's prompts (each k, each repetition)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Run:
    """The shared servers of one measuring run, and what it has measured so far."""

    args: argparse.Namespace
    group: ProcessGroup
    pair: BenchPair
    single: LlamaServer  # the target alone: (a), and the reference
    drafter: LlamaServer
    # the pool's workers, the junk host's rpc-server, the drafter, then the workers' peer ports
    relays: RelayProcess
    bench: Bench
    result: dict[str, Any]
    log_dir: Path
    venv: Path | None

    @property
    def ks(self) -> list[str]:
        return [str(k) for k in self.args.ks]

    @property
    def pool_rpc(self) -> list[str]:
        return self.relays.endpoints[: self.args.workers]

    @property
    def pool_peers(self) -> dict[str, str]:
        """Each pool worker's relayed endpoint -> its relayed peer endpoint (none: --no-peers)."""
        return dict(zip(self.pool_rpc, self.relays.endpoints[self.args.workers + 2:]))

    @property
    def junk_rpc(self) -> str:
        return self.relays.endpoints[self.args.workers]

    @property
    def drafter_url(self) -> str:
        return f"http://{self.relays.endpoints[self.args.workers + 1]}"


def units(args: argparse.Namespace, venv: Path | None) -> list[tuple[str, str]]:
    """Every (configuration, k) a repetition visits."""
    ks = [str(k) for k in args.ks]
    out: list[tuple[str, str]] = [("a", "-"), ("b", "-")]
    for config in ("c", "c2"):
        if config in args.configs:
            out += [(config, k) for k in [*ks, NATIVE_DEFAULT]]
    if "d" in args.configs:
        out += [("d", k) for k in [*ks, ADAPTIVE]]
    if venv is not None:
        out.append(("e", "8"))
    return out


def rotated(items: list[tuple[str, str]], rep: int) -> list[tuple[str, str]]:
    """The visiting order of repetition ``rep``: rotated, and reversed every other time, so no
    configuration always runs first, last, or right after the same neighbour."""
    shift = (rep * 5) % len(items) if items else 0
    order = items[shift:] + items[:shift]
    return order[::-1] if rep % 2 else order


def measure_all(args: argparse.Namespace, bin_dir: Path, pair: BenchPair, profile: LinkProfile,
                venv: Path | None, result: dict[str, Any]) -> Bench:
    """Start the shared servers and measure every configuration of ``args.configs``; fills
    ``result`` with what the summary needs besides the samples."""
    log_dir = Path(tempfile.mkdtemp(prefix="tightwad-pool-bench-"))
    with ProcessGroup(bin_dir=bin_dir, log_dir=log_dir, threads=args.threads) as group:
        relays: RelayProcess | None = None
        try:
            workers = [group.rpc_worker(name=f"worker{i}", cache=True, peer=args.peers)
                       for i in range(args.workers)]
            junk = group.rpc_worker(name="junk-rpc", cache=True)
            single = group.llama_server(pair.target, name="single", ctx=CTX, slots=SLOTS,
                                        args=["--verify-max-tokens", str(VERIFY_MAX_TOKENS)])
            drafter = group.llama_server(pair.draft, name="drafter", ctx=CTX, slots=SLOTS,
                                         args=drafter_args())
            relays = RelayProcess([*(w.endpoint for w in workers), junk.endpoint,
                                   f"{drafter.host}:{drafter.port}",
                                   *(w.peer for w in workers if w.peer)], profile, seed=0)
            result["models"]["n_vocab"] = single.get("/v1/models")["data"][0]["meta"]["n_vocab"]
            prompts = [(text, single.post("/tokenize", {"content": text,
                                                        "add_special": True})["tokens"])
                       for text in PROMPTS[: args.prompts]]
            run = Run(args, group, pair, single, drafter, relays,
                      Bench(args, relays, args.workers, prompts, group), result, log_dir, venv)
            measure_pair(run)
            plan = units(args, venv)
            for rep in range(args.reps):
                for config, k in rotated(plan, rep):
                    measure_unit(run, config, k, rep)
            pool_ms = statistics.median(1e3 * s.elapsed_s / s.tokens
                                        for s in run.bench.samples
                                        if s.config == "b" and s.streams == 1)
            set_costs(run, pool_ms)
            if "d" in args.configs or "c" in args.configs:
                measure_profile(run)
            result["native_default_k"] = native_default_k(bin_dir)
            if venv is not None:
                result["legacy_note"] = LEGACY_NOTE
            result["outputs"] = compare_outputs(run.bench, single)
        except BaseException:
            log(f"failed; process logs in {log_dir}")
            raise
        finally:
            if relays is not None:
                relays.close()
    if not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    return run.bench


def measure_pair(run: Run) -> None:
    """(a)'s greedy reference, the pair's agreement and the draft's own cost per token."""
    bench = run.bench
    bench.take_reference(run.single)
    run.result["agreement"] = measure_agreement(run.drafter, bench.prompts, bench.reference)
    log(f"per-position agreement a = {run.result['agreement']['alpha']:.3f}")
    run.result["costs"] = {"draft_ms_per_token": draft_step_ms(run.drafter, bench.prompts, 32)}


def set_costs(run: Run, pool_ms: float) -> None:
    """The pool's step (b), the target's alone (a), and Leviathan's bound from them."""
    costs = run.result["costs"]
    single_ms = statistics.median(1e3 * s.elapsed_s / s.tokens for s in run.bench.samples
                                  if s.config == "a" and s.streams == 1)
    draft_ms = costs["draft_ms_per_token"]["median"]
    costs.update({"pool_ms_per_token": pool_ms, "single_ms_per_token": single_ms,
                  "draft_over_single_target": draft_ms / single_ms})
    bound = speedup_bound(run.result["agreement"]["alpha"], bm.cost_ratio(draft_ms, pool_ms),
                          run.args.ks)
    run.result["bound"] = bound
    log(f"c = {bound['cost_ratio']:.3f}; bound best k {bound['best_k']}, S = {bound['best_speedup']:.2f}")


@contextlib.contextmanager
def serving(run: Run, config: str, k: str, rep: int) -> Iterator[Endpoint]:
    """A fresh endpoint for (config, k): the single server for (a), else a newly started
    coordinator (with native speculation for c/c2) and, for d/e, a newly started proxy."""
    if config == "a":
        yield Endpoint("llama", run.single.url)
        return
    extra: list[str] = []
    rpc = run.pool_rpc
    if config in ("c", "c2"):
        extra, with_junk = native_spec_args(config, k, run.pair.draft, run.args.workers)
        rpc = [*rpc, *([run.junk_rpc] if with_junk else [])]
    coord = start_coordinator(run.group, run.pair.target, rpc, f"coord-{config}-k{k}-r{rep}",
                              extra, run.pool_peers)
    try:
        if config == "d":
            proxy = start_proxy(run.group, coord, run.drafter_url, k, max(run.args.ks))
            try:
                yield Endpoint("proxy", proxy.url, coord.url)
            finally:
                proxy.stop()
        elif config == "e":
            assert run.venv is not None
            home = run.log_dir / "legacy-home"
            home.mkdir(exist_ok=True)
            legacy = start_legacy(run.group, run.venv, coord, run.drafter_url, home)
            try:
                yield Endpoint("legacy", legacy.url, coord.url)
            finally:
                legacy.stop()
        else:
            yield Endpoint("llama", coord.url, coord.url)
    finally:
        coord.stop()


def measure_unit(run: Run, config: str, k: str, rep: int) -> None:
    """One visit of (config, k): warm-up, one request per prompt, then, for the configurations
    that run them, each concurrency level above one (a warm-up batch of the same width first)."""
    log(f"rep {rep + 1}/{run.args.reps}: ({config}) k = {k}")
    bench = run.bench
    with serving(run, config, k, rep) as ep:
        bench.warm_up(ep)
        bench.solo(config, k, ep, rep)
        if (config, k) in CONCURRENCY_UNITS:
            for n in run.args.concurrency:
                if n > 1:
                    log(f"  {n} streams")
                    bench.warm_up(ep, n)
                    bench.batch(config, k, ep, rep, n)


def measure_profile(run: Run) -> None:
    """The parts of one round per k, on a fresh pooled coordinator."""
    log("round profile per k")
    coord = start_coordinator(run.group, run.pair.target, run.pool_rpc, "coord-profile",
                              peers=run.pool_peers)
    try:
        run.result["profile"] = profile_rounds(
            run.single, coord, run.drafter_url, run.relays, run.args.workers,
            run.bench.prompts[:PROFILE_PROMPTS],
            run.bench.reference, run.args.ks, max(1, min(run.args.reps, 2)))
    finally:
        coord.stop()
