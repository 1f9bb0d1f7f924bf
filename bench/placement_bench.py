#!/usr/bin/env python3
"""Speed-aware vs memory-proportional placement on a heterogeneous loopback pool.

Three ``ggml-rpc-server`` workers on this machine (one thread each):

- ``fast``: as is;
- ``slow``: throttled to ``--quota`` (default a quarter) of one CPU by a cgroup of its own
  (cgroup v2 ``cpu.max``, else the v1 ``cpu`` controller's ``cpu.cfs_quota_us``; a short period,
  so a token's few milliseconds of work are slowed evenly rather than stalled in bursts);
- ``far``: as fast as ``fast``, behind the link emulator (``tightwad_dev.linkemu``) on the
  ``--link`` profile (default ``bad-wifi``: 7.5 ms one way, 3 ms jitter, 50 Mbit/s).

``tightwad.pool.probe`` measures each worker from the coordinator's side (a layer of the model
through its own worker, the link's round trip and bandwidth), and ``tightwad.pool.placement``
places the bench target with it (speed) and proportionally to free memory (memory). The plain
pool (b: a coordinator llama-server over the workers with the deployed coordinator's flags,
greedy ``/completion``, no speculation) and remote speculation (d: the Tightwad proxy in remote
mode in front of that coordinator, a drafter llama-server of the bench draft on this machine,
greedy ``/v1/completions``, timed by the wall clock) are then timed under both splits,
interleaved (each repetition starts a fresh coordinator, and a fresh proxy on it, for each
split, alternating which goes first); medians with their spread, the speed/memory ratios, and
the predicted vs measured ms/token of each split (b). ``--uniform`` also runs the same with no
throttle and no emulated link, each worker taken to hold only :data:`UNIFORM_SHARE` of the
model (the product's case: a model that fits on none of the devices, only across all of them),
where the speed-aware rule should cost nothing.

    python bench/placement_bench.py --repeats 3 --tokens 48 [--configs b,d] [--uniform] \
        [--json out.json]

Needs root for the cgroup (without it the run stops and says so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Run as a script, this file's directory (bench/) is on sys.path.
from benchenv import stop_on_sigterm, write_result

from tightwad import build as llama_build
from tightwad import defaults
from tightwad.pool import placement, probe
from tightwad.pool.linkemu import RelayThread, get_profile
from tightwad.pool.procs import HttpService, LlamaServer, ProcessGroup, RpcWorker
from tightwad_dev.benchmath import spread
from tightwad_dev.benchmodels import ensure_bench_models

CTX = 1024
PERIOD_US = 10_000
PROMPT = "Once upon a time, in a drawer full of old computers,"
UNIFORM_SHARE = 0.4
"""In the uniform profile each worker's memory holds this share of the model (weights and KV
cache): every split must use all three workers. (Without a bound the three share this machine's
RAM, and the speed-aware rule rightly puts the whole model on one, saving two stages.)"""


def memory_for(shape: placement.ModelShape, share: float) -> int:
    """Free bytes of a device that can hold ``share`` of the model after placement's headroom."""
    need = share * (shape.n_layer * (shape.layer_bytes + shape.kv_layer_bytes)
                    + shape.output_bytes)
    free = math.ceil(max(need + placement.HEADROOM_MIN, need / (1 - placement.HEADROOM_FRACTION)))
    assert placement.usable(free) >= need
    return free


