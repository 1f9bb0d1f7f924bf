"""The dashboard: ``GET /dashboard`` (``/`` redirects there) serves a page of plain HTML, CSS
and JavaScript shipped as package data (``server/static/``: no build step, no CDN), and
``GET /tightwad/dashboard.json`` is the one picture the page polls.

The page holds no data and is public; it asks for the proxy's token (a form, or ``#token=...``
in the address: a fragment never reaches a server or its log), keeps it in the tab's
``sessionStorage`` and sends it as a bearer header. The JSON needs the token like every route.

The picture (:meth:`Dashboard.picture`) is built from what exists: ``/tightwad/status``
(the engine's status, :class:`~tightwad.engine.telemetry.Telemetry` the one statistics object,
plus its rolling view), health probes of the coordinator and the drafter, and the pool, from
one of two sources:

- a local pool (``TIGHTWAD_POOL_STATE`` names its state file; ``tightwad start --local`` passes
  it): each worker, its devices from its start-up banner, its memory and layers as the
  coordinator's load report (``-lv 4``) and split give them (:func:`pool_view`);
- a deployed pool (config ``dashboard.pool_file``: the description the coordinator role writes
  and the proxy role copies next to the proxy): the workers in ``--rpc`` order, the applied
  ``--tensor-split``, the model's layer count and the deploy-time probe's link measurements
  (:func:`deployed_pool_view`). The workers admit only the coordinator, so their health is the
  coordinator's, and said so.

Either way a link is timed with a TCP handshake to the worker's host on port 22 (a refusal is
an answer too), never on the worker's own port: a worker serves one client at a time with a
backlog of one.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tightwad.decoding.speculation import Line, round_rate
from tightwad.engine.engine import Engine
from tightwad.llamaserver import wire
from tightwad.llamaserver.client import LlamaClient
from tightwad.llamaserver.layers import layer_devices
from tightwad.pool.checks import tcp_rtt

STATIC = Path(__file__).parent / "static"
POOL_STATE_ENV = "TIGHTWAD_POOL_STATE"
"""A local pool's state file (``pool/localpool.py`` writes it): the pool the page draws."""
DESCRIPTION_VERSION = 1
"""The deployed pool's description format (``filter_plugins/tightwad_pool.py`` writes it)."""
DEPLOY_FIX = ("rerun site.yml (`tightwad start -i INVENTORY`, or `ansible-playbook site.yml`): "
              "its coordinator role writes the description and its proxy role copies it here")
ASSETS = {"/dashboard": ("index.html", "text/html"),
          "/dashboard/app.js": ("app.js", "application/javascript"),
          "/dashboard/app.css": ("app.css", "text/css")}
PUBLIC_PATHS = frozenset({"/", *ASSETS})
"""The page and its files: no data in them, so no token (the JSON they poll needs it)."""
LINK_EVERY_S = 15.0
LOG_EVERY_S = 10.0
_LOG_HEAD = 4 << 20  # the load report is near a log's start; -lv 4 logs grow with each request


# -- pure parts -------------------------------------------------------------------------------


def layer_spans(layer_map: Mapping[int, str]) -> dict[str, list[list[int]]]:
    """Each device's layers as ``[first, last]`` runs: ``{0: "CPU", 1: "a", 2: "a"}`` ->
    ``{"CPU": [[0, 0]], "a": [[1, 2]]}``."""
    spans: dict[str, list[list[int]]] = {}
    for layer in sorted(layer_map):
        runs = spans.setdefault(layer_map[layer], [])
        if runs and runs[-1][1] == layer - 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return spans


def _ms_line(value: Any) -> Line | None:
    if not isinstance(value, dict):
        return None
    return Line(value["fixed_ms"] / 1000, value["per_token_ms"] / 1000)


