"""Doctor's checks: observing the pool and judging it, every check as data (name,
ok/warn/fail, a message with numbers, a fix). No printing: ``tightwad doctor``
(:mod:`tightwad.cli.doctor`) builds the :class:`PoolView` and renders the results.

:func:`run_checks` takes a :class:`PoolView` (what the inventory or the local pool's state says
the pool is) and looks at the real thing: model files, binaries, workers, services. Workers are
probed with one RPC HELLO each (:mod:`tightwad.pool.rpcproto`, safe on a serving worker: a busy
one is reported as such); nothing else ever speaks RPC.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tightwad import build as llama_build
from tightwad import defaults
from tightwad.llamaserver import wire
from tightwad.pool import context, discovery, placement, probe, rpcproto
from tightwad.pool.gguf_info import GGUFError, GGUFInfo, read_info
from tightwad.pool.inventory import is_loopback
from tightwad.pool.placement import MiB, human_bytes, pool_fit

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
WIFI_RTT_S = 0.002
"""A wired LAN answers in well under a millisecond; 2 ms and more is Wi-Fi class (or worse)."""
SLOW_LINK_BPS = 12.5e6
"""100 Mbit/s: loading weights (and logits per verify) over anything slower hurts."""
PROBE_BYTES = 4 * MiB
RAM_ENV = "TIGHTWAD_COORDINATOR_RAM_MB"


@dataclass
class Check:
    name: str
    status: str
    message: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class Endpoint:
    name: str
    host: str
    """Where the controller reaches it."""
    port: int


@dataclass
class PoolView:
    """The pool as configured; doctor compares it with what is really there."""

    source: str
    schema_errors: list[str] = field(default_factory=list)
    workers: list[Endpoint] = field(default_factory=list)
    coordinator: Endpoint | None = None
    coordinator_address: str | None = None
    """The coordinator's pool address (the only source a worker should admit)."""
    drafter: Endpoint | None = None
    proxy: Endpoint | None = None
    proxy_bind: str | None = None
    proxy_token: bool = False
    proxy_token_weakness: str | None = None
    """Why the inventory's proxy token is too weak (``tightwad.config.token_weakness``)."""
    model: Path | None = None
    draft: Path | None = None
    ctx: int | None = None
    """The coordinator's ``-c`` (all slots together); None: ``auto`` (:mod:`tightwad.pool.context`
    chooses it from the model and the memory)."""
    slots: int = defaults.SLOTS
    coordinator_ram: int | None = None
    """Bytes, from a configured limit; None: measure it (possible when the coordinator is here)."""
    bin_dir: Path | None = None
    processes: dict[str, bool] | None = None
    """Local pool only: service name -> its recorded PID is running."""
    serving_workers_known: bool = False
    """The coordinator is known to run on exactly ``workers`` (the local pool's state)."""
    split: str | list[float] = "auto"
    """``coordinator_tensor_split``: auto, memory or one number per worker."""
    measurements: list[probe.Measurement] = field(default_factory=list)
    """Stored measurements (``--measurements``: the probe's JSON or the role's kept split file)."""
    fix_start: str = "tightwad start"
    fix_deploy: str = "ansible-playbook site.yml -i <inventory>"


@dataclass
class Facts:
    """What was observed, shared by the checks (each probe happens once)."""

    hellos: dict[str, Any] = field(default_factory=dict)
    """worker name -> rpcproto.Hello, or the ProbeError."""
    http: dict[str, discovery.HttpFinding | None] = field(default_factory=dict)
    target: GGUFInfo | None = None
    target_error: str | None = None
    draft: GGUFInfo | None = None
    draft_error: str | None = None
    local_addresses: set[str] = field(default_factory=set)
    remote_versions: dict[str, str] | None = None
    """``--ssh``: host -> output of its ``ggml-rpc-server --version`` (None: not asked)."""
    units: dict[str, dict[str, str]] | None = None
    """``--ssh``: host -> {systemd unit: state} (None: not asked)."""
    measured: dict[str, probe.Measurement] = field(default_factory=dict)
    """``--measure``: "host:port" -> this run's layer and link measurements of idle workers."""

    @property
    def coordinator_healthy(self) -> bool:
        found = self.http.get("coordinator")
        return bool(found and found.healthy and found.kind == "llama-server")

    @property
    def nothing_running(self) -> bool:
        """No service answers and no worker accepts: a pool not started (or deployed) yet, whose
        missing services are expected rather than failures."""
        return (not any(self.http.values())
                and not any(isinstance(h, (rpcproto.Hello, rpcproto.Busy, rpcproto.NotRpc,
                                           rpcproto.Silent))
                            for h in self.hellos.values()))


