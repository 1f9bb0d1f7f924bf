"""``tightwad status --watch``: the dashboard's picture in the terminal, redrawn in place
(rich's live view) from the proxy's ``/tightwad/dashboard.json``, until Ctrl-C (exit 0)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tightwad.cli.common import console
from tightwad.llamaserver import blocking

_BLOCKS = " ▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], top: float | None = None) -> str:
    """One character per value, its height the value over ``top`` (default: the largest);
    a space where there is no value."""
    known = [v for v in values if v is not None]
    high = top if top is not None else max(known, default=0.0)
    if high <= 0:
        return "".join(" " if v is None else _BLOCKS[1] for v in values)
    return "".join(" " if v is None else _BLOCKS[max(1, min(8, round(8 * v / high)))]
                   for v in values)


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _runs(runs: Sequence[Sequence[int]]) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _depth(runs: Sequence[Sequence[int]], total: int, width: int = 24) -> str:
    cells = ["·"] * width
    for first, last in runs:
        for i in range(first * width // total, min(width, (last + 1) * width // total + 1)):
            cells[i] = "█"
    return "".join(cells)


def render(picture: dict[str, Any] | None, error: str | None, where: str,
           doctor: Sequence[dict[str, str]] = ()) -> RenderableType:
    """The picture as rich renderables, with ``doctor``'s findings (failed and warned checks)
    under it (pure: the unit tests call it)."""
    findings = [Text(f"doctor: {c['status']} {c['name']}: {c['message']}"
                     + (f"\n  fix: {c['fix']}" if c.get("fix") else ""),
                     style="red" if c["status"] == "fail" else "yellow") for c in doctor]
    if picture is None:
        return Group(Text(f"tightwad status --watch: {where}: {error}", style="red"), *findings)
    parts: list[RenderableType] = []
    status, health = picture["status"], picture["health"]
    model = ((status.get("target") or {}).get("model") or "").rsplit("/", 1)[-1]
    title = f"tightwad: {where}  {model}"
    services = Table(title=title, title_justify="left")
    for col in ("service", "health", "detail"):
        services.add_column(col)

    def row(name: str, healthy: bool, detail: str) -> None:
        color = "green" if healthy else "red"
        services.add_row(name, f"[{color}]{'ok' if healthy else 'down'}[/]", detail)

    row("proxy", True, f"mode {status.get('mode')}, speculation "
        f"{'active' if status.get('speculation_active') else 'inactive'}")
    row("coordinator", health["coordinator"]["healthy"], health["coordinator"]["url"])
    if health.get("drafter"):
        last = (status.get("drafter") or {}).get("last_error")
        row("drafter", health["drafter"]["healthy"],
            health["drafter"]["url"] + (f" ({last})" if last else ""))
    pool = picture.get("pool")
    if pool and pool.get("workers"):
        total = max(1, pool["n_layers"])
        for w in pool["workers"]:
            devices = ", ".join(f"{d['backend']} {d['total_mib']} MiB" for d in w["devices"])
            rtt, emulated = w["link"]["rtt_ms"], w["link"].get("emulated")
            link = (f"link emulated ({emulated})" if emulated
                    else f"RTT {'-' if rtt is None else f'{rtt:.2f} ms'}")
            row(w["name"], w["healthy"],
                f"{w['endpoint']} {devices}; used {_num(w['used_mib'])} MiB; layers "
                f"{_runs(w['layers'])} {_depth(w['layers'], total)}; {link}")
        for device, runs in (pool.get("coordinator_layers") or {}).items():
            row(f"coordinator {device}", health["coordinator"]["healthy"],
                f"layers {_runs(runs)} {_depth(runs, total)}")
    parts.append(services)
    sp = picture["speculation"]
    falls = ", ".join(f"{r} {n}" for r, n in sp["fallbacks"].items()) or "none"
    last = sp.get("last_fallback")
    spec = Table(title="speculation now", title_justify="left", show_header=False)
    spec.add_column()
    spec.add_column()
    spec.add_row("tok/s per stream", f"{_num(sp['speculative_tok_s'])} with a draft, "
                 f"{_num(sp['target_only_tok_s'])} target alone (x"
                 f"{_num(sp['measured_speedup'], 2)}); bound {_num(sp['bound_tok_s'])} (x"
                 f"{_num(sp['bound_speedup'], 2)})")
    spec.add_row("acceptance", f"{_num(sp['acceptance'], 2)}; per position "
                 + " ".join(_num(p["acceptance"], 2) for p in sp["positions"]))
    spec.add_row("k, tokens/round", f"k {sp['k'] if sp['k'] is not None else '-'}, "
                 f"{_num(sp['tokens_per_round'], 2)} tokens/round; "
                 f"{'drafting' if sp['drafting'] else 'not drafting'}: {sp['reason']}")
    spec.add_row("fallbacks", falls + (f" (last: {last['reason']})" if last else ""))
    series = picture["series"]
    spec.add_row("tok/s, 5 min", sparkline([p["tok_s"] for p in series])
                 + f" {_num(picture['throughput']['tok_s'])} now")
    spec.add_row("acceptance", sparkline([p["acceptance"] for p in series], 1.0))
    parts.append(spec)
    load = picture["load"]
    slots = "".join("■" if s["busy"] else "□" for s in load["slots"])
    parts.append(Text(f"load: {load['running']} running, {load['queued']} queued, slots "
                      f"{slots}; last requests: " + ", ".join(
                          f"{r['tokens']} tok in {r['latency_s']:.2f} s"
                          for r in load["requests"][:4])))
    for p in picture["problems"]:
        parts.append(Text(f"✗ {p['where']}: {p['what']}\n  fix: {p['fix']}", style="red"))
    return Group(*parts, *findings)


def fetch(proxy_url: str, token: str | None) -> tuple[dict[str, Any] | None, str | None]:
    answer = blocking.probe(f"{proxy_url}/tightwad/dashboard.json", timeout=5, token=token)
    if answer.status == 200 and isinstance(answer.body, dict):
        return answer.body, None
    if answer.status == 0:
        return None, f"the proxy at {proxy_url} does not answer ({answer.body})"
    return None, f"the proxy answered {answer.status}" + (
        " (its token: the inventory's proxy_token)" if answer.status == 401 else "")


class _Doctor:
    """``tightwad doctor``'s checks, run in the background every ``every_s`` (they probe
    services and read the model files: too slow for every frame)."""

    def __init__(self, run: Callable[[], list[dict[str, str]]], every_s: float) -> None:
        self.findings: list[dict[str, str]] = []
        self._run, self._every = run, every_s
        threading.Thread(target=self._loop, name="tightwad-watch-doctor", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                self.findings = [c for c in self._run() if c["status"] in ("fail", "warn")]
            except Exception as exc:  # shown, never a traceback
                self.findings = [{"status": "warn", "name": "doctor",
                                  "message": f"the checks failed: {exc}", "fix": ""}]
            time.sleep(self._every)


def watch(proxy_url: str, token: str | None, where: str, interval: float = 1.0,
          get: Callable[[str, str | None], tuple[dict[str, Any] | None, str | None]] = fetch,
          doctor: Callable[[], list[dict[str, str]]] | None = None,
          doctor_every_s: float = 30.0) -> int:
    """Redraw every ``interval`` s until Ctrl-C, which ends it with exit code 0; with
    ``doctor`` (the checks as dicts), its failures and warnings too."""
    checks = _Doctor(doctor, doctor_every_s) if doctor is not None else None
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                picture, error = get(proxy_url, token)
                live.update(render(picture, error, where,
                                   checks.findings if checks else ()), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        if not console.is_terminal:
            console.line()  # the last frame ends without one
        console.print("stopped watching")
        return 0
