"""Fixtures that run the real pinned llama.cpp: builds, models, RPC workers and servers.

Everything binds to loopback on free ports and is torn down after use, also when a test fails;
a failing test's report carries the tail of every log of the processes it used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tightwad import build as llama_build
from tightwad.pool import localpool
from tightwad.pool.procs import LlamaServer, Proc, ProcessGroup, RpcWorker
from tightwad_dev.inproc import PROXY_SLOTS, VERIFY_MAX_TOKENS, ProxyThread, proxy_config
from tightwad_dev.models import ModelSet, ensure_models


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return llama_build.default_cache_dir()


@pytest.fixture(scope="session")
def llama(cache_dir: Path) -> llama_build.Build:
    """The CPU build of the pin with every patch the package ships (built once, then cached)."""
    return llama_build.ensure_build("cpu", cache=cache_dir)


@pytest.fixture(scope="session")
def bin_dir(request: pytest.FixtureRequest) -> Path:
    """Binaries the process fixtures run: the cached build, or TIGHTWAD_TEST_BIN_DIR when set
    (to run the suite against a llama.cpp tree being worked on)."""
    if override := os.environ.get("TIGHTWAD_TEST_BIN_DIR"):
        return Path(override)
    return request.getfixturevalue("llama").bin_dir


@pytest.fixture(scope="session")
def source_tree(cache_dir: Path) -> Path:
    return llama_build.fetch_source(cache_dir)


@pytest.fixture(scope="session")
def vocab_dir(source_tree: Path) -> Path:
    return source_tree / "models"


@pytest.fixture(scope="session")
def models(cache_dir: Path, vocab_dir: Path) -> ModelSet:
    return ensure_models(cache_dir / "models", vocab_dir)


def _group(bin_dir: Path, factory: pytest.TempPathFactory, name: str) -> ProcessGroup:
    return ProcessGroup(bin_dir=bin_dir, log_dir=factory.mktemp(f"logs-{name}"))


@pytest.fixture
def procs(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Iterator[ProcessGroup]:
    """A process group of this test's own; everything in it is stopped when the test ends."""
    with _group(bin_dir, tmp_path_factory, request.node.name[:40]) as group:
        yield group


@dataclass
class Pool:
    """A loopback pool: RPC workers, a coordinator whose layers live on them, and a drafter."""

    group: ProcessGroup
    workers: list[RpcWorker] = field(default_factory=list)
    coordinator: LlamaServer | None = None
    drafter: LlamaServer | None = None


@pytest.fixture(scope="module")
def pool(bin_dir: Path, models: ModelSet,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with _group(bin_dir, tmp_path_factory, "pool") as group:
        workers = [group.rpc_worker(name=f"worker{i}") for i in range(2)]
        # -lv 4 puts llama.cpp's load report (buffers per device) into the log.
        coordinator = group.llama_server(models.target, name="coordinator", rpc=workers, slots=2,
                                         args=["-lv", "4"])
        drafter = group.llama_server(models.draft, name="drafter", slots=2)
        yield Pool(group, workers, coordinator, drafter)


@pytest.fixture(scope="module")
def single(bin_dir: Path, models: ModelSet,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """The target model on one plain llama-server, no RPC: the reference for pooled output."""
    with _group(bin_dir, tmp_path_factory, "single") as group:
        yield group.llama_server(models.target, name="single")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    seen: set[int] = set()
    for value in getattr(item, "funcargs", {}).values():
        group = value if isinstance(value, ProcessGroup) else getattr(value, "group", None)
        used = group.procs if isinstance(group, ProcessGroup) else [value]
        for proc in used:
            if isinstance(proc, Proc) and id(proc) not in seen:
                seen.add(id(proc))
                report.sections.append((f"log of {proc.name} ({proc.log_path})",
                                        proc.log_tail(60)))


# --- proxy fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec_pool(bin_dir: Path, models: ModelSet,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A 2-worker pool whose coordinator runs as the product runs it (verifies, top-n on the
    device: localpool.coordinator_args) with 4 slots, and a drafter with as many slots."""
    with _group(bin_dir, tmp_path_factory, "spec-pool") as group:
        workers = [group.rpc_worker(name=f"worker{i}") for i in range(2)]
        coordinator = group.llama_server(
            models.target, name="coordinator", rpc=workers, slots=PROXY_SLOTS,
            args=localpool.coordinator_args(VERIFY_MAX_TOKENS))
        drafter = group.llama_server(models.draft, name="drafter", slots=PROXY_SLOTS)
        yield Pool(group, workers, coordinator, drafter)


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., ProxyThread]]:
    """Start proxies (``make_proxy(config)``); all are stopped when the test ends."""
    started: list[ProxyThread] = []

    def make(config: Any) -> ProxyThread:
        proxy = ProxyThread(config).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="module")
def spec_proxy(spec_pool: Pool) -> Iterator[ProxyThread]:
    """A proxy in remote mode in front of ``spec_pool`` (no token), shared by a module."""
    assert spec_pool.coordinator is not None and spec_pool.drafter is not None
    proxy = ProxyThread(proxy_config(spec_pool.coordinator, spec_pool.drafter)).start()
    yield proxy
    proxy.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run only with TIGHTWAD_SLOW=1 (README: slow opt-in tests)."""
    if os.environ.get("TIGHTWAD_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow opt-in test: set TIGHTWAD_SLOW=1 to run it")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)
