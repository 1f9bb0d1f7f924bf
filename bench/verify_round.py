#!/usr/bin/env python3
"""What does one verify round cost, against the sequential decoding it replaces?

On a loopback pool - 2 ``ggml-rpc-server`` workers and a coordinator ``llama-server`` with
``--verify-max-tokens 32`` and one slot, holding the test target model - this times, per prompt
and repetition, three requests from the same cached context (docs/verify-api.md, "Measured"):

- ``sequential``: ``n_predict: k`` - k decode steps, what the target alone would do;
- ``verify``: context + k draft tokens with ``prompt_logprobs: k``, ``n_predict: 1`` - one
  speculation round (the draft is the target's own greedy continuation; acceptance does not
  change the cost);
- ``batch``: the same k + 1 tokens evaluated stock (no ``prompt_logprobs``, one output), to
  show what the k extra output rows cost.

Between the coordinator and each worker sits the link emulator (:mod:`tightwad.pool.linkemu`,
``--profile``), which also counts the bytes and round trips of every request. Reports wall
clock and the server's own timings (median and spread over prompts x repetitions), prints a
markdown table and the machine, models and command, and writes everything to ``--json``.

    .venv/bin/python bench/verify_round.py --profile wifi --json verify-wifi.json
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, this file's directory (bench/) is on sys.path.
from benchenv import binary_version, llama_binaries, machine_info, stop_on_sigterm, write_result

from tightwad import build as llama_build
from tightwad.pool.demomodels import TARGET_SPEC
from tightwad.pool.linkemu import PROFILES, LinkProfile, LinkStats, RelayThread, adjust_profile
from tightwad.pool.procs import LlamaServer, ProcessGroup
from tightwad_dev.benchmath import spread
from tightwad_dev.models import ensure_models

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Once upon a time, in a land far away, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "東京の天気は晴れ、気温は",
]
VARIANTS = ("sequential", "verify", "batch")
VERIFY_MAX_TOKENS = 32
TIMING_KEYS = ("prompt_n", "prompt_ms", "cache_n", "predicted_n", "predicted_ms")


@dataclass
class Sample:
    variant: str
    prompt: int
    rep: int
    wall_ms: float
    timings: dict[str, float]
    links: list[dict[str, int]]  # per worker: LinkStats of this request alone

    @property
    def server_ms(self) -> float:
        return self.timings["prompt_ms"] + self.timings["predicted_ms"]

    def link_total(self, key: str) -> int:
        return sum(link[key] for link in self.links)


@dataclass
class Bench:
    server: LlamaServer
    relays: RelayThread | None
    k: int
    n_probs: int
    samples: list[Sample] = field(default_factory=list)

    def _links(self) -> list[LinkStats]:
        return self.relays.stats() if self.relays else []

    def request(self, variant: str, prompt_idx: int, rep: int, body: dict[str, Any],
                record: bool) -> dict:
        before = self._links()
        started = time.perf_counter()
        res = self.server.post("/completion", {
            "temperature": 0, "cache_prompt": True, "id_slot": 0, "return_tokens": True,
            **body}, timeout=300)
        wall_ms = (time.perf_counter() - started) * 1e3
        links = [(after - b).as_dict() for after, b in zip(self._links(), before)]
        if record:
            self.samples.append(Sample(variant, prompt_idx, rep, wall_ms,
                                       {key: res["timings"][key] for key in TIMING_KEYS}, links))
        return res

    def round(self, prompt_idx: int, context: list[int], draft: list[int], rep: int,
              record: bool) -> None:
        k = self.k
        order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]  # rotate, so no variant always goes first
        for variant in order:
            if variant == "sequential":
                res = self.request(variant, prompt_idx, rep, {
                    "prompt": context, "n_predict": k, "ignore_eos": True}, record)
                check(res["timings"]["predicted_n"] == k, f"sequential: {res['timings']}")
            elif variant == "verify":
                res = self.request(variant, prompt_idx, rep, {
                    "prompt": context + draft, "n_predict": 1, "n_probs": self.n_probs,
                    "prompt_logprobs": k}, record)
                check(len(res["prompt_probabilities"]) == k, "verify: wrong number of entries")
                check(res["timings"]["prompt_n"] == k + 1, f"verify: {res['timings']}")
            else:
                # The slot may hold context + draft already (the draft is the greedy
                # continuation); make it hold only context[:-1], as a verify would use it.
                other = (context[-1] + 1) % 1000 + 1
                self.server.post("/completion", {
                    "prompt": context[:-1] + [other], "n_predict": 1, "temperature": 0,
                    "cache_prompt": True, "id_slot": 0}, timeout=300)
                res = self.request(variant, prompt_idx, rep, {
                    "prompt": context + draft, "n_predict": 1}, record)
                check(res["timings"]["prompt_n"] == k + 1, f"batch: {res['timings']}")


def check(ok: bool, message: str) -> None:
    if not ok:
        raise SystemExit(f"unexpected server behaviour: {message}")


# --- statistics and output --------------------------------------------------------------------


def fmt_ms(s: dict[str, float]) -> str:
    return f"{s['median']:.0f} ({s['p25']:.0f}-{s['p75']:.0f})"


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def values_of(samples: Sequence[Sample], key: str) -> str:
    seen = sorted({int(s.timings[key]) for s in samples})
    return "/".join(map(str, seen))


def summarize(samples: list[Sample], has_links: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        mine = [s for s in samples if s.variant == variant]
        entry: dict[str, Any] = {
            "wall_ms": spread([s.wall_ms for s in mine]),
            "server_ms": spread([s.server_ms for s in mine]),
            "prompt_ms": spread([s.timings["prompt_ms"] for s in mine]),
            "predicted_ms": spread([s.timings["predicted_ms"] for s in mine]),
            **{key: values_of(mine, key) for key in ("prompt_n", "cache_n", "predicted_n")},
        }
        if has_links:
            n_links = len(mine[0].links)
            entry["bytes_to_workers"] = statistics.median(s.link_total("bytes_up") for s in mine)
            entry["bytes_from_workers"] = statistics.median(
                s.link_total("bytes_down") for s in mine)
            entry["round_trips"] = statistics.median(s.link_total("round_trips") for s in mine)
            entry["per_link"] = [{key: statistics.median(s.links[i][key] for s in mine)
                                  for key in ("bytes_up", "bytes_down", "round_trips")}
                                 for i in range(n_links)]
        out[variant] = entry
    seq, ver = out["sequential"]["wall_ms"]["median"], out["verify"]["wall_ms"]["median"]
    out["speedup_wall"] = seq / ver
    out["speedup_server"] = (out["sequential"]["server_ms"]["median"]
                             / out["verify"]["server_ms"]["median"])
    return out


def table(summary: dict[str, Any], link: str, k: int, has_links: bool) -> str:
    labels = {"sequential": f"{k} sequential steps (`n_predict: {k}`)",
              "verify": f"one verify, k = {k} (`prompt_logprobs: {k}`)",
              "batch": f"same {k + 1} tokens, stock (1 output)"}
    head = ("| Link | Request | Wall ms | Server ms (prompt + predicted) | "
            "prompt_n / cache_n / predicted_n |")
    rule = "|---|---|---|---|---|"
    if has_links:
        head += " Bytes to / from workers | Round trips |"
        rule += "---|---|"
    rows = [head, rule]
    for variant in VARIANTS:
        e = summary[variant]
        row = (f"| {link} | {labels[variant]} | {fmt_ms(e['wall_ms'])} | "
               f"{fmt_ms(e['server_ms'])} | {e['prompt_n']} / {e['cache_n']} / "
               f"{e['predicted_n']} |")
        if has_links:
            row += (f" {fmt_bytes(e['bytes_to_workers'])} / "
                    f"{fmt_bytes(e['bytes_from_workers'])} | {e['round_trips']:g} |")
        rows.append(row)
    rows.append(f"\nSpeed-up of one verify over {k} sequential steps (medians): "
                f"{summary['speedup_wall']:.1f}x wall clock, "
                f"{summary['speedup_server']:.1f}x server time.")
    return "\n".join(rows)


def link_label(profile: LinkProfile) -> str:
    if profile.name != "custom":
        return profile.name
    bandwidth = ("unlimited" if profile.bandwidth_bps is None
                 else f"{profile.bandwidth_bps / 1e6:g} Mbit/s")
    jitter = f" +-{profile.jitter_s * 1e3:g}" if profile.jitter_s else ""
    return f"{profile.delay_s * 1e3:g}{jitter} ms each way, {bandwidth}"


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="none", choices=list(PROFILES),
                   help="link emulated between the coordinator and each worker")
    p.add_argument("--delay-ms", type=float, help="one-way delay, overrides the profile's")
    p.add_argument("--jitter-ms", type=float, help="overrides the profile's jitter")
    p.add_argument("--bandwidth-mbit", type=float,
                   help="per direction, overrides the profile's (0: unlimited)")
    p.add_argument("--no-relay", action="store_true",
                   help="connect the coordinator to the workers directly (no byte counts)")
    p.add_argument("--k", type=int, default=16, help="draft length per verify (default 16)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per prompt")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per prompt")
    p.add_argument("--prompts", type=int, default=3, help=f"how many of the {len(PROMPTS)} "
                   "built-in prompts to use")
    p.add_argument("--n-probs", type=int, default=1,
                   help="n_probs of the verify (1: what the proxy asks for greedy requests)")
    p.add_argument("--threads", type=int, default=1, help="threads per llama.cpp process")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--bin-dir", type=Path,
                   help="llama.cpp binaries (default: the cached build, built if missing)")
    p.add_argument("--json", type=Path, help="write settings, machine, samples and summary")
    p.add_argument("--keep-logs", action="store_true", help="keep the process logs")
    args = p.parse_args(argv)
    custom = (args.delay_ms, args.jitter_ms, args.bandwidth_mbit) != (None, None, None)
    if args.no_relay and (args.profile != "none" or custom):
        p.error("--no-relay measures plain loopback; it cannot emulate a profile")
    if not 1 <= args.k <= VERIFY_MAX_TOKENS:
        p.error(f"--k must be in 1..{VERIFY_MAX_TOKENS}")
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must be in 1..{len(PROMPTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/verify_round.py",
                          *(sys.argv[1:] if argv is None else argv)])
    cache = llama_build.default_cache_dir()
    bin_dir, build_name = llama_binaries(args.bin_dir, cache)
    models = ensure_models(cache / "models", llama_build.fetch_source(cache) / "models")
    profile = adjust_profile(args.profile, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms,
                             bandwidth_mbit=args.bandwidth_mbit)
    link = "direct loopback, no relay" if args.no_relay else profile.describe()
    machine = machine_info()
    target = models.target
    model_info = {"target": target.name, "target_mb": round(target.stat().st_size / 1e6, 1),
                  "n_layer": TARGET_SPEC.n_layer, "n_embd": TARGET_SPEC.n_embd,
                  "vocab": TARGET_SPEC.vocab}
    version = binary_version(bin_dir / "llama-server")
    print(f"# verify_round: {command}", flush=True)
    print(f"machine: {machine['cpus']} CPUs, {machine['cpu_model']}, {machine['system']}, "
          f"load average {machine['loadavg_start'][0]:.2f}", flush=True)
    print(f"llama.cpp: {version}, build {build_name}", flush=True)
    print(f"link: {link}", flush=True)

    log_root = Path(tempfile.mkdtemp(prefix="tightwad-bench-"))
    relays: RelayThread | None = None
    started = time.monotonic()
    with ProcessGroup(bin_dir=bin_dir, log_dir=log_root, threads=args.threads) as group:
        try:
            workers = [group.rpc_worker(name=f"worker{i}") for i in range(args.workers)]
            if not args.no_relay:
                relays = RelayThread([w.endpoint for w in workers], profile, seed=0).start()
            rpc = relays.endpoints if relays else workers
            server = group.llama_server(
                target, name="coordinator", rpc=rpc, slots=1, timeout=600,
                args=["--verify-max-tokens", str(VERIFY_MAX_TOKENS)])
            meta = server.get("/v1/models")["data"][0].get("meta", {})
            model_info["n_vocab"] = meta.get("n_vocab")
            print(f"model: {target.name} ({model_info['target_mb']} MB, "
                  f"{TARGET_SPEC.n_layer} layers, {TARGET_SPEC.n_embd} wide, "
                  f"{model_info['n_vocab']}-token {TARGET_SPEC.vocab} vocabulary) on "
                  f"{args.workers} workers x {args.threads} thread(s), coordinator -np 1, "
                  f"--verify-max-tokens {VERIFY_MAX_TOKENS}", flush=True)
            bench = Bench(server, relays, args.k, args.n_probs)
            for idx, text in enumerate(PROMPTS[:args.prompts]):
                context = server.post("/tokenize", {"content": text,
                                                    "add_special": True})["tokens"]
                draft = server.post("/completion", {
                    "prompt": context, "n_predict": args.k, "temperature": 0,
                    "ignore_eos": True, "return_tokens": True, "id_slot": 0,
                    "cache_prompt": True})["tokens"]
                check(len(draft) == args.k, "the greedy continuation is too short")
                for rep in range(args.warmup + args.reps):
                    bench.round(idx, context, draft, rep, record=rep >= args.warmup)
                print(f"prompt {idx + 1}/{args.prompts}: {len(context)} context tokens done "
                      f"({time.monotonic() - started:.0f} s)", flush=True)
        finally:
            if relays:
                relays.close()
    machine["loadavg_end"] = os.getloadavg()
    if not args.keep_logs:
        for log in log_root.glob("*.log"):
            log.unlink()
        for sub in sorted(log_root.rglob("*"), reverse=True):
            if sub.is_dir():
                sub.rmdir()
        log_root.rmdir()

    summary = summarize(bench.samples, relays is not None)
    text = table(summary, "direct" if args.no_relay else link_label(profile), args.k,
                 relays is not None)
    print()
    print(f"Median (p25-p75) of {summary['verify']['wall_ms']['n']} samples per row "
          f"({args.prompts} prompts x {args.reps} repetitions); load average "
          f"{machine['loadavg_start'][0]:.1f} -> {machine['loadavg_end'][0]:.1f}.")
    print()
    print(text)
    if relays is not None:
        print("\nPer link (to / from worker, median per request): " + "; ".join(
            f"{v}: " + ", ".join(f"w{i} {fmt_bytes(x['bytes_up'])} / "
                                 f"{fmt_bytes(x['bytes_down'])}, {x['round_trips']:g} RT"
                                 for i, x in enumerate(summary[v]["per_link"]))
            for v in VARIANTS))
    if args.json:
        write_result(args.json, json.dumps({
            "command": command, "machine": machine, "llama_cpp": version, "build": build_name,
            "model": model_info, "link": {"profile": profile.name, "described": link,
                                          "relay": relays is not None,
                                          "delay_s": profile.delay_s,
                                          "jitter_s": profile.jitter_s,
                                          "bandwidth_bps": profile.bandwidth_bps},
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "bin_dir")},
            "seconds": round(time.monotonic() - started, 1),
            "summary": summary, "samples": [vars(s) for s in bench.samples],
        }, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
