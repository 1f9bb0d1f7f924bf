"""bench/pool_bench.py end to end at its tiniest settings: every configuration runs against
real llama.cpp processes (interleaved, each on a fresh coordinator, relays in their own
process), with concurrency levels, the steady-state round profile and both vocabularies, and
the JSON, markdown and plot it writes are consistent. Without processes: the saved runs in
bench/results give their summary and docs/benchmarks.md again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import REPO as ROOT
from support import alive, children

# The run docs/benchmarks.md shows, then the real-vocabulary run beside it.
SAVED = ["bench/results/pool_bench-wifi-reduced.json",
         "bench/results/pool_bench-wifi-real-vocab-reduced.json"]


def _command(tmp_path: Path, bin_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "bench" / "pool_bench.py"), "--profile", "none",
            "--tokens", "8", "--prompts", "1", "--reps", "1", "--ks", "2", "--workers", "2",
            "--bin-dir", str(bin_dir), "--json", str(tmp_path / "bench.json"),
            "--markdown", str(tmp_path / "bench.md"), "--plot", str(tmp_path / "bench.png"),
            *extra]


def _run(tmp_path: Path, bin_dir: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    res = subprocess.run(_command(tmp_path, bin_dir, *extra), capture_output=True, text=True,
                         timeout=540, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    return json.loads(out.read_text()), (tmp_path / "bench.md").read_text()


@pytest.mark.timeout(600)
def test_pool_bench_smoke(tmp_path: Path, bin_dir: Path) -> None:
    # 24 tokens: long enough that a batch's streams overlap in a steady state.
    result, md = _run(tmp_path, bin_dir, "--concurrency", "1,4,16", "--tokens", "24")
    rows = {(r["config"], r["k"]): r for r in result["summary"]["rows"] if r["streams"] == 1}
    ran = {"a", "b", "c", "c2", "d"} | ({"e"} if not result["legacy_note"].startswith(
        "(e) not run") else set())
    assert {config for config, _ in rows} == ran
    assert {("c", "2"), ("c2", "2"), ("d", "2"), ("d", "adaptive"), ("c", "default")} <= set(rows)
    for row in rows.values():
        assert row["tok_s"]["median"] > 0 and row["tokens"] > 0
        assert row["tok_s"]["ci_lo"] <= row["tok_s"]["median"] <= row["tok_s"]["ci_hi"]
        assert row["ms_per_token"]["median"] == pytest.approx(
            1e3 / row["tok_s"]["median"], rel=1e-6)  # one sample: the inverse exactly
        assert row["ttft_ms"]["median"] > 0
    assert rows[("b", "-")]["vs_b"] == 1.0
    assert rows[("a", "-")]["rpc_round_trips_per_token"] == 0
    assert rows[("b", "-")]["rpc_round_trips_per_token"] > 0
    adaptive = rows[("d", "adaptive")]
    assert adaptive["tokens_per_round"] >= 1
    # The adaptive rule may judge, on a loaded machine and a link-free pool, that no draft pays
    # and run target-only bursts throughout: then it has no acceptance to compare.
    for key in (("c", "2"), ("d", "2")) + ((("d", "adaptive"),) if adaptive["drafted"] else ()):
        row = rows[key]
        assert 0 <= row["acceptance"] <= 1 and row["tokens_per_round"] >= 1
        assert row["predicted_speedup"] > 0
        assert row["efficiency"] == pytest.approx(row["vs_b"] / row["predicted_speedup"])
    for key in (("c", "2"), ("d", "2")):  # k = 2 was profiled: the component bound
        row = rows[key]
        assert row["component_speedup"] > 0
        assert row["component_efficiency"] == pytest.approx(row["vs_b"]
                                                            / row["component_speedup"])
    assert rows[("d", "2")]["draft_link_round_trips_per_token"] > 0

    # Concurrency: b, c (default k) and d (adaptive) at 4 and 16 streams, with latencies, a
    # steady-state window counted by the coordinator's own batches, and the solo comparison.
    loaded = {(r["config"], r["k"], r["streams"]): r for r in result["summary"]["rows"]
              if r["streams"] > 1}
    assert set(loaded) == {(c, k, n) for c, k in (("b", "-"), ("c", "default"),
                                                  ("d", "adaptive")) for n in (4, 16)}
    for (config, _, n), row in loaded.items():
        assert row["latency_ms"]["n"] == n
        assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
        assert row["solo_same"] + row["solo_different"] == n
        steady = row["steady"]
        if steady:  # a window exists when every stream started before the first ended
            assert steady["batches_per_s"] > 0 and steady["tokens_per_batch"] > 0
            assert steady["rpc_round_trips_per_batch"] > 0
            if config == "b":  # every stream decodes in each batch: several tokens per batch
                assert steady["tokens_per_batch"] > 1, steady
            # Where the CPU went: the pool's workers compute; the proxy only in (d).
            cpu = steady["cpu_ms_per_token"]
            assert cpu["worker"] > 0 and ("proxy" in cpu) == (config == "d"), cpu
    assert any(row["steady"] for row in loaded.values())
    assert "CPU time per generated token" in md
    regimes = [s["regimes"] for s in result["samples"] if s["config"] == "d" and s["streams"] > 1]
    assert regimes and all(isinstance(r, dict) for r in regimes)  # the proxy's load regimes

    profile = result["profile"]["per_k"]["2"]
    assert profile["verify_rpc_bytes_down"]["median"] > 0
    assert profile["verify_rpc_round_trips"]["median"] > 0
    bound = result["bound"]
    assert 0 < bound["alpha"] <= 1 and bound["cost_ratio"] > 0 and bound["best_k"] == 2
    assert "--metrics" in result["coordinator_args"]
    # Greedy outputs: the pool and native speculation give (a)'s tokens; the proxy its text.
    for key in ("b/-", "c/2", "c2/2", "d/2"):
        assert result["outputs"][key]["different"] == 0, result["outputs"][key]
    assert {t["name"].split(":")[0] for t in result["targets"]["13"]} >= {
        "4 stream(s)", "16 stream(s)", "1 stream"}
    assert all(t["pass"] in (True, False, None) for ts in result["targets"].values()
               for t in ts)
    assert result["command"] in md and "| (d)" in md and "REDUCED run" in md
    assert "PASS" in md or "MISS" in md


@pytest.mark.timeout(600)
def test_pool_bench_real_vocab_smoke(tmp_path: Path, bin_dir: Path) -> None:
    """The real-vocabulary profile (the demo pair's 128k tokenizer, tiny layers): a verify
    moves the logits of its rows, and the draft's own cost is reported apart from it."""
    result, md = _run(tmp_path, bin_dir, "--vocab", "llama-bpe", "--tiny-models",
                      "--configs", "a,b,d", "--concurrency", "1,2")
    assert result["models"]["n_vocab"] > 100_000
    assert result["costs"]["draft_ms_per_token"]["median"] > 0
    verify = result["profile"]["per_k"]["2"]
    # A k = 2 verify pulls at least its rows' logits (3 x n_vocab x 4 B) from the workers:
    # the payload the patch of issue 14 shrinks; at least one row whatever the patch does.
    assert verify["verify_rpc_bytes_down"]["median"] > 0
    assert "llama-bpe" in md and "Issue 14" in md


@pytest.mark.timeout(300)
def test_a_terminated_run_stops_its_processes_and_keeps_the_last_json(tmp_path: Path,
                                                                     bin_dir: Path) -> None:
    """SIGTERM (a ``timeout``, a kill) ends a run as Ctrl-C does: every worker and server it
    started stops, and the JSON of the previous run is left whole."""
    previous = '{"the": "previous run"}'
    (tmp_path / "bench.json").write_text(previous)
    run = subprocess.Popen(_command(tmp_path, bin_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    started: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(started) < 2 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
            started = children(run.pid)
        assert len(started) >= 2, "the run started no workers"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        left = [pid for pid in started if alive(pid)]
        for pid in left:  # what a broken run left behind goes with the test
            os.kill(pid, signal.SIGKILL)
    assert not left
    assert (tmp_path / "bench.json").read_text() == previous


def test_render_gives_the_docs_page_again(tmp_path: Path) -> None:
    """``--render`` writes docs/benchmarks.md byte for byte from the saved runs it cites."""
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, "bench/pool_bench.py", "--render", SAVED[0], "--beside", SAVED[1],
           "--plot", str(tmp_path / "benchmarks.png"),
           "--markdown", str(tmp_path / "benchmarks.md")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "benchmarks.md").read_text() == (ROOT / "docs" / "benchmarks.md").read_text()
    assert (tmp_path / "benchmarks.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("saved", SAVED)
def test_summary_of_a_saved_run(saved: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pure summary, from a saved run's samples, is the summary, headline and targets it
    saved."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from poolbench.sample import Sample
    from poolbench.summary import finish

    stored = json.loads((ROOT / saved).read_text())
    derived = ("summary", "headline", "a_tok_s", "samples", "concurrency_configs", "targets")
    result = json.loads(json.dumps({k: v for k, v in stored.items() if k not in derived}))
    finish(result, [Sample(**s) for s in stored["samples"]],
           [str(k) for k in stored["settings"]["ks"]])
    again = json.loads(json.dumps(result))
    for key in derived:
        assert again[key] == stored[key], key


def test_interleaved_order_moves_every_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each repetition visits every unit once, and no unit keeps its place or its neighbour."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from poolbench.scenarios import rotated

    items = [(c, "-") for c in "abcdefg"]
    orders = [rotated(items, rep) for rep in range(3)]
    assert all(sorted(o) == items for o in orders)
    assert len({o[0] for o in orders}) == 3 and len({o[-1] for o in orders}) == 3
