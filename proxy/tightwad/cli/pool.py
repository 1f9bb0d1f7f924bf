"""``tightwad start`` / ``stop`` / ``status``: the local loopback pool, or an inventory's hosts."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from tightwad import build as llama_build
from tightwad import defaults
from tightwad.cli import watch
from tightwad.cli.common import (
    CliError,
    ansible_command,
    console,
    dump_json,
    load_inventory,
    resolve_inventory,
    run_playbook,
    unit_states,
    units_by_host,
)
from tightwad.llamaserver import blocking
from tightwad.llamaserver.wire import UpstreamFailure
from tightwad.pool import discovery, localpool
from tightwad.pool import inventory as inv_mod
from tightwad.pool.procs import ProcessFailed, ProcessGroup

# Written by the coordinator role (coordinator_split_file): workers, their free MiB, the split.
SPLIT_FILE = "/etc/tightwad/tensor-split.json"


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--inventory", type=Path, help="inventory (default: "
                   "inventory/tightwad.yml if it exists, else the local pool)")
    p.add_argument("--local", action="store_true", help="the local loopback pool")
    p.add_argument("--state-dir", type=Path, help="where the local pool's state lives "
                   "(default: ~/.cache/tightwad/local, or $TIGHTWAD_STATE_DIR)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("start", help="bring the pool up",
                       description="With an inventory: ansible-playbook site.yml. Locally: "
                       "RPC workers, a pooled coordinator, a drafter and the proxy on loopback.")
    _target_args(p)
    p.add_argument("--model", type=Path, help="local: target GGUF (default: the demo "
                   "pair's target)")
    p.add_argument("--draft", type=Path, help="local: draft GGUF (default: the demo's draft)")
    p.add_argument("--no-draft", action="store_true", help="local: no drafter (proxy in "
                   "pass-through mode)")
    p.add_argument("--bin-dir", type=Path, help="local: llama.cpp binaries (default: build or "
                   "reuse the pinned CPU build)")
    p.add_argument("--workers", default=",".join(map(str, defaults.LOCAL_WORKER_PORTS)),
                   help="local: RPC worker ports, one worker each (default: %(default)s)")
    p.add_argument("--coordinator-port", type=int, default=defaults.COORDINATOR_PORT)
    p.add_argument("--drafter-port", type=int, default=defaults.DRAFTER_PORT)
    p.add_argument("--port", type=int, default=defaults.PROXY_PORT,
                   help="local: the proxy's port (default: %(default)s)")
    p.add_argument("--slots", type=int, default=defaults.SLOTS)
    p.add_argument("--ctx", type=int, default=defaults.LOCAL_CTX_SIZE, help="local: context of "
                   "the coordinator and drafter, all slots together (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="local: threads per process")
    p.add_argument("--link", choices=localpool.LINK_CHOICES, default=None,
                   help="local: run each worker's link through an emulated network of this "
                   "profile (a relay process per worker; e.g. wifi: 5 ms RTT, 200 Mbit/s), "
                   "so pooling pays what it would between machines (default: direct loopback)")
    p.set_defaults(func=start)

    p = sub.add_parser("stop", help="bring the pool down",
                       description="With an inventory: ansible-playbook playbooks/stop.yml. "
                       "Locally: stop exactly the processes `start --local` recorded.")
    _target_args(p)
    p.set_defaults(func=stop)

    p = sub.add_parser("status", help="services, health, live tensor split, speculation stats")
    _target_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true", help="the live picture (the dashboard's) "
                   "redrawn every second until Ctrl-C")
    p.set_defaults(func=status)


# --- start -----------------------------------------------------------------------------------


def start(args: argparse.Namespace) -> int:
    path = resolve_inventory(args.inventory, args.local)
    if path is not None:
        load_inventory(path)
        return run_playbook("site.yml", path)
    return start_local(args)


def start_local(args: argparse.Namespace) -> int:
    directory = localpool.state_dir(args.state_dir)
    existing = localpool.load_state(directory)
    if existing is not None:
        running = [s for s in existing.services if localpool.alive(s)]
        if running and len(running) == len(existing.services):
            proxy = existing.one("proxy")
            console.print(f"the local pool is already running ({proxy.url if proxy else ''}); "
                          "`tightwad status --local` shows it")
            return 0
        if running:
            raise CliError(f"the local pool is partly running ({', '.join(s.name for s in running)}"
                           "); run `tightwad stop --local` first")
        localpool.clear_state(directory)
    try:
        worker_ports = discovery.parse_ports(args.workers)
    except discovery.DiscoveryError as exc:
        raise CliError(str(exc), 2) from None
    ports = [*worker_ports, args.coordinator_port, args.port]
    if not args.no_draft:
        ports.append(args.drafter_port)
    busy = sorted(p for p in ports if p in localpool.listening_ports())
    if busy:
        raise CliError(f"port(s) {', '.join(map(str, busy))} already in use; stop what holds "
                       "them or choose others (see tightwad start --help)", 2)
    cache = llama_build.default_cache_dir()
    try:
        with console.status("preparing llama.cpp and the models (first time: a build of "
                            "several minutes) ..."):
            bin_dir = args.bin_dir or llama_build.ensure_build("cpu", cache=cache).bin_dir
            model, draft = args.model, None if args.no_draft else args.draft
            if model is None or (draft is None and not args.no_draft):
                from tightwad.pool.demomodels import ensure_local_pair

                models = ensure_local_pair(cache / "models",
                                        llama_build.fetch_source(cache) / "models")
                model = model or models.target
                if not args.no_draft:
                    draft = draft or models.draft
    except llama_build.BuildError as exc:
        raise CliError(str(exc), 2) from None
    except ImportError:
        raise CliError("the demo models need the 'models' extra (pip install "
                       "'tightwad[models]'), or pass --model and --draft", 2) from None
    for label, file in (("model", model), ("draft", draft)):
        if file is not None and not Path(file).is_file():
            raise CliError(f"--{label} {file}: no such file", 2)
    from tightwad.server.dashboard import POOL_STATE_ENV  # here: --help needs no server

    link = localpool.link_choice(args.link)
    spec = localpool.LaunchSpec(model=Path(model).resolve(),
                                draft=Path(draft).resolve() if draft else None,
                                worker_ports=worker_ports,
                                coordinator_port=args.coordinator_port,
                                drafter_port=args.drafter_port, proxy_port=args.port,
                                slots=args.slots, ctx=args.ctx,
                                # The dashboard draws the pool from this state file.
                                proxy_env={POOL_STATE_ENV: str(localpool.state_path(directory))},
                                link=link)
    log_dir = directory / "logs"
    group = ProcessGroup(bin_dir=Path(bin_dir), log_dir=log_dir, threads=args.threads)
    try:
        with console.status(f"starting {len(worker_ports)} RPC workers"
                            f"{', their emulated links' if link else ''}, the coordinator"
                            f"{', the drafter' if draft else ''} and the proxy ..."):
            launched = localpool.launch(group, spec)
    except (ProcessFailed, OSError) as exc:
        group.close()
        first = str(exc).splitlines()[0]
        raise CliError(f"the pool did not come up: {first} (logs in {log_dir})") from None
    except BaseException:
        group.close()
        raise
    state = localpool.LocalState(bin_dir=str(bin_dir), log_dir=str(log_dir), model=str(spec.model),
                                 draft=str(spec.draft) if spec.draft else None, ctx=spec.ctx,
                                 slots=spec.slots, services=localpool.services_of(launched),
                                 link=link)
    localpool.save_state(directory, state)
    console.print(f"[green]local pool up[/]: {len(launched.workers)} workers, coordinator "
                  f"{launched.coordinator.url}"
                  + (f", drafter {launched.drafter.url}" if launched.drafter else ""))
    console.print(f"link: {localpool.link_label(link)}")
    console.print(f"OpenAI-compatible endpoint: [bold]{launched.proxy.url}/v1[/]   "
                  "(`tightwad status` to watch it, `tightwad stop` to end it)")
    return 0


# --- stop ------------------------------------------------------------------------------------


def stop(args: argparse.Namespace) -> int:
    path = resolve_inventory(args.inventory, args.local)
    if path is not None:
        load_inventory(path)
        return run_playbook("playbooks/stop.yml", path)
    directory = localpool.state_dir(args.state_dir)
    state = localpool.load_state(directory)
    if state is None:
        console.print("no local pool is running")
        return 0
    for svc in reversed(state.services):  # proxy first, workers last
        result = localpool.signal_and_wait(svc)
        console.print(f"{svc.name:<12} pid {svc.pid:<8} {result}")
    localpool.clear_state(directory)
    return 0


# --- status ----------------------------------------------------------------------------------


def local_status(directory: Path) -> dict[str, Any]:
    state = localpool.load_state(directory)
    if state is None:
        raise CliError("no local pool is running; start one with `tightwad start --local`")
    listening = localpool.listening_ports()
    services = []
    for svc in state.services:
        running = localpool.alive(svc)
        if svc.kind in ("rpc", "link"):
            # No connection to a worker (or its relay): it serves one client at a time.
            health = "listening" if running and svc.port in listening else "down"
        else:
            health = "healthy" if running and blocking.ok(f"{svc.url}/health") else "down"
        services.append({"name": svc.name, "kind": svc.kind, "pid": svc.pid,
                         "state": "running" if running else "dead", "health": health,
                         "endpoint": f"{svc.host}:{svc.port}"})
    coordinator = state.one("coordinator")
    split = []
    if coordinator is not None:
        buffers = localpool.live_split(coordinator)
        total = sum(mib for _, mib in buffers) or 1.0
        split = [{"device": d, "weights_mib": mib, "share": round(mib / total, 3)}
                 for d, mib in buffers]
    stats = None
    proxy = state.one("proxy")
    if proxy is not None and localpool.alive(proxy):
        try:
            body = blocking.get_json(f"{proxy.url}/tightwad/status")
            stats = {"mode": body.get("mode"), "speculation_active":
                     body.get("speculation_active"), **(body.get("stats") or {})}
        except UpstreamFailure:
            stats = None
    return {"pool": "local", "state_dir": str(directory), "model": state.model,
            "draft": state.draft, "link": {"profile": state.link,
                                           "emulated": state.link is not None,
                                           "label": localpool.link_label(state.link)},
            "services": services, "split": split, "speculation": stats,
            "endpoint": f"{proxy.url}/v1" if proxy else None}


def inventory_status(path: Path) -> dict[str, Any]:
    inventory, _ = load_inventory(path)
    rows = [{"host": host, "unit": unit, "state": state}
            for host, units in unit_states(path, units_by_host(inventory)).items()
            for unit, state in units.items()]
    health = {}
    for role, group, key, default in (("coordinator", "coordinator", "coordinator_port",
                                       inv_mod.COORDINATOR_PORT),
                                      ("drafter", "drafters", "drafter_port",
                                       inv_mod.DRAFTER_PORT),
                                      ("proxy", "proxy", "proxy_port", inv_mod.PROXY_PORT)):
        hosts = inventory.group(group)
        if not hosts:
            continue
        url = f"http://{hosts[0].address}:{hosts[0].port(key, default)}"
        bind = hosts[0].vars.get("proxy_bind_address") or (
            hosts[0].pool_address if (hosts[0].vars.get("proxy_token")
                                      or inventory.proxy_token) else "127.0.0.1")
        if role == "proxy" and inv_mod.is_loopback(bind) and not inv_mod.is_loopback(
                hosts[0].address):
            continue  # bound to its host's loopback: its unit state above is what we can see
        health[role] = {"url": url, "healthy": blocking.ok(f"{url}/health")}
    stats = None
    if "proxy" in health:
        token = inventory.proxy_token
        answer = blocking.probe(f"{health['proxy']['url']}/tightwad/status", token=token)
        code, body = answer.status, answer.body
        if code == 200 and isinstance(body, dict):
            stats = {"mode": body.get("mode"), "speculation_active":
                     body.get("speculation_active"), **(body.get("stats") or {})}
    coord = inventory.coordinator
    split = coord.vars.get("coordinator_tensor_split", "auto") if coord else None
    if coord is not None and split == "auto":
        # The split the coordinator role computed from the workers' free memory and runs with.
        kept = ansible_command(path, coord.name, f"cat {SPLIT_FILE}").get(coord.name, {})
        try:
            split = json.loads(kept.get("stdout") or "")
        except json.JSONDecodeError:
            split = "auto (not deployed yet)"
    return {"pool": str(path), "units": rows, "health": health, "split": split,
            "speculation": stats}


def status(args: argparse.Namespace) -> int:
    path = resolve_inventory(args.inventory, args.local)
    if args.watch:
        return _watch(args, path)
    data = local_status(localpool.state_dir(args.state_dir)) if path is None \
        else inventory_status(path)
    if args.json:
        dump_json(data)
    else:
        _print_status(data)
    if path is None:
        bad = [s for s in data["services"] if s["state"] != "running"
               or s["health"] == "down"]
    else:
        bad = [u for u in data["units"] if u["state"] != "active"]
        bad += [h for h in data["health"].values() if not h["healthy"]]
    return 1 if bad else 0


def _watch(args: argparse.Namespace, path: Path | None) -> int:
    if path is None:
        directory = localpool.state_dir(args.state_dir)
        state = localpool.load_state(directory)
        proxy = state.one("proxy") if state is not None else None
        if proxy is None:
            raise CliError("no local pool is running; start one with `tightwad start --local`")
        from tightwad.cli import doctor  # the local pool's view, as `tightwad doctor` builds it
        from tightwad.pool import checks

        def run_doctor() -> list[dict[str, str]]:
            return [c.as_dict() for c in checks.run_checks(doctor.view_from_local(directory))]

        # A local proxy wants a token only when `start` ran with TIGHTWAD_AUTH__TOKEN set.
        return watch.watch(proxy.url, os.environ.get("TIGHTWAD_AUTH__TOKEN"), "local pool",
                           doctor=run_doctor)
    inventory, _ = load_inventory(path)
    hosts = inventory.group("proxy")
    if not hosts:
        raise CliError(f"{path}: no proxy host to watch")
    url = f"http://{hosts[0].address}:{hosts[0].port('proxy_port', inv_mod.PROXY_PORT)}"
    return watch.watch(url, inventory.proxy_token, str(path))


def _print_status(data: dict[str, Any]) -> None:
    table = Table(title=f"tightwad status: {data['pool']}")
    if "services" in data:
        for col in ("service", "pid", "state", "health", "endpoint"):
            table.add_column(col)
        for s in data["services"]:
            color = "green" if s["state"] == "running" and s["health"] != "down" else "red"
            table.add_row(s["name"], str(s["pid"]), f"[{color}]{s['state']}[/]",
                          f"[{color}]{s['health']}[/]", s["endpoint"])
    else:
        for col in ("host", "unit", "state"):
            table.add_column(col)
        for u in data["units"]:
            color = "green" if u["state"] == "active" else "red"
            table.add_row(u["host"], u["unit"], f"[{color}]{u['state']}[/]")
        for role, h in data["health"].items():
            color = "green" if h["healthy"] else "red"
            table.add_row(role, h["url"], f"[{color}]{'healthy' if h['healthy'] else 'down'}[/]")
    console.print(table)
    if isinstance(data.get("link"), dict):
        console.print(f"link: {data['link']['label']}")
    split = data.get("split")
    if isinstance(split, list) and split and isinstance(split[0], dict):
        console.print("tensor split (weights per device, from the coordinator's load report): "
                      + ", ".join(f"{s['device']} {s['weights_mib']:.1f} MiB "
                                  f"({s['share'] * 100:.0f}%)" for s in split))
    elif isinstance(split, dict) and "tensor_split" in split:
        console.print("tensor split (share per worker, from its free memory at deploy time): "
                      + ", ".join(f"{rpc} {share}" for rpc, share in zip(
                          split.get("rpc", []), str(split["tensor_split"]).split(","))))
    elif split is not None:
        console.print(f"tensor split: {split}")
    spec = data.get("speculation")
    if spec:
        acc = spec.get("acceptance")
        tpr = spec.get("tokens_per_round")
        console.print(f"speculation: {spec.get('mode')}, "
                      f"{'active' if spec.get('speculation_active') else 'inactive'}; "
                      f"{spec.get('requests', 0)} requests, {spec.get('tokens', 0)} tokens, "
                      f"{spec.get('rounds', 0)} rounds, acceptance "
                      f"{'-' if acc is None else f'{acc:.2f}'}, tokens/round "
                      f"{'-' if tpr is None else f'{tpr:.2f}'}")
    if data.get("endpoint"):
        console.print(f"endpoint: {data['endpoint']}")
