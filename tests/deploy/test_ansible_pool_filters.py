"""The pool filters the service roles share (filter_plugins/tightwad_pool.py): --rpc order,
service URLs, other hosts' role defaults, free memory per worker device and the tensor split
(tightwad.pool.placement's, the same rule ``tightwad init`` proposes). Pure functions, fed with
the output of the commands the coordinator role runs on the workers."""

from __future__ import annotations

import importlib.util

import pytest

from support import REPO, tiny_gguf
from tightwad import defaults
from tightwad.pool import placement

_spec = importlib.util.spec_from_file_location("tightwad_pool_filters",
                                               REPO / "filter_plugins" / "tightwad_pool.py")
pool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pool)

LIST_DEVICES = """\
Available devices:
  CUDA0: NVIDIA GeForce RTX 3060 (12044 MiB, 11800 MiB free)
  CUDA1: NVIDIA GeForce RTX 2070 (7971 MiB, 7600 MiB free)
"""
MEMINFO = "MemTotal:       32768000 kB\nMemFree:         1000000 kB\nMemAvailable:   20480000 kB\n"
HOSTVARS = {
    "rig": {"ansible_host": "10.0.0.10", "tightwad_pool_address": "192.168.7.10",
            "rpc_worker_instances": [{"name": "cuda0", "port": 50052, "device": "CUDA0"},
                                     {"name": "cuda1", "port": 50053, "device": "CUDA1"}]},
    "xeon": {"ansible_host": "192.168.7.13"},
    "v6": {"tightwad_pool_address": "fd00::5", "coordinator_port": 9000},
}


def test_endpoints_follow_inventory_order_with_defaults():
    endpoints = pool.tightwad_rpc_endpoints(["rig", "xeon"], HOSTVARS)
    assert [e["rpc"] for e in endpoints] == ["192.168.7.10:50052", "192.168.7.10:50053",
                                             "192.168.7.13:50052"]
    assert [e["device"] for e in endpoints] == ["CUDA0", "CUDA1", ""]
    assert endpoints[2]["name"] == "main"  # rpc_worker's default instance
    # An empty list counts as unset, as before.
    hostvars = {"a": {"ansible_host": "10.0.0.1", "rpc_worker_instances": []}}
    assert [e["rpc"] for e in pool.tightwad_rpc_endpoints(["a"], hostvars)] == \
        [f"10.0.0.1:{defaults.RPC_PORT}"]


def test_endpoints_name_each_workers_peer_port():
    """Where a worker takes hidden states pushed by the others: its port + the offset
    (rpc_worker's default), or nowhere when its host sets the offset to 0."""
    hostvars = {**HOSTVARS, "xeon": {"ansible_host": "192.168.7.13",
                                     "rpc_worker_peer_port_offset": 0}}
    endpoints = pool.tightwad_rpc_endpoints(["rig", "xeon"], hostvars)
    offset = defaults.RPC_PEER_PORT_OFFSET
    assert [e["peer"] for e in endpoints] == [f"192.168.7.10:{50052 + offset}",
                                             f"192.168.7.10:{50053 + offset}", ""]


def test_two_workers_on_one_port_are_refused():
    hostvars = {"a": {"ansible_host": "10.0.0.1",
                      "rpc_worker_instances": [{"name": "x", "port": 1}, {"name": "y", "port": 1}]}}
    with pytest.raises(pool.AnsibleFilterError, match="10.0.0.1:1"):
        pool.tightwad_rpc_endpoints(["a"], hostvars)


def test_service_urls():
    assert pool.tightwad_service_url(["xeon"], HOSTVARS, "coordinator_port") == \
        "http://192.168.7.13:8090"
    assert pool.tightwad_service_url(["xeon"], HOSTVARS, "drafter_port") == \
        "http://192.168.7.13:8091"
    assert pool.tightwad_service_url(["v6"], HOSTVARS, "coordinator_port") == \
        "http://[fd00::5]:9000"
    assert pool.tightwad_service_url([], HOSTVARS, "drafter_port") == ""


def test_other_hosts_role_variables_fall_back_to_the_role_defaults():
    coord = {"coordinator_parallel": 3}
    assert pool.tightwad_role_var(coord, "coordinator_parallel") == 3
    assert pool.tightwad_role_var({}, "coordinator_parallel") == defaults.SLOTS
    assert pool.tightwad_role_var({}, "drafter_parallel") == defaults.SLOTS
    assert pool.tightwad_role_var({}, "coordinator_verify_max_tokens") == defaults.VERIFY_MAX_TOKENS
    with pytest.raises(pool.AnsibleFilterError, match="no role default"):
        pool.tightwad_role_var({}, "coordinator_ctx_size")


