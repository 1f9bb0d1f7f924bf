"""Pure: the samples of a run summarized per (config, k, streams), the speculative-decoding
bound they are held against, and the headline numbers the report quotes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from tightwad_dev import benchmath as bm

from .sample import Sample
from .settings import ADAPTIVE, NATIVE_DEFAULT


def speedup_bound(a: float, c: float, ks: Sequence[int]) -> dict[str, Any]:
    """Leviathan's bound S = E(a, k) / (k c + 1) over the sweep, and its best k."""
    best = bm.best_k(a, c, ks)
    return {"alpha": a, "cost_ratio": c, "best_k": best, "best_speedup": bm.predicted_speedup(a, best, c),
            "per_k": {k: bm.predicted_speedup(a, k, c) for k in ks}}


def summarize(samples: Sequence[Sample], a: float, c: float,
              ks_all: list[str]) -> dict[str, Any]:
    """Per (config, k, streams): spreads, totals, ratios, bound and efficiency."""
    groups: dict[tuple[str, str, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.config, s.k, s.streams), []).append(s)
    rows = [group_row(config, k, streams, ss) for (config, k, streams), ss in groups.items()]

    def find(config: str, k: str = "-", streams: int = 1) -> dict[str, Any] | None:
        return next((r for r in rows if (r["config"], r["k"], r["streams"])
                     == (config, k, streams)), None)

    base = find("b")
    base_tok_s = base["tok_s"]["median"] if base else None
    for row in rows:
        if row["streams"] == 1:
            row["vs_b"] = bm.ratio(row["tok_s"]["median"], base_tok_s)
        else:
            own = find("a", "-", row["streams"])
            row["vs_a_same_streams"] = bm.ratio(row["tok_s"]["median"],
                                                own["tok_s"]["median"] if own else None)
        k_num = row_k(row)
        if row["config"] in ("c", "d") and row["streams"] == 1 and k_num and row["vs_b"]:
            predicted = bm.predicted_speedup(a, k_num, c)
            row["k_used"] = k_num
            row["predicted_speedup"] = predicted
            row["efficiency"] = bm.efficiency(row["vs_b"], predicted)
            row["expected_acceptance"] = bm.expected_draft_acceptance(a, k_num)
    rows.sort(key=lambda r: (r["streams"], r["config"], k_order(r["k"], ks_all)))
    return {"rows": rows}


def group_row(config: str, k: str, streams: int, ss: list[Sample]) -> dict[str, Any]:
    """One (config, k, streams)'s totals and spreads, before any ratio to another row."""
    tokens = sum(s.tokens for s in ss)
    drafted = sum(s.drafted or 0 for s in ss) if any(s.drafted is not None for s in ss) \
        else None
    accepted = sum(s.accepted or 0 for s in ss) if drafted is not None else None
    rounds = sum(s.rounds or 0 for s in ss) if any(s.rounds for s in ss) else None
    if rounds is None and config in ("c", "c2") and accepted is not None:
        per_round = bm.native_tokens_per_round(tokens, accepted)
    else:
        per_round = tokens / rounds if rounds else None
    rpc_rt = sum(s.rpc["round_trips"] for s in ss)
    rpc_bytes = sum(s.rpc["bytes_up"] + s.rpc["bytes_down"] for s in ss)
    draft_rt = sum(s.draft_link["round_trips"] for s in ss)
    draft_bytes = sum(s.draft_link["bytes_up"] + s.draft_link["bytes_down"] for s in ss)
    ttfts = [s.ttft_s for s in ss if s.ttft_s is not None]
    latencies = [t for s in ss for t in s.latencies_s]
    row: dict[str, Any] = {
        "config": config, "k": k, "streams": streams, "n": len(ss),
        "tok_s": bm.spread([s.tok_s for s in ss]),
        # Request time per generated token (one stream), or a batch's wall time per token of
        # all its streams (several): the inverse of tok/s, in absolute terms.
        "ms_per_token": bm.spread([1e3 * s.elapsed_s / s.tokens for s in ss]),
        "latency_ms": bm.latency([1e3 * t for t in latencies]) if latencies else None,
        "ttft_ms": bm.spread([t * 1e3 for t in ttfts]) if ttfts else None,
        "tokens": tokens, "drafted": drafted, "accepted": accepted,
        "acceptance": bm.draft_acceptance(accepted, drafted) if drafted else None,
        "tokens_per_round": per_round,
        "rpc_round_trips_per_token": rpc_rt / tokens,
        "rpc_bytes_per_token": rpc_bytes / tokens,
        "draft_link_round_trips_per_token": draft_rt / tokens,
        "draft_link_bytes_per_token": draft_bytes / tokens,
    }
    if streams > 1:
        row["steady"] = steady_state([s.window for s in ss if s.window])
        if any(s.solo_same is not None for s in ss):
            row["solo_same"] = sum(s.solo_same or 0 for s in ss)
            row["solo_different"] = sum(s.solo_different or 0 for s in ss)
    if config == "d":
        extra = [s.extra for s in ss if s.extra]
        if extra and rounds:
            row["draft_ms_per_round"] = sum(e["draft_ms"] for e in extra) / rounds
            row["verify_ms_per_round"] = sum(e["verify_ms"] for e in extra) / rounds
            row["elapsed_ms_per_round"] = 1e3 * sum(s.elapsed_s for s in ss) / rounds
            row["fallbacks"] = sum(e["fallbacks"] for e in extra)
    return row