class Throttle:
    """A cgroup that caps its processes at ``quota`` of one CPU; removed on close."""

    def __init__(self, name: str, quota: float) -> None:
        self.path: Path | None = None
        self.parent_procs: Path | None = None
        limit = max(1000, int(PERIOD_US * quota))
        v2_root = Path("/sys/fs/cgroup")
        own = next((line.split("::", 1)[1] for line in
                    Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")),
                   None)
        candidates: list[tuple[Path, dict[str, str]]] = []
        if (v2_root / "cgroup.controllers").is_file() and own is not None:
            parent = v2_root / own.strip("/")
            candidates.append((parent / name, {"cpu.max": f"{limit} {PERIOD_US}"}))
        v1 = v2_root / "cpu"
        if (v1 / "cpu.cfs_quota_us").is_file():
            candidates.append((v1 / name, {"cpu.cfs_period_us": str(PERIOD_US),
                                           "cpu.cfs_quota_us": str(limit)}))
        errors = []
        for path, settings in candidates:
            try:
                path.mkdir(exist_ok=True)
                for key, value in settings.items():
                    (path / key).write_text(value)
                self.path, self.parent_procs = path, path.parent / "cgroup.procs"
                self.how = f"{path.parent}: " + ", ".join(f"{k}={v}" for k, v in settings.items())
                return
            except OSError as exc:
                errors.append(f"{path}: {exc}")
                with contextlib.suppress(OSError):
                    path.rmdir()
        raise SystemExit("placement_bench: cannot make a CPU-limited cgroup (run as root on a "
                         "machine with the cpu controller): " + "; ".join(errors or ["none"]))

    def add(self, pid: int) -> None:
        assert self.path is not None
        (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                assert self.parent_procs is not None
                self.parent_procs.write_text(pid)
        for _ in range(50):
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        self.path = None


def log(message: str) -> None:
    print(f"[placement-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ms_per_token(server: LlamaServer, tokens: int) -> float:
    body = {"prompt": PROMPT, "n_predict": tokens, "temperature": 0, "ignore_eos": True,
            "cache_prompt": False}
    timings = server.post("/completion", body, timeout=600)["timings"]
    return float(timings["predicted_ms"]) / max(1, int(timings["predicted_n"]))


def spec_ms_per_token(proxy: HttpService, tokens: int) -> float:
    """Wall-clock ms per generated token of one greedy completion through the proxy."""
    body = {"model": "tightwad", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True}
    started = time.perf_counter()
    reply = proxy.post("/v1/completions", body, timeout=600)
    elapsed = time.perf_counter() - started
    return elapsed * 1000 / max(1, int(reply["usage"]["completion_tokens"]))


def start_proxy(group: ProcessGroup, coordinator: LlamaServer, drafter: LlamaServer,
                name: str) -> HttpService:
    """The proxy in remote mode (product defaults otherwise), once it speculates."""
    proxy = group.tightwad_proxy(target=coordinator, drafter=drafter, mode="remote", slots=1,
                                 name=name, timeout=120,
                                 env={"TIGHTWAD_DRAFTER__TIMEOUT_S": "30"})
    deadline = time.monotonic() + 60
    while not proxy.get("/tightwad/status").get("speculation_active"):
        if time.monotonic() > deadline:
            proxy.stop()
            raise SystemExit(f"placement_bench: the proxy does not speculate ({name})")
        time.sleep(0.2)
    return proxy


def time_split(group: ProcessGroup, model: Path, rpcs: Sequence[str], p: placement.Placement,
               tokens: int, requests: int, drafter: LlamaServer | None) -> dict[str, Any]:
    """ms/token of ``requests`` greedy completions on a fresh coordinator with ``p``'s split
    (b), then with a ``drafter``, as many through a fresh proxy on it (d) and its counters."""
    order = [rpcs[i] for i in p.order]
    server = group.llama_server(model, name=f"coordinator-{p.mode}", rpc=order, ctx=CTX,
                                slots=1, timeout=600,
                                args=["--verify-max-tokens", str(defaults.VERIFY_MAX_TOKENS),
                                      *defaults.COORDINATOR_ARGS, "--tensor-split",
                                      p.tensor_split])
    try:
        ms_per_token(server, 8)  # warm-up: graph allocation, first transfers
        out: dict[str, Any] = {"b": [ms_per_token(server, tokens) for _ in range(requests)]}
        if drafter is not None:
            proxy = start_proxy(group, server, drafter, f"proxy-{p.mode}")
            try:
                spec_ms_per_token(proxy, 8)  # warm-up
                out["d"] = [spec_ms_per_token(proxy, tokens) for _ in range(requests)]
                stats = proxy.get("/tightwad/status").get("stats") or {}
                out["d_counts"] = {k: int(stats.get(k) or 0)
                                   for k in ("rounds", "drafted", "accepted")}
            finally:
                proxy.stop()
        return out
    finally:
        server.stop()


@contextlib.contextmanager
def workers(group: ProcessGroup, hetero: bool, quota: float,
            link: str) -> Iterator[tuple[list[str], list[str], str]]:
    """Three workers; with ``hetero``, the second throttled and the third behind the link."""
    started: list[RpcWorker] = [group.rpc_worker(name=n, cache=True)
                                for n in ("fast", "slow", "far")]
    throttle = Throttle(f"tightwad-bench-slow-{os.getpid()}", quota) if hetero else None
    relays = RelayThread([started[2].endpoint], get_profile(link)) if hetero else None
    try:
        how = "uniform: no throttle, no emulated link"
        if throttle is not None and relays is not None:
            throttle.add(started[1].pid)
            relays.__enter__()
            how = (f"slow: {quota:g} of a CPU ({throttle.how}); far: linkemu "
                   f"{get_profile(link).describe()}")
        rpcs = [w.endpoint for w in started[:2]] + (
            relays.endpoints if relays is not None else [started[2].endpoint])
        yield rpcs, ["fast", "slow", "far"], how
    finally:
        if relays is not None:
            relays.__exit__(None, None, None)
        for w in started:
            w.stop()
        if throttle is not None:
            throttle.close()


def run_profile(args: argparse.Namespace, bin_dir: Path, model: Path, draft: Path,
                hetero: bool, log_dir: Path) -> dict[str, Any]:
    name = "heterogeneous" if hetero else "uniform"
    with ProcessGroup(bin_dir, log_dir / name, threads=1) as group, \
            workers(group, hetero, args.quota, args.link) as (rpcs, names, how):
        log(f"{name}: {how}; probing {', '.join(rpcs)}")
        started = time.monotonic()
        found = probe.measure(model, rpcs, bin_dir, repeats=args.probe_repeats,
                              work_dir=log_dir)
        probe_s = time.monotonic() - started
        for m in found:
            if m.skipped:
                raise SystemExit(f"placement_bench: {m.rpc} was not measured: {m.skipped}")
        shape = probe.model_shape(model, CTX)
        free = None if hetero else memory_for(shape, UNIFORM_SHARE)
        devices = [m.device(n, free) for m, n in zip(found, names)]
        if free is not None:
            how += f"; each worker holds {UNIFORM_SHARE:.0%} of the model"
        splits = {"memory": placement.place(shape, devices, mode="memory"),
                  "speed": placement.place(shape, devices)}
        for key, p in splits.items():
            log(f"{name} {key}: --tensor-split {p.tensor_split} order {list(p.order)}: "
                f"{p.describe()}")
        configs = args.configs
        drafter = (group.llama_server(draft, name="drafter", ctx=CTX, slots=1, timeout=300)
                   if "d" in configs else None)
        samples: dict[str, dict[str, list[float]]] = {
            c: {"memory": [], "speed": []} for c in configs}
        counts: dict[str, dict[str, int]] = {"memory": {}, "speed": {}}
        for rep in range(args.repeats):
            for key in (("memory", "speed") if rep % 2 == 0 else ("speed", "memory")):
                got = time_split(group, model, rpcs, splits[key], args.tokens, args.requests,
                                 drafter)
                for c in configs:
                    log(f"{name} rep {rep} {key} ({c}): "
                        f"{', '.join(f'{v:.2f}' for v in got[c])} ms/token")
                    samples[c][key] += got[c]
                for k, v in got.get("d_counts", {}).items():
                    counts[key][k] = counts[key].get(k, 0) + v
    out: dict[str, Any] = {"profile": name, "setup": how, "probe_s": round(probe_s, 1),
                           "measurements": [m.as_dict() for m in found]}
    for key, p in splits.items():
        out[key] = {"tensor_split": p.tensor_split, "order": [names[i] for i in p.order],
                    "layers": dict(zip(names, p.chosen.layers)),
                    "output": names[p.chosen.output],
                    "predicted_ms_token": p.chosen.ms_token,
                    "predicted_ms_verify": p.chosen.ms_verify}
        for c in configs:
            ms = samples[c][key]
            # (b) keeps its keys at the top level (older result files read the same).
            entry = out[key] if c == "b" else out[key].setdefault(c, {})
            entry.update({"ms_token": spread(ms), "tok_s": spread([1000 / v for v in ms])})
        if "b" in configs:
            pred, med = p.chosen.ms_token, out[key]["ms_token"]["median"]
            out[key]["predicted_error"] = round(pred / med - 1, 3) if pred else None
        if "d" in configs:
            out[key]["d"]["counts"] = counts[key]
    for c in configs:
        def tok(key: str, c: str = c) -> float:
            return float((out[key] if c == "b" else out[key][c])["tok_s"]["median"])
        out["speedup" if c == "b" else f"speedup_{c}"] = round(tok("speed") / tok("memory"), 3)
    out["configs"] = list(configs)
    return out


def report(result: dict[str, Any]) -> None:
    for prof in result["profiles"]:
        print(f"\n## {prof['profile']} ({prof['setup']})")
        print(f"probe: {prof['probe_s']} s")
        for m in prof["measurements"]:
            print(f"  {m['rpc']}: layer {m['layer_ms']} ms (batch of 9: {m['verify_layer_ms']} "
                  f"ms), base {m['base_ms']} ms, hop {m.get('hop_ms')} ms, "
                  f"RTT {m['rtt_ms']} ms, "
                  f"{(m['bandwidth_bps'] or 0) / 1e6:.0f} MB/s")
        configs = prof.get("configs", ["b"])
        for key in ("memory", "speed"):
            r = prof[key]
            print(f"  {key:6}: split {r['tensor_split']} ({r['layers']}, output on "
                  f"{r['output']})")
            if "b" in configs:
                tok = r["tok_s"]
                print(f"    (b) {tok['median']:.1f} tok/s [{tok['min']:.1f}-{tok['max']:.1f}, "
                      f"n={tok['n']}], measured {r['ms_token']['median']:.2f} ms/token, "
                      f"predicted {r['predicted_ms_token']} ms/token (error "
                      f"{r['predicted_error']:+.0%})")
            if "d" in configs:
                tok, n = r["d"]["tok_s"], r["d"]["counts"]
                rate = n.get("accepted", 0) / max(1, n.get("drafted", 0))
                print(f"    (d) {tok['median']:.1f} tok/s [{tok['min']:.1f}-{tok['max']:.1f}, "
                      f"n={tok['n']}], {r['d']['ms_token']['median']:.2f} ms/token (wall), "
                      f"{n.get('accepted', 0)}/{n.get('drafted', 0)} drafted tokens accepted "
                      f"({rate:.0%})")
        for c in configs:
            ratio = prof["speedup" if c == "b" else f"speedup_{c}"]
            print(f"  ({c}) speed-aware / memory-proportional tok/s: {ratio:.2f}x")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="coordinator starts per split")
    p.add_argument("--requests", type=int, default=2, help="completions per start")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--probe-repeats", type=int, default=3)
    p.add_argument("--quota", type=float, default=0.25, help="the slow worker's CPU share")
    p.add_argument("--link", default="bad-wifi", help="the far worker's link profile")
    p.add_argument("--uniform", action="store_true", help="also the uniform pool")
    p.add_argument("--configs", default="b,d", help="b (plain pool) and/or d (remote "
                   "speculation through the proxy)")
    p.add_argument("--bin-dir", type=Path)
    p.add_argument("--json", type=Path, help="write the result here too")
    args = p.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    if not args.configs or set(args.configs) - {"b", "d"}:
        p.error("--configs: b, d or b,d")
    bin_dir = args.bin_dir or llama_build.ensure_build("cpu").bin_dir
    pair = ensure_bench_models(llama_build.default_cache_dir() / "models")
    model = pair.target
    result: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                              "model": model.name, "draft": pair.draft.name,
                              "tokens": args.tokens, "profiles": []}
    with tempfile.TemporaryDirectory(prefix="placement-bench-") as tmp:
        for hetero in ([True, False] if args.uniform else [True]):
            result["profiles"].append(run_profile(args, bin_dir, model, pair.draft, hetero,
                                                  Path(tmp)))
    report(result)
    if args.json:
        write_result(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
