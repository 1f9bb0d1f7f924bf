"""Pure: the markdown tables of a run's result, and the number formats they share."""

from __future__ import annotations

from typing import Any

from tightwad_dev import benchmath as bm

from .settings import ADAPTIVE, LABELS, NATIVE_DEFAULT


def fmt(x: float | None, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def fmt_spread(s: dict[str, float] | None, spec: str = ".1f") -> str:
    """Median and interquartile range."""
    if not s:
        return "-"
    return f"{s['median']:{spec}} ({s['p25']:{spec}}-{s['p75']:{spec}})"


def fmt_ci(s: dict[str, float] | None, spec: str = ".1f") -> str:
    """Median and its bootstrap 95% confidence interval."""
    if not s:
        return "-"
    return f"{s['median']:{spec}} [{s['ci_lo']:{spec}}, {s['ci_hi']:{spec}}]"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n:.0f} B"


def k_label(r: dict[str, Any]) -> str:
    if r["k"] == NATIVE_DEFAULT:
        return f"default ({r.get('k_used', '?')})"
    if r["k"] == ADAPTIVE and r.get("k_used"):
        return f"adaptive (mean {r['k_used']})"
    return r["k"]


def config_table(result: dict[str, Any]) -> str:
    head = ("| Config | k | tok/s median [95% CI] | ms/token median [95% CI] | vs (b) | TTFT ms | "
            "accepted/drafted | tokens/round (E(a,k)) | RPC round trips/token | RPC bytes/token | "
            "draft-link round trips/token | Leviathan S, efficiency | component S, efficiency | "
            "output = (a) |")
    rows = [head, "|" + "---|" * 14]
    a = result["bound"]["alpha"]
    for r in result["summary"]["rows"]:
        if r["streams"] != 1:
            continue
        same = result["outputs"].get(f"{r['config']}/{r['k']}", {}).get("verdict", "-")
        k_fixed = int(r["k"]) if r["k"].isdigit() else (
            r.get("k_used") if r["k"] == NATIVE_DEFAULT else None)
        per_round = fmt(r["tokens_per_round"])
        if k_fixed and r["tokens_per_round"] is not None:
            per_round += f" ({bm.expected_tokens(a, k_fixed):.2f})"
        leviathan = (f"{fmt(r.get('predicted_speedup'))}x, {fmt(r.get('efficiency'))}"
                     if r.get("predicted_speedup") else "-")
        component = (f"{fmt(r.get('component_speedup'))}x, {fmt(r.get('component_efficiency'))}"
                     if r.get("component_speedup") else "-")
        rows.append(
            f"| ({r['config']}) {LABELS[r['config']]} | {k_label(r)} | {fmt_ci(r['tok_s'])} | "
            f"{fmt_ci(r['ms_per_token'])} | {fmt(r.get('vs_b'))}x | "
            f"{fmt_spread(r['ttft_ms'], '.0f')} | {fmt(r['acceptance'])} | {per_round} | "
            f"{r['rpc_round_trips_per_token']:.2f} | {fmt_bytes(r['rpc_bytes_per_token'])} | "
            f"{r['draft_link_round_trips_per_token']:.2f} | {leviathan} | {component} | {same} |")
    return "\n".join(rows)


def concurrency_table(result: dict[str, Any]) -> str:
    rows = ["| Config | streams | aggregate tok/s median [95% CI] | ms/token | latency p50 / p99 "
            "ms | vs (b) at the same streams | accepted/drafted | coordinator batches/s | "
            "tokens/batch | RPC round trips/batch | RPC bytes/batch | same as solo |",
            "|" + "---|" * 12]
    picked = [r for r in result["summary"]["rows"]
              if r["config"] in result["concurrency_configs"]
              and r["k"] in ("-", ADAPTIVE, NATIVE_DEFAULT)]
    for r in sorted(picked, key=lambda r: (r["streams"], r["config"])):
        base = next((x for x in result["summary"]["rows"] if x["config"] == "b"
                     and x["streams"] == r["streams"]), None)
        vs = bm.ratio(r["tok_s"]["median"], base["tok_s"]["median"] if base else None)
        k = "" if r["k"] == "-" else f", k {r['k']}"
        steady = r.get("steady") or {}
        lat = r.get("latency_ms") or {}
        solo = (f"{r['solo_same']}/{r['solo_same'] + r['solo_different']}"
                if "solo_same" in r else "-")
        rows.append(
            f"| ({r['config']}) {LABELS[r['config']]}{k} | {r['streams']} | "
            f"{fmt_ci(r['tok_s'])} | {fmt(r['ms_per_token']['median'], '.1f')} | "
            f"{fmt(lat.get('p50'), '.0f')} / {fmt(lat.get('p99'), '.0f')} | {fmt(vs)}x | "
            f"{fmt(r['acceptance'])} | {fmt(steady.get('batches_per_s'), '.1f')} | "
            f"{fmt(steady.get('tokens_per_batch'))} | "
            f"{fmt(steady.get('rpc_round_trips_per_batch'), '.1f')} | "
            f"{fmt_bytes(steady.get('rpc_bytes_per_batch'))} | {solo} |")
    return "\n".join(rows)


