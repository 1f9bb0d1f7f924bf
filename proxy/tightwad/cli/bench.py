"""``tightwad bench``: the same prompts through the proxy and straight to the target.

Every number comes from the servers: completion tokens from each response's ``usage``, time to
first token from the first streamed chunk that carries text, acceptance and tokens per round
from the proxy's own statistics (``/tightwad/status``, the difference over the run).

A result means little without what it ran on: when ``--url`` is the local pool's proxy, the
bench also reports the pool's link (emulated, with its profile, or direct loopback) and its
model pair (files, layers x width, and the draft's cost per token relative to the pooled
target's, measured after the run); for any other proxy it says it does not know them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tightwad import defaults
from tightwad.cli.common import CliError, console, dump_json, err_console
from tightwad.llamaserver import blocking, wire
from tightwad.llamaserver.wire import UpstreamError, UpstreamFailure
from tightwad.pool import localpool
from tightwad.pool.gguf_info import GGUFError, read_info

PROMPTS = [
    "Explain in plain words why a pile of old graphics cards can serve one large model.",
    "Write a short story about a junk drawer that learns to count.",
    "List the steps to replace a bicycle chain.",
    "def fibonacci(n):",
    "The three most important facts about the Moon are",
    "Translate to French: the network is slow but the answer is correct.",
]


@dataclass
class Run:
    tokens: int
    seconds: float
    ttft: float | None


@dataclass
class Side:
    url: str
    runs: list[Run] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        tokens = sum(r.tokens for r in self.runs)
        seconds = sum(r.seconds for r in self.runs)
        ttfts = [r.ttft for r in self.runs if r.ttft is not None]
        return {"url": self.url, "requests": len(self.runs), "completion_tokens": tokens,
                "seconds": round(seconds, 4),
                "tokens_per_second": round(tokens / seconds, 3) if seconds else None,
                "ttft_ms_median": round(1000 * statistics.median(ttfts), 2) if ttfts else None,
                "runs": [asdict(r) for r in self.runs]}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="A/B: through the proxy vs the target alone",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=f"http://127.0.0.1:{defaults.PROXY_PORT}", help="the proxy")
    p.add_argument("--target-url", help="the coordinator (default: what the proxy reports, "
                   f"else http://127.0.0.1:{defaults.COORDINATOR_PORT})")
    p.add_argument("--prompts", type=int, default=4, help=f"how many of the {len(PROMPTS)} "
                   "built-in prompts (default: 4)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--token", default=os.environ.get("TIGHTWAD_TOKEN"),
                   help="the proxy's bearer token (default: $TIGHTWAD_TOKEN)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--state-dir", type=Path, help="the local pool's state, to report its link "
                   "and models (default: ~/.cache/tightwad/local, or $TIGHTWAD_STATE_DIR)")
    p.set_defaults(func=run)


UNKNOWN = "unknown (not a local pool)"
COST_TOKENS = 32  # tokens per cost probe: enough for a stable ms/token, cheap next to the bench


def local_pool_of(url: str, state_dir: Path | None) -> localpool.LocalState | None:
    """The local pool's state when ``url`` is its proxy, else None."""
    try:
        state = localpool.load_state(localpool.state_dir(state_dir))
    except localpool.LocalPoolError:
        return None
    proxy = state.one("proxy") if state is not None else None
    if proxy is None:
        return None
    parts = urlsplit(url)
    loopback = {"127.0.0.1", "localhost", "::1", proxy.host}
    return state if parts.hostname in loopback and parts.port == proxy.port else None


def model_facts(path: str | None) -> dict[str, Any] | None:
    """A model file's name and shape (layers x width), read from its GGUF header."""
    if path is None:
        return None
    facts: dict[str, Any] = {"file": Path(path).name, "layers": None, "width": None}
    try:
        info = read_info(path)
        facts["layers"] = info.arch_value("block_count")
        facts["width"] = info.arch_value("embedding_length")
    except (GGUFError, OSError):
        pass
    return facts


