"""A client that gives up on a busy RPC worker must not kill it (docs/architecture.md, the pin and its RPC).

A ``ggml-rpc-server`` serves one client at a time; a second client queues in its listen backlog.
If that client gives up (here ``timeout 3 llama-server --rpc W --list-devices``), its dead
connection waits there; when the coordinator disconnects, the worker accepts it, answers, and
the stock worker dies of SIGPIPE (exit 141 in a shell, -13 from Popen). The fix is
``proxy/tightwad/patches/llama.cpp/0003-rpc-server-ignore-sigpipe.patch``: the first test
reproduces the death with a stock worker (built by ``tightwad.build`` without patches, the
ggml-rpc-server target only: ~15 s with ccache warm from the main build), the second shows the
patched worker surviving the same sequence and serving the next coordinator.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tightwad import build as llama_build
from tightwad.pool.procs import ProcessGroup, RpcWorker
from tightwad_dev.models import ModelSet

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def stock_worker_bin(cache_dir: Path) -> Path:
    """A ``ggml-rpc-server`` of the pin without any of our patches."""
    stock = llama_build.ensure_build("cpu", cache=cache_dir, patches_dir=llama_build.NO_PATCHES,
                                     targets=["ggml-rpc-server"])
    assert stock.manifest["patches"] == []
    return stock.bin_dir


def _give_up_while_queued(bin_dir: Path, worker: RpcWorker, log: Path) -> None:
    """A second RPC client connects to the busy worker, queues, and is killed after 3 s."""
    with log.open("w") as fh:
        done = subprocess.run(["timeout", "3", str(bin_dir / "llama-server"), "--rpc",
                               worker.endpoint, "--list-devices"],
                              stdout=fh, stderr=subprocess.STDOUT, timeout=60)
    assert done.returncode == 124, "the second client was not kept waiting by the busy worker"


def _wait_exit(worker: RpcWorker, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not worker.alive():
            return worker.popen.returncode
        time.sleep(0.05)
    return None


def _hold_then_release(group: ProcessGroup, worker: RpcWorker, models: ModelSet,
                       client_bin: Path, log: Path) -> int | None:
    """The recipe of docs/architecture.md (the pin and its RPC); returns the worker's exit code,
    or None if it lives."""
    coordinator = group.llama_server(models.draft, name="coordinator", rpc=[worker])
    _give_up_while_queued(client_bin, worker, log)
    assert worker.alive()
    coordinator.stop()  # the worker now accepts the queued, dead connection
    return _wait_exit(worker, 3)


def test_stock_worker_dies_of_sigpipe(stock_worker_bin: Path, bin_dir: Path, models: ModelSet,
                                      procs: ProcessGroup, tmp_path: Path) -> None:
    stock = ProcessGroup(bin_dir=stock_worker_bin, log_dir=tmp_path / "stock")
    with stock:
        worker = stock.rpc_worker(name="stock-worker")
        code = _hold_then_release(procs, worker, models, bin_dir, tmp_path / "client.log")
    assert code == -signal.SIGPIPE, (
        f"the stock worker was expected to die of SIGPIPE, got {code}; if upstream fixed it, "
        f"tightwad/patches/llama.cpp/0003 may go")


def test_patched_worker_survives_and_still_serves(bin_dir: Path, models: ModelSet,
                                                  procs: ProcessGroup, tmp_path: Path) -> None:
    worker = procs.rpc_worker(name="patched-worker")
    code = _hold_then_release(procs, worker, models, bin_dir, tmp_path / "client.log")
    assert code is None, f"the patched worker exited with {code}:\n{worker.log_tail()}"
    # ... and the next coordinator gets its layers on it and generates.
    again = procs.llama_server(models.draft, name="next-coordinator", rpc=[worker])
    answer = again.post("/completion", {"prompt": "Hello", "n_predict": 8, "temperature": 0})
    assert answer["tokens_predicted"] == 8
    assert worker.alive()


def test_stock_builds_are_keyed_and_kept_apart(tmp_path: Path) -> None:
    """An unpatched build has its own key and work tree (so building it never recompiles the
    patched tree), and a build of fewer targets its own name."""
    full = llama_build.build_key("cpu")
    stock = llama_build.build_key("cpu", patches_dir=llama_build.NO_PATCHES,
                                  targets=["ggml-rpc-server"])
    empty_dir = llama_build.build_key("cpu", patches_dir=tmp_path,
                                      targets=["ggml-rpc-server"])
    assert stock == empty_dir and stock.unpatched and not full.unpatched
    assert stock.work_name == full.work_name + "-unpatched"
    assert stock.name != full.name and stock.name.endswith(
        llama_build.build_key("cpu", targets=["ggml-rpc-server"]).name[-8:])
    assert llama_build.build_key("cpu", targets=list(reversed(llama_build.TARGETS))) == full
    with pytest.raises(llama_build.BuildError, match="unknown target"):
        llama_build.build_key("cpu", targets=["rpc-server"])
