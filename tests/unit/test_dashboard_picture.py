"""The dashboard's pure parts: the log parsers it reads the pool with, layer runs, the pool
view from a local pool's state, speculation now and its bound, problems and their fixes, the
telemetry's rolling view, and the terminal rendering of ``status --watch``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from rich.console import Console

from tightwad.cli import watch
from tightwad.decoding.speculation import expected_tokens
from tightwad.engine import telemetry
from tightwad.engine.telemetry import SERIES_S, Round, Telemetry
from tightwad.llamaserver import layers, wire
from tightwad.pool import localpool
from tightwad.server import dashboard

# Captured from a pinned coordinator on two loopback workers (-lv 4), shortened (fewer lines
# and blanks).
COORDINATOR_LOG = """\
0.00.007.502 I cmn  common_param:   - RPC0    : 127.0.0.1:50052 (24151 MiB, 24151 MiB free)
I common_memory_breakdown_print: | memory breakdown [MiB] | total free self model context compute |
I common_memory_breakdown_print: | - RPC0 (127.0.0.1:50052) | 24151 = 24151 + ( 10 = 2 + 2 + 5) + -10 |
I common_memory_breakdown_print: | - RPC1 (127.0.0.1:50053) | 24151 = 24141 + ( 103 = 33 + 1 + 68) + -103 |
I common_memory_breakdown_print: | - Host | 34 = 31 + 0 + 3 |
0.01.407.677 I llama_prepare_model_devices: using device RPC0 (127.0.0.1:50052) (unknown id) - 24151 MiB free
0.01.407.844 I llama_prepare_model_devices: using device RPC1 (127.0.0.1:50053) (unknown id) - 24151 MiB free
0.02.164.362 I print_info: n_layer               = 8
0.02.167.990 I load_tensors: loading model tensors, this can take a while... (load_mode = mmap)
0.02.170.019 I load_tensors: offloading output layer to GPU
0.02.170.037 I load_tensors: offloading 7 repeating layers to GPU
0.02.170.047 I load_tensors: offloaded 9/9 layers to GPU
0.02.170.059 I load_tensors:   CPU_Mapped model buffer size =    31.31 MiB
"""

WORKER_LOG = """\
Starting RPC server v7.0.0
  endpoint       : 127.0.0.1:50052
  local cache    : n/a
Devices:
  CPU: AMD EPYC 7B13 (15890 MiB, 12001 MiB free)
  transport      : TCP
