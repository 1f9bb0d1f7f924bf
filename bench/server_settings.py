#!/usr/bin/env python3
"""Which llama-server settings suit a pool? Remote drafting through the proxy, per setting.

llama-server's host-RAM prompt cache (``--cache-ram``, default 8192 MiB) saves idle slots on
every new task (``--cache-idle-slots``, default on) and a slot's old conversation when another
conversation takes the slot (``--slot-prompt-similarity``); over RPC a save reads the slot's KV
cache back from the workers with blocking round trips inside the server's main loop, and through
the proxy every speculation round is a new task. This measures, for each setting below, applied
to the coordinator and the drafter alike:

- a loopback pool of 2 ``ggml-rpc-server`` workers behind link emulator relays
  (:mod:`tightwad.pool.linkemu`, ``--profile``, default ``wifi``), the demo models
  (:mod:`tightwad.pool.demomodels`), a coordinator with 4 slots and ``--verify-max-tokens 32``,
  a drafter with 4 slots and the proxy in remote mode;
- 1 stream, then ``--streams`` concurrent streams, of ``--tokens`` greedy tokens each
  (``ignore_eos``), through the proxy's ``/v1/completions``;
- aggregate tokens per second, and the relays' bytes and round trips per generated token.

Settings are interleaved (each repetition starts the servers afresh, in a rotated order) and
repeated; the table shows medians with [min, max]. Outputs must be identical across settings:
these are cache policies, the computation is the same.

    .venv/bin/python bench/server_settings.py --repeats 3 --json settings-wifi.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

# Run as a script, this file's directory (bench/) is on sys.path.
from benchenv import binary_version, llama_binaries, machine_info, stop_on_sigterm, write_result

from tightwad import build as llama_build
from tightwad import defaults
from tightwad.pool.demomodels import DemoPair, ensure_demo_pair
from tightwad.pool.linkemu import PROFILES, LinkStats, RelayThread
from tightwad.pool.procs import HttpService, ProcessGroup, RpcWorker
from tightwad_dev.benchmath import spread

SETTINGS: dict[str, tuple[str, ...]] = {
    "llama.cpp defaults": (),
    "--no-cache-idle-slots": ("--no-cache-idle-slots",),
    "--no-cache-idle-slots -sps 0": ("--no-cache-idle-slots", "--slot-prompt-similarity", "0"),
    "--cache-ram 0 --no-cache-idle-slots": ("--cache-ram", "0", "--no-cache-idle-slots"),
}
assert defaults.LLAMA_SERVER_ARGS in SETTINGS.values(), "measure what the pool runs with"
PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Once upon a time, in a land far away, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Tightwad pools the junk drawer of compute: old laptops, a gaming PC and",
    "The weather in Tokyo today is sunny, and the temperature is",
    "Dear diary, today I finally understood why the network",
    "SELECT name, count(*) FROM users WHERE",
    "In 1969, the first humans landed on the moon, and",
]
SLOTS = 4
VERIFY_MAX_TOKENS = 32


@dataclass
class Sample:
    setting: str
    repeat: int
    streams: int
    tokens: int
    seconds: float
    link: dict[str, int]
    texts: list[str]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    def per_token(self, key: str) -> float:
        return self.link[key] / self.tokens


def _complete(proxy: HttpService, prompt: str, tokens: int) -> tuple[int, str]:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    answer = proxy.post("/v1/completions", body, timeout=600)
    return int(answer["usage"]["completion_tokens"]), answer["choices"][0]["text"]


def _link(relays: RelayThread) -> LinkStats:
    return sum(relays.stats(), LinkStats())


def measure(proxy: HttpService, relays: RelayThread, setting: str, repeat: int, streams: int,
            tokens: int) -> Sample:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
    before, started = _link(relays), time.monotonic()
    with ThreadPoolExecutor(streams) as pool:
        answers = list(pool.map(lambda p: _complete(proxy, p, tokens), prompts))
    seconds = time.monotonic() - started
    link = _link(relays) - before
    return Sample(setting, repeat, streams, sum(n for n, _ in answers), seconds,
                  {"bytes": link.bytes_up + link.bytes_down, "round_trips": link.round_trips},
                  [text for _, text in answers])


def start_servers(group: ProcessGroup, models: DemoPair, relays: RelayThread, flags: Sequence[str],
                  tag: str) -> list[HttpService]:
    """Coordinator, drafter and proxy with ``flags``; the proxy speculating."""
    coordinator = group.llama_server(
        models.target, name=f"coordinator-{tag}", rpc=relays.endpoints, slots=SLOTS,
        ctx=defaults.LOCAL_CTX_SIZE, timeout=600, pool_args=flags,
        args=["--verify-max-tokens", str(VERIFY_MAX_TOKENS)])
    drafter = group.llama_server(models.draft, name=f"drafter-{tag}", slots=SLOTS,
                                 ctx=defaults.LOCAL_CTX_SIZE, pool_args=flags)
    proxy = group.tightwad_proxy(target=coordinator, drafter=drafter, slots=SLOTS,
                                 name=f"proxy-{tag}", timeout=120)
    deadline = time.monotonic() + 60
    while not proxy.get("/tightwad/status").get("speculation_active"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the proxy does not speculate; logs in {group.log_dir}")
        time.sleep(0.2)
    _complete(proxy, "warm up", 8)
    return [proxy, drafter, coordinator]


def run(args: argparse.Namespace, bin_dir: Path) -> list[Sample]:
    cache = args.cache or llama_build.default_cache_dir()
    models = ensure_demo_pair(cache / "models", llama_build.fetch_source(cache) / "models")
    names = list(args.settings)
    samples: list[Sample] = []
    log_dir = Path(tempfile.mkdtemp(prefix="tightwad-server-settings-"))
    with ProcessGroup(bin_dir=bin_dir, log_dir=log_dir, threads=args.threads) as group:
        workers: list[RpcWorker] = [group.rpc_worker(name=f"worker{i}", cache=True)
                                    for i in range(2)]
        with RelayThread([w.endpoint for w in workers], args.profile, seed=0) as relays:
            for repeat in range(args.repeats):
                shift = repeat % len(names)
                for name in names[shift:] + names[:shift]:
                    servers = start_servers(group, models, relays, SETTINGS[name],
                                            f"{names.index(name)}-{repeat}")
                    try:
                        for streams in (1, args.streams):
                            sample = measure(servers[0], relays, name, repeat, streams,
                                             args.tokens)
                            samples.append(sample)
                            print(f"  {name:30} repeat {repeat} {streams} stream(s): "
                                  f"{sample.tok_s:6.1f} tok/s, "
                                  f"{sample.per_token('bytes') / 1024:7.1f} KiB/token, "
                                  f"{sample.per_token('round_trips'):5.2f} round trips/token",
                                  file=sys.stderr, flush=True)
                    finally:
                        for proc in servers:
                            proc.stop()
    return samples


def _cell(values: Sequence[float], fmt: str) -> str:
    s = spread(values)
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}, {s['max']:{fmt}}]"


def table(samples: list[Sample], names: Sequence[str], streams: Sequence[int]) -> str:
    head = ["setting (coordinator and drafter)"]
    for n in streams:
        head += [f"{n} stream(s) tok/s", f"{n}: KiB/token", f"{n}: round trips/token"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        row = [f"`{name}`" if SETTINGS[name] else name]
        for n in streams:
            mine = [s for s in samples if s.setting == name and s.streams == n]
            row += [_cell([s.tok_s for s in mine], ".1f"),
                    _cell([s.per_token("bytes") / 1024 for s in mine], ".0f"),
                    _cell([s.per_token("round_trips") for s in mine], ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def identical(samples: list[Sample]) -> list[str]:
    """Where a setting's output differs from the first sample with the same streams."""
    found = []
    for n in sorted({s.streams for s in samples}):
        mine = [s for s in samples if s.streams == n]
        found += [f"{s.setting} repeat {s.repeat}, {n} stream(s)" for s in mine
                  if s.texts != mine[0].texts]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="wifi", choices=sorted(PROFILES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1, help="threads per llama.cpp process")
    parser.add_argument("--bin-dir", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=None, help="tightwad cache directory")
    parser.add_argument("--json", type=Path, default=None, help="write the samples here")
    args = parser.parse_args(argv)
    bin_dir, build_name = llama_binaries(args.bin_dir, args.cache or
                                         llama_build.default_cache_dir())
    machine = machine_info()
    samples = run(args, bin_dir)
    machine["loadavg_end"] = os.getloadavg()
    print(table(samples, args.settings, (1, args.streams)))
    differ = identical(samples)
    print("\noutputs identical across settings and repetitions: "
          + ("yes" if not differ else "NO: " + "; ".join(differ)))
    print(f"\n{PROFILES[args.profile].describe()}; {binary_version(bin_dir / 'llama-server')} "
          f"({build_name}); {machine['cpus']} CPUs, load {machine['loadavg_start']} -> "
          f"{machine['loadavg_end']}")
    print("command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
    if args.json:
        write_result(args.json, json.dumps({
            "machine": machine, "profile": args.profile,
            "settings": {k: list(SETTINGS[k]) for k in args.settings},
            "samples": [asdict(s) for s in samples]}, indent=1))
    return 1 if differ else 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