def steady_state(windows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The round profile under load from batches' steady-state windows: the coordinator's
    batches per second, generated tokens per batch, RPC round trips and bytes per batch. A
    window in which the coordinator ran no batch (too short to see one) says nothing about
    them and is left out."""
    windows = [w for w in windows if w["decodes"]]
    if not windows:
        return None
    seconds = sum(w["seconds"] for w in windows)
    tokens = sum(w["tokens"] for w in windows)
    decodes = sum(w["decodes"] or 0 for w in windows)
    rpc_rt = sum(w["rpc_round_trips"] for w in windows)
    rpc_bytes = sum(w["rpc_bytes"] for w in windows)
    cpu: dict[str, float] = {}
    for w in windows:
        for role, used in w.get("cpu_s", {}).items():
            cpu[role] = cpu.get(role, 0.0) + used
    # (Runs from before CPU time was recorded have none: no key, so their summary is as saved.)
    return {**({"cpu_ms_per_token": {role: 1e3 * s / tokens for role, s in sorted(cpu.items())}}
               if tokens and cpu else {}),
            "seconds": seconds, "windows": len(windows), "tok_s": bm.rate(tokens, seconds),
            "batches_per_s": bm.rate(decodes, seconds) if decodes else None,
            "tokens_per_batch": tokens / decodes if decodes else None,
            "rpc_round_trips_per_batch": rpc_rt / decodes if decodes else None,
            "rpc_bytes_per_batch": rpc_bytes / decodes if decodes else None,
            "rpc_round_trips_per_token": rpc_rt / tokens if tokens else None,
            "rpc_bytes_per_token": rpc_bytes / tokens if tokens else None}


def apply_component_bound(rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """(c) and (d) one-stream rows at a profiled k get the bound built from measured component
    costs (:func:`tightwad_dev.benchmath.component_speedup`): for (d) the draft call through
    the drafter's link, for (c) k draft tokens at the draft's own cost on the coordinator;
    both with the measured verify of k tokens on the pool."""
    per_k = (result.get("profile") or {}).get("per_k", {})
    costs = result["costs"]
    for row in rows:
        k = row.get("k_used") or (int(row["k"]) if row["k"].isdigit() else None)
        prof = per_k.get(str(k)) if k else None
        if row["config"] not in ("c", "d") or row["streams"] != 1 or not prof or not row.get(
                "vs_b"):
            continue
        draft_ms = (prof["draft_wall_ms"]["median"] if row["config"] == "d"
                    else k * costs["draft_ms_per_token"]["median"])
        bound = bm.component_speedup(result["bound"]["alpha"], k, costs["pool_ms_per_token"],
                                     draft_ms, prof["verify_wall_ms"]["median"])
        row["component_speedup"] = bound
        row["component_efficiency"] = bm.efficiency(row["vs_b"], bound)


def row_k(row: dict[str, Any]) -> int | None:
    """The k a row ran at: fixed k, llama.cpp's default, or the adaptive rule's mean."""
    k = row["k"]
    if k.isdigit():
        return int(k)
    if k == NATIVE_DEFAULT:
        return row.get("native_default_k")
    if k == ADAPTIVE and row.get("drafted") and row.get("tokens_per_round"):
        rounds = row["tokens"] / row["tokens_per_round"]
        return max(1, round(row["drafted"] / rounds))
    return None


def k_order(k: str, ks_all: list[str]) -> int:
    return ks_all.index(k) if k in ks_all else -1


def apply_native_default(rows: list[dict[str, Any]], native_k: int | None,
                         bound: dict[str, Any]) -> None:
    """The rows at llama.cpp's default k get that k, and (c)'s its bound and efficiency."""
    for row in rows:
        if row["k"] == NATIVE_DEFAULT:
            row["native_default_k"] = native_k
            k_num = row_k(row)
            if k_num:
                row["k_used"] = k_num
                if row["config"] == "c" and row["streams"] == 1 and row.get("vs_b"):
                    row["predicted_speedup"] = bm.predicted_speedup(bound["alpha"], k_num,
                                                                    bound["cost_ratio"])
                    row["efficiency"] = bm.efficiency(row["vs_b"], row["predicted_speedup"])


def finish(result: dict[str, Any], samples: Sequence[Sample], ks: list[str]) -> None:
    """Complete a measured ``result``: its samples, summary, the proxy's profiled round and
    the headline."""
    result["samples"] = [{key: value for key, value in asdict(s).items()
                          if key not in ("text", "token_ids")
                          and (key != "regimes" or value is not None)} for s in samples]
    summary = summarize(samples, result["bound"]["alpha"], result["bound"]["cost_ratio"],
                        ["-", *ks, ADAPTIVE, NATIVE_DEFAULT])
    apply_native_default(summary["rows"], result["native_default_k"], result["bound"])
    apply_component_bound(summary["rows"], result)
    result["summary"] = summary
    result["a_tok_s"] = next(r["tok_s"]["median"] for r in summary["rows"]
                             if r["config"] == "a" and r["streams"] == 1)
    result["concurrency_configs"] = ["b", "c", "d"]
    result["headline"] = headline(result)
    result["targets"] = targets(result)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers the report quotes, all from the summary."""
    rows = [r for r in result["summary"]["rows"] if r["streams"] == 1]

    def best(config: str) -> dict[str, Any] | None:
        # (d)'s best is over the fixed k of the sweep: its adaptive rule is held against it.
        mine = [r for r in rows if r["config"] == config
                and (config != "d" or r["k"].isdigit())]
        return max(mine, key=lambda r: r["tok_s"]["median"]) if mine else None

    def get(config: str, k: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["config"] == config and r["k"] == k), None)

    d_adaptive, d_best = get("d", ADAPTIVE), best("d")
    out: dict[str, Any] = {}
    for name, row in (("d_adaptive", d_adaptive), ("d_best", d_best), ("c_best", best("c")),
                      ("c2_best", best("c2")), ("e", best("e")), ("b", get("b", "-")),
                      ("a", get("a", "-"))):
        if row:
            out[name] = {"k": row["k"], "tok_s": row["tok_s"]["median"],
                         "vs_b": row.get("vs_b"), "efficiency": row.get("efficiency"),
                         "predicted_speedup": row.get("predicted_speedup"),
                         "acceptance": row.get("acceptance")}
    for ref in ("c_best", "c2_best", "e", "a"):
        if "d_adaptive" in out and ref in out:
            out[f"d_adaptive_vs_{ref.removesuffix('_best')}"] = bm.ratio(
                out["d_adaptive"]["tok_s"], out[ref]["tok_s"])
        if "d_best" in out and ref in out:
            out[f"d_best_vs_{ref.removesuffix('_best')}"] = bm.ratio(
                out["d_best"]["tok_s"], out[ref]["tok_s"])
    bound = result["bound"]
    out["bound_best_k"] = bound["best_k"]
    out["bound_best_speedup"] = bound["best_speedup"]
    return out