def speculation_view(learned: Mapping[str, Any], rolling: Mapping[str, Any]) -> dict[str, Any]:
    """Speculation now: the proxy's measured tokens/s of one stream with and without a draft,
    their ratio, and the bound the measured acceptance and costs give at the chosen k (one
    stream: the k controller's fitted draft and verify lines, :func:`round_rate`)."""
    spec, alone = rolling.get("speculative_tok_s"), rolling.get("target_only_tok_s")
    k = learned.get("k")
    alpha = (learned.get("alpha") or {}).get("greedy")
    costs = (learned.get("by_streams") or {}).get("1") or {}
    draft, verify = _ms_line(costs.get("draft")), _ms_line(costs.get("verify"))
    bound = bound_alone = None
    if draft is not None and verify is not None and k and alpha is not None:
        rate = round_rate(alpha, k, draft, verify)
        bound = rate if math.isfinite(rate) else None
        bound_alone = 1 / verify(0) if verify(0) > 0 else None
    return {
        "drafting": learned.get("drafting"), "reason": learned.get("reason"), "k": k,
        "alpha": alpha, "predicted_speedup": learned.get("predicted_speedup"),
        "speculative_tok_s": spec, "target_only_tok_s": alone,
        "measured_speedup": spec / alone if spec and alone else None,
        "bound_tok_s": bound, "bound_target_only_tok_s": bound_alone,
        "bound_speedup": bound / bound_alone if bound and bound_alone else None,
        "tokens_per_round": rolling.get("tokens_per_round"),
        "acceptance": rolling.get("acceptance"), "positions": rolling.get("positions", []),
        "k_drafted": rolling.get("k_drafted", {}), "fallbacks": rolling.get("fallbacks", {}),
        "last_fallback": rolling.get("last_fallback"),
    }


def problems(picture: Mapping[str, Any]) -> list[dict[str, str]]:
    """What is wrong with the pool the picture shows, and the fix, as ``tightwad doctor``
    says it (what the proxy can see; doctor checks the rest)."""
    out: list[dict[str, str]] = []
    health = picture["health"]
    status = picture["status"]
    start = picture.get("fix_start") or "tightwad start"
    if not health["coordinator"]["healthy"]:
        out.append({"where": "coordinator", "what": f"the coordinator at "
                    f"{health['coordinator']['url']} does not answer /health; requests get 503",
                    "fix": f"start it ({start}); `tightwad doctor` says why it is down"})
    drafter = health.get("drafter")
    if drafter is not None and not drafter["healthy"]:
        why = (status.get("drafter") or {}).get("last_error") or "no answer to /health"
        out.append({"where": "drafter", "what": f"the drafter at {drafter['url']} is down "
                    f"({why}): rounds run target-only, slower but exact",
                    "fix": f"start the drafter ({start}), or check drafter.url"})
    check = status.get("tokenizer_check")
    if check is not None and not check.get("match"):
        out.append({"where": "drafter", "what": f"the drafter's tokenizer differs from the "
                    f"target's ({check.get('reason')}): speculation is off",
                    "fix": "serve a draft model with the target's tokenizer"})
    target = status.get("target") or {}
    if target.get("ready") and target.get("verify_limit") == 0 and status.get("mode") == "remote":
        out.append({"where": "coordinator", "what": str(target.get("verify")),
                    "fix": "run tightwad's patched llama-server (tightwad start builds it)"})
    pool = picture.get("pool") or {}
    if pool.get("fix"):
        out.append({"where": "pool", "what": pool.get("error") or pool.get("warning") or "",
                    "fix": pool["fix"]})
    for worker in pool.get("workers", []):
        # A deployed worker's health is the coordinator's: its problem is already said.
        if not worker["healthy"] and worker.get("health_from") != "coordinator":
            out.append({"where": worker["name"], "what": f"worker {worker['name']} "
                        f"({worker['endpoint']}) is not running; the coordinator cannot "
                        "compute its layers", "fix": f"restart the pool ({start})"})
    return out


def _split_arg(args: Sequence[str]) -> list[float] | None:
    """``--tensor-split 3,1`` (or ``-ts``) from a llama-server's command line."""
    for flag, value in zip(args, args[1:]):
        if flag in ("--tensor-split", "-ts"):
            try:
                return [float(v) for v in value.split(",")]
            except ValueError:
                return None
    return None