def cpu_table(result: dict[str, Any]) -> str | None:
    """CPU ms per generated token of each process role in the batches' steady state (None:
    a run from before they were recorded)."""
    picked = [r for r in result["summary"]["rows"] if r["config"] in result[
        "concurrency_configs"] and (r.get("steady") or {}).get("cpu_ms_per_token")]
    if not picked:
        return None
    roles = sorted({role for r in picked for role in r["steady"]["cpu_ms_per_token"]})
    roles = [role for role in roles if any(r["steady"]["cpu_ms_per_token"].get(role, 0) >= 0.05
                                           for r in picked)]
    rows = ["| Config | streams | " + " | ".join(roles) + " | all processes |",
            "|" + "---|" * (len(roles) + 3)]
    for r in sorted(picked, key=lambda r: (r["streams"], r["config"])):
        cpu = r["steady"]["cpu_ms_per_token"]
        k = "" if r["k"] == "-" else f", k {r['k']}"
        rows.append(f"| ({r['config']}){k} | {r['streams']} | "
                    + " | ".join(fmt(cpu.get(role), ".1f") for role in roles)
                    + f" | {sum(v for role, v in cpu.items() if role != 'steal'):.1f} |")
    return "\n".join(rows)


def profile_table(result: dict[str, Any]) -> str:
    """The parts of one round per k: draft call, verify on the pool and alone, its traffic."""
    per_k = (result.get("profile") or {}).get("per_k", {})
    step = result["costs"]["pool_ms_per_token"]
    n_vocab = result["models"]["n_vocab"]
    rows = ["| k | draft call ms (drafter computing) | verify on the pool ms | same verify alone "
            "ms | verify / pool step | RPC bytes from workers per verify | logits of k+1 rows "
            "(n_vocab x 4 B each) | RPC bytes to workers | RPC round trips per verify | bytes "
            "between workers per verify |",
            "|" + "---|" * 10]
    for k, p in sorted(per_k.items(), key=lambda kv: int(kv[0])):
        rows.append(
            f"| {k} | {p['draft_wall_ms']['median']:.1f} ({p['draft_server_ms']['median']:.1f}) | "
            f"{fmt_ci(p['verify_wall_ms'])} | {p['verify_compute_ms']['median']:.1f} | "
            f"{p['verify_wall_ms']['median'] / step:.2f} | "
            f"{fmt_bytes(p['verify_rpc_bytes_down']['median'])} | "
            f"{fmt_bytes((int(k) + 1) * n_vocab * 4)} | "
            f"{fmt_bytes(p['verify_rpc_bytes_up']['median'])} | "
            f"{p['verify_rpc_round_trips']['median']:.0f} | "
            + (f"{fmt_bytes(p['verify_peer_bytes']['median'])} |" if "verify_peer_bytes" in p
               else "- |"))
    return "\n".join(rows)


def fmt_target_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return {"bytes": fmt_bytes(value), "count": f"{value:.0f}"}.get(unit, f"{value:.2f}x")


def targets_table(lines: list[dict[str, Any]]) -> str:
    rows = ["| Target | measured | wanted | verdict |", "|---|---|---|---|"]
    for t in lines:
        verdict = {True: "PASS", False: "**MISS**", None: "not measured"}[t["pass"]]
        rows.append(f"| {t['name']} | {fmt_target_value(t['value'], t['unit'])} | {t['op']} "
                    f"{fmt_target_value(t['threshold'], t['unit'])} | {verdict} |")
    return "\n".join(rows)


def repeat_table(runs: list[dict[str, Any]]) -> str:
    """Headline numbers of several runs of this benchmark side by side."""
    rows = ["| Run | command | load avg start / end | (a) tok/s | (b) tok/s | (c) best k: x(b) | "
            "(c2) best k: x(b) | (d) best k: x(b), efficiency | (d) adaptive: x(b) | "
            "(e): x(b) | (d) adaptive / (c) best | (d) adaptive / (c2) best |",
            "|" + "---|" * 12]
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
            f"{fmt(h.get('d_adaptive_vs_c2'))}x |")
    return "\n".join(rows)
