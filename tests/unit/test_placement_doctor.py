"""doctor's placement check (tightwad.pool.checks.check_placement) and the measurements it reads:
the chosen split, the predicted ms/token and the memory-proportional alternative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import tiny_gguf
from tightwad.pool import checks, placement, probe, rpcproto
from tightwad.pool.gguf_info import read_info

GiB = placement.GiB


def _model(path: Path, n_layer: int = 8, n_embd: int = 256, n_vocab: int = 512) -> Path:
    return tiny_gguf(path, n_layer, n_embd, n_vocab)


def _hello(port: int, free: int, rtt_s: float = 0.0002) -> rpcproto.Hello:
    return rpcproto.Hello("192.0.2.10", port, (7, 0, 0), rtt_s, rtt_s,
                          [rpcproto.Device(0, free, free)], 100e6)


def _view(model: Path, **kw) -> checks.PoolView:
    workers = [checks.Endpoint(f"rig/w{i}", "192.0.2.10", 50052 + i) for i in range(3)]
    return checks.PoolView(source="lan", workers=workers, model=model, ctx=2048, slots=2,
                           coordinator=checks.Endpoint("coord", "192.0.2.1", 8090), **kw)


def _facts(model: Path, **kw) -> checks.Facts:
    hellos = {f"rig/w{i}": _hello(50052 + i, 8 * GiB) for i in range(3)}
    return checks.Facts(hellos=hellos, target=read_info(model), **kw)


MEASURED = [probe.Measurement("192.0.2.10:50052", layer_ms=0.5, rtt_ms=0.2, bandwidth_bps=1e8),
            probe.Measurement("192.0.2.10:50053", layer_ms=2.0, rtt_ms=0.2, bandwidth_bps=1e8),
            probe.Measurement("192.0.2.10:50054", layer_ms=0.5, rtt_ms=20.0, bandwidth_bps=5e6)]


def test_doctor_prints_the_split_the_prediction_and_the_memory_alternative(tmp_path: Path):
    model = _model(tmp_path / "m.gguf")
    [check] = checks.check_placement(_view(model, measurements=MEASURED), _facts(model))
    assert check.status == checks.OK
    # The slow and the far worker only add time: all 8 layers and the output on w0.
    assert check.message.startswith("--rpc 192.0.2.10:50052,192.0.2.10:50053,192.0.2.10:50054 "
                                    "--tensor-split 9,0,0: speed: layers rig/w0: 8 +output (")
    assert "ms/token" in check.message
    assert "memory-proportional: rig/w0: 4, rig/w1: 3, rig/w2: 1 +output (" in check.message
    assert "left out rig/w1, rig/w2" in check.message
    # The same split the coordinator role applies for the same inputs (filter_plugins).
    chosen, _ = checks.placement_for(_view(model, measurements=MEASURED), _facts(model))
    assert chosen is not None and chosen.tensor_split == "9,0,0"


def test_doctor_without_layer_times_is_memory_proportional_and_says_how_to_measure(tmp_path):
    model = _model(tmp_path / "m.gguf")
    [check] = checks.check_placement(_view(model), _facts(model))
    assert check.status == checks.OK
    assert "--tensor-split 0.334,0.333,0.333: memory:" in check.message
    assert "no speed measurement for rig/w0, rig/w1, rig/w2" in check.message
    assert "doctor --measure" in check.fix


def test_doctor_warns_when_the_configured_split_is_much_slower(tmp_path: Path):
    model = _model(tmp_path / "m.gguf")
    [check] = checks.check_placement(_view(model, measurements=MEASURED, split="memory"),
                                     _facts(model))
    assert check.status == checks.WARN and "speed-aware would predict" in check.message
    assert check.fix == "set coordinator_tensor_split: auto"


def test_a_busy_worker_without_stored_memory_is_skipped(tmp_path: Path):
    model = _model(tmp_path / "m.gguf")
    facts = _facts(model)
    facts.hellos["rig/w1"] = rpcproto.Busy("serving")
    [check] = checks.check_placement(_view(model), facts)
    assert check.status == checks.SKIP and "rig/w1 is busy" in check.message


def test_measurements_from_the_probe_or_the_roles_kept_file(tmp_path: Path):
    probe_json = json.loads(json.dumps([m.as_dict() for m in MEASURED]))
    assert checks.load_measurements(probe_json) == MEASURED
    kept = {"rpc": [m.rpc for m in MEASURED] + ["192.0.2.11:50052"],
            "free_mib": [8192, 8192, 8192, 4096], "measurements": probe_json}
    loaded = checks.load_measurements(kept)
    assert [m.free for m in loaded] == [8 * GiB] * 3 + [4 * GiB]
    assert loaded[3].skipped == "not measured"
    with pytest.raises(ValueError, match="expected"):
        checks.load_measurements("nonsense")
