"""The PNG plot of a run: tok/s per configuration, and the k sweep against the bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tightwad_dev import benchmath as bm

from .settings import ADAPTIVE


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["summary"]["rows"] if r["streams"] == 1]
    fig, (left, right, third) = plt.subplots(1, 3, figsize=(18, 5))
    bars = []
    for config in ("a", "b", "c", "c2", "d", "e"):
        mine = [r for r in rows if r["config"] == config]
        if not mine:
            continue
        picks = [max(mine, key=lambda r: r["tok_s"]["median"])]
        adaptive = next((r for r in mine if r["k"] == ADAPTIVE), None)
        if adaptive and adaptive is not picks[0]:
            picks.append(adaptive)
        for pick in picks:
            label = f"({config})" + ("" if pick["k"] == "-" else f"\nk={pick['k']}")
            bars.append((label, pick["tok_s"]))
    xs = range(len(bars))
    med = [b[1]["median"] for b in bars]
    err = [[b[1]["median"] - b[1]["p25"] for b in bars], [b[1]["p75"] - b[1]["median"]
                                                          for b in bars]]
    left.bar(xs, med, yerr=err, capsize=4, color="#4c72b0")
    left.set_xticks(list(xs), [b[0] for b in bars])
    left.set_ylabel("generated tok/s (median, IQR)")
    left.set_title(f"One stream, link {result['settings']['profile']} (best k of each; "
                   "(d) also adaptive)", fontsize=10)

    base = next((r for r in rows if r["config"] == "b"), None)
    base_tok_s = base["tok_s"]["median"] if base else 0
    for config, marker in (("c", "s"), ("c2", "^"), ("d", "o")):
        pts = sorted((int(r["k"]), r["tok_s"]["median"]) for r in rows
                     if r["config"] == config and r["k"].isdigit())
        if pts:
            right.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                       label=f"({config}) measured")
    bound = result["bound"]
    if base_tok_s:
        ks = list(range(1, max(result["settings"]["ks"] + [1]) + 1))
        right.plot(ks, [base_tok_s * bm.predicted_speedup(bound["alpha"], k, bound["cost_ratio"])
                        for k in ks], "k--",
                   label=f"bound: (b) x E(a,k)/(kc+1), a={bound['alpha']:.2f}, c={bound['cost_ratio']:.3f}")
        right.axhline(base_tok_s, color="grey", lw=1, label="(b) pool direct")
    adaptive = next((r for r in rows if r["config"] == "d" and r["k"] == ADAPTIVE), None)
    if adaptive:
        right.axhline(adaptive["tok_s"]["median"], color="C2", ls=":",
                      label="(d) adaptive k")
    right.set_xscale("log", base=2)
    right.set_xlabel("draft length k")
    right.set_ylabel("generated tok/s (median)")
    right.set_title("k sweep against the Leviathan bound")
    right.legend(fontsize=7, loc="upper left")

    for config, k, marker in (("b", "-", "s"), ("c", "default", "^"), ("d", ADAPTIVE, "o")):
        pts = sorted((r["streams"], r["tok_s"]["median"]) for r in result["summary"]["rows"]
                     if r["config"] == config and r["k"] == k)
        if pts:
            third.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                       label=f"({config})" + ("" if k == "-" else f" k {k}"))
    third.set_xscale("log", base=2)
    third.set_xlabel("simultaneous streams")
    third.set_ylabel("aggregate tok/s (median)")
    third.set_title("Concurrency")
    third.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
