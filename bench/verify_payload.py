#!/usr/bin/env python3
"""What does ``--output-top-n`` save? Bytes and time of a verify, and of a plain decoded token.

Loopback pools side by side, identical but for the flag: each ``--workers`` ``ggml-rpc-server``
workers behind link-emulator relays (:mod:`tightwad.pool.linkemu`, ``--profile``) and a coordinator
``llama-server`` with ``--verify-max-tokens 32`` and one slot, holding the 128k-vocabulary test
target; ``full`` pulls n_vocab logits per output row (patch 0001 alone), ``top-n`` runs with
``--output-top-n N`` (patch 0005: the worker holding the output layer sends N ids and
probabilities per row); ``top-n-peer`` is ``top-n`` whose workers pass the hidden states to each
other (patch 0007: ``--peer`` ports, behind relays of their own, named in ``GGML_RPC_PEERS``)
instead of through the coordinator. Per prompt, repetition and configuration, in rotating order,
each request once untimed (so the timed one reuses its graph, as a steady stream would) and once timed:

- ``verify k``: context + the target's k greedy tokens, ``prompt_logprobs: k``, ``n_probs: 1``,
  ``n_predict: 1`` (the proxy's greedy verify), for each ``--k``;
- ``decode``: ``n_predict: 16`` from the cached context, greedy, no ``n_probs``.

Reports median wall ms with its bootstrap 95% CI, bytes to / from the workers over the
coordinator's links and between workers, per request (the relays' counters) and per decoded
token, and writes everything to ``--json``.

    .venv/bin/python bench/verify_payload.py --profile wifi --json payload-wifi.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Run as a script, this file's directory (bench/) is on sys.path.
from benchenv import binary_version, llama_binaries, machine_info, stop_on_sigterm, write_result

from tightwad import build as llama_build
from tightwad.pool.linkemu import PROFILES, LinkStats, RelayThread
from tightwad.pool.procs import LlamaServer, ProcessGroup
from tightwad_dev.benchmath import spread
from tightwad_dev.models import ensure_models

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Once upon a time, in a land far away, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]
# Where the output layer runs: on the worker holding the last layers (llama.cpp's choice), or on
# the coordinator's own CPU (``-ot output.weight=CPU``: only hidden states cross the link).
OUTPUT_ON_COORDINATOR = ["--override-tensor", r"output\.weight=CPU"]
CONFIG_ARGS = {"full": [], "top-n": None, "full-out-coord": OUTPUT_ON_COORDINATOR,
               "top-n-out-coord": None, "top-n-peer": None}
VERIFY_MAX_TOKENS = 32
DECODE_TOKENS = 16


@dataclass
class Sample:
    config: str
    request: str  # "verify k" or "decode"
    prompt: int
    rep: int
    wall_ms: float
    server_ms: float
    bytes_up: int
    bytes_down: int
    round_trips: int
    bytes_between: int = 0  # over the links between workers (top-n-peer)


@dataclass
class Pool:
    server: LlamaServer
    relays: RelayThread  # the coordinator's links to the workers, then the peer ports' links
    n_workers: int


def post(pool: Pool, body: dict) -> tuple[dict, float, LinkStats, LinkStats]:
    """One request: its answer, wall ms, and the bytes over the coordinator's links and over
    the links between workers."""
    before = pool.relays.stats()
    started = time.perf_counter()
    res = pool.server.post("/completion", {"temperature": 0, "cache_prompt": True, "id_slot": 0,
                                           "return_tokens": True, **body}, timeout=300)
    wall_ms = (time.perf_counter() - started) * 1e3
    moved = [a - b for a, b in zip(pool.relays.stats(), before)]
    return (res, wall_ms, sum(moved[:pool.n_workers], LinkStats()),
            sum(moved[pool.n_workers:], LinkStats()))


def check(ok: bool, message: str) -> None:
    if not ok:
        raise SystemExit(f"unexpected server behaviour: {message}")


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="wifi", choices=list(PROFILES),
                   help="link emulated between each coordinator and its workers (default wifi)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 4, 8, 16], help="draft lengths")
    p.add_argument("--top-n", type=int, default=16, help="--output-top-n of the top-n pool")
    p.add_argument("--configs", nargs="+", default=["full", "top-n"], choices=list(CONFIG_ARGS),
                   help="pools to compare (default: full top-n); *-out-coord: the output "
                   "layer on the coordinator's CPU")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per prompt")
    p.add_argument("--prompts", type=int, default=2, help=f"how many of the {len(PROMPTS)} "
                   "built-in prompts to use")
    p.add_argument("--workers", type=int, default=2, help="RPC workers per pool")
    p.add_argument("--threads", type=int, default=1, help="threads per llama.cpp process")
    p.add_argument("--bin-dir", type=Path,
                   help="llama.cpp binaries (default: the cached build, built if missing)")
    p.add_argument("--json", type=Path, help="write settings, machine, samples and summary")
    args = p.parse_args(argv)
    if not all(1 <= k <= VERIFY_MAX_TOKENS for k in args.k):
        p.error(f"--k must be in 1..{VERIFY_MAX_TOKENS}")
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must be in 1..{len(PROMPTS)}")
    return args


def summarize(samples: list[Sample], requests: list[str],
              configs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for request in requests:
        per = 1 if request != "decode" else DECODE_TOKENS
        for config in configs:
            mine = [s for s in samples if s.config == config and s.request == request]
            out[f"{request} / {config}"] = {
                "wall_ms": spread([s.wall_ms for s in mine]),
                "server_ms": spread([s.server_ms for s in mine]),
                "bytes_up": statistics.median(s.bytes_up for s in mine) / per,
                "bytes_down": statistics.median(s.bytes_down for s in mine) / per,
                "round_trips": statistics.median(s.round_trips for s in mine),
                "bytes_between": statistics.median(s.bytes_between for s in mine) / per,
            }
    return out


def table(summary: dict[str, Any], requests: list[str], link: str,
          configs: Sequence[str]) -> str:
    rows = ["| Link | Request | Config | Wall ms, median [95% CI] (p25-p75) | Server ms | "
            "Bytes to / from workers | Between workers | Round trips | Wall speed-up |",
            "|---|---|---|---|---|---|---|---|---|"]
    for request in requests:
        label = f"{request} (per token)" if request == "decode" else request
        full_ms = summary[f"{request} / {configs[0]}"]["wall_ms"]["median"]
        for config in configs:
            e = summary[f"{request} / {config}"]
            w = e["wall_ms"]
            ms = (w["median"] / DECODE_TOKENS if request == "decode" else w["median"])
            rows.append(
                f"| {link} | {label} | {config} | {w['median']:.0f} [{w['ci_lo']:.0f}-"
                f"{w['ci_hi']:.0f}] ({w['p25']:.0f}-{w['p75']:.0f})"
                f"{f', {ms:.1f}/token' if request == 'decode' else ''} | "
                f"{e['server_ms']['median']:.0f} | {fmt_bytes(e['bytes_up'])} / "
                f"{fmt_bytes(e['bytes_down'])} | {fmt_bytes(e.get('bytes_between', 0))} | "
                f"{e['round_trips']:g} | "
                f"{full_ms / w['median']:.2f}x |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/verify_payload.py",
                          *(sys.argv[1:] if argv is None else argv)])
    cache = llama_build.default_cache_dir()
    bin_dir, build_name = llama_binaries(args.bin_dir, cache)
    models = ensure_models(cache / "models", llama_build.fetch_source(cache) / "models")
    machine = machine_info()
    print(f"# verify_payload: {command}", flush=True)
    print(f"machine: {machine['cpus']} CPUs, {machine['cpu_model']}, load average "
          f"{machine['loadavg_start'][0]:.2f}", flush=True)
    print(f"llama.cpp: {binary_version(bin_dir / 'llama-server')}, build {build_name}", flush=True)

    requests = [f"verify {k}" for k in args.k] + ["decode"]
    configs = tuple(args.configs)
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="tightwad-bench-") as log_dir, \
            ProcessGroup(bin_dir=bin_dir, log_dir=Path(log_dir), threads=args.threads) as group:
        pools: dict[str, Pool] = {}
        try:
            for config in configs:
                peer = config.endswith("-peer")
                workers = [group.rpc_worker(name=f"{config}-worker{i}", peer=peer)
                           for i in range(args.workers)]
                relays = RelayThread([*(w.endpoint for w in workers),
                                      *(w.peer for w in workers if peer)],
                                     args.profile, seed=0).start()
                rpc = relays.endpoints[:args.workers]
                extra = ((["--output-top-n", str(args.top_n)] if "top-n" in config else [])
                         + (OUTPUT_ON_COORDINATOR if "out-coord" in config else []))
                server = group.llama_server(
                    models.target, name=config, rpc=rpc, slots=1, timeout=600,
                    args=["--verify-max-tokens", str(VERIFY_MAX_TOKENS), *extra],
                    peers=dict(zip(rpc, relays.endpoints[args.workers:])))
                pools[config] = Pool(server, relays, args.workers)
            server0 = pools[configs[0]].server
            n_vocab = server0.get("/v1/models")["data"][0]["meta"]["n_vocab"]
            print(f"model: {models.target.name}, {n_vocab}-token vocabulary; link "
                  f"{pools[configs[0]].relays.profile.describe()}; top-n pools: --output-top-n "
                  f"{args.top_n}", flush=True)
            for idx, text in enumerate(PROMPTS[:args.prompts]):
                context = server0.post("/tokenize", {"content": text,
                                                     "add_special": True})["tokens"]
                greedy = server0.post("/completion", {
                    "prompt": context, "n_predict": max(args.k), "temperature": 0,
                    "ignore_eos": True, "return_tokens": True, "cache_prompt": False})["tokens"]
                for rep in range(args.reps):
                    shift = rep % len(configs)
                    order = configs[shift:] + configs[:shift]
                    for request in requests:
                        for config in order:
                            if request == "decode":
                                body = {"prompt": context, "n_predict": DECODE_TOKENS,
                                        "ignore_eos": True}
                            else:
                                k = int(request.split()[1])
                                body = {"prompt": context + greedy[:k], "n_predict": 1,
                                        "n_probs": 1, "prompt_logprobs": k}
                            post(pools[config], body)  # untimed: the graph for this shape
                            res, wall_ms, moved, between = post(pools[config], body)
                            t = res["timings"]
                            if request == "decode":
                                check(len(res["tokens"]) == DECODE_TOKENS, f"{config}: {t}")
                            else:
                                check(t["prompt_n"] == k + 1, f"{config} {request}: {t}")
                            samples.append(Sample(config, request, idx, rep, wall_ms,
                                                  t["prompt_ms"] + t["predicted_ms"],
                                                  moved.bytes_up, moved.bytes_down,
                                                  moved.round_trips, between.bytes_up))
                print(f"prompt {idx + 1}/{args.prompts} done", flush=True)
        finally:
            group.close()  # before the relays go: a coordinator that loses a worker aborts
            for pool in pools.values():
                pool.relays.close()
    machine["loadavg_end"] = os.getloadavg()
    summary = summarize(samples, requests, configs)
    print()
    print(f"{args.prompts} prompts x {args.reps} repetitions per cell; load average "
          f"{machine['loadavg_start'][0]:.1f} -> {machine['loadavg_end'][0]:.1f}; decode rows: "
          f"wall ms per {DECODE_TOKENS}-token request and per token, bytes per token.")
    print()
    print(table(summary, requests, args.profile, configs))
    if args.json:
        write_result(args.json, json.dumps({
            "command": command, "machine": machine, "build": build_name,
            "top_n": args.top_n, "configs": list(configs), "profile": args.profile, "n_vocab": n_vocab,
            "summary": summary, "samples": [asdict(s) for s in samples]}, indent=1))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
