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
    return {"a": a, "c": c, "best_k": best, "best_speedup": bm.predicted_speedup(a, best, c),
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
    row: dict[str, Any] = {
        "config": config, "k": k, "streams": streams, "n": len(ss),
        "tok_s": bm.spread([s.tok_s for s in ss]),
        "ttft_ms": bm.spread([t * 1e3 for t in ttfts]) if ttfts else None,
        "tokens": tokens, "drafted": drafted, "accepted": accepted,
        "acceptance": bm.draft_acceptance(accepted, drafted) if drafted else None,
        "tokens_per_round": per_round,
        "rpc_round_trips_per_token": rpc_rt / tokens,
        "rpc_bytes_per_token": rpc_bytes / tokens,
        "draft_link_round_trips_per_token": draft_rt / tokens,
        "draft_link_bytes_per_token": draft_bytes / tokens,
    }
    if config == "d":
        extra = [s.extra for s in ss if s.extra]
        if extra and rounds:
            row["draft_ms_per_round"] = sum(e["draft_ms"] for e in extra) / rounds
            row["verify_ms_per_round"] = sum(e["verify_ms"] for e in extra) / rounds
            row["elapsed_ms_per_round"] = 1e3 * sum(s.elapsed_s for s in ss) / rounds
            row["fallbacks"] = sum(e["fallbacks"] for e in extra)
    return row


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
                    row["predicted_speedup"] = bm.predicted_speedup(bound["a"], k_num,
                                                                    bound["c"])
                    row["efficiency"] = bm.efficiency(row["vs_b"], row["predicted_speedup"])


def finish(result: dict[str, Any], samples: Sequence[Sample], ks: list[str]) -> None:
    """Complete a measured ``result``: its samples, summary, the proxy's profiled round and
    the headline."""
    result["samples"] = [{key: value for key, value in asdict(s).items()
                          if key not in ("text", "token_ids")} for s in samples]
    summary = summarize(samples, result["bound"]["a"], result["bound"]["c"],
                        ["-", *ks, ADAPTIVE, NATIVE_DEFAULT])
    apply_native_default(summary["rows"], result["native_default_k"], result["bound"])
    result["summary"] = summary
    result["a_tok_s"] = next(r["tok_s"]["median"] for r in summary["rows"]
                             if r["config"] == "a" and r["streams"] == 1)
    result["concurrency_configs"] = ["a", "b", "c", "d"]
    if result.get("profile"):
        result["profile"]["proxy_round"] = next(
            (r for r in summary["rows"] if r["config"] == "d" and r["streams"] == 1
             and r["k"] == str(result["profile"]["k"]) and "draft_ms_per_round" in r), None)
    result["headline"] = headline(result)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers the report quotes, all from the summary."""
    rows = [r for r in result["summary"]["rows"] if r["streams"] == 1]

    def best(config: str) -> dict[str, Any] | None:
        mine = [r for r in rows if r["config"] == config]
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
