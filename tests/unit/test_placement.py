"""The one split rule (tightwad.pool.placement.place): pure arithmetic over measured devices."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tightwad.pool import placement
from tightwad.pool.placement import Device, GiB, MiB, ModelShape, PlacementError, place

# An 8B-class Q4 model: 32 layers of ~110 MiB, a 128k-vocabulary output layer, KV for 4 x 4k.
MODEL = ModelShape(n_layer=32, layer_bytes=110 * MiB, output_bytes=400 * MiB,
                   kv_layer_bytes=16 * MiB, n_embd=4096, n_vocab=128256)


def gpu(name: str, free_gib: float, layer_ms: float = 0.5, rtt_ms: float = 0.3,
        bw: float = 110e6) -> Device:
    return Device(name, int(free_gib * GiB), layer_ms, layer_ms * 1.1, rtt_ms, bw)


def held(p: placement.Placement) -> dict[str, int]:
    return {p.names[i]: n for i, n in enumerate(p.chosen.layers) if n}


def test_llama_cpp_mapping_of_integer_weights_is_exact():
    # Integer weights are layer counts; the output layer counts as layer n_layer.
    assert placement.layers_from_split([10, 0, 23], 32) == ((10, 0, 22), 2)
    assert placement.layers_from_split([33, 0, 0], 32) == ((32, 0, 0), 0)
    # Proportions: llama.cpp's upper_bound over cumulative shares of n_layer + 1.
    assert placement.layers_from_split([0.5, 0.5], 32) == ((17, 15), 1)
    with pytest.raises(PlacementError):
        placement.layers_from_split([0, 0], 4)


def test_memory_limits_are_respected():
    # The fast device holds only part of the model: it is filled, the rest goes elsewhere.
    devices = [gpu("small-fast", 2.0, layer_ms=0.3), gpu("big-slow", 24.0, layer_ms=2.0)]
    p = place(MODEL, devices)
    assert p.mode == "speed"
    for i, d in enumerate(devices):
        need = p.chosen.layers[i] * (MODEL.layer_bytes + MODEL.kv_layer_bytes) + (
            MODEL.output_bytes if i == p.chosen.output else 0)
        assert need <= placement.usable(d.free)
    assert sum(p.chosen.layers) == MODEL.n_layer
    assert p.chosen.layers[0] == placement.capacity(MODEL, devices[0], p.chosen.output == 0)
    # Nothing fits: a clear error with the numbers.
    with pytest.raises(PlacementError, match="does not fit"):
        place(MODEL, [gpu("a", 1.0), gpu("b", 1.0)])


def test_a_device_too_slow_or_too_far_is_left_out():
    fast = [gpu("4070", 3.0, layer_ms=0.4), gpu("2070", 8.0, layer_ms=0.7)]
    xeon = Device("xeon", 64 * GiB, 12.0, 30.0, 0.3, 110e6)   # a slow CPU, wired
    laptop = gpu("laptop", 8.0, layer_ms=0.5, rtt_ms=40.0, bw=3e6)  # bad Wi-Fi
    p = place(MODEL, [*fast, xeon, laptop])
    assert held(p).keys() == {"4070", "2070"}
    assert "left out xeon, laptop" in p.reason
    assert p.speedup is not None and p.speedup > 1.3
    # The memory-proportional split gives the slow host most of the layers.
    assert p.memory.layers[2] > p.memory.layers[0]
    assert p.memory.ms_token is not None and p.chosen.ms_token is not None
    assert p.chosen.ms_token < p.memory.ms_token


def test_fewest_hosts_when_more_only_add_link_cost():
    p = place(MODEL, [gpu("a", 24.0), gpu("b", 24.0), gpu("c", 24.0)])
    assert held(p) == {"a": 32}
    assert p.tensor_split == "33,0,0"  # the output layer counted on the device that holds it


def test_ties_are_stable():
    devices = [gpu("a", 24.0, rtt_ms=0.0), gpu("b", 24.0, rtt_ms=0.0)]
    first = place(MODEL, devices)
    assert first.as_dict() == place(MODEL, devices).as_dict()
    assert held(first) == {"a": 32}
    # Equal costs: the earlier device wins, whatever the dict/set order.
    assert place(MODEL, list(reversed(devices))).names[first.chosen.output] == "b"


def test_output_layer_goes_where_verifies_are_cheapest():
    # Two devices needed (neither holds the model alone); one slower, behind a slow link. The
    # output layer (400 MiB of compute + the logits rows) goes on the fast, near one, which is
    # then moved behind the other in --rpc order (llama.cpp puts the output on the last one).
    near = gpu("near", 4.0, layer_ms=0.5)
    far = gpu("far", 4.0, layer_ms=1.5, rtt_ms=1.0, bw=5e6)
    p = place(MODEL, [near, far], objective="verify")
    assert p.names[p.chosen.output] == "near"
    assert p.order == (1, 0)
    assert p.split[-1] == p.chosen.layers[0] + 1
    assert placement.layers_from_split(p.split, MODEL.n_layer) == (
        tuple(p.chosen.layers[i] for i in p.order), 1)


def test_uniform_pool_is_within_3_percent_of_memory_proportional():
    # Identical devices on a LAN where links cost nothing: no loss against memory.
    devices = [gpu(n, 8.0, rtt_ms=0.0, bw=1e12) for n in "abc"]
    p = place(MODEL, devices)
    assert p.chosen.ms_token is not None and p.memory.ms_token is not None
    assert p.chosen.ms_token <= p.memory.ms_token * 1.03
    assert p.memory.ms_token <= p.chosen.ms_token * 1.03


def test_unmeasured_devices_fall_back_to_memory_with_a_reason():
    devices = [gpu("a", 8.0), Device("b", 8 * GiB)]
    p = place(MODEL, devices)
    assert p.mode == "memory"
    assert "no speed measurement for b" in p.reason
    assert p.split == tuple(placement.propose_split([d.free for d in devices]))
    assert p.chosen.ms_token is None


def test_memory_and_explicit_modes():
    devices = [gpu("a", 8.0), gpu("b", 4.0)]
    mem = place(MODEL, devices, mode="memory")
    assert mem.mode == "memory" and "as asked" in mem.reason
    assert mem.chosen.ms_token is not None  # measured devices: the prediction is printed too
    exp = place(MODEL, devices, mode="explicit", explicit=[1, 1])
    assert exp.tensor_split == "1,1" and exp.chosen.layers == (17, 15)
    with pytest.raises(PlacementError, match="2 non-negative numbers"):
        place(MODEL, devices, mode="explicit", explicit=[1])
    with pytest.raises(PlacementError, match="unknown split mode"):
        place(MODEL, devices, mode="fast")


def test_describe_names_the_split_the_prediction_and_the_alternative():
    p = place(MODEL, [gpu("a", 24.0), Device("slow", 24 * GiB, 9.0, 9.0, 0.3, 110e6)])
    text = p.describe()
    assert text.startswith("speed: layers a: 32 +output (")
    assert "ms/token" in text and "memory-proportional: a: 17, slow: 15 +output" in text


def test_rpc_order_changes_only_when_it_must():
    # The output's device is already the last one with layers: --rpc stays in inventory order.
    p = place(MODEL, [gpu("slow", 24.0, layer_ms=5.0), gpu("fast", 24.0)])
    assert held(p) == {"fast": 32} and p.order == (0, 1) and p.tensor_split == "0,33"


def test_a_split_over_the_same_devices_needs_a_clear_win():
    # Three devices that must all be used; per-layer times 20% apart (a busy machine's probe
    # can be that wrong for identical devices): the split stays memory-proportional.
    devices = [gpu(n, 2.0, layer_ms=ms, rtt_ms=0.0, bw=1e12)
               for n, ms in (("a", 0.5), ("b", 0.6), ("c", 0.5))]
    p = place(MODEL, devices)
    assert p.mode == "memory" and "uses the same devices" in p.reason, p.reason
    assert p.split == tuple(placement.propose_split([d.free for d in devices]))
    # 3x apart is a real difference: the faster devices get more layers.
    devices[1] = gpu("b", 2.0, layer_ms=1.5, rtt_ms=0.0, bw=1e12)
    p = place(MODEL, devices)
    assert p.mode == "speed" and p.chosen.layers[1] < p.memory.layers[1]


def test_a_chain_probe_prices_each_extra_host():
    # Three identical devices that must all be used, each measured alone.
    devices = [Device(n, int(2.0 * GiB), 0.5, 0.6, 0.1, 1e9, base_ms=1.0) for n in "abc"]
    split = [1.0, 1.0, 1.0]
    layers, output = placement.layers_from_split(split, MODEL.n_layer)
    alone = place(MODEL, devices, mode="explicit", explicit=split).chosen.ms_token
    assert alone is not None
    # The chain ran 3 ms slower than its parts: 1.5 ms for each of the 2 hosts beyond the first.
    hop = placement.hop_ms(MODEL, devices, split, alone + 3.0)
    assert hop == pytest.approx(1.5)
    # A chain faster than its parts (a throttled host's bursts beat its probe) costs nothing.
    assert placement.hop_ms(MODEL, devices, split, alone - 2.0) == 0.0
    # A hop figure already on the devices is not counted twice when measuring it again.
    priced = [replace(d, hop_ms=hop) for d in devices]
    assert placement.hop_ms(MODEL, priced, split, alone + 3.0) == pytest.approx(1.5)
    # The rule charges it per host beyond the first: the 3-host chain predicts what was
    # measured, a split over two of them one hop less, one host none.
    chain = place(MODEL, priced, mode="explicit", explicit=split)
    assert chain.chosen.ms_token == pytest.approx(alone + 3.0)
    two = place(MODEL, devices, mode="explicit", explicit=[1.0, 1.0, 0.0]).chosen.ms_token
    two_priced = place(MODEL, priced, mode="explicit", explicit=[1.0, 1.0, 0.0]).chosen.ms_token
    assert two is not None and two_priced == pytest.approx(two + 1.5)
    one = place(MODEL, devices, mode="explicit", explicit=[1.0, 0.0, 0.0]).chosen.ms_token
    one_priced = place(MODEL, priced, mode="explicit", explicit=[1.0, 0.0, 0.0]).chosen.ms_token
    assert one_priced == one
    assert (layers, output) == (chain.chosen.layers, chain.chosen.output)
    with pytest.raises(PlacementError, match="at least two"):
        placement.hop_ms(MODEL, devices, [1.0, 0.0, 0.0], alone)


def test_hop_cost_tips_the_rule_to_fewer_hosts():
    # Two devices whose layers are faster split, but each extra host costs a measured hop:
    # without it the rule spreads, with it one host holds the model.
    devices = [Device(n, 24 * GiB, 0.5, 0.6, 0.1, 1e9, base_ms=1.0) for n in "ab"]
    assert held(place(MODEL, devices)) == {"a": 32}  # no reason to spread: same speed
    fast = [Device("a", 24 * GiB, 0.5, 0.6, 0.1, 1e9, base_ms=1.0),
            Device("b", 2 * GiB, 0.1, 0.12, 0.1, 1e9, base_ms=1.0)]
    spread = place(MODEL, fast)
    assert len(held(spread)) == 2
    hopped = place(MODEL, [replace(d, hop_ms=20.0) for d in fast])
    assert held(hopped) == {"a": 32}
    assert "left out b" in hopped.reason
    # The reasoning doctor prints names the measured chain cost.
    assert "each host after the first adds 20.00 ms" in hopped.describe()
    assert "after the first" not in spread.describe()
