"""``tightwad doctor``, the command: build the pool view (from an inventory or the local pool's
state), run the checks, print a table (or JSON), exit 1 on any failure. The checks themselves
(observing and judging, no printing) are :mod:`tightwad.pool.checks`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from tightwad.cli.common import (
    CliError,
    ansible_command,
    console,
    dump_json,
    load_inventory,
    resolve_inventory,
    unit_states,
    units_by_host,
)
from tightwad.config import token_weakness
from tightwad.pool import checks, localpool
from tightwad.pool import inventory as inv_mod

STYLE = {checks.OK: "green", checks.WARN: "yellow", checks.FAIL: "bold red", checks.SKIP: "dim"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check the pool: versions, workers, memory, models, "
                       "tokenizers, services, security",
                       description="Check everything a pool needs; exit code 1 on any failure.")
    p.add_argument("-i", "--inventory", type=Path, help="inventory (default: "
                   "inventory/tightwad.yml if it exists, else the local pool)")
    p.add_argument("--local", action="store_true", help="check the local loopback pool")
    p.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--bin-dir", type=Path, help="llama.cpp binaries on this machine to check "
                   "(default: the cached build of the pin, if any)")
    p.add_argument("--ssh", action="store_true", help="inventory: also ask every host over "
                   "SSH (ansible) for its ggml-rpc-server --version and its systemd units")
    p.add_argument("--measure", action="store_true", help="time a layer of the target on "
                   "every idle worker and each link (loads a few layers onto it; busy workers "
                   "are left alone) for the placement check")
    p.add_argument("--measurements", type=Path, metavar="FILE", help="measurements to place "
                   "with: python -m tightwad.pool.probe's JSON, or the coordinator's kept "
                   "/etc/tightwad/tensor-split.json")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=run)


def _local_bin_dir() -> Path | None:
    from tightwad import build as llama_build

    found = llama_build.cached_build(llama_build.default_cache_dir(), llama_build.build_key("cpu"))
    return found.bin_dir if found else None


def view_from_inventory(path: Path, bin_dir: Path | None) -> checks.PoolView:
    inventory, errors = load_inventory(path, strict=False)
    view = checks.PoolView(source=str(path), schema_errors=errors,
                           fix_start=f"tightwad start -i {path}",
                           fix_deploy=f"ansible-playbook site.yml -i {path}")
    view.workers = [checks.Endpoint(f"{h.name}/{i.name}", h.address, i.port)
                    for h, i in inventory.worker_endpoints()]
    coord = inventory.coordinator
    if coord is not None:
        view.coordinator = checks.Endpoint(coord.name, coord.address,
                                           coord.port("coordinator_port",
                                                      inv_mod.COORDINATOR_PORT))
        view.coordinator_address = coord.pool_address
        view.ctx = coord.ctx_size("coordinator_ctx_size")
        view.slots = coord.port("coordinator_parallel", inv_mod.DEFAULT_SLOTS)
        split = coord.vars.get("coordinator_tensor_split", "auto")
        view.split = split if isinstance(split, list) else str(split)
        if "coordinator_ram_mb" in coord.vars:
            view.coordinator_ram = int(coord.vars["coordinator_ram_mb"]) * 1024 * 1024
    drafters = inventory.group("drafters")
    if drafters:
        view.drafter = checks.Endpoint(drafters[0].name, drafters[0].address,
                                       drafters[0].port("drafter_port", inv_mod.DRAFTER_PORT))
    proxies = inventory.group("proxy")
    if proxies:
        host = proxies[0]
        view.proxy = checks.Endpoint(host.name, host.address,
                                     host.port("proxy_port", inv_mod.PROXY_PORT))
        token = host.vars.get("proxy_token") or inventory.proxy_token
        view.proxy_token = bool(token)
        view.proxy_token_weakness = token_weakness(str(token)) if token else None
        # The role's default: the pool address with a token, else loopback.
        view.proxy_bind = host.vars.get("proxy_bind_address") or (
            host.pool_address if token else "127.0.0.1")
    if inventory.model:
        view.model = Path(inventory.model).expanduser()
    if inventory.draft_model:
        view.draft = Path(inventory.draft_model).expanduser()
    view.bin_dir = bin_dir or _local_bin_dir()
    return view


def view_from_local(state_dir: Path | None) -> checks.PoolView:
    directory = localpool.state_dir(state_dir)
    state = localpool.load_state(directory)
    if state is None:
        raise CliError("no local pool is running (no state file); start one with "
                       "`tightwad start --local`, or pass -i INVENTORY", 1)
    view = checks.PoolView(source=f"local pool ({directory})", fix_start="tightwad start --local",
                           fix_deploy="python -m tightwad.build build, then tightwad stop "
                           "--local && tightwad start --local")
    view.workers = [checks.Endpoint(s.name, s.host, s.port) for s in state.by_kind("rpc")]
    for role in ("coordinator", "drafter", "proxy"):
        svc = state.one(role)
        if svc is not None:
            setattr(view, role, checks.Endpoint(svc.name, svc.host, svc.port))
    view.coordinator_address = "127.0.0.1"
    view.proxy_bind = "127.0.0.1"
    view.model = Path(state.model)
    view.draft = Path(state.draft) if state.draft else None
    view.ctx = state.ctx  # -c: the KV cache of all slots together
    view.slots = state.slots
    view.bin_dir = Path(state.bin_dir)
    view.serving_workers_known = True
    view.processes = {s.kind if s.kind != "rpc" else s.name: localpool.alive(s)
                      for s in state.services}
    return view


def _ssh_facts(path: Path):
    """What only the hosts themselves can say: installed binaries and systemd units."""
    inventory, _ = load_inventory(path, strict=False)
    workers = ":".join(h.name for h in inventory.group("rpc_workers"))

    def add(facts: checks.Facts) -> None:
        versions = ansible_command(path, workers, "{{ llama_cpp_install_dir | default("
                                   "'/opt/tightwad/llama.cpp') }}/bin/ggml-rpc-server --version")
        facts.remote_versions = {h: (r.get("stdout") or r.get("msg") or "no answer")
                                 for h, r in versions.items()}
        facts.units = unit_states(path, units_by_host(inventory))

    return add


def run(args: argparse.Namespace) -> int:
    path = resolve_inventory(args.inventory, args.local)
    view = view_from_local(args.state_dir) if path is None else \
        view_from_inventory(path, args.bin_dir)
    if args.bin_dir is not None:
        view.bin_dir = args.bin_dir
    if (limit := checks.ram_limit_from_env()) is not None:
        view.coordinator_ram = limit
    if args.measurements is not None:
        try:
            view.measurements = checks.load_measurements(json.loads(args.measurements.read_text()))
        except (OSError, ValueError) as exc:
            raise CliError(f"--measurements {args.measurements}: {exc}", 2) from None
    ssh = _ssh_facts(path) if args.ssh and path is not None else None

    def extra(facts: checks.Facts) -> None:
        if ssh is not None:
            ssh(facts)
        if args.measure:
            checks.measure_idle_workers(view, facts)
    if args.json:
        results = checks.run_checks(view, extra=extra)
    else:
        with console.status("checking the pool ..."):
            results = checks.run_checks(view, extra=extra)
    failed = [c for c in results if c.status == checks.FAIL]
    if args.json:
        dump_json({"source": view.source, "ok": not failed,
                   "checks": [c.as_dict() for c in results]})
        return 1 if failed else 0
    table = Table(title=f"tightwad doctor: {escape(view.source)}", show_lines=False, expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("details")
    for c in results:
        details = escape(c.message) + (f"\n[cyan]fix:[/cyan] {escape(c.fix)}" if c.fix and
                                       c.status in (checks.FAIL, checks.WARN) else "")
        table.add_row(c.name, f"[{STYLE[c.status]}]{c.status.upper()}[/]", details)
    console.print(table)
    warns = sum(c.status == checks.WARN for c in results)
    if failed:
        console.print(f"[bold red]{len(failed)} check(s) failed[/], {warns} warning(s)")
        return 1
    console.print(f"[green]all checks passed[/] ({warns} warning(s))")
    return 0