def _row(result: dict[str, Any], config: str, k: str, streams: int = 1) -> dict[str, Any] | None:
    return next((r for r in result["summary"]["rows"] if (r["config"], r["k"], r["streams"])
                 == (config, k, streams)), None)


def _tok_s(row: dict[str, Any] | None) -> float | None:
    return row["tok_s"]["median"] if row else None


def targets(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The issues' targets as measured lines (issue 13: many streams; issue 14: real
    vocabularies), each PASS, MISS or not measured in this run."""
    h = result["headline"]
    rows = result["summary"]["rows"]
    levels = sorted({r["streams"] for r in rows if r["config"] == "d" and r["k"] == ADAPTIVE})
    many: list[dict[str, Any]] = []
    for n in levels:
        d = _tok_s(_row(result, "d", ADAPTIVE, n))
        b, c = _tok_s(_row(result, "b", "-", n)), _tok_s(_row(result, "c", NATIVE_DEFAULT, n))
        better = max((x for x in (b, c) if x is not None), default=None)
        many.append(bm.check_target(f"{n} stream(s): (d) adaptive / the better of (b) and (c)",
                                    bm.ratio(d, better), ">=", 1.0))
    for n in (4, 8):
        many.append(bm.check_target(f"{n} streams: (d) adaptive / (b)", bm.ratio(
            _tok_s(_row(result, "d", ADAPTIVE, n)), _tok_s(_row(result, "b", "-", n))), ">=", 1.5))
    many.append(bm.check_target("1 stream: (d) adaptive / (d) at its best fixed k", bm.ratio(
        (h.get("d_adaptive") or {}).get("tok_s"), (h.get("d_best") or {}).get("tok_s")),
        ">=", 0.95))
    many.append(bm.check_target("1 stream: (d) adaptive / (b)",
                                (h.get("d_adaptive") or {}).get("vs_b"), ">=", 2.2))
    under_load = [r for r in rows if r["streams"] > 1 and "solo_different" in r]
    many.append(bm.check_target(
        "responses under load that differ from the same configuration's solo text",
        sum(r["solo_different"] for r in under_load) if under_load else None, "<=", 0,
        "count"))

    real: list[dict[str, Any]] = []
    per_k = (result.get("profile") or {}).get("per_k", {})
    verify8 = per_k.get("8", {}).get("verify_rpc_bytes_down")
    real.append(bm.check_target("bytes from the workers per k = 8 verify",
                                verify8["median"] if verify8 else None, "<=", 64e3, "bytes"))
    b1 = _row(result, "b", "-")
    n_vocab = result["models"]["n_vocab"]
    real.append(bm.check_target(
        "plain pool decode: a full logits row (n_vocab x 4 B) / RPC bytes per token of (b)",
        bm.ratio(4.0 * n_vocab, b1["rpc_bytes_per_token"] if b1 else None), ">=", 10.0))
    real.append(bm.check_target("1 stream: (d) adaptive / (b)",
                                (h.get("d_adaptive") or {}).get("vs_b"), ">=", 2.0))
    natives = [x["tok_s"] for x in (h.get("c_best"), h.get("c2_best")) if x]
    real.append(bm.check_target("1 stream: (d) adaptive / the better of (c) and (c2) at their "
                                "best k", bm.ratio((h.get("d_adaptive") or {}).get("tok_s"),
                                                   max(natives, default=None)), ">=", 1.2))
    s = result["settings"]
    d_out = [v for key, v in result["outputs"].items() if key.startswith("d/")]
    covered = s["prompts"] >= 20 and s["tokens"] >= 128
    identity = bm.check_target(
        f"(d) greedy outputs that differ from (a) beyond a near-tie ({s['prompts']} prompts x "
        f"{s['tokens']} tokens; the target asks >= 20 x 128)",
        sum(v["different"] for v in d_out) if d_out else None, "<=", 0, "count")
    if not covered:
        identity["pass"] = None
    real.append(identity)
    return {"13": many, "14": real}
