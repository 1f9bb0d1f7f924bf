"""``tightwad init``: discover the LAN, propose roles and a tensor split, write the inventory
with a strong proxy token, and say how clients connect."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.prompt import Confirm, Prompt
from rich.table import Table

from tightwad import defaults
from tightwad.cli.common import DEFAULT_INVENTORY, CliError, console, err_console
from tightwad.config import token_weakness
from tightwad.pool import discovery, rpcproto
from tightwad.pool import inventory as inv_mod
from tightwad.pool import placement as splits
from tightwad.pool.gguf_info import GGUFError, read_info


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="discover the LAN and write an Ansible inventory",
                       description="Find ggml-rpc-server workers (RPC hello: protocol, devices, "
                       "memory), llama-servers (/health, /props), Tightwad proxies and SSH "
                       "hosts; propose roles and a tensor split; write the inventory.")
    p.add_argument("cidr", nargs="*", help="networks or addresses to scan (default: the "
                   "subnets of this machine's interfaces; with --local: loopback)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_INVENTORY,
                   help=f"inventory to write (default: {DEFAULT_INVENTORY})")
    p.add_argument("--yes", "-y", action="store_true", help="no questions: accept the proposal")
    p.add_argument("--local", action="store_true", help="a single-machine pool on loopback")
    p.add_argument("--force", action="store_true", help="overwrite an existing inventory")
    p.add_argument("--model", type=Path, help="the target GGUF on this machine")
    p.add_argument("--draft", type=Path, help="the draft GGUF (same tokenizer as the target)")
    p.add_argument("--rpc-ports", default=",".join(map(str, defaults.DISCOVERY_RPC_PORTS)),
                   help="ports probed for RPC workers")
    p.add_argument("--http-ports", default=",".join(map(str, defaults.DISCOVERY_HTTP_PORTS)),
                   help="ports probed for llama-server and the proxy")
    p.add_argument("--ssh-port", type=int, default=22, help="0: do not look for SSH hosts")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds per probe")
    p.add_argument("--concurrency", type=int, default=64, help="probes in flight at most")
    p.set_defaults(func=run)


def _host_name(address: str, local: bool) -> str:
    if local or inv_mod.is_loopback(address):
        return "local"
    return "host-" + address.replace(".", "-").replace(":", "-")


def _findings_table(found: Sequence[discovery.HostFinding]) -> Table:
    table = Table(title="found")
    for col in ("address", "port", "what", "details"):
        table.add_column(col)
    for host in found:
        for r in host.rpc:
            if r.hello is not None:
                devs = ", ".join(f"dev{d.index} {splits.human_bytes(d.free)} free of "
                                 f"{splits.human_bytes(d.total)}" for d in r.hello.devices)
                ok = rpcproto.compatible(r.hello.version)
                what = f"rpc worker {r.hello.protocol}" + ("" if ok else " [red](mismatch)[/]")
                table.add_row(host.address, str(r.port), what, devs)
            else:
                table.add_row(host.address, str(r.port), f"rpc worker ({r.state})",
                              "serving a coordinator: not probed further" if r.state == "busy"
                              else r.detail)
        for h in host.http:
            details = ", ".join(x for x in (
                Path(h.model).name if h.model else "", f"{h.slots} slots" if h.slots else "",
                f"build {h.build}" if h.build else "", h.detail,
                "healthy" if h.healthy else "not healthy") if x)
            table.add_row(host.address, str(h.port), h.kind, details)
        if host.ssh:
            table.add_row(host.address, "22", "ssh", host.ssh)
    return table


def _file_size(path: str | None) -> int:
    try:
        return Path(path).stat().st_size if path else 0
    except OSError:
        return 0


def propose(found: Sequence[discovery.HostFinding], *, local: bool, model: Path | None,
            draft: Path | None) -> tuple[inv_mod.Inventory, list[str]]:
    """The inventory for what was found, and notes for the user (pure apart from stat())."""
    notes: list[str] = []
    inv = inv_mod.Inventory()
    llamas = [(h, s) for h in found for s in h.service("llama-server")]
    proxies = [(h, s) for h in found for s in h.service("tightwad-proxy")]

    # Which llama-server is the coordinator and which the drafter.
    def pick(path: Path | None, port: int) -> tuple[discovery.HostFinding,
                                                      discovery.HttpFinding] | None:
        if path is not None:
            resolved = str(Path(path).resolve())
            for h, s in llamas:
                if s.model and str(Path(s.model).resolve()) == resolved:
                    return h, s
        return next(((h, s) for h, s in llamas if s.port == port), None)

    coord_srv = pick(model, inv_mod.COORDINATOR_PORT)
    draft_srv = pick(draft, inv_mod.DRAFTER_PORT)
    rest = [x for x in llamas if x is not coord_srv and x is not draft_srv]
    rest.sort(key=lambda hs: _file_size(hs[1].model), reverse=True)
    if coord_srv is None and rest:
        coord_srv = rest.pop(0)
    if draft_srv is None and rest:
        draft_srv = rest.pop(0)
    if coord_srv and draft_srv and _file_size(draft_srv[1].model) > _file_size(
            coord_srv[1].model) and model is None and draft is None:
        coord_srv, draft_srv = draft_srv, coord_srv

    if model is None and coord_srv and coord_srv[1].model:
        model = Path(coord_srv[1].model)
    if draft is None and draft_srv and draft_srv[1].model:
        draft = Path(draft_srv[1].model)
    inv.vars["tightwad_model"] = str(Path(model).resolve()) if model else None
    if draft:
        inv.vars["tightwad_draft_model"] = str(Path(draft).resolve())

    def base_vars(address: str) -> dict:
        out: dict = {"ansible_host": address, "tightwad_pool_address": address}
        if local or inv_mod.is_loopback(address):
            out["ansible_connection"] = "local"
            # The controller's own Python, not whatever interpreter discovery finds first.
            out["ansible_python_interpreter"] = "{{ ansible_playbook_python }}"
        return out

    # Workers: every host with an RPC worker, and (not --local) every SSH host to deploy to.
    memory: dict[str, int] = {}
    free_per_instance: list[int | None] = []
    for host in found:
        workers = [r for r in host.rpc if r.state in ("ok", "busy", "silent")]
        if not workers and not (host.ssh and not local):
            continue
        name = _host_name(host.address, local)
        instances = [{"name": f"rpc{r.port}", "port": r.port} for r in workers] or \
            [{"name": "main", "port": inv_mod.RPC_PORT}]
        inv.add_host("rpc_workers", name, **base_vars(host.address),
                     rpc_worker_instances=instances)
        for r in workers:
            free_per_instance.append(r.hello.free_memory if r.hello else None)
        if not workers:
            free_per_instance.append(None)
        memory[name] = sum(r.hello.total_memory for r in workers if r.hello)
        for r in workers:
            if r.hello and not rpcproto.compatible(r.hello.version):
                notes.append(f"{host.address}:{r.port} speaks RPC {r.hello.protocol}, the pin "
                             f"speaks {rpcproto.format_version(rpcproto.PIN_PROTOCOL)}: "
                             "site.yml reinstalls the pinned build there")
    if local and not inv.groups["rpc_workers"]:
        inv.add_host("rpc_workers", "local", **base_vars("127.0.0.1"),
                     rpc_worker_instances=[{"name": "main", "port": inv_mod.RPC_PORT}])
        free_per_instance.append(None)

    # Coordinator: a running coordinator's host, else the host with the most memory that holds
    # the model file.
    model_bytes = _file_size(str(model) if model else None)
    if coord_srv is not None:
        coord_name, coord_addr = _host_name(coord_srv[0].address, local), coord_srv[0].address
    else:
        candidates = [splits.Candidate(n, memory.get(n, 0)) for n in inv.groups["rpc_workers"]]
        best = splits.choose_coordinator(candidates, model_bytes) or (
            max(candidates, key=lambda c: c.ram) if candidates else None)
        if best is None:
            coord_name, coord_addr = "local", "127.0.0.1"
        else:
            coord_name, coord_addr = best.name, inv.hosts[best.name].address
            if best.ram and model_bytes and best.ram < model_bytes:
                notes.append(f"no host reported memory >= the model file "
                             f"({splits.human_bytes(model_bytes)}); check coordinator RAM with "
                             "`tightwad doctor`")
    coord_vars = base_vars(coord_addr)
    if coord_srv is not None and coord_srv[1].port != inv_mod.COORDINATOR_PORT:
        coord_vars["coordinator_port"] = coord_srv[1].port
    known = [f for f in free_per_instance if f is not None]
    if free_per_instance and len(known) == len(free_per_instance):
        # The split stays auto: the deploy times a layer of the model on each worker and its
        # link (tightwad.pool.probe) and places by speed; from here only memory is known.
        notes.append("tensor split: auto (the deploy measures each worker's speed and link and "
                     "places the layers by them, `tightwad doctor --measure` shows the same); "
                     "memory-proportional would be "
                     f"{splits.format_split(splits.propose_split(known))}")
    else:
        notes.append("the tensor split is computed at deploy time (coordinator_tensor_split: "
                     "auto): some workers were busy or not deployed yet")
    inv.add_host("coordinator", coord_name, **coord_vars)

    if draft_srv is not None:
        d_vars = base_vars(draft_srv[0].address)
        if draft_srv[1].port != inv_mod.DRAFTER_PORT:
            d_vars["drafter_port"] = draft_srv[1].port
        inv.add_host("drafters", _host_name(draft_srv[0].address, local), **d_vars)
    elif draft is not None:
        others = [splits.Candidate(n, memory.get(n, 0), memory.get(n, 0))
                  for n in inv.groups["rpc_workers"]]
        small = splits.choose_drafter(others, exclude=[coord_name])
        name = small.name if small else coord_name
        inv.add_host("drafters", name, **base_vars(inv.hosts[name].address))
    if proxies:
        p_host, p_srv = proxies[0]
        p_vars = base_vars(p_host.address)
        if p_srv.port != inv_mod.PROXY_PORT:
            p_vars["proxy_port"] = p_srv.port
        inv.add_host("proxy", _host_name(p_host.address, local), **p_vars)
    else:
        inv.add_host("proxy", coord_name, **base_vars(coord_addr))
    return inv, notes


def proxy_token(replaced: Path) -> tuple[str, bool]:
    """The proxy token to write, and whether it is the one of the inventory being replaced
    (kept when strong, so its clients keep working); else a new one of 256 random bits."""
    try:
        old = inv_mod.load(replaced)[0].proxy_token if replaced.is_file() else None
    except (inv_mod.InventoryError, OSError):
        old = None
    if isinstance(old, str) and token_weakness(old) is None:
        return old, True
    return secrets.token_urlsafe(32), False


def proxy_url(inv: inv_mod.Inventory) -> str:
    """The base URL clients use: the proxy host's pool address, where the proxy role binds
    when there is a token (roles/proxy/defaults/main.yml)."""
    (host,) = inv.group("proxy")
    address = host.pool_address
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{host.port('proxy_port', inv_mod.PROXY_PORT)}/v1"


def _roles_table(inv: inv_mod.Inventory) -> Table:
    table = Table(title="proposed pool")
    for col in ("group", "host", "address", "details"):
        table.add_column(col)
    for group in inv_mod.GROUPS:
        for host in inv.group(group):
            details = ""
            if group == "rpc_workers":
                details = ", ".join(f"{i.name}:{i.port}" for i in host.instances)
            elif group == "coordinator":
                split = host.vars.get("coordinator_tensor_split", "auto")
                details = f"tensor split {split}"
            table.add_row(group, host.name, host.address, details)
    return table


def run(args: argparse.Namespace) -> int:
    out: Path = args.output
    if out.exists() and not args.force:
        raise CliError(f"{out} exists; pass --force to overwrite it (or -o another file)", 2)
    interactive = not args.yes
    if interactive and not sys.stdin.isatty():
        raise CliError("not a terminal: pass --yes to accept the proposal without questions", 2)
    for label, path in (("--model", args.model), ("--draft", args.draft)):
        if path is not None:
            try:
                read_info(path)
            except GGUFError as exc:
                raise CliError(f"{label}: {exc}", 2) from None
    try:
        targets = args.cidr or (["127.0.0.1/32"] if args.local else
                                discovery.local_networks())
        if not targets:
            raise CliError("no network to scan: pass a CIDR (e.g. 192.168.1.0/24) or --local", 2)
        addresses = discovery.expand(targets)
        rpc_ports = discovery.parse_ports(args.rpc_ports)
        http_ports = discovery.parse_ports(args.http_ports)
    except discovery.DiscoveryError as exc:
        raise CliError(str(exc), 2) from None

    progress = Progress(TextColumn(f"scanning {', '.join(targets)}"), BarColumn(),
                        MofNCompleteColumn(), console=err_console, transient=True)
    with progress:
        task = progress.add_task("scan", total=None)
        found = discovery.scan(addresses, rpc_ports=rpc_ports, http_ports=http_ports,
                               ssh_port=args.ssh_port or None,
                               connect_timeout=min(args.timeout, 0.5), rpc_timeout=args.timeout,
                               http_timeout=max(args.timeout, 2.0),
                               concurrency=args.concurrency,
                               progress=lambda done, total: progress.update(
                                   task, completed=done, total=total))
    if found:
        console.print(_findings_table(found))
    else:
        console.print(f"nothing found on {', '.join(targets)} (ports {args.rpc_ports}, "
                      f"{args.http_ports}, ssh {args.ssh_port or 'off'})")
    inventory, notes = propose(found, local=args.local, model=args.model, draft=args.draft)
    if not inventory.groups["rpc_workers"]:
        raise CliError("found no RPC worker and no SSH host to deploy one to; start "
                       "ggml-rpc-server on the workers or check the network (see docs/cli.md)")
    if inventory.model is None:
        if not interactive:
            raise CliError("no model: pass --model PATH (the target GGUF on this machine)", 2)
        answer = Prompt.ask("path of the target model (GGUF) on this machine")
        try:
            read_info(answer)
        except GGUFError as exc:
            raise CliError(str(exc), 2) from None
        inventory.vars["tightwad_model"] = str(Path(answer).resolve())
    console.print(_roles_table(inventory))
    for note in notes:
        console.print(f"[yellow]note[/]: {note}")
    if interactive and not Confirm.ask(f"write {out}?", default=True):
        console.print("nothing written")
        return 1
    token, kept = proxy_token(out)
    inventory.vars["tightwad_proxy_token"] = token
    header = ("Written by `tightwad init`. Check it: tightwad doctor -i " + str(out) +
              "\nDeploy it: tightwad start -i " + str(out) + "  (ansible-playbook site.yml)" +
              "\ntightwad_proxy_token: the bearer token clients send; keep this file private")
    try:
        inv_mod.write_atomic(out, inventory.to_yaml(header), force=args.force)
    except inv_mod.InventoryError as exc:
        raise CliError(str(exc), 2) from None
    console.print(f"[green]wrote {out}[/] (mode 0600); next: tightwad doctor -i {out}, then "
                  f"tightwad start -i {out}")
    url = proxy_url(inventory)
    console.print(f"clients connect to [bold]{url}[/] with the bearer token "
                  f"all.vars.tightwad_proxy_token from {out} "
                  f"({'kept from the inventory it replaces' if kept else 'newly generated'}): "
                  f'OpenAI(base_url="{url}", api_key=<that token>)', soft_wrap=True)
    return 0