def split_layers(split: Sequence[float], n_layer: int, offloaded: int | None,
                 devices: Sequence[str]) -> dict[str, list[list[int]]]:
    """Each device's layers (``devices`` in the split's order, ``CPU`` for the layers left on
    the coordinator) as llama.cpp assigns them under ``--tensor-split split``
    (:func:`layer_devices`)."""
    assigned = layer_devices(split, n_layer, offloaded)
    return layer_spans({il: "CPU" if d is None else devices[d] for il, d in enumerate(assigned)})


def _link(rtt_s: float | None, via: str, note: str, bandwidth_mbps: float | None = None,
          emulated: str | None = None) -> dict[str, Any]:
    return {"rtt_ms": None if rtt_s is None else round(1000 * rtt_s, 3),
            "bandwidth_mbps": bandwidth_mbps, "emulated": emulated, "via": via, "note": note}


def coordinator_layers(coordinator_log: str, args: Sequence[str]) -> dict[str, list[list[int]]]:
    """Each device's layers (RPC workers by endpoint, ``CPU`` for the coordinator), from the
    coordinator's load report (``-lv 4``: devices, free memory, layer counts) and its
    ``--tensor-split``, as llama.cpp assigns them (:func:`layer_devices`)."""
    devices = wire.parse_load_devices(coordinator_log)
    counts = wire.parse_layer_counts(coordinator_log)
    if not devices or counts is None:
        return {}
    split = _split_arg(args)
    if split is None or len(split) != len(devices):
        split = [float(d.free_mib) for d in devices]  # llama.cpp's default: free memory
    n_layer, offloaded = counts
    return split_layers(split, n_layer, offloaded, [d.where for d in devices])


def pool_view(state: Mapping[str, Any], coordinator_log: str,
              worker_logs: Mapping[str, str], running: Callable[[int], bool],
              links: Mapping[str, float | None]) -> dict[str, Any]:
    """The pool as a local pool's state records it and its logs say: every worker with its
    devices, memory and the layers the coordinator put on it; the coordinator's own share.
    Layer ``n_layers`` is the output layer; the input embeddings stay on the coordinator."""
    services = [s for s in state.get("services", []) if isinstance(s, dict)]
    coordinator = next((s for s in services if s.get("kind") == "coordinator"), {})
    spans = coordinator_layers(coordinator_log, coordinator.get("args") or [])
    memory = wire.parse_memory_breakdown(coordinator_log)
    counts = wire.parse_layer_counts(coordinator_log)
    rpc = [s for s in services if s.get("kind") == "rpc"]
    # An emulated link (``start --local --link wifi``): the coordinator reaches each worker
    # through a relay of its own, in the workers' order, and names the relays.
    relays = [f"{s['host']}:{s['port']}" for s in services if s.get("kind") == "link"]
    emulated = state.get("link")
    workers = []
    for i, svc in enumerate(rpc):
        endpoint = f"{svc['host']}:{svc['port']}"
        seen_as = relays[i] if len(relays) == len(rpc) else endpoint
        rtt = None if emulated else links.get(svc["host"])
        devices = wire.parse_worker_devices(worker_logs.get(svc["name"], ""))
        row = memory.get(seen_as)
        runs = spans.get(seen_as, [])
        workers.append({
            "name": svc["name"], "endpoint": endpoint, "pid": svc.get("pid"),
            "healthy": running(int(svc.get("pid") or 0)),
            "devices": [{"backend": d.name, "description": d.description,
                         "total_mib": d.total_mib, "free_at_start_mib": d.free_mib}
                        for d in devices],
            "devices_note": None if devices else "devices: no start-up banner in its log yet",
            "layers": runs, "n_layers": sum(b - a + 1 for a, b in runs),
            "used_mib": row.used if row else None,
            "memory": row._asdict() if row else None,
            "total_mib": row.total if row else (sum(d.total_mib for d in devices) or None),
            "link": _link(rtt, seen_as, "RTT: TCP handshake to the host; a serving worker "
                          "takes one client, so bandwidth is measured by `tightwad doctor` on "
                          "an idle pool", emulated=emulated),
        })
    endpoints = {w["link"]["via"] for w in workers}
    return {"workers": workers, "n_layers": counts[0] + 1 if counts else 0,
            "coordinator_layers": {d: r for d, r in spans.items() if d not in endpoints},
            "model": state.get("model"), "draft": state.get("draft")}


