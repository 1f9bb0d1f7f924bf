"""``tightwad init`` against real processes on loopback: idle and serving RPC workers, a pooled
coordinator and a drafter are found and told apart, the inventory it writes is accepted by
Ansible, and probing never harms a worker that is serving a coordinator — shown with a STOCK
worker (no SIGPIPE patch) in the middle of a generation."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import tightwad_cli
from tightwad import build as llama_build
from tightwad.pool import rpcproto
from tightwad.pool.procs import ProcessGroup, RpcWorker
from tightwad_dev.models import ModelSet

pytestmark = pytest.mark.timeout(240)


def tightwad(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return tightwad_cli(*argv, timeout=timeout, cwd=None, columns=250)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(out: Path, rpc: list[int], http: list[int], *extra: str) -> subprocess.CompletedProcess:
    return tightwad("init", "127.0.0.1", "--yes", "-o", str(out), "--ssh-port", "0",
                    "--rpc-ports", ",".join(map(str, rpc)),
                    "--http-ports", ",".join(map(str, http)), *extra)


def rows(stdout: str) -> dict[int, str]:
    """The findings table, by port."""
    out = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) >= 4 and cells[0] == "127.0.0.1" and cells[1].isdigit():
            out[int(cells[1])] = " ".join(cells[2:])
    return out


def test_init_finds_and_identifies_workers_and_servers(pool: Any, procs: ProcessGroup,
                                                       models: ModelSet, tmp_path: Path) -> None:
    idle = [procs.rpc_worker(name=f"idle{i}") for i in range(2)]
    busy = [w.port for w in pool.workers]
    gone = closed_port()
    out = tmp_path / "inv.yml"
    done = init(out, [*busy, *(w.port for w in idle), gone],
                [pool.coordinator.port, pool.drafter.port])
    assert done.returncode == 0, done.stdout + done.stderr
    found = rows(done.stdout)
    for w in idle:  # answered HELLO: protocol and memory
        assert "rpc worker v7.0.0" in found[w.port] and "free of" in found[w.port]
    for port in busy:  # serving the coordinator
        assert "rpc worker (busy)" in found[port] or "rpc worker (silent)" in found[port]
    assert gone not in found
    assert "llama-server" in found[pool.coordinator.port]
    assert models.target.name in found[pool.coordinator.port]
    assert "b1-0c1e570" in found[pool.coordinator.port]
    assert models.draft.name in found[pool.drafter.port]

    doc = yaml.safe_load(out.read_text())
    assert doc["all"]["vars"]["tightwad_model"] == str(models.target.resolve())
    assert doc["all"]["vars"]["tightwad_draft_model"] == str(models.draft.resolve())
    listed = json.loads(subprocess.run(
        [str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(out), "--list"],
        capture_output=True, text=True, timeout=60, check=True).stdout)
    host = listed["_meta"]["hostvars"]["local"]
    assert sorted(i["port"] for i in host["rpc_worker_instances"]) == sorted(
        [*busy, *(w.port for w in idle)])
    assert host["coordinator_port"] == pool.coordinator.port
    assert host["drafter_port"] == pool.drafter.port
    assert "coordinator_tensor_split" not in host  # busy workers: split left to deploy time
    # The pool it probed still serves.
    answer = pool.coordinator.post("/completion", {"prompt": "after init", "n_predict": 8})
    assert answer["tokens_predicted"] == 8
    assert all(w.alive() for w in [*pool.workers, *idle])


def test_init_proposes_a_split_from_idle_workers(procs: ProcessGroup, models: ModelSet,
                                                 tmp_path: Path) -> None:
    workers = [procs.rpc_worker(name=f"w{i}") for i in range(2)]
    out = tmp_path / "inv.yml"
    done = init(out, [w.port for w in workers], [closed_port()], "--model", str(models.target))
    assert done.returncode == 0, done.stdout + done.stderr
    coordinator = yaml.safe_load(out.read_text())["all"]["children"]["coordinator"]["hosts"]
    # The split stays auto (the deploy places by measured speed); the memory-proportional
    # alternative is printed: both workers report this machine's RAM.
    assert "coordinator_tensor_split" not in (coordinator["local"] or {})
    assert "memory-proportional would be 0.5,0.5" in " ".join(done.stdout.split())
    # doctor on that inventory before anything else runs: idle workers report memory and the
    # link's round trip and throughput; the model's fit is computed from them.
    done = tightwad("doctor", "-i", str(out), "--json")
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    for w in workers:
        check = checks[f"worker local/rpc{w.port}"]
        assert "idle" in check["message"], check
        # ok, or on a loaded machine a link warning (loopback RTT over 2 ms, or a slow read):
        # timing is not this test's subject (tests/test_cli_units.py covers the thresholds).
        assert check["status"] == "ok" or (
            check["status"] == "warn" and ("Wi-Fi class" in check["message"]
                                           or "slower than 100 Mbit/s" in check["message"])), check
        assert "MB/s" in check["message"] and "RTT" in check["message"], check
    assert checks["device memory"]["status"] == "ok"
    assert "can hold" in checks["device memory"]["message"]
    # The scratch buffer the throughput probe used left the workers fit to serve.
    assert all(w.alive() for w in workers)
    coordinator = procs.llama_server(models.target, rpc=workers)
    assert coordinator.post("/completion", {"prompt": "x", "n_predict": 4})["tokens_predicted"] == 4


# --- a serving worker is never harmed --------------------------------------------------------


@pytest.fixture(scope="module")
def stock_worker_bin(cache_dir: Path) -> Path:
    """``ggml-rpc-server`` of the pin without our patches (it dies of SIGPIPE when it writes to
    a dead connection); the same cached build tests/test_rel_rpc_sigpipe.py uses."""
    return llama_build.ensure_build("cpu", cache=cache_dir, patches_dir=llama_build.NO_PATCHES,
                                    targets=["ggml-rpc-server"]).bin_dir


def _generate(server: Any, n: int, result: dict[str, Any]) -> None:
    try:
        result["answer"] = server.post("/completion", {"prompt": "Once upon a time",
                                                       "n_predict": n, "temperature": 0,
                                                       "ignore_eos": True},
                                       timeout=120)
    except Exception as exc:  # the assertion below reports it
        result["error"] = exc


def _wait_dead(worker: RpcWorker, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and worker.alive():
        time.sleep(0.05)
    return worker.popen.poll()


def test_probing_a_serving_stock_worker_under_generation_leaves_it_unharmed(
        stock_worker_bin: Path, models: ModelSet, procs: ProcessGroup, tmp_path: Path) -> None:
    with ProcessGroup(bin_dir=stock_worker_bin, log_dir=tmp_path / "stock") as stock:
        worker = stock.rpc_worker(name="stock-worker")
        coordinator = procs.llama_server(models.target, name="coordinator", rpc=[worker])
        result: dict[str, Any] = {}
        # Long enough to outlast the first probe on a loaded machine (the probe waits out the
        # busy worker's silence).
        generation = threading.Thread(target=_generate, args=(coordinator, 1500, result))
        generation.start()
        time.sleep(0.3)
        # Three probes while it generates: more than its backlog holds.
        outcomes = []
        for i in range(3):
            done = init(tmp_path / f"inv{i}.yml", [worker.port], [coordinator.port])
            assert done.returncode == 0, done.stdout + done.stderr
            outcomes.append(rows(done.stdout)[worker.port])
            if i == 0:
                assert generation.is_alive(), "probe while it generates: make n_predict larger"
        generation.join(120)
        assert "error" not in result, result
        assert result["answer"]["tokens_predicted"] == 1500  # the generation was not disturbed
        assert all("busy" in o or "silent" in o for o in outcomes), outcomes
        assert coordinator.post("/completion", {"prompt": "next", "n_predict": 8})[
            "tokens_predicted"] == 8
        # The coordinator leaves: the worker now accepts the probes' queued connections, and
        # answers them. It must survive that and serve the next coordinator.
        coordinator.stop()
        assert _wait_dead(worker, 3) is None, f"the worker died: {worker.log_tail()}"
        again = procs.llama_server(models.target, name="coordinator-2", rpc=[worker])
        assert again.post("/completion", {"prompt": "again", "n_predict": 8})[
            "tokens_predicted"] == 8
        assert worker.alive()


def test_a_hello_closed_normally_would_have_killed_it(stock_worker_bin: Path, models: ModelSet,
                                                      procs: ProcessGroup,
                                                      tmp_path: Path) -> None:
    """The control: the same HELLO, ended with a FIN instead of a reset, kills the stock worker
    once the coordinator leaves (which is why rpcproto resets unanswered probes)."""
    with ProcessGroup(bin_dir=stock_worker_bin, log_dir=tmp_path / "stock") as stock:
        worker = stock.rpc_worker(name="stock-worker")
        coordinator = procs.llama_server(models.draft, name="coordinator", rpc=[worker])
        sock = socket.create_connection(("127.0.0.1", worker.port), timeout=1)
        sock.sendall(bytes([rpcproto.CMD_HELLO]) + struct.pack("<Q", 24) + bytes(24))
        with pytest.raises(socket.timeout):
            sock.recv(8)
        sock.close()
        coordinator.stop()
        assert _wait_dead(worker, 5) == -signal.SIGPIPE
