"""The local pool's link option as data: state files with and without a link, the labels every
output uses, and how ``tightwad bench`` finds (or does not find) the pool behind its URL."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tightwad.cli import bench, pool
from tightwad.pool import localpool
from tightwad.pool.localpool import LocalState, Service

OLD_STATE = {  # written by a tightwad without links: no "link" key, no "link" services
    "bin_dir": "/opt/llama/bin", "log_dir": "/var/log/tw", "model": "/m/target.gguf",
    "draft": "/m/draft.gguf", "ctx": 16384, "slots": 4, "version": localpool.STATE_VERSION,
    "services": [
        {"name": f"worker{i}", "kind": "rpc", "host": "127.0.0.1", "port": 50052 + i,
         "pid": 100 + i, "started": 5, "log": f"/l/worker{i}.log", "args": [], "env": {}}
        for i in range(2)] + [
        {"name": "proxy", "kind": "proxy", "host": "127.0.0.1", "port": 8088, "pid": 200,
         "started": 5, "log": "/l/proxy.log", "args": [], "env": {}}],
}


def _svc(name: str, kind: str, port: int) -> Service:
    return Service(name=name, kind=kind, host="127.0.0.1", port=port, pid=1, started=None,
                   log=f"/l/{name}.log")


def test_a_state_file_without_link_loads_as_direct(tmp_path: Path) -> None:
    localpool.state_path(tmp_path).write_text(json.dumps(OLD_STATE))
    state = localpool.load_state(tmp_path)
    assert state is not None and state.link is None
    assert state.rpc_endpoints() == ["127.0.0.1:50052", "127.0.0.1:50053"]
    assert localpool.link_label(state.link).startswith("direct")


def test_a_linked_state_round_trips_and_points_rpc_at_the_relays(tmp_path: Path) -> None:
    services = [_svc("worker0", "rpc", 50052), _svc("worker1", "rpc", 50053),
                _svc("link0", "link", 41001), _svc("link1", "link", 41002),
                _svc("proxy", "proxy", 8088)]
    localpool.save_state(tmp_path, LocalState(bin_dir="b", log_dir="l", model="m", draft=None,
                                              ctx=1, slots=1, services=services, link="wifi"))
    raw = json.loads(localpool.state_path(tmp_path).read_text())
    assert raw["link"] == "wifi" and raw["version"] == localpool.STATE_VERSION
    state = localpool.load_state(tmp_path)
    assert state is not None and state.link == "wifi"
    assert [s.name for s in state.by_kind("link")] == ["link0", "link1"]
    assert state.rpc_endpoints() == ["127.0.0.1:41001", "127.0.0.1:41002"]


def test_link_choice_and_labels() -> None:
    assert localpool.link_choice(None) is None
    assert localpool.link_choice("none") is None  # no relay for a link without delay
    assert localpool.link_choice("wifi") == "wifi"
    with pytest.raises(ValueError, match="wifi"):
        localpool.link_choice("carrier-pigeon")
    assert localpool.link_label("wifi") == (
        "wifi (emulated: 5 ms RTT, jitter +-1 ms, 200 Mbit/s each way)")
    assert "emulated" in localpool.link_label("lan")
    assert "emulated" not in localpool.link_label(None)


def test_start_accepts_exactly_the_emulator_profiles() -> None:
    parser = argparse.ArgumentParser()
    pool.add_parsers(parser.add_subparsers())
    assert parser.parse_args(["start", "--local", "--link", "wifi"]).link == "wifi"
    assert parser.parse_args(["start", "--local"]).link is None
    with pytest.raises(SystemExit):
        parser.parse_args(["start", "--local", "--link", "5g"])


def test_bench_finds_the_local_pool_only_behind_its_own_proxy(tmp_path: Path) -> None:
    localpool.state_path(tmp_path).write_text(json.dumps({**OLD_STATE, "link": "wifi"}))
    assert bench.local_pool_of("http://127.0.0.1:8088", tmp_path) is not None
    assert bench.local_pool_of("http://localhost:8088/", tmp_path) is not None
    assert bench.local_pool_of("http://127.0.0.1:9999", tmp_path) is None
    assert bench.local_pool_of("http://10.0.0.7:8088", tmp_path) is None
    assert bench.local_pool_of("http://127.0.0.1:8088", tmp_path / "none") is None


def test_bench_says_unknown_for_another_proxy() -> None:
    link, pair = bench.pool_facts(None, timeout=1)
    assert link["label"] == pair["label"] == "unknown (not a local pool)"
    assert link["emulated"] is None and pair["cost_ratio"] is None


def test_pair_label_names_files_shapes_and_the_measured_ratio() -> None:
    pair = {"target": {"file": "t.gguf", "layers": 24, "width": 256},
            "draft": {"file": "d.gguf", "layers": 2, "width": 256},
            "cost_ratio": 0.25, "draft_ms_per_token": 2.0, "target_ms_per_token": 8.0}
    assert bench.pair_label(pair) == (
        "target t.gguf (24 layers x 256), draft d.gguf (2 layers x 256); draft/target cost "
        "per token 0.25 (2.0 ms vs 8.0 ms pooled)")
    assert bench.pair_label({**pair, "draft": None, "cost_ratio": None}) == (
        "target t.gguf (24 layers x 256), draft none")
