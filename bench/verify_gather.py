#!/usr/bin/env python3
"""Does verify gathering put concurrent streams' verifies into ONE coordinator batch, and what
does it buy? (issue 13, point 2; docs/proxy.md, "Verify gathering")

A 2-worker pool (``ggml-rpc-server`` x 2 behind :mod:`tightwad.pool.linkemu` relays, ``--profile``,
default ``wifi``), a coordinator ``llama-server`` (``--metrics``) holding the demo target, a
drafter (the demo draft, behind its own relay), and one Tightwad proxy per gathering window in
``--windows`` (``speculation.gather_ms``; 0 = off), all in remote mode against the same servers.
For each number of streams in ``--streams``, each window runs ``--reps`` times, interleaved
(the order of the windows alternates per repetition): N clients start together, each streams
one greedy request of ``--tokens`` tokens through the proxy (``ignore_eos``).

Reported per (streams, window), medians with quartiles and extremes over the repetitions:

- aggregate tok/s (every stream's tokens / the wall time until the last one ended);
- from the COORDINATOR's own counters (``llamacpp:n_decode_total``,
  ``llamacpp:n_busy_slots_per_decode`` x n_decode, before and after): ``llama_decode`` calls per
  speculation round (rounds from the proxy's ``/tightwad/status``) and busy slots per decode;
- the drafter's busy slots per decode (whether drafts batch too);
- the gate's own record: verifies per group and mean/max wait.

    .venv/bin/python bench/verify_gather.py --profile wifi --streams 1,4,8 --windows 0,100 \\
        --reps 5 --json verify-gather-wifi.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, this file's directory (bench/) is on sys.path.
from benchenv import binary_version, llama_binaries, machine_info, stop_on_sigterm, write_result
from poolbench.settings import PROMPTS as SHARED_PROMPTS  # bench/ is on sys.path

from tightwad import build as llama_build
from tightwad.pool.demomodels import ensure_demo_pair
from tightwad.pool.linkemu import PROFILES, RelayThread
from tightwad.pool.procs import HttpService, LlamaServer, ProcessGroup
from tightwad_dev.benchmath import spread
from tightwad_dev.clients import StreamResult, stream

PROMPTS = SHARED_PROMPTS[:8]
VERIFY_MAX_TOKENS = 32


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="wifi", choices=list(PROFILES),
                   help="link emulated to every worker and to the drafter (default wifi)")
    p.add_argument("--streams", default="1,4,8", help="concurrent streams")
    p.add_argument("--windows", default="0,100", help="speculation.gather_ms values; 0 = off")
    p.add_argument("--reps", type=int, default=5, help="repetitions per (streams, window)")
    p.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--k", default="8", help="draft length (fixed), or 'adaptive'")
    p.add_argument("--slots", type=int, default=8, help="coordinator/drafter slots (-np)")
    p.add_argument("--threads", type=int, default=1, help="threads per llama.cpp process")
    p.add_argument("--bin-dir", type=Path, help="llama.cpp binaries (default: the cached build)")
    p.add_argument("--cache", type=Path, default=llama_build.default_cache_dir())
    p.add_argument("--json", type=Path, help="write every sample and the summary here")
    args = p.parse_args(argv)
    args.stream_counts = [int(s) for s in args.streams.split(",") if s]
    args.window_list = [float(w) for w in args.windows.split(",") if w]
    if max(args.stream_counts) > args.slots:
        p.error("--streams must not exceed --slots (queued streams measure the queue)")
    return args


# -- counters -----------------------------------------------------------------------------------


def prometheus(server: HttpService) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@dataclass(frozen=True)
class Decodes:
    """A llama-server's cumulative decode counters."""

    calls: float
    busy: float  # sum over decode calls of the busy slots

    @staticmethod
    def read(server: HttpService) -> Decodes:
        m = prometheus(server)
        calls = m["llamacpp:n_decode_total"]
        return Decodes(calls, m["llamacpp:n_busy_slots_per_decode"] * calls)

    def __sub__(self, other: Decodes) -> Decodes:
        return Decodes(self.calls - other.calls, self.busy - other.busy)