def _rpc_host(rpc: str) -> str:
    return rpc.rpartition(":")[0].strip("[]")


def description_hosts(description: Any) -> list[str]:
    """The worker addresses of a deployed pool's description, for the link timings."""
    if not isinstance(description, Mapping):
        return []
    rpcs = [str(w["rpc"]) for w in description.get("workers") or []
            if isinstance(w, Mapping) and w.get("rpc")]
    rpcs += [r for r in str(description.get("rpc") or "").split(",") if r]
    return sorted({_rpc_host(r) for r in rpcs})


def deployed_pool_view(description: Any, coordinator_healthy: bool,
                       links: Mapping[str, float | None], served_model: str | None = None,
                       where: str = "the pool's description") -> dict[str, Any]:
    """The pool a deployed proxy can describe, in :func:`pool_view`'s shape: every worker of the
    coordinator's ``--rpc`` in that order, the layers llama.cpp puts on each under the applied
    ``--tensor-split`` (:func:`split_layers`; the model's layer count read from the GGUF at
    deploy time), the link's round trip from ``links`` (host -> seconds) and the bandwidth the
    deploy-time probe measured. ``description`` is what the coordinator role wrote (None: there
    is none, and the picture says how to get one). Health: the workers admit only the
    coordinator, so a worker is as healthy as the coordinator, which serves only while every
    worker answers; each worker says so."""
    if description is None:
        return {"error": f"{where} is missing: the dashboard cannot show the workers",
                "fix": DEPLOY_FIX, "workers": []}
    if not isinstance(description, Mapping) or \
            description.get("version") != DESCRIPTION_VERSION or \
            not isinstance(description.get("workers"), list):
        return {"error": f"{where} is not a tightwad pool description (version "
                         f"{DESCRIPTION_VERSION})", "fix": DEPLOY_FIX, "workers": []}
    by_rpc = {str(w["rpc"]): w for w in description["workers"]
              if isinstance(w, Mapping) and w.get("rpc")}
    # The coordinator's --rpc order: the order of the split's shares.
    rpcs = [r for r in str(description.get("rpc") or "").split(",") if r] or list(by_rpc)
    listed = [by_rpc.get(r, {}) for r in rpcs]
    hosts = [str(w.get("host") or _rpc_host(r)) for w, r in zip(listed, rpcs)]
    measured = {str(m.get("rpc")): m for m in description.get("measurements") or []
                if isinstance(m, Mapping)}
    model = description.get("model") or None
    served = (served_model or "").replace("\\", "/").rsplit("/", 1)[-1] or None
    stale = bool(model and served and model != served)
    n_layer = description.get("n_layer")
    split = _split_arg(["--tensor-split", str(description.get("tensor_split") or "")])
    spans: dict[str, list[list[int]]] = {}
    notes = []
    if stale:
        notes.append(f"The description is for {model}, but the coordinator serves {served} "
                     "(a swap since the last site.yml): layers are not drawn.")
    elif not isinstance(n_layer, int) or n_layer <= 0:
        notes.append("The model's layer count is unknown (the model was not a file on the "
                     "controller at deploy time): layers are not drawn.")
    elif split is None or len(split) != len(rpcs):
        notes.append(f"The applied --tensor-split {description.get('tensor_split')!r} does not "
                     f"give one share per worker ({len(rpcs)}): layers are not drawn.")
    else:
        gpu_layers = description.get("gpu_layers")
        offloaded = gpu_layers if isinstance(gpu_layers, int) and gpu_layers >= 0 else None
        spans = split_layers(split, n_layer, offloaded, rpcs)
    drawn = bool(spans)
    # The coordinator loads only with every worker answering and stops when one fails it.
    health_note = "health: the coordinator's (it serves only with all its workers; the proxy " \
                  "cannot reach them)"
    probed = description.get("split") == "auto"
    workers = []
    for entry, rpc, host in zip(listed, rpcs, hosts):
        instance = str(entry.get("instance") or "")
        name = host if hosts.count(host) == 1 or not instance else f"{host}/{instance}"
        runs = spans.get(rpc, [])
        m = measured.get(rpc) or {}
        bps = m.get("bandwidth_bps")
        if isinstance(bps, (int, float)) and bps > 0:
            bandwidth: float | None = round(bps * 8 / 1e6, 1)
            measured_note = "bandwidth: measured at deploy time (tightwad.pool.probe)"
        else:
            bandwidth = None
            why = (str(m["skipped"]) if m.get("skipped") else "no probe result" if probed
                   else "the deploy-time probe runs with coordinator_tensor_split: auto only")
            measured_note = f"bandwidth: not measured ({why})"
        device = str(entry.get("device") or "")
        free = entry.get("free_mib")
        workers.append({
            "name": name, "endpoint": rpc, "host": host, "instance": instance or None,
            "pid": None, "healthy": bool(coordinator_healthy), "health_from": "coordinator",
            "health_note": health_note,
            "devices": [],
            "devices_note": "devices: not visible from the proxy; it serves "
                            + (f"--device {device}" if device else "all of its host's")
                            + (f", {free} MiB free at deploy time" if isinstance(free, int)
                               else ""),
            "layers": runs, "n_layers": sum(b - a + 1 for a, b in runs),
            "used_mib": None, "memory": None, "total_mib": None,
            "link": _link(links.get(_rpc_host(rpc)), rpc, "RTT: TCP handshake from the proxy's "
                          "host (port 22); " + measured_note, bandwidth),
        })
    view: dict[str, Any] = {
        "kind": "deployed", "workers": workers,
        "n_layers": n_layer + 1 if drawn and isinstance(n_layer, int) else 0,
        "coordinator_layers": {d: r for d, r in spans.items() if d not in set(rpcs)},
        "model": model, "draft": description.get("draft") or None,
        "tensor_split": description.get("tensor_split"),
        "placement": description.get("placement"),
        "note": " ".join(notes) or None}
    if stale:
        view["warning"] = notes[0]
        view["fix"] = DEPLOY_FIX
    return view


