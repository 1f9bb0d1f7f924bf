"""``tightwad bench``: the same prompts through the proxy and straight to the target.

Every number comes from the servers: completion tokens from each response's ``usage``, time to
first token from the first streamed chunk that carries text, acceptance and tokens per round
from the proxy's own statistics (``/tightwad/status``, the difference over the run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tightwad import defaults
from tightwad.cli.common import CliError, console, dump_json, err_console
from tightwad.llamaserver import blocking
from tightwad.llamaserver.wire import UpstreamError, UpstreamFailure

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
    p.set_defaults(func=run)


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