# --- observing --------------------------------------------------------------------------------


def binary_version(path: Path, timeout: float = 10) -> wire.Version:
    """What ``<binary> --version`` says (commit, RPC protocol; None where it does not say)."""
    try:
        proc = subprocess.run([str(path), "--version"], capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return wire.Version(None, None)
    return wire.parse_version(proc.stdout + proc.stderr)


def memory_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def observe(view: PoolView, *, rpc_timeout: float = 1.0) -> Facts:
    """Probe everything once, concurrently (each probe has its own timeout)."""
    facts = Facts(local_addresses=discovery.local_addresses())
    roles = [r for r in ("coordinator", "drafter", "proxy") if getattr(view, r) is not None]

    def identify(role: str) -> tuple[str, discovery.HttpFinding | None]:
        ep = getattr(view, role)
        return role, discovery.identify_http(ep.host, ep.port)

    def read(attr: str) -> None:
        path = view.model if attr == "target" else view.draft
        if path is None:
            return
        try:
            info = read_info(path)
            info.vocab_fingerprint()  # cached on the object: parsed while the network waits
            setattr(facts, attr, info)
        except GGUFError as exc:
            setattr(facts, f"{attr}_error", str(exc))

    def hello(worker: Endpoint) -> tuple[str, Any]:
        try:
            return worker.name, rpcproto.hello(worker.host, worker.port, timeout=rpc_timeout,
                                               connect_timeout=rpc_timeout,
                                               measure_bytes=PROBE_BYTES)
        except rpcproto.ProbeError as exc:
            return worker.name, exc

    with ThreadPoolExecutor(max_workers=8) as pool:
        files = [pool.submit(read, attr) for attr in ("target", "draft")]
        facts.http.update(pool.map(identify, roles))
        if view.serving_workers_known and facts.coordinator_healthy:
            # The local pool's coordinator runs on exactly these workers: it is serving, so
            # they are busy. Leave their one-client backlog alone.
            for w in view.workers:
                facts.hellos[w.name] = rpcproto.Busy("not probed: serving the coordinator")
        else:
            facts.hellos.update(pool.map(hello, view.workers))
        for f in files:
            f.result()
    return facts


# --- the checks -------------------------------------------------------------------------------


def check_inventory(view: PoolView, facts: Facts) -> list[Check]:
    if view.schema_errors:
        first = "; ".join(view.schema_errors[:3])
        more = f" (+{len(view.schema_errors) - 3} more)" if len(view.schema_errors) > 3 else ""
        return [Check("inventory", FAIL, f"{len(view.schema_errors)} problem(s): {first}{more}",
                      "edit the inventory (docs/cli.md shows its shape); `ansible-playbook "
                      "playbooks/check-inventory.yml -i <inventory>` checks the role settings")]
    return [Check("inventory", OK, f"{view.source}: {len(view.workers)} worker(s), "
                  f"coordinator {'set' if view.coordinator else 'missing'}, "
                  f"drafter {'set' if view.drafter else 'none'}, "
                  f"proxy {'set' if view.proxy else 'none'}")]


def check_models(view: PoolView, facts: Facts) -> list[Check]:
    out = []
    for label, path, info, error in (("target model", view.model, facts.target,
                                      facts.target_error),
                                     ("draft model", view.draft, facts.draft, facts.draft_error)):
        if path is None:
            if label == "target model":
                out.append(Check(label, FAIL, "no target model configured",
                                 "set all.vars.tightwad_model to the GGUF's path"))
            continue
        if info is None:
            out.append(Check(label, FAIL, error or f"{path}: unreadable",
                             f"put a valid GGUF at {path} (or fix the path in the inventory)"))
        else:
            out.append(Check(label, OK, f"{path.name}: GGUF v{info.version}, "
                             f"{human_bytes(info.size)}, {info.architecture}, "
                             f"{info.arch_value('block_count', '?')} layers, "
                             f"{info.n_vocab} tokens"))
    return out


def check_tokenizer(view: PoolView, facts: Facts) -> list[Check]:
    if view.draft is None:
        return [Check("draft tokenizer", SKIP, "no draft model: speculation is off")]
    if facts.target is None or facts.draft is None:
        return [Check("draft tokenizer", SKIP, "a model file is unreadable (see above)")]
    try:
        t_hash, d_hash = facts.target.vocab_fingerprint(), facts.draft.vocab_fingerprint()
    except GGUFError as exc:
        return [Check("draft tokenizer", FAIL, str(exc), "use GGUF files with a tokenizer")]
    t_fam, d_fam = facts.target.family, facts.draft.family
    if t_hash == d_hash and t_fam == d_fam:
        return [Check("draft tokenizer", OK, f"same vocabulary ({facts.target.n_vocab} tokens, "
                      f"sha256 {t_hash[:12]}) and family {t_fam}")]
    return [Check("draft tokenizer", FAIL,
                  f"TOKENIZER MISMATCH: target {t_fam} with {facts.target.n_vocab} tokens "
                  f"(sha256 {t_hash[:12]}), draft {d_fam} with {facts.draft.n_vocab} tokens "
                  f"(sha256 {d_hash[:12]}); the proxy would serve target-only",
                  "pick a draft from the target's own family (same tokenizer), e.g. a smaller "
                  "model of the same release, and set tightwad_draft_model to it")]


def check_versions(view: PoolView, facts: Facts) -> list[Check]:
    pin_commit, pin_proto = llama_build.PIN_SHORT, rpcproto.format_version(rpcproto.PIN_PROTOCOL)
    seen: list[tuple[str, str, str]] = []  # (who, what, value)
    bad: list[str] = []
    if view.bin_dir is not None:
        for binary in ("ggml-rpc-server", "llama-server"):
            path = view.bin_dir / binary
            if not path.exists():
                bad.append(f"{path} missing")
                continue
            commit, proto = binary_version(path)
            seen.append((binary, "commit", commit or "?"))
            if commit != pin_commit:
                bad.append(f"{binary} here is commit {commit or 'unknown'}")
            if binary == "ggml-rpc-server":
                seen.append((binary, "protocol", proto or "?"))
                if proto != pin_proto:
                    bad.append(f"{binary} here speaks {proto or 'an unknown protocol'}")
    for role in ("coordinator", "drafter"):
        found = facts.http.get(role)
        # A deployed server behind its API key shows no /props here: no build to compare.
        if found is not None and found.kind == "llama-server" and found.build:
            commit = wire.parse_build_info(found.build)
            seen.append((role, "commit", commit or "?"))
            if commit != pin_commit:
                bad.append(f"{role} runs build {found.build}")
    for host, text in (facts.remote_versions or {}).items():
        got_commit, got_proto = wire.parse_version(text)
        seen.append((host, "commit", got_commit or "?"))
        if got_commit != pin_commit or got_proto != pin_proto:
            bad.append(f"{host} has ggml-rpc-server commit {got_commit or 'unknown'}, "
                       f"RPC {got_proto or 'unknown'}"
                       + (f" ({text.strip()[:60]})" if not got_commit else ""))
    busy = []
    for name, result in facts.hellos.items():
        if isinstance(result, rpcproto.Hello):
            seen.append((name, "protocol", result.protocol))
            if result.version != rpcproto.PIN_PROTOCOL:
                bad.append(f"worker {name} speaks {result.protocol}")
        elif isinstance(result, rpcproto.Busy) and facts.coordinator_healthy:
            busy.append(name)
    if bad:
        return [Check("llama.cpp versions", FAIL,
                      f"expected commit {pin_commit} / RPC {pin_proto} everywhere; "
                      + "; ".join(bad),
                      "install the pin on every host: " + view.fix_deploy
                      + " (the llama_cpp role builds commit " + pin_commit + ")")]
    note = (f"; {len(busy)} busy worker(s) speak it to the serving coordinator" if busy else "")
    if not seen:
        return [Check("llama.cpp versions", WARN, "nothing to compare: no binaries here and no "
                      "service answered", "start the pool, then run doctor again")]
    return [Check("llama.cpp versions", OK, f"commit {pin_commit}, RPC {pin_proto} on "
                  f"{len(seen)} probe(s){note}")]


def tcp_rtt(host: str, port: int, samples: int = 3, timeout: float = 1.0) -> float | None:
    """Median TCP handshake time to a port that is not a worker's (SSH, or a closed port
    answering with a reset), so a busy worker's backlog is left alone."""
    times = []
    for _ in range(samples):
        started = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except ConnectionRefusedError:
            pass  # a reset is an answer: one round trip
        except OSError:
            return None
        times.append(time.monotonic() - started)
    return sorted(times)[len(times) // 2] if times else None


def check_workers(view: PoolView, facts: Facts) -> list[Check]:
    out = []
    for worker in view.workers:
        name = f"worker {worker.name}"
        where = f"{worker.host}:{worker.port}"
        result = facts.hellos.get(worker.name)
        if isinstance(result, rpcproto.Hello):
            # The TCP handshake is the network's round trip; the HELLO exchange adds the
            # worker's own wake-up, which a busy machine can stretch.
            rtt, bps = min(result.connect_s, result.rtt_s), result.download_bps
            mem = human_bytes(result.free_memory)
            msg = (f"{where} idle, {len(result.devices)} device(s), {mem} free, "
                   f"RTT {rtt * 1000:.2f} ms"
                   + (f", {bps / 1e6:.0f} MB/s" if bps else ", throughput not measured"))
            if rtt >= WIFI_RTT_S:
                out.append(Check(name, WARN, msg + " (Wi-Fi class: every token pays it)",
                                 "put the worker on wired Ethernet; speculation (a draft) "
                                 "amortises the round trips"))
            elif bps is not None and bps < SLOW_LINK_BPS:
                out.append(Check(name, WARN, msg + " (slower than 100 Mbit/s)",
                                 "use a faster (wired, gigabit) link for this worker"))
            else:
                out.append(Check(name, OK, msg))
        elif isinstance(result, rpcproto.Busy):
            ssh_rtt = tcp_rtt(worker.host, 22) if not is_loopback(worker.host) else None
            rtt_s = f", RTT {ssh_rtt * 1000:.2f} ms" if ssh_rtt is not None else ""
            if facts.coordinator_healthy:
                out.append(Check(name, OK, f"{where} busy serving the coordinator{rtt_s}"))
            else:
                out.append(Check(name, WARN, f"{where} accepted but serves another client and "
                                 "the coordinator is not healthy",
                                 "find what holds the worker (another llama-server --rpc?) and "
                                 "stop it"))
        elif isinstance(result, rpcproto.Unreachable) and facts.coordinator_healthy \
                and "refused" not in str(result).lower():
            out.append(Check(name, OK, f"{where} does not accept from here (firewalled, or "
                             "its one-client backlog is full) but the coordinator is serving"))
        elif isinstance(result, rpcproto.NotRpc):
            out.append(Check(name, FAIL, f"{where} answers, but not as an RPC worker: {result}",
                             f"check rpc_worker_instances ports; is another program on "
                             f"{worker.port}?"))
        elif facts.nothing_running:
            out.append(Check(name, WARN, f"{where} not running yet ({result})",
                             f"deploy and start the pool: {view.fix_start}"))
        else:
            out.append(Check(name, FAIL, f"{where} unreachable: {result}",
                             f"start the worker ({view.fix_start}); check that it listens on "
                             f"{worker.host} and that a firewall admits the coordinator"))
    return out


@dataclass(frozen=True)
class SlotContext:
    per_slot: int
    slots: int
    source: str
    warning: str = ""

    @property
    def total(self) -> int:
        return self.per_slot * self.slots


def _idle_free(view: PoolView, facts: Facts) -> list[int] | None:
    """Free bytes of every worker device, when every worker is idle and said so (else None)."""
    idle = [h for h in facts.hellos.values() if isinstance(h, rpcproto.Hello)]
    if view.workers and len(idle) == len(view.workers):
        return [d.free for h in idle for d in h.devices]
    return None


def slot_context(view: PoolView, facts: Facts) -> SlotContext | None:
    """A coordinator slot's context: what the serving coordinator's ``/props`` says, else the
    inventory's number, else what ``auto`` chooses for the target and the idle workers' memory
    (the deploy's rule); None when auto has no readable model to choose from."""
    found = facts.http.get("coordinator")
    if found is not None and found.kind == "llama-server" and found.n_ctx:
        return SlotContext(found.n_ctx, found.slots or view.slots, "the coordinator's /props")
    if view.ctx is not None:
        return SlotContext(view.ctx // max(1, view.slots), view.slots, "coordinator_ctx_size")
    if facts.target is None:
        return None
    choice = context.choose_for_model(facts.target, view.slots, _idle_free(view, facts))
    return SlotContext(choice.per_slot, choice.slots, f"auto, set by the {choice.limit}",
                       choice.warning)


def check_context(view: PoolView, facts: Facts) -> list[Check]:
    if view.coordinator is None:
        return []
    slot = slot_context(view, facts)
    if slot is None:
        return [Check("slot context", SKIP, "coordinator_ctx_size is auto and the target model "
                      "is unreadable (see above)")]
    trained = context.trained_context(facts.target) if facts.target is not None else 0
    msg = (f"{slot.per_slot} tokens per slot x {slot.slots} slot(s) ({slot.source}"
           + (f"; the model was trained on {trained}" if trained else "") + ")")
    small = context.small_slot(slot.per_slot, trained)
    if not small and not slot.warning:
        return [Check("slot context", OK, msg)]
    return [Check("slot context", WARN,
                  msg + (f": {small}, so longer conversations fail with a context error"
                         if small else "") + (f"; {slot.warning}" if slot.warning else ""),
                  "raise coordinator_ctx_size (auto gives each slot the trained context as far "
                  "as memory allows), lower coordinator_parallel, or add worker memory")]


def check_memory(view: PoolView, facts: Facts) -> list[Check]:
    out = []
    info = facts.target
    if info is None:
        return [Check("coordinator RAM", SKIP, "no readable target model")]
    ram, source = view.coordinator_ram, "configured limit"
    if ram is None and view.coordinator is not None and (
            is_loopback(view.coordinator.host) or view.coordinator.host in facts.local_addresses):
        ram, source = memory_total(), "this machine"
    if ram is None:
        out.append(Check("coordinator RAM", WARN, "unknown (the coordinator is another host)",
                         "set coordinator_ram_mb on the coordinator host, or run doctor there"))
    elif ram < info.size:
        out.append(Check("coordinator RAM", FAIL,
                         f"model file {human_bytes(info.size)} > coordinator RAM "
                         f"{human_bytes(ram)} ({source})",
                         "make the host with the most RAM the coordinator, or use a smaller "
                         "quantization of the model"))
    else:
        out.append(Check("coordinator RAM", OK, f"model file {human_bytes(info.size)} <= "
                         f"{human_bytes(ram)} ({source})"))
    slot = slot_context(view, facts)
    ctx = slot.total if slot is not None else 0
    kv = info.kv_cache_bytes(ctx)
    free = _idle_free(view, facts)
    if free is not None:
        fit = pool_fit(info.size, kv, free)
        msg = (f"need {human_bytes(fit.need)} (model {human_bytes(info.size)} + KV cache "
               f"{human_bytes(kv)} at {ctx} ctx), devices can hold {human_bytes(fit.have)}")
        out.append(Check("device memory", OK if fit.ok else FAIL, msg,
                         "" if fit.ok else "add a worker, lower the context, or use a smaller "
                         "quantization"))
    elif facts.coordinator_healthy:
        out.append(Check("device memory", OK, f"the coordinator serves the model "
                         f"({human_bytes(info.size)} + KV {human_bytes(kv)} at {ctx} ctx) "
                         "from its workers"))
    else:
        out.append(Check("device memory", WARN, f"need {human_bytes(info.size + kv)}; worker "
                         "memory unknown (some workers did not answer)",
                         "start the workers, then run doctor again"))
    return out


_EXPECTED_KIND = {"coordinator": "llama-server", "drafter": "llama-server",
                  "proxy": "tightwad-proxy"}


def check_services(view: PoolView, facts: Facts) -> list[Check]:
    out = []
    for role, kind in _EXPECTED_KIND.items():
        ep = getattr(view, role)
        if ep is None:
            continue
        found = facts.http.get(role)
        where = f"{ep.host}:{ep.port}"
        running = None if view.processes is None else view.processes.get(role)
        remote_loopback = (role == "proxy" and is_loopback(view.proxy_bind or "127.0.0.1")
                           and not is_loopback(ep.host) and ep.host not in facts.local_addresses)
        if found is None and remote_loopback:
            # The role binds a token-less proxy to 127.0.0.1 on its host: not visible from here.
            out.append(Check(role, SKIP if facts.units is not None else WARN,
                             f"binds 127.0.0.1 on {ep.host}: not reachable from this machine",
                             "" if facts.units is not None else
                             "run doctor --ssh to check its unit, or doctor on that host"))
        elif found is None and facts.nothing_running and not running:
            out.append(Check(role, WARN, f"not running yet ({where} is free)",
                             f"start the pool: {view.fix_start}"))
        elif found is None:
            extra = "" if running is None else (" (its process is running but not listening)"
                                                if running else " (its process is not running)")
            out.append(Check(role, FAIL, f"nothing answers on {where}{extra}",
                             f"start it: {view.fix_start}"))
        elif found.kind != kind:
            out.append(Check(role, FAIL, f"{where} is served by {found.kind}, not {kind} "
                             f"({found.detail})",
                             f"stop what holds port {ep.port}, or set {role}_port to a free one"))
        elif not found.healthy:
            out.append(Check(role, FAIL, f"{kind} on {where} is not healthy yet",
                             "wait for it to load, or read its log"))
        else:
            detail = f", model {Path(found.model).name}" if found.model else ""
            slots = f", {found.slots} slots" if found.slots else ""
            out.append(Check(role, OK, f"{kind} healthy on {where}{detail}{slots}"))
    return out


def check_units(view: PoolView, facts: Facts) -> list[Check]:
    """``--ssh``: the systemd units of every host are active."""
    if facts.units is None:
        return []
    down = [f"{host}: {unit} {state}" for host, units in facts.units.items()
            for unit, state in units.items() if state != "active"]
    total = sum(len(u) for u in facts.units.values())
    if down:
        return [Check("services (systemd)", FAIL, f"{len(down)} of {total} unit(s) not active: "
                      + "; ".join(down[:6]) + (" ..." if len(down) > 6 else ""),
                      f"{view.fix_start}; on a host: journalctl -u <unit> says why")]
    return [Check("services (systemd)", OK, f"{total} unit(s) active on {len(facts.units)} "
                  "host(s)")]


def check_proxy_auth(view: PoolView, facts: Facts) -> list[Check]:
    if view.proxy is None:
        return []
    bind = view.proxy_bind or "127.0.0.1"
    if is_loopback(bind):
        return [Check("proxy auth", OK, f"binds {bind} (loopback only)"
                      + ("; token set" if view.proxy_token else ""))]
    weakness = view.proxy_token_weakness if view.proxy_token else None
    if view.proxy_token and not weakness:
        return [Check("proxy auth", OK, f"binds {bind}; clients need the token")]
    if weakness:
        return [Check("proxy auth", FAIL, f"binds {bind} (off loopback) with a weak token: "
                      f"{weakness} (and the proxy refuses to start like this)",
                      "set all.vars.tightwad_proxy_token to a strong one (e.g. `openssl rand "
                      "-hex 24`)")]
    return [Check("proxy auth", FAIL, f"binds {bind} (off loopback) without a token: anyone on "
                  "the network can use the pool (and the proxy refuses to start like this)",
                  "set all.vars.tightwad_proxy_token (e.g. `openssl rand -hex 24`), or bind "
                  "proxy_bind_address to 127.0.0.1")]


def check_exposure(view: PoolView, facts: Facts) -> list[Check]:
    """A worker reachable from here when here is not the coordinator is open to the LAN."""
    coord = view.coordinator_address or (view.coordinator.host if view.coordinator else None)
    here_is_coordinator = coord is not None and (is_loopback(coord)
                                                 or coord in facts.local_addresses)
    exposed = []
    for worker in view.workers:
        if is_loopback(worker.host):
            continue
        result = facts.hellos.get(worker.name)
        reachable = isinstance(result, (rpcproto.Hello, rpcproto.Busy, rpcproto.NotRpc))
        if reachable and not here_is_coordinator:
            exposed.append(f"{worker.host}:{worker.port}")
    if exposed:
        return [Check("worker firewall", FAIL,
                      f"{', '.join(exposed)} accept(s) connections from this machine, which is "
                      "not the coordinator: anyone there can take a worker down",
                      "run site.yml (the rpc_worker role admits only the coordinator), or "
                      "firewall the RPC ports yourself")]
    if here_is_coordinator or all(is_loopback(w.host) for w in view.workers):
        return [Check("worker firewall", OK, "not testable from the coordinator itself"
                      if not all(is_loopback(w.host) for w in view.workers)
                      else "workers listen on loopback only")]
    return [Check("worker firewall", OK, "workers refuse this non-coordinator machine")]


def _rpc(worker: Endpoint) -> str:
    return f"{worker.host}:{worker.port}"


def measure_idle_workers(view: PoolView, facts: Facts, repeats: int = 3) -> None:
    """``doctor --measure``: time a layer of the target on every worker that answered HELLO
    (idle); busy workers are not touched. Needs the target and the pinned binaries here."""
    idle = [w for w in view.workers if isinstance(facts.hellos.get(w.name), rpcproto.Hello)]
    if not idle or view.model is None or view.bin_dir is None:
        return
    for m in probe.measure(view.model, [_rpc(w) for w in idle], view.bin_dir, repeats=repeats):
        facts.measured[m.rpc] = m


def load_measurements(raw: Any) -> list[probe.Measurement]:
    """The probe's JSON list, or the coordinator role's kept split file (its ``measurements``
    and ``free_mib`` by ``rpc``)."""
    if isinstance(raw, dict):
        found = [probe.Measurement.from_dict(m) for m in raw.get("measurements") or []
                 if isinstance(m, dict)]
        free = dict(zip(raw.get("rpc") or [], raw.get("free_mib") or []))
        known = {m.rpc for m in found}
        found += [probe.Measurement(r, skipped="not measured") for r in free if r not in known]
        for m in found:
            if not m.free and m.rpc in free:
                m.free = int(free[m.rpc]) * MiB
        return found
    if isinstance(raw, list):
        return [probe.Measurement.from_dict(m) for m in raw if isinstance(m, dict)]
    raise ValueError("measurements: expected the probe's JSON list or a kept tensor-split.json")


def placement_for(view: PoolView, facts: Facts,
                  mode: str | None = None) -> tuple[placement.Placement | None, str]:
    """The split rule on what doctor knows (None and why not, when it cannot be applied)."""
    if view.model is None or facts.target is None:
        return None, "no readable target model"
    stored = {m.rpc: m for m in view.measurements}
    devices = []
    for w in view.workers:
        rpc, hello = _rpc(w), facts.hellos.get(w.name)
        m = facts.measured.get(rpc) or stored.get(rpc)
        usable_m = m if m is not None and not m.skipped else None
        if isinstance(hello, rpcproto.Hello):
            free = hello.free_memory
            rtt = min(hello.connect_s, hello.rtt_s) * 1000
            base = usable_m or probe.Measurement(rpc)
            devices.append(placement.Device(w.name, free, base.layer_ms, base.verify_layer_ms,
                                            rtt, hello.download_bps or base.bandwidth_bps,
                                            w.host, base.base_ms, base.hop_ms))
        elif m is not None and m.free:
            devices.append((usable_m or probe.Measurement(rpc, free=m.free)).device(w.name))
        else:
            return None, (f"worker {w.name} is busy (serving a coordinator: one client at a "
                          "time) or down, so its free memory is unknown; placement is proposed "
                          "on idle workers (before `tightwad start`)")
    slot = slot_context(view, facts)
    shape = probe.model_shape(view.model, slot.total if slot is not None else 0)
    split = view.split if mode is None else mode
    if isinstance(split, list):
        return placement.place(shape, devices, mode="explicit", explicit=split), ""
    return placement.place(shape, devices, mode=split), ""


def check_placement(view: PoolView, facts: Facts) -> list[Check]:
    if view.coordinator is None or not view.workers:
        return []
    try:
        chosen, why = placement_for(view, facts)
    except (placement.PlacementError, GGUFError) as exc:
        return [Check("placement", FAIL, str(exc), "add a worker, lower the context or the "
                      "slots, or use a smaller quantization")]
    if chosen is None:
        return [Check("placement", SKIP, f"cannot place the layers: {why}")]
    rpc = ",".join(_rpc(view.workers[i]) for i in chosen.order)
    msg = f"--rpc {rpc} --tensor-split {chosen.tensor_split}: {chosen.describe()}"
    if chosen.mode != "speed" and chosen.chosen.ms_token is not None:
        best, _ = placement_for(view, facts, "auto")
        if best is not None and best.chosen.ms_token and \
                chosen.chosen.ms_token >= 1.2 * best.chosen.ms_token:
            return [Check("placement", WARN, msg + f"; speed-aware would predict "
                          f"{best.chosen.ms_token:.1f} ms/token ({best.tensor_split})",
                          "set coordinator_tensor_split: auto")]
    if chosen.mode == "memory" and "no speed measurement" in chosen.reason:
        return [Check("placement", OK, msg, "measure the workers: tightwad doctor --measure "
                      "(loads a few layers onto each idle worker)")]
    return [Check("placement", OK, msg)]


CHECKS: list[Callable[[PoolView, Facts], list[Check]]] = [
    check_inventory, check_models, check_tokenizer, check_versions, check_workers,
    check_memory, check_context, check_placement, check_services, check_units,
    check_proxy_auth, check_exposure,
]


def run_checks(view: PoolView, facts: Facts | None = None,
               extra: Callable[[Facts], None] | None = None) -> list[Check]:
    """Observe (unless ``facts`` is given), let ``extra`` add to the facts (the CLI's SSH
    queries), then run every check."""
    facts = facts if facts is not None else observe(view)
    if extra is not None:
        extra(facts)
    results: list[Check] = []
    for check in CHECKS:
        try:
            results.extend(check(view, facts))
        except Exception as exc:  # a check that crashes is a failed check, not a traceback
            results.append(Check(check.__name__.removeprefix("check_"), FAIL,
                                 f"the check itself failed: {exc!r}", "report this as a bug"))
    return results


def ram_limit_from_env() -> int | None:
    value = os.environ.get(RAM_ENV)
    if not value:
        return None
    try:
        return int(float(value) * MiB)
    except ValueError:
        return None
