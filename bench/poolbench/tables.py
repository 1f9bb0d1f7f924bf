"""Pure: the markdown tables of a run's result, and the number formats they share."""

from __future__ import annotations

from typing import Any

from tightwad_dev import benchmath as bm

from .settings import ADAPTIVE, LABELS, NATIVE_DEFAULT


def fmt(x: float | None, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def fmt_spread(s: dict[str, float] | None, spec: str = ".1f") -> str:
    if not s:
        return "-"
    return f"{s['median']:{spec}} ({s['p25']:{spec}}-{s['p75']:{spec}})"


def fmt_bytes(n: float) -> str:
    return f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n:.0f} B"


def config_table(result: dict[str, Any]) -> str:
    head = ("| Config | k | tok/s median (IQR) | vs (b) | TTFT ms | accepted/drafted | "
            "tokens/round (E(a,k)) | RPC round trips/token | RPC bytes/token | draft-link "
            "round trips/token | predicted S | efficiency | output = (a) |")
    rows = [head, "|" + "---|" * 13]
    a = result["bound"]["a"]
    for r in result["summary"]["rows"]:
        if r["streams"] != 1:
            continue
        k = r["k"] if r["k"] != NATIVE_DEFAULT else f"default ({r.get('k_used', '?')})"
        if r["k"] == ADAPTIVE and r.get("k_used"):
            k = f"adaptive (mean {r['k_used']})"
        same = result["outputs"].get(f"{r['config']}/{r['k']}", {}).get("verdict", "-")
        k_fixed = int(r["k"]) if r["k"].isdigit() else (
            r.get("k_used") if r["k"] == NATIVE_DEFAULT else None)
        per_round = fmt(r["tokens_per_round"])
        if k_fixed and r["tokens_per_round"] is not None:
            per_round += f" ({bm.expected_tokens(a, k_fixed):.2f})"
        rows.append(
            f"| ({r['config']}) {LABELS[r['config']]} | {k} | {fmt_spread(r['tok_s'])} | "
            f"{fmt(r.get('vs_b'))}x | {fmt_spread(r['ttft_ms'], '.0f')} | "
            f"{fmt(r['acceptance'])} | {per_round} | "
            f"{r['rpc_round_trips_per_token']:.2f} | {fmt_bytes(r['rpc_bytes_per_token'])} | "
            f"{r['draft_link_round_trips_per_token']:.2f} | "
            f"{fmt(r.get('predicted_speedup'))} | {fmt(r.get('efficiency'))} | {same} |")
    return "\n".join(rows)


def concurrency_table(result: dict[str, Any]) -> str:
    rows = ["| Config | streams | aggregate tok/s median (IQR) | vs (a) at the same streams | "
            "accepted/drafted |", "|---|---|---|---|---|"]
    picked = []
    for r in result["summary"]["rows"]:
        if r["config"] not in result["concurrency_configs"]:
            continue
        if r["k"] not in ("-", ADAPTIVE, NATIVE_DEFAULT):
            continue
        picked.append(r)
    for r in sorted(picked, key=lambda r: (r["config"], r["streams"])):
        own = next((x for x in result["summary"]["rows"] if x["config"] == "a"
                    and x["streams"] == r["streams"]), None)
        vs = bm.ratio(r["tok_s"]["median"], own["tok_s"]["median"] if own else None)
        k = "" if r["k"] == "-" else f", k {r['k']}"
        rows.append(f"| ({r['config']}) {LABELS[r['config']]}{k} | {r['streams']} | "
                    f"{fmt_spread(r['tok_s'])} | {fmt(vs)}x | {fmt(r['acceptance'])} |")
    return "\n".join(rows)


def repeat_table(runs: list[dict[str, Any]]) -> str:
    """Headline numbers of several runs of this benchmark side by side."""
    rows = ["| Run | command | load avg start / end | (a) tok/s | (b) tok/s | (c) best k: x(b) | "
            "(c2) best k: x(b) | (d) best k: x(b), efficiency | (d) adaptive: x(b) | "
            "(e): x(b) | (d) adaptive / (c) best | (d) best / (c) best | (d) adaptive / (c2) "
            "best | (d) adaptive / (e) |", "|" + "---|" * 14]
    for i, run in enumerate(runs, 1):
        h, m = run["headline"], run["machine"]

        def vs(name: str, h: dict = h) -> str:
            x = h.get(name)
            return f"k={x['k']}: {fmt(x['vs_b'])}x" if x else "-"

        d_best = h.get("d_best") or {}
        rows.append(
            f"| {i} | `{run['command'].split('pool_bench.py ', 1)[-1]}` | "
            f"{m['loadavg_start'][0]:.1f} / {m['loadavg_end'][0]:.1f} | "
            f"{h['a']['tok_s']:.1f} | {h['b']['tok_s']:.1f} | {vs('c_best')} | {vs('c2_best')} | "
            f"k={d_best.get('k')}: {fmt(d_best.get('vs_b'))}x, {fmt(d_best.get('efficiency'))} | "
            f"{fmt((h.get('d_adaptive') or {}).get('vs_b'))}x | "
            f"{fmt((h.get('e') or {}).get('vs_b'))}x | {fmt(h.get('d_adaptive_vs_c'))}x | "
            f"{fmt(h.get('d_best_vs_c'))}x | {fmt(h.get('d_adaptive_vs_c2'))}x | "
            f"{fmt(h.get('d_adaptive_vs_e'))}x |")
    return "\n".join(rows)