def test_free_memory_of_gpu_and_cpu_devices():
    assert pool.tightwad_device_free_mib(LIST_DEVICES, MEMINFO, "CUDA1") == 7600
    assert pool.tightwad_device_free_mib(LIST_DEVICES, MEMINFO, "CUDA0,CUDA1") == 19400
    assert pool.tightwad_device_free_mib(LIST_DEVICES, MEMINFO, "") == 19400  # all devices
    # A CPU build lists no devices: the CPU device offers the available RAM.
    assert pool.tightwad_device_free_mib("Available devices:\n  (none)\n", MEMINFO, "") == 20000
    assert pool.tightwad_device_free_mib(LIST_DEVICES, MEMINFO, "CPU") == 20000
    with pytest.raises(pool.AnsibleFilterError, match="ROCm0 is not on this worker"):
        pool.tightwad_device_free_mib(LIST_DEVICES, MEMINFO, "ROCm0")
    with pytest.raises(pool.AnsibleFilterError, match="MemAvailable"):
        pool.tightwad_device_free_mib("", "", "")


def test_split_is_proportional_to_free_memory_in_rpc_order():
    endpoints = pool.tightwad_rpc_endpoints(["rig", "xeon"], HOSTVARS)
    free = pool.tightwad_free_mib(endpoints, {"rig": LIST_DEVICES, "xeon": "(none)"},
                                  {"rig": MEMINFO, "xeon": MEMINFO})
    assert free == [11800, 7600, 20000]
    split = pool.tightwad_tensor_split(free)
    # Devices this big keep a 10 % headroom each: the shares stay proportional to free memory.
    shares = [float(x) for x in split.split(",")]
    assert shares == pytest.approx([f / sum(free) for f in free], abs=0.002)
    assert sum(shares) == pytest.approx(1.0)
    # ONE rule: exactly what tightwad init proposes for the same devices.
    assert split == placement.format_split(placement.propose_split([f * placement.MiB for f in free]))
    # A device with less than its headroom free gets nothing.
    assert pool.tightwad_tensor_split([8192, 100]) == "1,0"
    with pytest.raises(pool.AnsibleFilterError, match="none free"):
        pool.tightwad_tensor_split([0, 0])
    with pytest.raises(pool.AnsibleFilterError, match="none free"):
        pool.tightwad_tensor_split([100, 200])  # below the headroom everywhere


def _tiny_gguf(path, n_layer=4, n_embd=64, n_vocab=256):
    """A GGUF with the shape placement reads (metadata and a tensor table), nothing more."""
    return tiny_gguf(path, n_layer, n_embd, n_vocab, n_ff=4 * n_embd, dtype="float32")


def test_placement_modes_and_the_speed_aware_split(tmp_path):
    endpoints = pool.tightwad_rpc_endpoints(["rig", "xeon"], HOSTVARS)
    rpcs = [e["rpc"] for e in endpoints]
    free = [11800, 7600, 20000]
    memory = pool.tightwad_tensor_split(free)
    # An explicit list is taken as given, in inventory order.
    explicit = pool.tightwad_placement(endpoints, [], split=[3, 1, 0])
    assert (explicit["tensor_split"], explicit["rpc"], explicit["mode"]) == \
        ("3,1,0", ",".join(rpcs), "explicit")
    with pytest.raises(pool.AnsibleFilterError, match="2 numbers for 3 RPC workers"):
        pool.tightwad_placement(endpoints, [], split=[1, 1])
    with pytest.raises(pool.AnsibleFilterError, match="use auto"):
        pool.tightwad_placement(endpoints, free, split="fastest")
    # memory, and auto without a model or measurements: the memory-proportional rule.
    for args in ((free, [], "", "auto", 1, "memory"), (free, [], "", "auto", 1, "auto")):
        got = pool.tightwad_placement(endpoints, *args)
        assert (got["tensor_split"], got["rpc"], got["mode"]) == (memory, ",".join(rpcs), "memory")
    model = _tiny_gguf(tmp_path / "m.gguf")
    unmeasured = pool.tightwad_placement(endpoints, free, [], str(model), 2048, 2, "auto")
    assert unmeasured["tensor_split"] == memory and "no speed measurement" in \
        unmeasured["description"]
    # Measured: the slow CPU device and the busy worker's absence are in the reasoning; the
    # split is placement.place's, the same doctor prints.
    measured = [{"rpc": rpcs[0], "layer_ms": 0.4, "rtt_ms": 0.3, "bandwidth_bps": 1e8},
                {"rpc": rpcs[1], "layer_ms": 0.6, "rtt_ms": 0.3, "bandwidth_bps": 1e8},
                {"rpc": rpcs[2], "layer_ms": 20.0, "rtt_ms": 0.3, "bandwidth_bps": 1e8}]
    got = pool.tightwad_placement(endpoints, free, measured, str(model), 2048, 2, "auto")
    assert got["mode"] == "speed" and got["tensor_split"] == "5,0,0"
    assert "left out" in got["description"] and rpcs[2] in got["description"]
    # Stable: the same inputs (kept on the coordinator) give the same split and --rpc order.
    assert pool.tightwad_placement(endpoints, free, measured, str(model), 2048, 2, "auto") == got
    busy = [*measured[:2], {"rpc": rpcs[2], "skipped": "busy (serving a coordinator)"}]
    fallback = pool.tightwad_placement(endpoints, free, busy, str(model), 2048, 2, "auto")
    assert fallback["tensor_split"] == memory
    assert "busy (serving a coordinator)" in fallback["description"]
