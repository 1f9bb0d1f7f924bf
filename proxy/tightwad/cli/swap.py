"""``tightwad swap MODEL``: serve another model; the RPC workers keep running.

Locally: wait until the coordinator's slots are idle (``--drain`` seconds at most, so in-flight
requests finish), stop only the coordinator, start it again on the same port and workers with
the new model, and make the proxy see it. Requests that arrive during the swap get the proxy's
clean 503 (coordinator unavailable, ``Retry-After``). With an inventory: ``playbooks/swap.yml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tightwad.cli.common import CliError, console, load_inventory, resolve_inventory, run_playbook
from tightwad.pool import localpool
from tightwad.pool.gguf_info import GGUFError, read_info
from tightwad.pool.procs import ProcessFailed, ProcessGroup


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("swap", help="hot-swap the served model (workers keep running)")
    p.add_argument("model", type=Path, help="the new target GGUF (a path on the controller)")
    p.add_argument("--draft", type=Path, help="also swap the drafter's model (local pool)")
    p.add_argument("-i", "--inventory", type=Path)
    p.add_argument("--local", action="store_true")
    p.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--drain", type=float, default=30.0, help="seconds to let in-flight "
                   "requests finish before the coordinator restarts (default: 30)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = resolve_inventory(args.inventory, args.local)
    try:
        target = read_info(args.model)
        draft = read_info(args.draft) if args.draft else None
    except GGUFError as exc:
        raise CliError(str(exc), 2) from None
    if path is not None:
        load_inventory(path)
        extra = ["-e", f"tightwad_model={Path(args.model).resolve()}"]
        if args.draft:
            extra += ["-e", f"tightwad_draft_model={Path(args.draft).resolve()}"]
        return run_playbook("playbooks/swap.yml", path, extra)
    directory = localpool.state_dir(args.state_dir)
    state = localpool.load_state(directory)
    if state is None:
        raise CliError("no local pool is running; start one with `tightwad start --local`")
    coordinator = state.one("coordinator")
    if coordinator is None or not localpool.alive(coordinator):
        raise CliError("the local coordinator is not running; `tightwad stop --local && "
                       "tightwad start --local` restarts the pool")
    drafter = state.one("drafter")
    if draft is None and drafter is not None and state.draft:
        try:
            if read_info(state.draft).vocab_fingerprint() != target.vocab_fingerprint():
                console.print("[yellow]warning[/]: the running draft has another tokenizer; "
                              "the proxy will serve target-only (pass --draft to swap it too)")
        except GGUFError:
            pass
    workers = state.rpc_endpoints()  # the link relays when the pool emulates a link
    group = ProcessGroup(bin_dir=Path(state.bin_dir), log_dir=Path(state.log_dir))
    new_model = Path(args.model).resolve()

    with console.status("waiting for in-flight requests ..."):
        localpool.wait_idle(coordinator.url, args.drain)
    localpool.signal_and_wait(coordinator)
    proxy = state.one("proxy")
    if proxy is not None:
        localpool.nudge_proxy(proxy.url)
    try:
        with console.status(f"loading {new_model.name} on {len(workers)} workers ..."):
            server = group.llama_server(new_model, name="coordinator", rpc=workers,
                                        port=coordinator.port, slots=state.slots, ctx=state.ctx,
                                        args=localpool.coordinator_args())
    except (ProcessFailed, OSError) as exc:
        group.close()
        raise CliError(f"the new coordinator did not come up: {str(exc).splitlines()[0]}; "
                       f"the workers still run: `tightwad swap {state.model}` goes back") \
            from None
    services = [localpool.service_from(server, "coordinator") if s.kind == "coordinator" else s
                for s in state.services]
    state.model = str(new_model)
    if args.draft and drafter is not None:
        localpool.signal_and_wait(drafter)
        try:
            new_drafter = group.llama_server(Path(args.draft).resolve(), name="drafter",
                                             port=drafter.port, slots=state.slots,
                                             ctx=state.ctx)
        except (ProcessFailed, OSError) as exc:
            raise CliError(f"the new drafter did not come up: {str(exc).splitlines()[0]}") \
                from None
        services = [localpool.service_from(new_drafter, "drafter") if s.kind == "drafter"
                    else s for s in services]
        state.draft = str(Path(args.draft).resolve())
    state.services = services
    localpool.save_state(directory, state)
    console.print(f"[green]swapped[/]: the coordinator serves {new_model.name} "
                  f"(pid {server.pid}); workers kept: "
                  + ", ".join(f"{w.name} pid {w.pid}" for w in state.by_kind("rpc")))
    return 0

