"""The pool's llama-server settings (``tightwad.defaults.LLAMA_SERVER_ARGS``), shown from the
link's own counters rather than timings: with llama.cpp's defaults a new task makes the
coordinator save its idle slots to the host-RAM prompt cache, which reads their KV cache back
from the RPC workers; with the pool's settings it moves nothing of the kind. And the local pool
(demo, ``tightwad start --local``) runs its coordinator and drafter with them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tightwad import defaults
from tightwad.pool.gguf_info import read_info
from tightwad.pool.linkemu import LinkStats, RelayThread
from tightwad.pool.localpool import LaunchSpec, launch
from tightwad.pool.procs import ProcessGroup, free_port
from tightwad_dev.models import ModelSet

LONG = 1500  # tokens slot 0 holds while slot 1 gets a new task
SHORT = 16


def _prompt(first: int, n: int) -> list[int]:
    return [first + i % 500 for i in range(n)]


def _kv_bytes_per_token(model: Path) -> int:
    """K and V of every layer, f16 (llama-server's default cache type)."""
    meta = read_info(model).metadata
    arch = meta["general.architecture"]
    n_embd_kv = (meta[f"{arch}.embedding_length"] // meta[f"{arch}.attention.head_count"]
                 * meta[f"{arch}.attention.head_count_kv"])
    return 2 * meta[f"{arch}.block_count"] * n_embd_kv * 2


@pytest.fixture(scope="module")
def linked(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[ProcessGroup, RelayThread]]:
    """One RPC worker behind a counting relay (no delay): the coordinator's only link."""
    with ProcessGroup(bin_dir=bin_dir, log_dir=tmp_path_factory.mktemp("logs-settings")) as group:
        worker = group.rpc_worker(name="worker", cache=True)
        with RelayThread([worker.endpoint], "none") as relay:
            yield group, relay


def _traffic_of_a_new_task(linked: tuple[ProcessGroup, RelayThread], models: ModelSet,
                           pool_args: Sequence[str], name: str) -> tuple[LinkStats, LinkStats]:
    """Link traffic of a short task on slot 1: (on an empty server, while slot 0 holds a long
    context)."""
    group, relay = linked
    coordinator = group.llama_server(models.target, name=name, rpc=relay.endpoints, slots=2,
                                     ctx=2 * 2048, pool_args=pool_args)

    def complete(slot: int, prompt: list[int]) -> LinkStats:
        before = relay.stats()[0]
        coordinator.post("/completion", {"prompt": prompt, "n_predict": 1, "temperature": 0,
                                         "cache_prompt": True, "id_slot": slot})
        return relay.stats()[0] - before

    try:
        alone = complete(1, _prompt(1000, SHORT))
        complete(0, _prompt(3000, LONG))
        beside = complete(1, _prompt(2000, SHORT))
    finally:
        coordinator.stop()
    return alone, beside


def test_pool_settings_read_no_idle_slot_back_from_the_workers(linked, models):
    alone, beside = _traffic_of_a_new_task(linked, models, defaults.LLAMA_SERVER_ARGS, "pool")
    kv = LONG * _kv_bytes_per_token(models.target)
    # The same short task costs the same whether or not slot 0 holds a long context.
    assert beside.bytes_down - alone.bytes_down < kv // 10, (alone, beside, kv)
    assert beside.round_trips <= alone.round_trips + 1, (alone, beside)


def test_llama_cpp_defaults_read_the_idle_slot_back_from_the_workers(linked, models):
    """What the settings prevent (and why the test above would fail without them): the idle
    slot 0 is saved to host RAM, its KV cache read back over RPC, layer by layer."""
    alone, beside = _traffic_of_a_new_task(linked, models, (), "llama-defaults")
    kv = LONG * _kv_bytes_per_token(models.target)
    n_layer = read_info(models.target).metadata["llama.block_count"]
    assert beside.bytes_down - alone.bytes_down >= kv // 2, (alone, beside, kv)
    assert beside.round_trips >= alone.round_trips + n_layer, (alone, beside)


def _has(args: Sequence[str], flags: Sequence[str]) -> bool:
    return any(list(args[i:i + len(flags)]) == list(flags) for i in range(len(args)))


def test_local_pool_runs_coordinator_and_drafter_with_the_pool_settings(bin_dir, models,
                                                                        tmp_path):
    with ProcessGroup(bin_dir=bin_dir, log_dir=tmp_path / "logs") as group:
        pool = launch(group, LaunchSpec(
            model=models.target, draft=models.draft, worker_ports=[free_port(), free_port()],
            coordinator_port=free_port(), drafter_port=free_port(), proxy_port=free_port()))
        assert pool.drafter is not None
        for server in (pool.coordinator, pool.drafter):
            cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode().split("\0")
            assert _has(cmdline, defaults.LLAMA_SERVER_ARGS), cmdline
