"""The dashboard's picture of a deployed (Ansible) pool: the description the coordinator role
writes (filter_plugins/tightwad_pool.py, ``tightwad_pool_description``) turned into the page's
pool by ``tightwad.server.dashboard.deployed_pool_view``: workers in ``--rpc`` order, each one's
layers as llama.cpp assigns them under the applied ``--tensor-split``, the deploy-time probe's
bandwidth, health honestly derived from the coordinator's, and what the page says when the
description is missing, foreign or stale. The proxy reads ``dashboard.pool_file`` from its
config; the deploy test (tests/deploy/test_ansible_deploy.py) shows it on real hosts."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import pytest

from support import REPO
from tightwad.config import parse_config
from tightwad.llamaserver.layers import layer_devices
from tightwad.pool.gguf_info import read_info
from tightwad.server import dashboard

_spec = importlib.util.spec_from_file_location("tightwad_pool_filters_dashboard",
                                               REPO / "filter_plugins" / "tightwad_pool.py")
assert _spec is not None and _spec.loader is not None
pool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pool)

HOSTVARS = {
    "w1": {"ansible_host": "10.77.0.11"},
    "w2": {"ansible_host": "10.77.0.12",
           "rpc_worker_instances": [{"name": "a", "port": 50052, "device": "CUDA0"},
                                    {"name": "b", "port": 50053, "device": "CUDA1"}]},
}
ENDPOINTS = pool.tightwad_rpc_endpoints(["w1", "w2"], HOSTVARS)
# The placement's order is not the inventory's: the output layer's device goes last.
PLACED = {"rpc": "10.77.0.12:50053,10.77.0.11:50052,10.77.0.12:50052",
          "tensor_split": "0.2,0.5,0.3", "mode": "speed",
          "description": "speed: least time per token", "order": [2, 0, 1]}
MEASURED = [
    {"rpc": "10.77.0.11:50052", "free": 1, "rtt_ms": 0.4, "bandwidth_bps": 12.5e6,
     "layer_ms": 1.0, "skipped": "", "note": ""},
    {"rpc": "10.77.0.12:50052", "free": 0, "skipped": "busy (serving a coordinator): not probed"},
]


def describe(model: Path, **over: Any) -> dict[str, Any]:
    """The description as the coordinator role writes it, read back as JSON (the file)."""
    args: dict[str, Any] = {"model_file": str(model), "model": model.name, "draft": "",
                            "gpu_layers": 999, "split_setting": "auto",
                            "free_mib": [4000, 11000, 7000], "measurements": MEASURED,
                            "coordinator": "coord"}
    args.update(over)
    placed = args.pop("placement", PLACED)
    return json.loads(json.dumps(pool.tightwad_pool_description(ENDPOINTS, placed, **args)))


def layers_of(spans: list[list[int]]) -> list[int]:
    return [il for first, last in spans for il in range(first, last + 1)]


@pytest.fixture(scope="module")
def model(models: Any) -> Path:
    return Path(models.target)


def test_the_description_holds_the_workers_in_rpc_order_and_the_model_shape(model: Path) -> None:
    description = describe(model)
    assert description["version"] == dashboard.DESCRIPTION_VERSION
    assert [w["rpc"] for w in description["workers"]] == PLACED["rpc"].split(",")
    assert [(w["host"], w["instance"], w["device"], w["free_mib"])
            for w in description["workers"]] == [("w2", "b", "CUDA1", 7000),
                                                 ("w1", "main", "", 4000),
                                                 ("w2", "a", "CUDA0", 11000)]
    assert description["n_layer"] == read_info(model).arch_value("block_count") == 8
    assert (description["tensor_split"], description["rpc"]) == ("0.2,0.5,0.3", PLACED["rpc"])
    assert description["measurements"] == MEASURED
    # No secret: nothing of the inventory but hosts, instances, devices and addresses.
    assert "key" not in json.dumps(description).lower()
    # Measurements only describe an auto split; a model given by URL has no layer count here.
    by_memory = describe(model, split_setting="memory", model_file="")
    assert by_memory["measurements"] == [] and by_memory["n_layer"] is None
    with pytest.raises(pool.AnsibleFilterError, match="is not the workers"):
        describe(model, placement={**PLACED, "rpc": "10.77.0.11:50052"})


@pytest.mark.parametrize("split,gpu_layers", [("0.2,0.5,0.3", 999), ("1,1,1", 999),
                                              ("3,0,1", 999), ("0.2,0.5,0.3", 5)])
def test_each_worker_holds_the_layers_llama_cpp_gives_it(model: Path, split: str,
                                                         gpu_layers: int) -> None:
    description = describe(model, placement={**PLACED, "tensor_split": split},
                           gpu_layers=gpu_layers)
    view = dashboard.deployed_pool_view(description, True, {"10.77.0.11": 0.00042})
    rpcs = PLACED["rpc"].split(",")
    assert [w["endpoint"] for w in view["workers"]] == rpcs
    assert [w["name"] for w in view["workers"]] == ["w2/b", "w1", "w2/a"]
    n_layer = 8
    assigned = layer_devices([float(x) for x in split.split(",")], n_layer,
                             min(gpu_layers, n_layer + 1))
    for i, worker in enumerate(view["workers"]):
        want = [il for il, d in enumerate(assigned) if d == i]
        assert layers_of(worker["layers"]) == want, (worker["name"], split)
        assert worker["n_layers"] == len(want)
    on_cpu = [il for il, d in enumerate(assigned) if d is None]
    assert layers_of(view["coordinator_layers"].get("CPU", [])) == on_cpu
    # Together: every layer 0..n_layer (the output layer) once.
    every = sorted(il for w in view["workers"] for il in layers_of(w["layers"])) + on_cpu
    assert sorted(every) == list(range(n_layer + 1)) and view["n_layers"] == n_layer + 1
    assert view["note"] is None and dashboard.problems(_picture(view)) == []
    # The order is the coordinator's --rpc, whatever order the workers are listed in.
    description["workers"].reverse()
    again = dashboard.deployed_pool_view(description, True, {})
    assert [w["endpoint"] for w in again["workers"]] == rpcs
    assert [w["layers"] for w in again["workers"]] == [w["layers"] for w in view["workers"]]


def test_links_rtt_from_the_proxy_and_bandwidth_from_the_deploy_probe(model: Path) -> None:
    view = dashboard.deployed_pool_view(describe(model), True, {"10.77.0.11": 0.00042,
                                                                 "10.77.0.12": None})
    w2b, w1, w2a = view["workers"]
    assert w1["link"]["rtt_ms"] == 0.42 and w2a["link"]["rtt_ms"] is None
    # 12.5e6 bytes/s (the probe's unit) is 100 Mbit/s.
    assert w1["link"]["bandwidth_mbps"] == 100.0 and "deploy time" in w1["link"]["note"]
    assert w2a["link"]["bandwidth_mbps"] is None and "busy" in w2a["link"]["note"]
    assert w2b["link"]["bandwidth_mbps"] is None and "no probe result" in w2b["link"]["note"]
    assert {w["link"]["emulated"] for w in view["workers"]} == {None}
    assert w1["link"]["via"] == "10.77.0.11:50052"
    # The workers' devices are not visible from the proxy: said, with what the deploy knew.
    assert w1["devices"] == [] and "all of its host's" in w1["devices_note"]
    assert "--device CUDA1" in w2b["devices_note"] and "7000 MiB free" in w2b["devices_note"]
    # A memory split keeps no measurements: no bandwidth at all, and the page says why.
    memory = dashboard.deployed_pool_view(describe(model, split_setting="memory"), True, {})
    assert {w["link"]["bandwidth_mbps"] for w in memory["workers"]} == {None}
    assert all("auto only" in w["link"]["note"] for w in memory["workers"])
    assert dashboard.description_hosts(describe(model)) == ["10.77.0.11", "10.77.0.12"]


def test_worker_health_is_the_coordinators_and_says_so(model: Path) -> None:
    down = dashboard.deployed_pool_view(describe(model), False, {})
    assert [w["healthy"] for w in down["workers"]] == [False] * 3
    assert all("coordinator" in w["health_note"] for w in down["workers"])
    picture = _picture(down, coordinator_healthy=False)
    # One problem, the coordinator's: no claim that a worker process is not running.
    assert [p["where"] for p in dashboard.problems(picture)] == ["coordinator"]
    up = dashboard.deployed_pool_view(describe(model), True, {})
    assert [w["healthy"] for w in up["workers"]] == [True] * 3


def test_a_missing_foreign_or_stale_description_says_how_to_get_one(model: Path) -> None:
    missing = dashboard.deployed_pool_view(None, True, {}, where="/etc/tightwad/proxy-pool.json")
    assert missing["workers"] == [] and "/etc/tightwad/proxy-pool.json is missing" in missing["error"]
    assert "site.yml" in missing["fix"]
    (problem,) = dashboard.problems(_picture(missing))
    assert problem["where"] == "pool" and "site.yml" in problem["fix"]
    for foreign in ({}, [], {"version": 99, "workers": []}, {"version": 1}):
        view = dashboard.deployed_pool_view(foreign, True, {})
        assert view["workers"] == [] and "not a tightwad pool description" in view["error"]
    # A swap since the deploy: the workers stay, the old model's layers are not drawn.
    stale = dashboard.deployed_pool_view(describe(model), True, {},
                                         served_model="/var/lib/tightwad/models/other.gguf")
    assert len(stale["workers"]) == 3 and stale["n_layers"] == 0
    assert all(w["layers"] == [] for w in stale["workers"]) and "other.gguf" in stale["note"]
    assert [p["where"] for p in dashboard.problems(_picture(stale))] == ["pool"]
    same = dashboard.deployed_pool_view(describe(model), True, {},
                                        served_model=f"/var/lib/tightwad/models/{model.name}")
    assert same["n_layers"] == 9 and "fix" not in same
    unknown = dashboard.deployed_pool_view(describe(model, model_file=""), True, {})
    assert unknown["n_layers"] == 0 and "layer count is unknown" in unknown["note"]


def _picture(pool_view: dict[str, Any], coordinator_healthy: bool = True) -> dict[str, Any]:
    return {"status": {"mode": "remote", "tokenizer_check": {"match": True}, "target": {}},
            "health": {"coordinator": {"url": "http://c", "healthy": coordinator_healthy},
                       "drafter": None},
            "pool": pool_view}


def test_the_proxy_draws_the_file_its_config_names(model: Path, tmp_path: Path) -> None:
    """``dashboard.pool_file`` reaches the dashboard through the app; the file is read on each
    look (a new description needs no restart) and the links are timed for real."""
    from tightwad.server.app import create_app

    path = tmp_path / "proxy-pool.json"
    described = describe(model)
    for worker in described["workers"]:  # hosts this machine answers for
        worker["rpc"] = worker["rpc"].replace("10.77.0.11", "127.0.0.1")
    described["rpc"] = described["rpc"].replace("10.77.0.11", "127.0.0.1")
    config = parse_config({"dashboard": {"pool_file": str(path)}}, env={})
    board = create_app(config)[dashboard.DASHBOARD]
    assert board.pool_file == path and board.pool_state is None

    missing = asyncio.run(board._pool(time.time(), True, None))
    assert missing is not None and str(path) in missing["error"] and "site.yml" in missing["fix"]
    path.write_text("{not json")
    assert "unreadable" in asyncio.run(board._pool(time.time(), True, None))["error"]
    path.write_text(json.dumps(described))
    view = asyncio.run(board._pool(time.time(), True, None))
    assert [w["name"] for w in view["workers"]] == ["w2/b", "w1", "w2/a"]
    local = view["workers"][1]
    assert local["endpoint"] == "127.0.0.1:50052" and local["link"]["rtt_ms"] is not None

    without = create_app(parse_config({}, env={}))[dashboard.DASHBOARD]
    assert without.pool_file is None and asyncio.run(without._pool(time.time(), True, None)) is None