def _ms_per_token(url: str, prompt: str, timeout: float) -> float | None:
    """Decode cost per token of one llama-server, from its own timings."""
    try:
        answer = wire.parse_completion(blocking.post_json(
            f"{url}/completion", {"prompt": prompt, "n_predict": COST_TOKENS, "temperature": 0,
                                  "seed": 1}, timeout=timeout))
    except UpstreamFailure:
        return None
    t = answer.timings
    return t.predicted_ms / t.predicted_n if t.predicted_n else None


def pool_facts(state: localpool.LocalState | None, timeout: float) -> tuple[dict, dict]:
    """(link, pair) of the local pool ``state``, or "unknown" for another proxy. The cost ratio
    is measured here: the drafter's ms per token over the pooled target's (through its links)."""
    if state is None:
        return ({"profile": None, "emulated": None, "label": UNKNOWN},
                {"target": None, "draft": None, "label": UNKNOWN, "cost_ratio": None})
    link = {"profile": state.link, "emulated": state.link is not None,
            "label": localpool.link_label(state.link)}
    target, draft = model_facts(state.model), model_facts(state.draft)
    pair: dict[str, Any] = {"target": target, "draft": draft, "cost_ratio": None,
                            "draft_ms_per_token": None, "target_ms_per_token": None}
    coordinator, drafter = state.one("coordinator"), state.one("drafter")
    if coordinator is not None and drafter is not None and localpool.alive(drafter):
        pair["target_ms_per_token"] = _ms_per_token(coordinator.url, PROMPTS[0], timeout)
        pair["draft_ms_per_token"] = _ms_per_token(drafter.url, PROMPTS[0], timeout)
        if pair["target_ms_per_token"] and pair["draft_ms_per_token"]:
            pair["cost_ratio"] = round(pair["draft_ms_per_token"] / pair["target_ms_per_token"],
                                       3)
    pair["label"] = pair_label(pair)
    return link, pair


def pair_label(pair: dict[str, Any]) -> str:
    def one(m: dict[str, Any] | None) -> str:
        if m is None:
            return "none"
        shape = f"{m['layers']} layers x {m['width']}" if m["layers"] else "shape unknown"
        return f"{m['file']} ({shape})"

    text = f"target {one(pair['target'])}, draft {one(pair['draft'])}"
    if pair["cost_ratio"] is not None:
        text += (f"; draft/target cost per token {pair['cost_ratio']:.2f} "
                 f"({pair['draft_ms_per_token']:.1f} ms vs {pair['target_ms_per_token']:.1f} ms "
                 "pooled)")
    return text


def _stream(url: str, body: dict[str, Any], token: str | None, timeout: float) -> Run:
    """One streamed completion: (completion tokens from usage, wall time, TTFT)."""
    started = time.monotonic()
    ttft = None
    usage = None
    try:
        for chunk in blocking.events(f"{url}/v1/completions", body, timeout=timeout,
                                     token=token):
            if "error" in chunk:
                raise CliError(f"{url}: {chunk['error'].get('message', chunk['error'])}")
            if ttft is None and any(c.get("text") for c in chunk.get("choices") or []):
                ttft = time.monotonic() - started
            if chunk.get("usage"):
                usage = chunk["usage"]
    except UpstreamError as exc:
        raise CliError(f"{url} answered HTTP {exc.status}: {exc.message}") from None
    except UpstreamFailure as exc:
        raise CliError(f"{url}: {exc.detail}") from None
    seconds = time.monotonic() - started
    if not usage or "completion_tokens" not in usage:
        raise CliError(f"{url} sent no usage with its stream; cannot count tokens")
    return Run(int(usage["completion_tokens"]), seconds, ttft)


def _proxy_stats(url: str, token: str | None) -> dict[str, Any]:
    answer = blocking.probe(f"{url}/tightwad/status", timeout=10, token=token)
    code, body = answer.status, answer.body
    if code != 200 or not isinstance(body, dict):
        raise CliError(f"{url} is not a Tightwad proxy (/tightwad/status answered {code}); "
                       "pass the proxy as --url")
    return body


