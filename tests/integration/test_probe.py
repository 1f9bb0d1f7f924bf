"""The placement probe against real ggml-rpc-servers (tightwad.pool.probe): probe models with
the model's own layers, a layer's time through the worker, the link's round trip and bandwidth;
and a worker that serves a coordinator is neither probed nor disturbed."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from support import tightwad_cli
from tightwad.pool import placement, probe
from tightwad.pool.gguf_info import read_info
from tightwad.pool.placement import place


def test_probe_models_keep_the_real_layers(models, tmp_path: Path):
    shape = probe.model_shape(models.target, 2048)
    info = read_info(models.target)
    assert shape.n_layer == info.arch_value("block_count") and shape.layer_bytes > 0
    assert shape.output_bytes > shape.layer_bytes  # a 128k-vocabulary output matrix
    assert shape.kv_layer_bytes == info.kv_cache_bytes(2048) // shape.n_layer
    small = probe.write_probe_model(models.target, tmp_path / "p1.gguf", 1)
    assert read_info(small).arch_value("block_count") == 1
    again = probe.model_shape(small)
    assert (again.layer_bytes, again.output_bytes) == (shape.layer_bytes, shape.output_bytes)
    # Metadata, embeddings and output are kept; only the other blocks' bytes are gone.
    assert small.stat().st_size < models.target.stat().st_size - (shape.n_layer - 2) * \
        shape.layer_bytes


def test_probe_times_a_layer_on_an_idle_worker(procs, bin_dir: Path, models, tmp_path: Path):
    worker = procs.rpc_worker(name="idle")
    [m] = probe.measure(models.target, [worker.endpoint], bin_dir, work_dir=tmp_path, repeats=2)
    assert not m.skipped, m.skipped
    assert m.rtt_ms is not None and 0 < m.rtt_ms < 50
    assert m.bandwidth_bps is not None and m.bandwidth_bps > 1e6
    assert m.free > 0
    assert m.layer_ms is not None and m.layer_ms > 0
    assert m.verify_layer_ms is not None and m.base_ms is not None
    # The probe's llama-servers are gone and the worker takes the next client (a coordinator).
    assert worker.alive()
    coordinator = procs.llama_server(models.target, rpc=[worker], ctx=512)
    assert coordinator.post("/completion", {"prompt": "Hi", "n_predict": 2})["tokens_predicted"]
    # What the rule makes of it.
    device = m.device("idle")
    assert device.measured
    chosen = placement.place(probe.model_shape(models.target, 512), [device])
    assert chosen.mode == "speed" and chosen.chosen.ms_token is not None


def test_probe_prices_a_chain_of_idle_workers(procs, bin_dir: Path, models, tmp_path: Path):
    workers = [procs.rpc_worker(name=f"chain{i}") for i in range(2)]
    found = probe.measure(models.target, [w.endpoint for w in workers], bin_dir,
                          work_dir=tmp_path, repeats=2)
    assert all(not m.skipped for m in found), [m.skipped for m in found]
    # One chain over both, one figure on each: what the second host costs beyond its parts.
    hops = {m.hop_ms for m in found}
    assert len(hops) == 1 and None not in hops, [m.note for m in found]
    [hop] = hops
    assert hop is not None and 0.0 <= hop < 100.0
    # The rule charges it: a split over both predicts one hop more than the same parts alone.
    shape = probe.model_shape(models.target, 512)
    priced = place(shape, [m.device() for m in found], mode="explicit", explicit=[1.0, 1.0])
    plain = place(shape, [replace(m.device(), hop_ms=None) for m in found], mode="explicit",
                  explicit=[1.0, 1.0])
    assert priced.chosen.ms_token is not None and plain.chosen.ms_token is not None
    assert priced.chosen.ms_token == pytest.approx(plain.chosen.ms_token + hop, abs=1e-3)
    # The chain's llama-server is gone: both workers take the next client.
    assert all(w.alive() for w in workers)
    coordinator = procs.llama_server(models.target, rpc=workers, ctx=512)
    assert coordinator.post("/completion", {"prompt": "Hi", "n_predict": 2})["tokens_predicted"]


def test_a_chain_longer_than_the_model_takes_a_layer_per_worker(procs, bin_dir: Path, models,
                                                                 tmp_path: Path):
    # Three workers, a model of two layers: the chain is the first two, one layer each.
    small = probe.write_probe_model(models.target, tmp_path / "two.gguf", 2)
    workers = [procs.rpc_worker(name=f"short{i}") for i in range(3)]
    found = probe.measure(small, [w.endpoint for w in workers], bin_dir, work_dir=tmp_path,
                          repeats=1)
    assert all(not m.skipped for m in found), [m.skipped for m in found]
    assert [m.hop_ms is not None for m in found] == [True, True, False], found
    assert not any("chain probe failed" in m.note for m in found), [m.note for m in found]


def test_a_worker_serving_a_coordinator_is_not_probed(procs, bin_dir: Path, models,
                                                      tmp_path: Path):
    worker = procs.rpc_worker(name="serving")
    coordinator = procs.llama_server(models.target, rpc=[worker], ctx=512)
    before = coordinator.post("/completion", {"prompt": "Hello", "n_predict": 8,
                                              "temperature": 0})
    [m] = probe.measure(models.target, [worker.endpoint], bin_dir, work_dir=tmp_path)
    assert m.skipped and "serving a coordinator" in m.skipped
    assert m.layer_ms is None and m.rtt_ms is None
    # No probe llama-server was started against it (the compute probe needs a HELLO answer).
    assert not list(tmp_path.glob("tightwad-probe-*"))
    after = coordinator.post("/completion", {"prompt": "Hello", "n_predict": 8,
                                             "temperature": 0})
    assert after["content"] == before["content"]
    coordinator.stop()
    # The worker outlives its coordinator (nothing the probe left in its backlog kills it).
    assert worker.alive()
    late = procs.llama_server(models.target, rpc=[worker], ctx=512)
    assert late.post("/completion", {"prompt": "Hello", "n_predict": 8,
                                      "temperature": 0})["content"] == before["content"]


def test_doctor_measure_prints_the_speed_aware_split(procs, bin_dir: Path, models,
                                                     tmp_path: Path):
    workers = [procs.rpc_worker(name=f"w{i}") for i in range(2)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    inv = tmp_path / "inv.yml"
    done = tightwad_cli("init", "127.0.0.1", "--yes", "-o", str(inv), "--ssh-port", "0",
                        "--rpc-ports", ",".join(str(w.port) for w in workers),
                        "--http-ports", str(closed), "--model", str(models.target), cwd=None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "memory-proportional would be" in " ".join(done.stdout.split())
    hosts = yaml.safe_load(inv.read_text())["all"]["children"]["coordinator"]["hosts"]
    assert "coordinator_tensor_split" not in (hosts["local"] or {})  # auto: the deploy measures

    def placement_check(*extra: str) -> dict:
        got = tightwad_cli("doctor", "-i", str(inv), "--json", "--bin-dir", str(bin_dir), *extra,
                           cwd=None, timeout=300)
        return {c["name"]: c for c in json.loads(got.stdout)["checks"]}["placement"]

    plain = placement_check()
    assert "memory:" in plain["message"] and "no speed measurement" in plain["message"]
    measured = placement_check("--measure")
    assert measured["status"] == "ok"
    assert "speed: layers" in measured["message"] and "ms/token" in measured["message"]
    assert "memory-proportional:" in measured["message"]
    assert measured["message"].startswith(f"--rpc 127.0.0.1:{workers[0].port},"
                                          f"127.0.0.1:{workers[1].port} --tensor-split ")
    assert all(w.alive() for w in workers)
