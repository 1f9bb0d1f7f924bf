"""The measuring run: the servers every configuration shares, then each configuration in
turn. The order matters: (a) gives the reference outputs, (b)'s step cost sets the bound, and
the pool's coordinator serves (b), (d) and (e) before the native coordinators (c, c2) start."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tightwad.pool.procs import LlamaServer, ProcessGroup
from tightwad_dev import benchmath as bm
from tightwad_dev.benchmodels import BenchPair
from tightwad_dev.linkemu import LinkProfile, RelayThread

from .greedy import compare_outputs
from .measure import Bench, Endpoint
from .probes import draft_step_ms, measure_agreement, profile_round
from .services import (
    native_default_k,
    native_spec_args,
    start_coordinator,
    start_legacy,
    start_proxy,
    stopping,
)
from .settings import ADAPTIVE, CTX, LEGACY_VERSION, NATIVE_DEFAULT, PROMPTS, SLOTS, VERIFY_MAX_TOKENS
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
    relays: RelayThread  # the pool's workers, the junk host's rpc-server, the drafter
    bench: Bench
    result: dict[str, Any]
    log_dir: Path

    @property
    def ks(self) -> list[str]:
        return [str(k) for k in self.args.ks]

    @property
    def pool_rpc(self) -> list[str]:
        return self.relays.endpoints[: self.args.workers]

    @property
    def junk_rpc(self) -> str:
        return self.relays.endpoints[self.args.workers]

    @property
    def drafter_url(self) -> str:
        return f"http://{self.relays.endpoints[self.args.workers + 1]}"

    def concurrency(self, label: str, config: str, k: str, ep: Endpoint) -> None:
        """The ``--concurrency`` levels above one stream."""
        for n in self.args.concurrency:
            if n > 1:
                log(f"{label} {n} streams")
                self.bench.measure(config, k, ep, streams=n)


def measure_all(args: argparse.Namespace, bin_dir: Path, pair: BenchPair, profile: LinkProfile,
                venv: Path | None, result: dict[str, Any]) -> Bench:
    """Start the shared servers and measure every configuration of ``args.configs``; fills
    ``result`` with what the summary needs besides the samples."""
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
            result["models"]["n_vocab"] = single.get("/v1/models")["data"][0]["meta"]["n_vocab"]
            prompts = [(text, single.post("/tokenize", {"content": text,
                                                        "add_special": True})["tokens"])
                       for text in PROMPTS[: args.prompts]]
            run = Run(args, group, pair, single, drafter, relays,
                      Bench(args, group, relays, args.workers, prompts), result, log_dir)
            draft_ms, single_ms = measure_single(run)
            measure_pool(run, draft_ms, single_ms, venv)
            run.concurrency("(a)", "a", "-", Endpoint("llama", single.url))
            for config in ("c", "c2"):
                if config in args.configs:
                    measure_native(run, config)
            result["native_default_k"] = native_default_k(bin_dir)
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


def measure_single(run: Run) -> tuple[dict[str, float], float]:
    """(a), its greedy reference, the pair's agreement; (the draft's ms per token, (a)'s)."""
    log("(a) the target alone")
    bench = run.bench
    bench.measure("a", "-", Endpoint("llama", run.single.url))
    bench.take_reference(run.single)
    run.result["agreement"] = measure_agreement(run.drafter, bench.prompts, bench.reference)
    log(f"per-position agreement a = {run.result['agreement']['a']:.3f}")
    draft_ms = draft_step_ms(run.drafter, bench.prompts, 32)
    single_ms = statistics.median(
        1e3 * s.elapsed_s / s.tokens for s in bench.samples if s.config == "a")
    return draft_ms, single_ms


def measure_pool(run: Run, draft_ms: dict[str, float], single_ms: float,
                 venv: Path | None) -> None:
    """(b), the bound from its step cost, then (d) and (e) on the same coordinator, (b)'s
    concurrency and the profile of one remote-draft round."""
    log("(b) pool direct")
    coordinator = start_coordinator(run.group, run.pair.target, run.pool_rpc, "coordinator")
    with stopping(coordinator):
        pool_ep = Endpoint("llama", coordinator.url)
        run.bench.measure("b", "-", pool_ep)
        pool_ms = statistics.median(
            1e3 * s.elapsed_s / s.tokens for s in run.bench.samples if s.config == "b")
        run.result["costs"] = {"draft_ms_per_token": draft_ms, "pool_ms_per_token": pool_ms,
                               "single_ms_per_token": single_ms,
                               "draft_over_single_target": draft_ms["median"] / single_ms}
        bound = speedup_bound(run.result["agreement"]["a"],
                              bm.cost_ratio(draft_ms["median"], pool_ms), run.args.ks)
        run.result["bound"] = bound
        log(f"c = {bound['c']:.3f}; bound best k {bound['best_k']}, "
            f"S = {bound['best_speedup']:.2f}")
        if "d" in run.args.configs:
            measure_remote_draft(run, coordinator)
        if venv is not None:
            measure_legacy(run, coordinator, venv)
        run.concurrency("(b)", "b", "-", pool_ep)
        if "d" in run.args.configs:
            run.result["profile"] = profile_round(
                run.single, coordinator, run.drafter_url, run.bench.prompts,
                run.bench.reference, bound["best_k"], max(1, run.args.reps))


def measure_remote_draft(run: Run, coordinator: LlamaServer) -> None:
    """(d): a Tightwad proxy per k of the sweep, then one with the adaptive rule."""
    for k in [*run.ks, ADAPTIVE]:
        log(f"(d) remote draft, k = {k}")
        proxy = start_proxy(run.group, coordinator, run.drafter_url, k, max(run.args.ks))
        with stopping(proxy):
            ep = Endpoint("proxy", proxy.url)
            run.bench.measure("d", k, ep)
            if k == ADAPTIVE:
                run.concurrency("(d) adaptive,", "d", k, ep)


def measure_legacy(run: Run, coordinator: LlamaServer, venv: Path) -> None:
    """(e): the original Tightwad proxy from its own virtualenv."""
    log(f"(e) tightwad {LEGACY_VERSION}")
    home = run.log_dir / "legacy-home"
    home.mkdir(exist_ok=True)
    legacy = start_legacy(run.group, venv, coordinator, run.drafter_url, home)
    with stopping(legacy):
        run.bench.measure("e", "8", Endpoint("legacy", legacy.url))
    run.result["legacy_note"] = LEGACY_NOTE


def measure_native(run: Run, config: str) -> None:
    """(c) or (c2): a coordinator with llama.cpp's own speculation per k, and its default."""
    for k in [*run.ks, NATIVE_DEFAULT]:
        log(f"({config}) native speculation, k = {k}")
        extra, with_junk = native_spec_args(config, k, run.pair.draft, run.args.workers)
        rpc = [*run.pool_rpc, *([run.junk_rpc] if with_junk else [])]
        coord = start_coordinator(run.group, run.pair.target, rpc,
                                  f"coordinator-{config}-k{k}", extra)
        with stopping(coord):
            ep = Endpoint("llama", coord.url)
            run.bench.measure(config, k, ep)
            if config == "c" and k == NATIVE_DEFAULT:
                run.concurrency("(c) default k,", "c", k, ep)