def proxy_counts(proxy: HttpService) -> tuple[int, int, int]:
    """(rounds, verifies through the gate, groups) since the proxy started."""
    status = proxy.get("/tightwad/status")
    gather = status["target"].get("verify_gather") or {}
    return (int(status["stats"]["rounds"]), int(gather.get("verifies", 0)),
            int(gather.get("groups", 0)))


# -- one measurement ----------------------------------------------------------------------------


def run_streams(proxy: HttpService, n: int, tokens: int, offset: int) -> tuple[float, int]:
    """n clients at once; (wall seconds until the last ended, tokens generated)."""
    results: list[StreamResult | None] = [None] * n
    start = threading.Barrier(n)

    def client(i: int) -> None:
        body = {"prompt": PROMPTS[(offset + i) % len(PROMPTS)], "temperature": 0,
                "max_tokens": tokens, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        start.wait()
        results[i] = stream(proxy.url, "/v1/completions", body, timeout=300)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = 0
    for r in results:
        assert r is not None and r.done and not r.errors, (r.events[-3:] if r else None)
        usage = next(e["usage"] for e in r.events if isinstance(e, dict) and e.get("usage"))
        total += int(usage["completion_tokens"])
    return wall, total


def measure(proxy: HttpService, coordinator: LlamaServer, drafter: LlamaServer, n: int,
            tokens: int, offset: int) -> dict[str, Any]:
    c0, d0, p0 = Decodes.read(coordinator), Decodes.read(drafter), proxy_counts(proxy)
    wall, total = run_streams(proxy, n, tokens, offset)
    c, d = Decodes.read(coordinator) - c0, Decodes.read(drafter) - d0
    p1 = proxy_counts(proxy)
    rounds, verifies, groups = (a - b for a, b in zip(p1, p0))
    return {
        "tok_s": total / wall, "wall_s": wall, "tokens": total, "rounds": rounds,
        "coordinator_decodes": c.calls, "decodes_per_round": c.calls / rounds if rounds else None,
        "busy_slots_per_decode": c.busy / c.calls if c.calls else None,
        "drafter_busy_slots_per_decode": d.busy / d.calls if d.calls else None,
        "verifies_per_group": verifies / groups if groups else None,
    }


# -- the run ------------------------------------------------------------------------------------


def start_proxy(group: ProcessGroup, coordinator: LlamaServer, drafter_url: str,
                window: float, args: argparse.Namespace) -> HttpService:
    if args.k == "adaptive":
        spec = {"ADAPTIVE": "true"}
    else:
        spec = {"K_MIN": args.k, "K_MAX": args.k, "K_INITIAL": args.k, "ADAPTIVE": "false"}
    env = {"TIGHTWAD_DRAFTER__URL": drafter_url, "TIGHTWAD_DRAFTER__TIMEOUT_S": "30",
           "TIGHTWAD_SPECULATION__GATHER_MS": str(window),
           **{f"TIGHTWAD_SPECULATION__{key}": value for key, value in spec.items()}}
    proxy = group.tightwad_proxy(target=coordinator, mode="remote", slots=args.slots,
                                 name=f"proxy-w{window:g}", env=env, timeout=120)
    deadline = time.monotonic() + 60
    while not proxy.get("/tightwad/status").get("speculation_active"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"proxy-w{window:g} does not speculate")
        time.sleep(0.2)
    return proxy


def summarize(samples: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.stream_counts:
        for w in args.window_list:
            mine = [s for s in samples if s["streams"] == n and s["window_ms"] == w]
            row: dict[str, Any] = {"streams": n, "window_ms": w}
            for key in ("tok_s", "decodes_per_round", "busy_slots_per_decode",
                        "drafter_busy_slots_per_decode", "verifies_per_group"):
                values = [s[key] for s in mine if s[key] is not None]
                row[key] = spread(values) if values else None
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def cell(stat: dict[str, float] | None, digits: int = 2) -> str:
        if stat is None:
            return "-"
        return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"

    off = {r["streams"]: r for r in rows if r["window_ms"] == 0}
    lines = ["| streams | gather_ms | tok/s median (min-max) | vs off | decodes/round | "
             "busy slots/decode | drafter busy/decode | verifies/group |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = off.get(r["streams"])
        ratio = (f"{r['tok_s']['median'] / base['tok_s']['median']:.2f}x"
                 if base is not None and r["tok_s"] and base["tok_s"] else "-")
        lines.append(f"| {r['streams']} | {r['window_ms']:g} | {cell(r['tok_s'], 1)} | {ratio} | "
                     f"{cell(r['decodes_per_round'])} | {cell(r['busy_slots_per_decode'])} | "
                     f"{cell(r['drafter_busy_slots_per_decode'])} | "
                     f"{cell(r['verifies_per_group'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bin_dir, build_name = llama_binaries(args.bin_dir, args.cache)
    models = ensure_demo_pair(args.cache / "models", llama_build.fetch_source(args.cache) / "models")
    log_dir = Path(tempfile.mkdtemp(prefix="tightwad-verify-gather-"))
    samples: list[dict[str, Any]] = []
    machine = machine_info()
    with ProcessGroup(bin_dir=bin_dir, log_dir=log_dir, threads=args.threads) as group:
        workers = [group.rpc_worker(name=f"worker{i}", cache=True) for i in range(2)]
        drafter = group.llama_server(models.draft, name="drafter", slots=args.slots,
                                     ctx=1024 * args.slots, args=["--metrics"])
        with RelayThread([*(w.endpoint for w in workers), f"{drafter.host}:{drafter.port}"],
                         args.profile, seed=0) as relays:
            coordinator = group.llama_server(
                models.target, name="coordinator", rpc=relays.endpoints[:2], slots=args.slots,
                ctx=1024 * args.slots, timeout=600,
                args=["--verify-max-tokens", str(VERIFY_MAX_TOKENS), "--metrics"])
            drafter_url = f"http://{relays.endpoints[2]}"
            proxies = {w: start_proxy(group, coordinator, drafter_url, w, args)
                       for w in args.window_list}
            log(f"warm-up; logs in {log_dir}")
            for proxy in proxies.values():
                run_streams(proxy, 2, 16, 0)
            for rep in range(args.reps):
                for n in args.stream_counts:
                    order = args.window_list if rep % 2 == 0 else args.window_list[::-1]
                    for w in order:
                        s = measure(proxies[w], coordinator, drafter, n, args.tokens, rep)
                        s.update(streams=n, window_ms=w, rep=rep)
                        samples.append(s)
                        log(f"rep {rep} streams {n} gather_ms {w:g}: {s['tok_s']:.1f} tok/s, "
                            f"{s['decodes_per_round'] or 0:.2f} decodes/round, "
                            f"{s['busy_slots_per_decode'] or 0:.2f} busy slots/decode")
            status = {w: p.get("/tightwad/status")["target"]["verify_gather"]
                      for w, p in proxies.items()}
            group.close()  # before the relays go: a coordinator that loses a worker aborts
    machine["loadavg_end"] = os.getloadavg()
    rows = summarize(samples, args)
    table = markdown(rows, args)
    command = "bench/verify_gather.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print()
    print(table)
    print(f"\nprofile {args.profile}, k {args.k}, {args.tokens} tokens per stream, "
          f"{args.reps} reps; llama.cpp {binary_version(bin_dir / 'llama-server')} "
          f"({build_name}); machine {machine['cpu_model']} x {machine['cpus']}, "
          f"load {machine['loadavg_start']} -> {machine['loadavg_end']}")
    print(f"command: .venv/bin/python {command}")
    if args.json:
        write_result(args.json, json.dumps({
            "command": command, "machine": machine, "summary": rows, "samples": samples,
            "gate_status": status, "table": table,
            "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list))},
        }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
