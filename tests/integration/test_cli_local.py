"""The CLI against a real local pool: ``start --local`` brings up 2 RPC workers, a coordinator,
a drafter and the proxy; then status, doctor (healthy, then one injected fault at a time),
``init --local`` discovering that very pool, bench, swap and stop — all through the real
``tightwad`` command in a subprocess, as a user would run it."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import REPO, FakeWorker, alive, tightwad_cli
from tightwad.llamaserver import blocking
from tightwad.pool.procs import free_port
from tightwad_dev.models import ModelSet

pytestmark = pytest.mark.timeout(240)


def tightwad(*argv: str, env: dict[str, str] | None = None, timeout: float = 180,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return tightwad_cli(*argv, env=env, timeout=timeout, cwd=cwd)


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class LocalPool:
    def __init__(self, state: Path, ports: dict[str, Any]) -> None:
        self.state, self.ports = state, ports

    def cli(self, *argv: str, **kw: Any) -> subprocess.CompletedProcess:
        return tightwad(*argv, **kw)

    def state_json(self) -> dict[str, Any]:
        return json.loads((self.state / "state.json").read_text())

    def pids(self) -> dict[str, int]:
        return {s["name"]: s["pid"] for s in self.state_json()["services"]}

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"


def _kill_recorded(state: Path) -> None:
    """Teardown after a failure: SIGKILL exactly the PIDs the state file records."""
    try:
        services = json.loads((state / "state.json").read_text())["services"]
    except (OSError, ValueError):
        return
    for svc in services:
        try:
            os.kill(svc["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def local_pool(bin_dir: Path, models: ModelSet,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPool]:
    state = tmp_path_factory.mktemp("local-state")
    ports = {"workers": [free_port(), free_port()], "coordinator": free_port(),
             "drafter": free_port(), "proxy": free_port()}
    done = tightwad("start", "--local", "--state-dir", str(state), "--bin-dir", str(bin_dir),
                    "--model", str(models.target), "--draft", str(models.draft),
                    "--workers", ",".join(map(str, ports["workers"])),
                    "--coordinator-port", str(ports["coordinator"]),
                    "--drafter-port", str(ports["drafter"]), "--port", str(ports["proxy"]),
                    # 4 slots of the demo models' trained 4096: doctor warns about smaller ones.
                    "--ctx", "16384")
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        yield LocalPool(state, ports)
    finally:
        tightwad("stop", "--local", "--state-dir", str(state), timeout=120)
        _kill_recorded(state)


def post(url: str, body: dict[str, Any], timeout: float = 60) -> tuple[int, Any]:
    answer = blocking.request("POST", url, body, timeout=timeout)
    return answer.status, answer.body


# --- start / status --------------------------------------------------------------------------


def test_start_then_status_shows_services_split_and_stats(local_pool: LocalPool) -> None:
    pids = local_pool.pids()
    assert set(pids) == {"worker0", "worker1", "coordinator", "drafter", "proxy"}
    code, answer = post(f"{local_pool.proxy}/v1/completions",
                        {"prompt": "The junk drawer", "max_tokens": 8, "temperature": 0})
    assert code == 200 and answer["usage"]["completion_tokens"] == 8
    done = local_pool.cli("status", "--local", "--state-dir", str(local_pool.state), "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert {(s["name"], s["state"]) for s in status["services"]} == {
        (n, "running") for n in pids}
    assert all(s["health"] in ("healthy", "listening") for s in status["services"])
    # The live split: both workers hold weights, as the coordinator's own load report says.
    devices = {d["device"]: d["weights_mib"] for d in status["split"]}
    for port in local_pool.ports["workers"]:
        assert devices[f"127.0.0.1:{port}"] > 0
    assert sum(d["share"] for d in status["split"]) == pytest.approx(1, abs=0.01)
    # ... as the one placement rule proposed it (memory-proportional: equal workers, halves)
    state = json.loads((local_pool.state / "state.json").read_text())
    args = next(s for s in state["services"] if s["name"] == "coordinator")["args"]
    split = [float(x) for x in args[args.index("--tensor-split") + 1].split(",")]
    assert len(split) == 2 and split[0] == pytest.approx(split[1], rel=0.05), split
    spec = status["speculation"]
    assert spec["mode"] == "remote" and spec["speculation_active"] is True
    assert spec["tokens"] >= 8 and spec["rounds"] >= 1
    # The table form too, and a second start is a no-op.
    table = local_pool.cli("status", "--local", "--state-dir", str(local_pool.state))
    assert table.returncode == 0 and "tensor split" in table.stdout and "worker0" in table.stdout
    again = local_pool.cli("start", "--local", "--state-dir", str(local_pool.state))
    assert again.returncode == 0 and "already running" in again.stdout
    assert local_pool.pids() == pids


# --- doctor ----------------------------------------------------------------------------------


def doctor(*argv: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    done = tightwad("doctor", "--json", *argv, env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def failed(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in report["checks"] if c["status"] == "fail"}


def test_doctor_on_the_healthy_local_pool_passes(local_pool: LocalPool) -> None:
    code, report = doctor("--local", "--state-dir", str(local_pool.state))
    assert code == 0 and report["ok"], report
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    # The workers serve the coordinator (one client each): placement cannot be re-proposed.
    placement = next(c for c in report["checks"] if c["name"] == "placement")
    assert placement["status"] == "skip" and "busy" in placement["message"], placement
    del statuses["placement"]
    assert set(statuses.values()) <= {"ok"}, statuses
    for name in ("llama.cpp versions", "draft tokenizer", "coordinator RAM", "device memory",
                 "coordinator", "drafter", "proxy", "proxy auth", "worker worker0"):
        assert statuses[name] == "ok"
    table = tightwad("doctor", "--local", "--state-dir", str(local_pool.state))
    assert table.returncode == 0 and "all checks passed" in table.stdout


@pytest.fixture(scope="module")
def inventory_file(local_pool: LocalPool, models: ModelSet,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tightwad init --local`` pointed at the running pool's ports writes its inventory."""
    out = tmp_path_factory.mktemp("inv") / "tightwad.yml"
    ports = local_pool.ports
    done = tightwad("init", "--local", "--yes", "-o", str(out),
                    "--rpc-ports", ",".join(map(str, ports["workers"])),
                    "--http-ports", f"{ports['coordinator']},{ports['drafter']},{ports['proxy']}",
                    "--ssh-port", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_init_local_identifies_the_pool_and_writes_an_inventory_ansible_accepts(
        inventory_file: Path, local_pool: LocalPool, models: ModelSet) -> None:
    doc = yaml.safe_load(inventory_file.read_text())
    ports = local_pool.ports
    assert len(doc["all"]["vars"].pop("tightwad_proxy_token")) >= 43  # token_urlsafe(32)
    assert doc["all"]["vars"] == {"tightwad_model": str(models.target.resolve()),
                                  "tightwad_draft_model": str(models.draft.resolve())}
    listed = json.loads(subprocess.run([tool("ansible-inventory"), "-i", str(inventory_file),
                                        "--list"], capture_output=True, text=True, timeout=60,
                                       check=True).stdout)
    for group in ("rpc_workers", "coordinator", "drafters", "proxy"):
        assert listed[group]["hosts"] == ["local"]
    host = listed["_meta"]["hostvars"]["local"]
    assert [i["port"] for i in host["rpc_worker_instances"]] == ports["workers"]
    assert (host["coordinator_port"], host["drafter_port"], host["proxy_port"]) == (
        ports["coordinator"], ports["drafter"], ports["proxy"])
    assert host["ansible_host"] == "127.0.0.1" and host["ansible_connection"] == "local"
    # Busy workers cannot report memory: the split is left to deploy time.
    assert "coordinator_tensor_split" not in host
    check = REPO / "playbooks" / "check-inventory.yml"
    if check.is_file():  # the roles' argument specs accept it
        run = subprocess.run([tool("ansible-playbook"), str(check), "-i", str(inventory_file)],
                             capture_output=True, text=True, timeout=120, cwd=check.parents[1])
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_init_never_overwrites_without_force(inventory_file: Path, local_pool: LocalPool) -> None:
    def init(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return tightwad("init", "--local", "--yes", "-o", str(out), *extra, "--rpc-ports",
                        str(local_pool.ports["workers"][0]), "--http-ports",
                        str(local_pool.ports["coordinator"]), "--ssh-port", "0")

    before = inventory_file.read_text()
    refused = init(inventory_file)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert inventory_file.read_text() == before
    other = inventory_file.with_name("forced.yml")
    other.write_text("old")
    forced = init(other, "--force")
    assert forced.returncode == 0, forced.stderr
    assert yaml.safe_load(other.read_text())["all"]["children"]["coordinator"]


def test_doctor_on_the_inventory_passes(inventory_file: Path, bin_dir: Path) -> None:
    code, report = doctor("-i", str(inventory_file), "--bin-dir", str(bin_dir))
    assert code == 0 and not failed(report), failed(report)


def _variant(src: Path, dest: Path, change) -> Path:
    doc = copy.deepcopy(yaml.safe_load(src.read_text()))
    change(doc)
    dest.write_text(yaml.safe_dump(doc))
    return dest


def _instances(doc: dict) -> list:
    return doc["all"]["children"]["rpc_workers"]["hosts"]["local"]["rpc_worker_instances"]


def _fake_binaries(directory: Path) -> Path:
    """ggml-rpc-server / llama-server that report another commit (an old install)."""
    directory.mkdir(parents=True)
    for name, text in (("ggml-rpc-server", "version: ggml 0.9.0 (commit deadbee)\\n"
                                           "rpc protocol: v6.0.0"),
                       ("llama-server", "version: 4000 (commit deadbee)")):
        path = directory / name
        path.write_text(f"#!/bin/sh\nprintf '{text}\\n'\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return directory


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["worker-protocol", "binary-commit", "unreachable-worker",
                                   "foreign-draft", "ram-limit", "ram-limit-var",
                                   "proxy-no-token"])
def test_doctor_turns_exactly_the_right_check_red(fault: str, inventory_file: Path,
                                                  bin_dir: Path, models: ModelSet,
                                                  tmp_path: Path) -> None:
    env: dict[str, str] = {}
    bins = bin_dir
    fake = None
    dest = tmp_path / "inv.yml"
    if fault == "worker-protocol":
        fake = FakeWorker(version=(6, 0, 0))
        inv = _variant(inventory_file, dest, lambda d: _instances(d).append(
            {"name": "old", "port": fake.port}))
        expect, words = "llama.cpp versions", "worker local/old speaks v6.0.0"
    elif fault == "binary-commit":
        inv, bins = inventory_file, _fake_binaries(tmp_path / "bin")
        expect, words = "llama.cpp versions", "commit deadbee"
    elif fault == "unreachable-worker":
        port = _closed_port()
        inv = _variant(inventory_file, dest, lambda d: _instances(d).append(
            {"name": "gone", "port": port}))
        expect, words = "worker local/gone", "unreachable"
    elif fault == "foreign-draft":
        inv = _variant(inventory_file, dest, lambda d: d["all"]["vars"].update(
            {"tightwad_draft_model": str(models.foreign)}))
        expect, words = "draft tokenizer", "TOKENIZER MISMATCH"
    elif fault == "ram-limit":
        inv, env = inventory_file, {"TIGHTWAD_COORDINATOR_RAM_MB": "16"}
        expect, words = "coordinator RAM", "> coordinator RAM 16.0 MiB"
    elif fault == "ram-limit-var":
        inv = _variant(inventory_file, dest, lambda d: d["all"]["children"]["coordinator"]
                       ["hosts"]["local"].update({"coordinator_ram_mb": 32}))
        expect, words = "coordinator RAM", "> coordinator RAM 32.0 MiB"
    else:
        def no_token(d: dict) -> None:  # init writes one: take it out
            d["all"]["vars"].pop("tightwad_proxy_token")
            d["all"]["children"]["proxy"]["hosts"]["local"]["proxy_bind_address"] = "192.0.2.10"
        inv = _variant(inventory_file, dest, no_token)
        expect, words = "proxy auth", "without a token"
    try:
        code, report = doctor("-i", str(inv), "--bin-dir", str(bins), env=env)
    finally:
        if fake is not None:
            fake.close()
    red = failed(report)
    assert code == 1 and set(red) == {expect}, red
    assert words in red[expect]["message"], red[expect]
    assert red[expect]["fix"], "every failure says how to fix it"
    if fault == "proxy-no-token":  # a weak token is red too, a strong one fine
        inv = _variant(dest, tmp_path / "inv2.yml", lambda d: d["all"]["vars"].update(
            {"tightwad_proxy_token": "s3cret"}))
        code, report = doctor("-i", str(inv), "--bin-dir", str(bins))
        assert code == 1 and "weak token" in failed(report)["proxy auth"]["message"]
        inv = _variant(dest, tmp_path / "inv3.yml", lambda d: d["all"]["vars"].update(
            {"tightwad_proxy_token": "kq3-Vx8_pL2mZ7rT9wY4-strong"}))
        code, report = doctor("-i", str(inv), "--bin-dir", str(bins))
        assert code == 0, failed(report)


def test_doctor_ssh_reads_each_hosts_installed_binary(inventory_file: Path, bin_dir: Path,
                                                      tmp_path: Path) -> None:
    """--ssh asks the hosts themselves (here `local`, through Ansible) for their worker
    binary's version; an old install there turns the versions check red."""
    fake_install = tmp_path / "install"
    _fake_binaries(fake_install / "bin")
    inv = _variant(inventory_file, tmp_path / "inv.yml", lambda d: d["all"]["children"]
                   ["rpc_workers"]["hosts"]["local"].update(
                       {"llama_cpp_install_dir": str(fake_install)}))
    # The local binaries (--bin-dir) are the pin: only the host's own install is old.
    _, report = doctor("-i", str(inv), "--bin-dir", str(bin_dir), "--ssh")
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["llama.cpp versions"]["status"] == "fail"
    assert checks["llama.cpp versions"]["message"].endswith(
        "local has ggml-rpc-server commit deadbee, RPC v6.0.0"), checks["llama.cpp versions"]
    assert "services (systemd)" in checks  # asked too (no such units on this test machine)


# --- bench -----------------------------------------------------------------------------------


def test_bench_json_counts_server_tokens_consistently(local_pool: LocalPool) -> None:
    done = tightwad("bench", "--url", local_pool.proxy, "--prompts", "2", "--max-tokens", "16",
                    "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    proxy, target, spec = result["proxy"], result["target"], result["speculation"]
    assert target["url"] == f"http://127.0.0.1:{local_pool.ports['coordinator']}"
    for side in (proxy, target):
        assert side["requests"] == 2 == len(side["runs"])
        assert side["completion_tokens"] == sum(r["tokens"] for r in side["runs"])
        assert 0 < side["completion_tokens"] <= 32
        assert side["tokens_per_second"] == pytest.approx(
            side["completion_tokens"] / side["seconds"], rel=1e-3)
        assert all(0 < r["ttft"] <= r["seconds"] for r in side["runs"])
    # Greedy through the proxy is the target's own output: the same token counts.
    assert proxy["completion_tokens"] == target["completion_tokens"]
    assert spec["tokens"] == proxy["completion_tokens"]
    assert spec["rounds"] >= 1 and 0 <= spec["accepted"] <= spec["drafted"]
    # The engine pauses drafting where it cannot pay (this test pair's draft costs what its
    # target does): then nothing is drafted and there is no acceptance to report.
    assert spec["acceptance"] == (pytest.approx(spec["accepted"] / spec["drafted"], abs=1e-4)
                                  if spec["drafted"] else None)
    assert spec["tokens_per_round"] == pytest.approx(spec["tokens"] / spec["rounds"], abs=1e-4)
    assert result["speedup"] == pytest.approx(
        proxy["tokens_per_second"] / target["tokens_per_second"], rel=1e-3)


# --- swap, then stop -------------------------------------------------------------------------


def test_swap_keeps_workers_and_serves_the_new_model(local_pool: LocalPool,
                                                     models: ModelSet) -> None:
    before = local_pool.pids()
    in_flight: dict[str, Any] = {}

    def long_request() -> None:
        try:
            in_flight["result"] = post(f"{local_pool.proxy}/v1/completions",
                                       {"prompt": "A long story:", "max_tokens": 200,
                                        "temperature": 0}, timeout=120)
        except Exception as exc:  # a reset connection would land here
            in_flight["error"] = exc

    thread = threading.Thread(target=long_request)
    thread.start()
    done = local_pool.cli("swap", str(models.draft), "--local", "--state-dir",
                          str(local_pool.state))
    thread.join(120)
    assert done.returncode == 0, done.stdout + done.stderr
    # The request in flight finished, or got a clean error: never a dropped connection.
    assert "error" not in in_flight, in_flight
    code, body = in_flight["result"]
    assert code == 200 and body["usage"]["completion_tokens"] > 0 or (
        code in (502, 503) and "error" in body), in_flight
    after = local_pool.pids()
    assert after["worker0"] == before["worker0"] and after["worker1"] == before["worker1"]
    assert after["coordinator"] != before["coordinator"]
    assert after["proxy"] == before["proxy"]
    models_list = blocking.get_json(f"{local_pool.proxy}/v1/models", timeout=10)
    assert models_list["data"][0]["id"] == models.draft.stem
    code, answer = post(f"{local_pool.proxy}/v1/completions",
                        {"prompt": "After the swap", "max_tokens": 8, "temperature": 0})
    assert code == 200 and answer["model"] == models.draft.stem
    assert local_pool.state_json()["model"] == str(models.draft.resolve())


def test_a_dead_service_shows_in_status_and_doctor(local_pool: LocalPool) -> None:
    os.kill(local_pool.pids()["drafter"], signal.SIGKILL)  # a crash
    done = local_pool.cli("status", "--local", "--state-dir", str(local_pool.state), "--json")
    assert done.returncode == 1
    states = {s["name"]: (s["state"], s["health"]) for s in json.loads(done.stdout)["services"]}
    assert states["drafter"] == ("dead", "down")
    assert states["coordinator"] == ("running", "healthy")
    code, report = doctor("--local", "--state-dir", str(local_pool.state))
    red = failed(report)
    assert code == 1 and set(red) == {"drafter"}, red
    assert "not running" in red["drafter"]["message"] and "tightwad start" in red["drafter"]["fix"]


def test_stop_ends_exactly_the_recorded_processes(local_pool: LocalPool) -> None:
    pids = local_pool.pids()
    done = local_pool.cli("stop", "--local", "--state-dir", str(local_pool.state))
    assert done.returncode == 0, done.stderr
    assert "drafter" in done.stdout and "not running" in done.stdout
    for name, pid in pids.items():
        assert not alive(pid), f"{name} still runs"
    assert not (local_pool.state / "state.json").exists()
    status = local_pool.cli("status", "--local", "--state-dir", str(local_pool.state))
    assert status.returncode == 1 and "no local pool" in status.stderr


# --- an emulated link --------------------------------------------------------------------------


def test_start_with_an_emulated_link_status_bench_stop(bin_dir: Path, models: ModelSet,
                                                       tmp_path: Path) -> None:
    """``start --local --link wifi``: one relay process per worker, the coordinator's --rpc
    names the relays, every output says the link is emulated, and stop ends the relays too."""
    state = tmp_path / "state"
    workers = [free_port(), free_port()]
    ports = {"coordinator": free_port(), "drafter": free_port(), "proxy": free_port()}
    done = tightwad("start", "--local", "--link", "wifi", "--state-dir", str(state),
                    "--bin-dir", str(bin_dir), "--model", str(models.target),
                    "--draft", str(models.draft), "--workers", ",".join(map(str, workers)),
                    "--coordinator-port", str(ports["coordinator"]),
                    "--drafter-port", str(ports["drafter"]), "--port", str(ports["proxy"]),
                    "--slots", "1", "--ctx", "4096")
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "link: wifi (emulated: 5 ms RTT" in done.stdout, done.stdout
        recorded = json.loads((state / "state.json").read_text())
        assert recorded["link"] == "wifi"
        links = [s for s in recorded["services"] if s["kind"] == "link"]
        assert [r["name"] for r in links] == ["link0", "link1", "peer-link0", "peer-link1"]
        relays, peer_links = links[:2], links[2:]
        for relay, worker_port in zip(relays, workers):
            # Its own process (the CLI has exited), relaying to its worker.
            cmdline = Path(f"/proc/{relay['pid']}/cmdline").read_bytes().split(b"\0")
            assert b"tightwad.pool.linkemu" in cmdline and b"wifi" in cmdline
            assert f"127.0.0.1:{worker_port}".encode() in cmdline
            assert relay["port"] not in workers
        coordinator = next(s for s in recorded["services"] if s["kind"] == "coordinator")
        rpc = coordinator["args"][coordinator["args"].index("--rpc") + 1]
        assert rpc == ",".join(f"127.0.0.1:{r['port']}" for r in relays)
        # Worker to worker goes over an emulated link too: into each worker's peer port.
        environ = Path(f"/proc/{coordinator['pid']}/environ").read_bytes().split(b"\0")
        assert ("GGML_RPC_PEERS=" + ",".join(
            f"127.0.0.1:{r['port']}=127.0.0.1:{p['port']}" for r, p in zip(relays, peer_links))
        ).encode() in environ
        for link in peer_links:
            cmdline = Path(f"/proc/{link['pid']}/cmdline").read_bytes().split(b"\0")
            assert b"tightwad.pool.linkemu" in cmdline and b"wifi" in cmdline

        status = tightwad("status", "--local", "--state-dir", str(state), "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        data = json.loads(status.stdout)
        assert data["link"]["profile"] == "wifi" and data["link"]["emulated"] is True
        assert {s["name"]: s["health"] for s in data["services"]}["link0"] == "listening"
        table = tightwad("status", "--local", "--state-dir", str(state))
        assert "link: wifi (emulated: 5 ms RTT" in table.stdout, table.stdout

        proxy = f"http://127.0.0.1:{ports['proxy']}"
        bench = tightwad("bench", "--url", proxy, "--state-dir", str(state), "--prompts", "1",
                         "--max-tokens", "8", "--json")
        assert bench.returncode == 0, bench.stderr
        result = json.loads(bench.stdout)
        assert result["link"]["profile"] == "wifi" and result["link"]["emulated"] is True
        pair = result["pair"]
        assert pair["target"]["file"] == models.target.name
        assert pair["draft"]["file"] == models.draft.name
        assert pair["target"]["layers"] == 8 and pair["draft"]["layers"] == 2
        assert pair["cost_ratio"] == pytest.approx(
            pair["draft_ms_per_token"] / pair["target_ms_per_token"], abs=1e-3)
        text = tightwad("bench", "--url", proxy, "--state-dir", str(state), "--prompts", "1",
                        "--max-tokens", "8")
        assert text.returncode == 0, text.stderr
        assert "link:   wifi (emulated" in text.stdout and models.target.name in text.stdout
        # Another proxy's bench does not pretend to know the link.
        other = tightwad("bench", "--url", proxy, "--state-dir", str(tmp_path / "elsewhere"),
                         "--prompts", "1", "--max-tokens", "4", "--json")
        assert json.loads(other.stdout)["link"]["label"] == "unknown (not a local pool)"

        stopped = tightwad("stop", "--local", "--state-dir", str(state))
        assert stopped.returncode == 0 and "link0" in stopped.stdout, stopped.stdout
        for relay in relays:
            assert not alive(relay["pid"]), relay
    finally:
        tightwad("stop", "--local", "--state-dir", str(state), timeout=120)
        _kill_recorded(state)