# -- I/O --------------------------------------------------------------------------------------


def _read_head(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read(_LOG_HEAD).decode("utf-8", "replace")
    except OSError:
        return ""


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_description(path: Path) -> Any:
    """The deployed pool's description, None when there is none (OSError, ValueError when it
    cannot be read)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


@dataclass
class Dashboard:
    """The picture's sources and caches: health clients, the pool's logs, link timings."""

    engine: Engine
    pool_state: Path | None = None
    fix_start: str = "tightwad start"
    pool_file: Path | None = None
    """A deployed pool's description (config ``dashboard.pool_file``); a local pool's state
    (``pool_state``) wins."""
    _clients: dict[str, LlamaClient] = field(default_factory=dict)
    _logs: tuple[float, str, dict[str, str]] = (0.0, "", {})
    _links: tuple[float, dict[str, float | None]] = (0.0, {})

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def _healthy(self, name: str, url: str) -> bool:
        client = self._clients.get(name)
        if client is None or client.base_url != url.rstrip("/"):
            client = self._clients[name] = LlamaClient(url, name=name, timeout_s=2.0)
        return await client.health(timeout_s=1.0)

    async def _timed(self, now: float, hosts: list[str]) -> dict[str, float | None]:
        """Each host's TCP round trip (port 22), timed at most every :data:`LINK_EVERY_S`."""
        if now - self._links[0] >= LINK_EVERY_S or set(hosts) - set(self._links[1]):
            timed = await asyncio.gather(*(asyncio.to_thread(tcp_rtt, h, 22) for h in hosts))
            self._links = (now, dict(zip(hosts, timed)))
        return self._links[1]

    async def _pool(self, now: float, coordinator_healthy: bool,
                    served_model: str | None) -> dict[str, Any] | None:
        if self.pool_state is None:
            if self.pool_file is None:
                return None
            try:
                description = await asyncio.to_thread(_read_description, self.pool_file)
            except (OSError, ValueError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not JSON"
                return {"error": f"the pool's description {self.pool_file} is unreadable "
                                 f"({why})", "fix": DEPLOY_FIX, "workers": []}
            links = await self._timed(now, description_hosts(description))
            return deployed_pool_view(description, coordinator_healthy, links, served_model,
                                      where=f"the pool's description {self.pool_file}")
        try:
            state = json.loads(self.pool_state.read_text())
        except (OSError, ValueError):
            return {"error": f"the pool's state file {self.pool_state} is unreadable",
                    "workers": []}
        services = [s for s in state.get("services", []) if isinstance(s, dict)]
        if now - self._logs[0] >= LOG_EVERY_S or not self._logs[1]:
            coordinator = next((s for s in services if s.get("kind") == "coordinator"), {})
            self._logs = (now, await asyncio.to_thread(_read_head, coordinator.get("log", "")),
                          {s["name"]: await asyncio.to_thread(_read_head, s.get("log", ""))
                           for s in services if s.get("kind") == "rpc"})
        hosts = sorted({s["host"] for s in services if s.get("kind") == "rpc"})
        if state.get("link"):  # emulated: a handshake on this host would say nothing
            hosts = []
        links = await self._timed(now, hosts)
        return pool_view(state, self._logs[1], self._logs[2], _running, links)

    async def picture(self, status: dict[str, Any]) -> dict[str, Any]:
        """The dashboard's JSON: ``/tightwad/status`` (as ``status``), health, speculation
        now, load, the series, the pool and what is wrong with it."""
        now = time.time()
        engine = self.engine
        config = engine.config
        target_ok = await engine.healthy()
        drafter = None
        if config.speculation.mode == "remote":
            drafter = {"url": config.drafter.url,
                       "healthy": await self._healthy("drafter", config.drafter.url)}
        rolling = engine.telemetry.dashboard(now)
        slots = engine.servers.target_slots
        # The proxy's own leases: which coordinator slots its requests hold now.
        free = set(getattr(slots, "_free", ())) if slots else set()
        picture: dict[str, Any] = {
            "time": now, "status": status, "fix_start": self.fix_start,
            "health": {"proxy": {"healthy": True},
                       "coordinator": {"url": config.target.url, "healthy": target_ok},
                       "drafter": drafter},
            "speculation": speculation_view(status.get("speculation") or {}, rolling),
            "load": {"running": engine.telemetry.in_flight,
                     "queued": slots.waiting if slots else 0,
                     "slots": [{"id": i, "busy": i not in free}
                               for i in range(slots.size)] if slots else [],
                     "requests": rolling["requests"]},
            "throughput": {"tok_s": rolling["tok_s"], "window_s": rolling["window_s"]},
            "series": rolling["series"],
            "pool": await self._pool(now, target_ok,
                                     (status.get("target") or {}).get("model")),
        }
        picture["problems"] = problems(picture)
        return picture


DASHBOARD = web.AppKey("dashboard", Dashboard)


async def _redirect(_: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/dashboard")


async def _asset(request: web.Request) -> web.StreamResponse:
    name, kind = ASSETS[request.path]
    return web.FileResponse(STATIC / name, headers={
        "Content-Type": f"{kind}; charset=utf-8", "Cache-Control": "no-cache",
        # Everything the page needs is on this origin; the token never leaves it.
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
        "Referrer-Policy": "no-referrer"})


def add_routes(app: web.Application, engine: Engine,
               status: Callable[[web.Request], dict[str, Any]]) -> None:
    """The page, its files and its JSON; ``status`` builds ``/tightwad/status``'s body. The
    pool comes from ``TIGHTWAD_POOL_STATE`` (a local pool) or the config's
    ``dashboard.pool_file`` (a deployed one)."""
    path = os.environ.get(POOL_STATE_ENV)
    described = engine.config.dashboard.pool_file
    app[DASHBOARD] = Dashboard(engine, Path(path) if path else None,
                               pool_file=Path(described) if described else None)

    async def data(request: web.Request) -> web.Response:
        return web.json_response(await request.app[DASHBOARD].picture(status(request)))

    async def close(_: web.Application) -> None:
        await app[DASHBOARD].close()

    app.on_cleanup.append(close)
    app.router.add_get("/", _redirect)
    for route in ASSETS:
        app.router.add_get(route, _asset)
    app.router.add_get("/tightwad/dashboard.json", data)
