"""A complete local pool on loopback, served by the Tightwad proxy on :8088.

    python -m tightwad.pool.demo            # (scripts/demo bootstraps first)
    python -m tightwad.pool.demo --link wifi   # each worker behind an emulated Wi-Fi link

It builds or reuses the pinned llama.cpp, writes the demo pair, starts 2 RPC workers, a
pooled coordinator that verifies drafts, a drafter and the proxy (remote drafting on), answers
one completion through the proxy, prints the endpoint and serves until Ctrl-C.
The pool is the one ``tightwad start --local`` runs (tightwad.pool.localpool.launch), kept in
the foreground.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tightwad import build as llama_build
from tightwad import defaults
from tightwad.llamaserver.wire import UpstreamFailure
from tightwad.pool.demomodels import ensure_local_pair
from tightwad.pool.localpool import LINK_CHOICES, LaunchSpec, launch, link_choice, link_label
from tightwad.pool.procs import LOOPBACK, ProcessFailed, ProcessGroup, tcp_open


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tightwad.pool.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=defaults.PROXY_PORT, help="the proxy (the endpoint)")
    parser.add_argument("--coordinator-port", type=int, default=defaults.COORDINATOR_PORT)
    parser.add_argument("--drafter-port", type=int, default=defaults.DRAFTER_PORT)
    parser.add_argument("--worker-ports", default=",".join(map(str, defaults.LOCAL_WORKER_PORTS)),
                        help="comma-separated ports, one RPC worker each")
    parser.add_argument("--cache", type=Path, default=None, help="tightwad cache directory")
    parser.add_argument("--link", choices=LINK_CHOICES, default=None,
                        help="run each worker's link through an emulated network of this "
                        "profile (default: direct loopback)")
    return parser


def _interrupt(*_: object) -> None:
    """SIGTERM (and SIGINT) end the demo as cleanly as Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    link = link_choice(args.link)
    cache = args.cache or llama_build.default_cache_dir()
    worker_ports = [int(p) for p in args.worker_ports.split(",") if p]
    ports = [*worker_ports, args.coordinator_port, args.drafter_port, args.port]
    busy = [p for p in ports if tcp_open(LOOPBACK, p)]
    if busy:
        print(f"error: port(s) {', '.join(map(str, busy))} on {LOOPBACK} are already in use; "
              "stop what holds them or pass other ports (see --help)", file=sys.stderr)
        return 2
    try:
        build = llama_build.ensure_build("cpu", cache=cache)
        models = ensure_local_pair(cache / "models", llama_build.fetch_source(cache) / "models")
    except llama_build.BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # Also SIGINT: a shell without job control starts background commands with it ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    log_dir = cache / "demo" / "logs"
    with ProcessGroup(bin_dir=build.bin_dir, log_dir=log_dir) as group:
        try:
            print("starting 2 RPC workers, the coordinator, the drafter and the proxy ...",
                  flush=True)
            pool = launch(group, LaunchSpec(
                model=models.target, draft=models.draft, worker_ports=worker_ports,
                coordinator_port=args.coordinator_port, drafter_port=args.drafter_port,
                proxy_port=args.port, slots=defaults.SLOTS, link=link))
            workers, coordinator, drafter, proxy = (pool.workers, pool.coordinator,
                                                    pool.drafter, pool.proxy)
            assert drafter is not None
            answer = proxy.post("/v1/completions", {
                "prompt": "The junk drawer of compute says", "max_tokens": 16, "temperature": 0})
            spec = proxy.get("/tightwad/status")
        except (ProcessFailed, OSError, UpstreamFailure) as exc:
            print(f"error: the pool did not come up: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        print(f"workers:     {', '.join(w.endpoint for w in workers)}")
        print(f"link:        {link_label(link)}"
              + (f", relays {', '.join(r.endpoint for r in pool.links)}" if pool.links else ""))
        print(f"coordinator: {coordinator.url}   drafter: {drafter.url}")
        active = "active" if spec["speculation_active"] else "OFF, see the proxy log"
        print(f"speculation: {spec['mode']} drafting, {active}")
        print(f"logs:        {log_dir}")
        print(f"completion:  {answer['choices'][0]['text']!r} "
              f"({answer['usage']['completion_tokens']} tokens; random-weight test model)")
        print(f"\nOpenAI-compatible endpoint: {proxy.url}/v1   (Ctrl-C to stop)", flush=True)
        try:
            while all(p.alive() for p in group.procs):
                time.sleep(1)
            dead = [p for p in group.procs if not p.alive()]
            print(f"error: {dead[0].name} exited; see {dead[0].log_path}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nstopping the pool ...", flush=True)
            return 0


if __name__ == "__main__":
    sys.exit(main())