Accepted client connection
"""


def test_the_log_parsers_read_devices_memory_and_layer_counts() -> None:
    assert wire.parse_load_devices(COORDINATOR_LOG) == [
        wire.LoadDevice("RPC0", "127.0.0.1:50052", 24151),
        wire.LoadDevice("RPC1", "127.0.0.1:50053", 24151)]
    # A second load (a swap in the same log): only its devices count.
    again = COORDINATOR_LOG + "0.09 I llama_prepare_model_devices: using device CUDA0 (RTX " \
        "3060) (0000:01:00.0) - 11800 MiB free\n"
    assert wire.parse_load_devices(again) == [wire.LoadDevice("CUDA0", "RTX 3060", 11800)]
    assert wire.parse_memory_breakdown(COORDINATOR_LOG) == {
        "127.0.0.1:50052": wire.MemoryRow(24151, 24151, 10, 2, 2, 5),
        "127.0.0.1:50053": wire.MemoryRow(24151, 24141, 103, 33, 1, 68)}
    assert wire.parse_layer_counts(COORDINATOR_LOG) == (8, 9)
    assert wire.parse_layer_counts("no load yet") is None
    assert wire.parse_worker_devices(WORKER_LOG) == [
        wire.WorkerDevice("CPU", "AMD EPYC 7B13", 15890, 12001)]
    assert wire.parse_worker_devices("no banner yet") == []


@pytest.mark.parametrize("split", [[1, 1], [3, 1], [1, 2, 1], [0.2, 0.3, 0.5], [5], [1, 0, 1]])
@pytest.mark.parametrize("n_layer", [1, 8, 32, 61])
def test_llamas_layer_rule_gives_each_device_one_run_in_order(split: list[float],
                                                              n_layer: int) -> None:
    devices = layers.layer_devices(split, n_layer)
    assert None not in devices  # all offloaded by default
    assert devices == sorted(devices)  # contiguous, in the split's order
    assert all(devices.count(i) == 0 for i, share in enumerate(split) if share == 0)


def test_layer_devices_keeps_the_first_layers_on_the_cpu_when_not_all_are_offloaded() -> None:
    assert layers.layer_devices([1, 1], 4, 3) == [None, None, 0, 0, 1]
    assert layers.layer_devices([1, 1], 4, 0) == [None] * 5
    assert layers.layer_devices([0, 0], 4) == [None] * 5


def test_layer_spans_are_runs_along_the_depth() -> None:
    assert dashboard.layer_spans({0: "CPU", 1: "a", 2: "a", 3: "b", 4: "a"}) == {
        "CPU": [[0, 0]], "a": [[1, 2], [4, 4]], "b": [[3, 3]]}
    assert dashboard.layer_spans({}) == {}


def test_coordinator_layers_follow_its_tensor_split_else_free_memory() -> None:
    # Equal free memory: layers 0-4 on the first worker, 5-7 and the output on the second.
    assert dashboard.coordinator_layers(COORDINATOR_LOG, []) == {
        "127.0.0.1:50052": [[0, 4]], "127.0.0.1:50053": [[5, 8]]}
    assert dashboard.coordinator_layers(COORDINATOR_LOG, ["-m", "x", "--tensor-split", "1,2"]) \
        == {"127.0.0.1:50052": [[0, 2]], "127.0.0.1:50053": [[3, 8]]}
    assert dashboard.coordinator_layers("nothing loaded", []) == {}


def _state(tmp_path: Path) -> dict:
    """A state file as `tightwad start --local` writes it, read back as the proxy reads it."""
    logs = {}
    for name, text in (("coordinator", COORDINATOR_LOG), ("worker0", WORKER_LOG),
                       ("worker1", WORKER_LOG.replace("50052", "50053"))):
        logs[name] = tmp_path / f"{name}.log"
        logs[name].write_text(text)
    services = [localpool.Service(f"worker{i}", "rpc", "127.0.0.1", port, 1000 + i, None,
                                  str(logs[f"worker{i}"])) for i, port in enumerate((50052, 50053))]
    services.append(localpool.Service("coordinator", "coordinator", "127.0.0.1", 8090, 1002,
                                      None, str(logs["coordinator"])))
    state = localpool.LocalState(bin_dir="bin", log_dir=str(tmp_path), model="t.gguf",
                                 draft="d.gguf", ctx=4096, slots=4, services=services)
    localpool.save_state(tmp_path, state)
    return json.loads(localpool.state_path(tmp_path).read_text())


def test_pool_view_shows_each_worker_with_its_devices_layers_and_link(tmp_path: Path) -> None:
    state = _state(tmp_path)
    view = dashboard.pool_view(state, COORDINATOR_LOG,
                               {"worker0": WORKER_LOG, "worker1": ""},
                               running=lambda pid: pid != 1001,
                               links={"127.0.0.1": 0.00012})
    w0, w1 = view["workers"]
    assert (w0["name"], w0["endpoint"], w0["layers"], w0["n_layers"]) == \
        ("worker0", "127.0.0.1:50052", [[0, 4]], 5)
    assert w0["devices"][0]["backend"] == "CPU" and w0["devices"][0]["total_mib"] == 15890
    assert (w0["used_mib"], w0["total_mib"]) == (10, 24151)
    assert w0["link"]["rtt_ms"] == 0.12 and w0["healthy"]
    assert w1["layers"] == [[5, 8]] and not w1["healthy"] and w1["devices"] == []
    assert w1["memory"]["model"] == 33
    assert view["n_layers"] == 9 and view["coordinator_layers"] == {}


def _learned(alpha: float = 0.8, k: int = 4) -> dict:
    return {"drafting": True, "reason": "k 4", "k": k, "alpha": {"greedy": alpha},
            "predicted_speedup": 1.5,
            "by_streams": {"1": {"draft": {"fixed_ms": 2.0, "per_token_ms": 1.0},
                                 "verify": {"fixed_ms": 10.0, "per_token_ms": 1.0}}}}


def test_speculation_now_measured_against_its_bound() -> None:
    view = dashboard.speculation_view(_learned(), {"speculative_tok_s": 150.0,
                                                   "target_only_tok_s": 100.0})
    assert view["measured_speedup"] == pytest.approx(1.5)
    # One round: draft 2 + 4 ms, verify 10 + 4 ms, E(0.8, 4) tokens; alone: 10 ms a token.
    want = expected_tokens(0.8, 4) / 0.020
    assert view["bound_tok_s"] == pytest.approx(want)
    assert view["bound_target_only_tok_s"] == pytest.approx(100.0)
    assert view["bound_speedup"] == pytest.approx(want / 100.0)
    # Before anything is measured: no numbers, no crash.
    empty = dashboard.speculation_view({"drafting": True, "reason": "no request yet",
                                        "k": None}, {})
    assert empty["bound_tok_s"] is None and empty["measured_speedup"] is None


def _picture(**over: object) -> dict:
    picture = {"status": {"mode": "remote", "drafter": {"last_error": "refused"},
                          "tokenizer_check": {"match": True}, "target": {"ready": True,
                                                                         "verify_limit": 8}},
               "health": {"coordinator": {"url": "http://c", "healthy": True},
                          "drafter": {"url": "http://d", "healthy": True}},
               "pool": None}
    picture.update(over)
    return picture


def test_problems_say_what_is_wrong_and_the_fix() -> None:
    assert dashboard.problems(_picture()) == []
    down = _picture(health={"coordinator": {"url": "http://c", "healthy": True},
                            "drafter": {"url": "http://d", "healthy": False}})
    (problem,) = dashboard.problems(down)
    assert problem["where"] == "drafter" and "refused" in problem["what"]
    assert "start the drafter" in problem["fix"]
    worker = {"name": "worker1", "endpoint": "h:1", "healthy": False}
    everything = _picture(health={"coordinator": {"url": "http://c", "healthy": False},
                                  "drafter": None},
                          pool={"workers": [worker]},
                          status={"mode": "remote", "tokenizer_check": {"match": False,
                                                                        "reason": "vocab"},
                                  "target": {"ready": True, "verify_limit": 0,
                                             "verify": "no verify patch"}})
    assert [p["where"] for p in dashboard.problems(everything)] == [
        "coordinator", "drafter", "coordinator", "worker1"]


def test_telemetry_rolling_view_rates_positions_series_and_requests(
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = Telemetry()
    stats = t.request_started("remote")
    t.slot_taken(stats, 0.0)
    now = 10_000.0
    # Two drafting rounds (4 drafted; 2 then 4 accepted) and one target-only round.
    rounds = [Round(4, 2, 3, 0.01, 0.03), Round(4, 4, 5, 0.01, 0.03), Round(0, 0, 1, None, 0.02)]
    clock = iter([now - 20, now - 19, now - 18, now - 17, now - 16, now - 15])
    monkeypatch.setattr(telemetry.time, "time", lambda: next(clock))
    for r in rounds:
        t.on_round(stats, r)
    t.on_fallback(stats, "down")
    t.request_finished(stats, 0.2)
    monkeypatch.undo()
    view = t.dashboard(now=now)
    assert view["speculative_tok_s"] == pytest.approx(8 / 0.08)
    assert view["target_only_tok_s"] == pytest.approx(1 / 0.02)
    assert view["acceptance"] == pytest.approx(6 / 8)
    assert view["tokens_per_round"] == pytest.approx(4.0)
    assert [p["acceptance"] for p in view["positions"]] == [1.0, 1.0, 0.5, 0.5]
    assert view["k_drafted"] == {"4": 2} and view["fallbacks"] == {"down": 1}
    assert view["last_fallback"]["reason"] == "down"
    (req,) = view["requests"]
    assert req["tokens"] == 9 and req["tok_s"] == pytest.approx(45.0)
    assert len(view["series"]) == SERIES_S // 5
    assert sum(p["tok_s"] * 5 for p in view["series"]) == pytest.approx(9)
    # Out of the window: no rates, and the series forgets them after SERIES_S.
    later = t.dashboard(now=now + 120)
    assert later["speculative_tok_s"] is None and later["acceptance"] is None
    assert sum(p["tok_s"] for p in t.dashboard(now=now + SERIES_S + 60)["series"]) == 0


def test_watch_renders_the_picture_and_its_problems() -> None:
    assert watch.sparkline([0, 1, 2, None, 4]) == "▁▂▄ █"
    assert watch.sparkline([None, 0.5], 1.0) == " ▄"
    assert watch.sparkline([0.0, 0.0]) == "▁▁"
    picture = {
        "status": {"mode": "remote", "speculation_active": True, "target": {"model": "m"},
                   "drafter": {"last_error": None}},
        "health": {"proxy": {"healthy": True}, "coordinator": {"url": "http://c", "healthy": True},
                   "drafter": {"url": "http://d", "healthy": False}},
        "pool": {"n_layers": 5, "coordinator_layers": {"CPU": [[0, 0]]}, "workers": [
            {"name": "worker0", "endpoint": "h:1", "healthy": True, "layers": [[1, 4]],
             "devices": [{"backend": "CPU", "total_mib": 100}], "used_mib": 37.0,
             "link": {"rtt_ms": 0.1}}]},
        "speculation": dashboard.speculation_view(_learned(), {"fallbacks": {"down": 3},
                                                               "last_fallback": {"reason": "down",
                                                                                 "at": 1.0}}),
        "series": [{"tok_s": 1.0, "acceptance": 0.5}], "throughput": {"tok_s": 1.0},
        "load": {"running": 1, "queued": 0, "slots": [{"id": 0, "busy": True}],
                 "requests": [{"tokens": 9, "latency_s": 0.2}]},
        "problems": [{"where": "drafter", "what": "down", "fix": "start it"}],
    }
    console = Console(width=200, record=True)
    console.print(watch.render(picture, None, "local pool"))
    text = console.export_text()
    for want in ("worker0", "layers 1-4", "down 3 (last: down)", "fix: start it", "■"):
        assert want in text, want
    finding = {"status": "fail", "name": "model", "message": "t.gguf: no such file",
               "fix": "copy the model"}
    console.print(watch.render(None, "the proxy does not answer", "local pool", [finding]))
    text = console.export_text()
    assert "does not answer" in text and "doctor: fail model: t.gguf" in text
    assert "fix: copy the model" in text


def test_the_state_file_keys_the_proxy_reads_exist(tmp_path: Path) -> None:
    """The dashboard reads a local pool's state file without importing pool code (the layer
    rule): the keys it uses must be the ones localpool writes."""
    state = _state(tmp_path)
    keys = set(asdict(localpool.Service("n", "rpc", "h", 1, 2, None, "l")))
    assert {"name", "kind", "host", "port", "pid", "log"} <= keys
    assert {"services", "model", "draft"} <= set(state)


def test_pool_view_through_emulated_links_maps_each_relay_to_its_worker(tmp_path: Path) -> None:
    state = _state(tmp_path)
    # `start --local --link wifi`: the coordinator names the relays (ports 60052, 60053).
    state["link"] = "wifi"
    state["services"] += [{"name": f"link{i}", "kind": "link", "host": "127.0.0.1",
                           "port": 60052 + i, "pid": 2000 + i} for i in range(2)]
    log = COORDINATOR_LOG.replace(":5005", ":6005")
    view = dashboard.pool_view(state, log, {}, running=lambda pid: True,
                               links={"127.0.0.1": 0.001})
    w0, w1 = view["workers"]
    assert (w0["layers"], w1["layers"]) == ([[0, 4]], [[5, 8]])
    assert w0["used_mib"] == 10 and w0["link"]["emulated"] == "wifi"
    assert w0["link"]["via"] == "127.0.0.1:60052" and w0["link"]["rtt_ms"] is None
    assert view["coordinator_layers"] == {}
