"""bench/pool_bench.py end to end at its tiniest settings: every configuration runs against
real llama.cpp processes, and the JSON, markdown and plot it writes are consistent. Without
processes: the saved runs in bench/results give their summary and docs/benchmarks.md again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO as ROOT

# The run docs/benchmarks.md shows first, then the earlier runs of its repeatability table.
SAVED = ["bench/results/pool_bench-wifi-3.json", "bench/results/pool_bench-wifi-1.json",
         "bench/results/pool_bench-wifi-2.json"]


@pytest.mark.timeout(600)
def test_pool_bench_smoke(tmp_path: Path, bin_dir: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "pool_bench.py"), "--profile", "none",
           "--tokens", "8", "--prompts", "1", "--reps", "1", "--ks", "2", "--concurrency", "1",
           "--workers", "2", "--bin-dir", str(bin_dir), "--json", str(out),
           "--markdown", str(tmp_path / "bench.md"), "--plot", str(tmp_path / "bench.png")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    result = json.loads(out.read_text())
    rows = {(r["config"], r["k"]): r for r in result["summary"]["rows"] if r["streams"] == 1}
    ran = {"a", "b", "c", "c2", "d"} | ({"e"} if not result["legacy_note"].startswith(
        "(e) not run") else set())
    assert {config for config, _ in rows} == ran
    assert {("c", "2"), ("c2", "2"), ("d", "2"), ("d", "adaptive"), ("c", "default")} <= set(rows)
    for row in rows.values():
        assert row["tok_s"]["median"] > 0 and row["tokens"] > 0
        assert row["ttft_ms"]["median"] > 0
    assert rows[("b", "-")]["vs_b"] == 1.0
    assert rows[("a", "-")]["rpc_round_trips_per_token"] == 0
    assert rows[("b", "-")]["rpc_round_trips_per_token"] > 0
    for key in (("c", "2"), ("d", "2"), ("d", "adaptive")):
        row = rows[key]
        assert 0 <= row["acceptance"] <= 1 and row["tokens_per_round"] >= 1
        assert row["predicted_speedup"] > 0
        assert row["efficiency"] == pytest.approx(row["vs_b"] / row["predicted_speedup"])
    assert rows[("d", "2")]["draft_link_round_trips_per_token"] > 0

    bound = result["bound"]
    assert 0 < bound["a"] <= 1 and bound["c"] > 0 and bound["best_k"] == 2
    # Greedy outputs: the pool and native speculation give (a)'s tokens; the proxy its text.
    for key in ("b/-", "c/2", "c2/2", "d/2"):
        assert result["outputs"][key]["different"] == 0, result["outputs"][key]
    md = (tmp_path / "bench.md").read_text()
    assert result["command"] in md and "| (d)" in md
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_render_gives_the_docs_page_again(tmp_path: Path) -> None:
    """``--render`` writes docs/benchmarks.md byte for byte from the saved runs it cites."""
    pytest.importorskip("matplotlib")
    also = [arg for path in SAVED[1:] for arg in ("--also", path)]
    cmd = [sys.executable, "bench/pool_bench.py", "--render", SAVED[0], *also,
           "--plot", str(tmp_path / "benchmarks.png"),
           "--markdown", str(tmp_path / "benchmarks.md")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "benchmarks.md").read_text() == (ROOT / "docs" / "benchmarks.md").read_text()
    assert (tmp_path / "benchmarks.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("saved", SAVED)
def test_summary_of_a_saved_run(saved: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pure summary, from a saved run's samples, is the summary and headline it saved."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from poolbench.sample import Sample
    from poolbench.summary import finish

    stored = json.loads((ROOT / saved).read_text())
    derived = ("summary", "headline", "a_tok_s", "samples", "concurrency_configs")
    result = json.loads(json.dumps({k: v for k, v in stored.items() if k not in derived}))
    result["profile"].pop("proxy_round")
    finish(result, [Sample(**s) for s in stored["samples"]],
           [str(k) for k in stored["settings"]["ks"]])
    again = json.loads(json.dumps(result))
    for key in (*derived, "profile"):
        assert again[key] == stored[key], key