def run(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    before = _proxy_stats(url, args.token)
    target_url = (args.target_url or (before.get("target") or {}).get("url")
                  or f"http://127.0.0.1:{defaults.COORDINATOR_PORT}").rstrip("/")
    code = blocking.probe(f"{target_url}/health", timeout=10).status
    if code != 200:
        raise CliError(f"the target {target_url} is not healthy (HTTP {code or 'no answer'}); "
                       "pass --target-url")
    prompts = PROMPTS[:max(1, min(args.prompts, len(PROMPTS)))]

    def body(prompt: str) -> dict[str, Any]:
        return {"prompt": prompt, "max_tokens": args.max_tokens,
                "temperature": args.temperature, "seed": 1, "stream": True,
                "stream_options": {"include_usage": True}}

    proxy, target = Side(url), Side(target_url)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err_console, transient=args.json)
    with progress:
        task = progress.add_task("warm-up", total=2 + 2 * len(prompts))
        # One untimed request each: first-request costs (graph build, caches) are not speed.
        _stream(target_url, body("warm up"), None, args.timeout)
        progress.advance(task)
        _stream(url, body("warm up"), args.token, args.timeout)
        progress.advance(task)
        mid = _proxy_stats(url, args.token).get("stats") or {}
        progress.update(task, description="through the proxy")
        for prompt in prompts:
            proxy.runs.append(_stream(url, body(prompt), args.token, args.timeout))
            progress.advance(task)
        after = _proxy_stats(url, args.token).get("stats") or {}
        progress.update(task, description="target alone")
        for prompt in prompts:
            target.runs.append(_stream(target_url, body(prompt), None, args.timeout))
            progress.advance(task)

    def delta(key: str) -> float:
        return float(after.get(key) or 0) - float(mid.get(key) or 0)

    link, pair = pool_facts(local_pool_of(url, args.state_dir), args.timeout)
    drafted, accepted, rounds, spec_tokens = (delta("drafted"), delta("accepted"),
                                              delta("rounds"), delta("tokens"))
    p_sum, t_sum = proxy.summary(), target.summary()
    speedup = (p_sum["tokens_per_second"] / t_sum["tokens_per_second"]
               if p_sum["tokens_per_second"] and t_sum["tokens_per_second"] else None)
    result = {
        "prompts": len(prompts), "max_tokens": args.max_tokens,
        "temperature": args.temperature, "mode": before.get("mode"),
        "speculation_active": before.get("speculation_active"),
        "proxy": p_sum, "target": t_sum,
        "speculation": {
            "rounds": int(rounds), "drafted": int(drafted), "accepted": int(accepted),
            "tokens": int(spec_tokens),
            "acceptance": round(accepted / drafted, 4) if drafted else None,
            "tokens_per_round": round(spec_tokens / rounds, 4) if rounds else None,
        },
        "speedup": round(speedup, 4) if speedup else None,
        "link": link, "pair": pair,
    }
    if args.json:
        dump_json(result)
        return 0
    table = Table(title=f"tightwad bench: {len(prompts)} prompts x {args.max_tokens} tokens, "
                  f"temperature {args.temperature:g}")
    for col in ("", "tokens", "tok/s", "TTFT (median)"):
        table.add_column(col)
    for name, s in (("proxy", p_sum), ("target alone", t_sum)):
        table.add_row(f"{name} ({s['url']})", str(s["completion_tokens"]),
                      f"{s['tokens_per_second'] or 0:.1f}",
                      f"{s['ttft_ms_median']:.0f} ms" if s["ttft_ms_median"] else "-")
    console.print(table)
    console.print(f"link:   {link['label']}")
    console.print(f"models: {pair['label']}")
    spec = result["speculation"]
    acc = spec["acceptance"]
    tpr = spec["tokens_per_round"]
    console.print(f"speculation ({result['mode']}): acceptance "
                  f"{'-' if acc is None else f'{acc:.2f}'} (accepted/drafted), "
                  f"{'-' if tpr is None else f'{tpr:.2f}'} tokens per round over "
                  f"{spec['rounds']} rounds")
    console.print(f"speedup: [bold]{'-' if speedup is None else f'{speedup:.2f}x'}[/] "
                  "(proxy tok/s / target tok/s)")
    return 0
