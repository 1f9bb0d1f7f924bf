"""The CLI's pure parts: split arithmetic, the inventory model and writer, GGUF metadata, the RPC
probe's wire format and how it closes, discovery input, and the one-line error contract."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from support import FakeWorker
from tightwad.pool import checks as doctor
from tightwad.pool import discovery, inventory, localpool, rpcproto
from tightwad.pool import placement as splits
from tightwad.pool.demomodels import read_gguf, vocab_fingerprint
from tightwad.pool.gguf_info import GGUFError, read_info
from tightwad_dev.models import ModelSet

MiB = splits.MiB
GiB = splits.GiB


# --- splits ----------------------------------------------------------------------------------


def test_split_is_proportional_to_usable_memory_and_sums_to_one() -> None:
    split = splits.propose_split([16 * GiB, 8 * GiB, 8 * GiB])
    assert sum(split) == pytest.approx(1.0)
    assert split[0] == pytest.approx(0.5, abs=0.002) and split[1] == split[2]
    # A device below the headroom gets nothing; all-empty falls back to an even split.
    assert splits.propose_split([8 * GiB, 100 * MiB]) == [1.0, 0.0]
    assert splits.propose_split([0, 0]) == [0.5, 0.5]
    assert splits.propose_split([]) == []
    assert splits.format_split([0.5, 0.25, 0.25]) == "0.5,0.25,0.25"


def test_fit_and_role_choice() -> None:
    fit = splits.pool_fit(10 * GiB, 1 * GiB, [8 * GiB, 4 * GiB])
    assert not fit.ok and fit.need == 11 * GiB
    assert splits.pool_fit(1 * GiB, 0, [8 * GiB]).ok
    hosts = [splits.Candidate("laptop", 16 * GiB, 8 * GiB),
             splits.Candidate("xeon", 128 * GiB, 0), splits.Candidate("rig", 32 * GiB, 16 * GiB)]
    assert splits.choose_coordinator(hosts, 40 * GiB).name == "xeon"
    assert splits.choose_coordinator(hosts, 200 * GiB) is None
    assert splits.choose_drafter(hosts, exclude=["xeon"]).name == "laptop"


# --- inventory -------------------------------------------------------------------------------


def _inventory() -> inventory.Inventory:
    inv = inventory.Inventory(vars={"tightwad_model": "/models/big.gguf"})
    inv.add_host("rpc_workers", "rig", ansible_host="10.0.0.10", tightwad_pool_address="10.0.0.10",
                 rpc_worker_instances=[{"name": "cuda0", "port": 50052, "device": "CUDA0"}])
    inv.add_host("rpc_workers", "xeon", ansible_host="10.0.0.13",
                 rpc_worker_instances=[{"name": "cpu", "port": 50052, "threads": 16}])
    inv.add_host("coordinator", "xeon", coordinator_tensor_split=[0.6, 0.4])
    inv.add_host("drafters", "junk", ansible_host="10.0.0.15")
    inv.add_host("proxy", "xeon", proxy_port=9000)
    return inv


def test_inventory_round_trip_and_contract_shape() -> None:
    inv = _inventory()
    doc = yaml.safe_load(inv.to_yaml("a header"))
    children = doc["all"]["children"]
    assert list(children) == ["rpc_workers", "coordinator", "drafters", "proxy"]
    assert doc["all"]["vars"] == {"tightwad_model": "/models/big.gguf"}
    # Role variables sit under their role's group; the rest under the host's first group.
    assert children["coordinator"]["hosts"]["xeon"] == {"coordinator_tensor_split": [0.6, 0.4]}
    assert children["proxy"]["hosts"]["xeon"] == {"proxy_port": 9000}
    assert children["rpc_workers"]["hosts"]["xeon"]["ansible_host"] == "10.0.0.13"
    again, errors = inventory.parse(doc)
    assert errors == []
    assert [(h.name, i.name, i.port) for h, i in again.worker_endpoints()] == [
        ("rig", "cuda0", 50052), ("xeon", "cpu", 50052)]
    assert again.coordinator.name == "xeon" and again.coordinator.address == "10.0.0.13"
    assert again.group("proxy")[0].port("proxy_port", 8088) == 9000


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["all"]["vars"].pop("tightwad_model"), "all.vars.tightwad_model"),
    (lambda d: d["all"]["children"]["coordinator"]["hosts"].update({"other": None}),
     "coordinator: needs exactly one host"),
    (lambda d: d["all"]["children"]["rpc_workers"]["hosts"]["rig"]["rpc_worker_instances"]
     .append({"name": "dup", "port": 50052}), "50052 used twice"),
    (lambda d: d["all"]["children"]["rpc_workers"]["hosts"]["rig"]["rpc_worker_instances"][0]
     .update({"port": "x"}), "rpc_worker_instances[0].port"),
    (lambda d: d["all"]["children"]["coordinator"]["hosts"]["xeon"].update(
        {"coordinator_tensor_split": [1]}), "1 entries for 2 RPC workers"),
    (lambda d: d["all"]["children"]["proxy"]["hosts"]["xeon"].update({"proxy_port": 0}),
     "proxy_port"),
])
def test_inventory_validation_names_the_key(mutate, expected: str) -> None:
    doc = _inventory().to_dict()
    mutate(doc)
    _, errors = inventory.parse(doc)
    assert any(expected in e for e in errors), errors


def test_write_atomic_refuses_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "inv" / "hosts.yml"
    inventory.write_atomic(path, "one\n")
    with pytest.raises(inventory.InventoryError, match="--force"):
        inventory.write_atomic(path, "two\n")
    assert path.read_text() == "one\n"
    inventory.write_atomic(path, "three\n", force=True)
    assert path.read_text() == "three\n"
    assert path.stat().st_mode & 0o077 == 0  # may hold the proxy token
    assert [p.name for p in path.parent.iterdir()] == ["hosts.yml"]  # no temp files left


def test_load_reports_bad_yaml_with_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("all:\n  vars: [\n")
    with pytest.raises(inventory.InventoryError, match="invalid YAML at line"):
        inventory.load(bad)


# --- GGUF metadata ---------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", ["llama-spm", "phi-3", "bert-bge"])
def test_gguf_info_fingerprint_equals_the_gguf_package_one(vocab_dir: Path, vocab: str) -> None:
    """The standard-library reader gives the digest the factory computes with the gguf package
    (small vocab files: the package parses a 128k vocabulary slowly)."""
    path = vocab_dir / f"ggml-vocab-{vocab}.gguf"
    assert read_info(path).vocab_fingerprint() == vocab_fingerprint(read_gguf(path))


def test_gguf_info_reads_the_test_models(models: ModelSet) -> None:
    target, foreign = read_info(models.target), read_info(models.foreign)
    assert target.vocab_fingerprint() != foreign.vocab_fingerprint()
    assert (foreign.tokenizer_pre, foreign.n_vocab) == ("qwen2", 151936)
    assert read_info(models.draft).vocab_fingerprint() == target.vocab_fingerprint()
    assert (target.architecture, target.tokenizer_pre, target.n_vocab) == (
        "llama", "llama-bpe", 128256)
    assert target.arch_value("block_count") == 8
    # 8 layers x 2 kv heads x (32 + 32) head dims x 2 bytes per position
    assert target.kv_cache_bytes(1000) == 8 * 1000 * 2 * 64 * 2


def test_gguf_info_rejects_non_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_info(fake)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5) + bytes(8))
    with pytest.raises(GGUFError, match="truncated"):
        read_info(truncated)
    with pytest.raises(GGUFError, match="No such file"):
        read_info(tmp_path / "missing.gguf")


# --- the RPC probe ---------------------------------------------------------------------------


def test_hello_reads_version_and_devices() -> None:
    fake = FakeWorker(version=(7, 0, 0), devices=((3 * GiB, 4 * GiB), (1 * GiB, 2 * GiB)))
    try:
        hello = rpcproto.hello("127.0.0.1", fake.port)
    finally:
        fake.close()
    assert hello.protocol == "v7.0.0" and rpcproto.compatible(hello.version)
    assert [(d.free, d.total) for d in hello.devices] == [(3 * GiB, 4 * GiB), (1 * GiB, 2 * GiB)]
    assert hello.free_memory == 4 * GiB and hello.total_memory == 6 * GiB
    assert not rpcproto.compatible((6, 0, 0)) and not rpcproto.compatible((7, 1, 0))


def test_probe_of_a_busy_worker_is_reset_so_its_later_answer_cannot_raise_sigpipe() -> None:
    """A listener that does not accept (a worker serving someone else): the probe reports Busy
    and leaves its connection reset. When the 'worker' later accepts it and answers, the write
    fails with ECONNRESET, not EPIPE (which is SIGPIPE in a C program)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        with pytest.raises(rpcproto.Busy):
            rpcproto.hello("127.0.0.1", port, timeout=0.3)
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(1) == bytes([rpcproto.CMD_HELLO])  # the request is there ...
            conn.recv(64)
            time.sleep(0.05)
            errors = []
            for _ in range(2):  # ggml-rpc-server writes the size, then the body
                try:
                    conn.send(bytes(8))
                except OSError as exc:
                    errors.append(type(exc))
            # ... but the first write already fails, with a reset rather than a broken pipe.
            assert errors and errors[0] is ConnectionResetError, errors
    finally:
        listener.close()


def test_probe_of_closed_port_and_non_rpc_service() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(rpcproto.Unreachable, match="refused"):
        rpcproto.hello("127.0.0.1", port, timeout=0.3)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer_http() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(100)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer_http, daemon=True)
    thread.start()
    try:
        with pytest.raises(rpcproto.NotRpc):
            rpcproto.hello("127.0.0.1", server.getsockname()[1], timeout=1)
    finally:
        thread.join(5)
        server.close()


# --- discovery input and local-pool helpers --------------------------------------------------


def test_ports_and_cidrs() -> None:
    assert discovery.parse_ports("50052,50060-50062, 8080") == [50052, 50060, 50061, 50062, 8080]
    with pytest.raises(discovery.DiscoveryError):
        discovery.parse_ports("80-x")
    assert discovery.expand(["192.168.1.0/30", "10.0.0.7"]) == ["192.168.1.1", "192.168.1.2",
                                                                 "10.0.0.7"]
    with pytest.raises(discovery.DiscoveryError, match="at most"):
        discovery.expand(["10.0.0.0/8"])
    with pytest.raises(discovery.DiscoveryError, match="not an address"):
        discovery.expand(["my-laptop"])


def test_live_split_from_the_coordinators_load_report(tmp_path: Path) -> None:
    log = """0.01 I load_tensors: loading model tensors, this can take a while... (load_mode = mmap)
0.01 I load_tensors:   CPU_Mapped model buffer size =    31.31 MiB
0.01 I load_tensors: RPC0[127.0.0.1:50052] model buffer size =     2.82 MiB
0.01 I load_tensors: RPC0[127.0.0.1:50053] model buffer size =    33.00 MiB
"""
    path = tmp_path / "coordinator.log"
    coordinator = localpool.Service("coordinator", "coordinator", "127.0.0.1", 8090, pid=1,
                                    started=None, log=str(path))
    path.write_text("old junk\n" + log)
    assert localpool.live_split(coordinator) == [
        ("CPU_Mapped", 31.31), ("127.0.0.1:50052", 2.82), ("127.0.0.1:50053", 33.0)]
    path.write_text(log + log.replace("2.82", "5.00"))
    assert localpool.live_split(coordinator)[1] == ("127.0.0.1:50052", 5.0)
    path.unlink()
    assert localpool.live_split(coordinator) == []


def test_errors_are_one_line_with_exit_code(tmp_path: Path) -> None:
    cases = [
        (["doctor", "-i", str(tmp_path / "missing.yml")], 2, "no such inventory"),
        (["init", "--yes", "--local", "--model", str(tmp_path / "nope.gguf"), "-o",
          str(tmp_path / "x.yml")], 2, "--model"),
        (["start", "--local", "--state-dir", str(tmp_path), "--workers", "1-x"], 2,
         "bad port list"),
        (["status", "--local", "--state-dir", str(tmp_path)], 1, "no local pool"),
    ]
    for argv, code, text in cases:
        done = subprocess.run([sys.executable, "-m", "tightwad.cli", *argv], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == code, (argv, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], lines


# --- doctor's judgement on observed facts (situations this machine cannot produce) -----------


def _lan_view() -> doctor.PoolView:
    return doctor.PoolView(
        source="lan", workers=[doctor.Endpoint("rig/cuda0", "192.0.2.10", 50052)],
        coordinator=doctor.Endpoint("xeon", "192.0.2.13", 8090),
        coordinator_address="192.0.2.13", proxy=doctor.Endpoint("xeon", "192.0.2.13", 8088),
        proxy_bind="127.0.0.1")


def test_doctor_flags_a_worker_open_to_a_non_coordinator() -> None:
    hello = rpcproto.Hello("192.0.2.10", 50052, (7, 0, 0), 0.0004, 0.0003,
                           [rpcproto.Device(0, 8 * GiB, 12 * GiB)], 100e6)
    facts = doctor.Facts(hellos={"rig/cuda0": hello}, local_addresses={"127.0.0.1", "192.0.2.50"})
    [check] = doctor.check_exposure(_lan_view(), facts)
    assert check.status == doctor.FAIL and "192.0.2.10:50052" in check.message and check.fix
    facts.local_addresses.add("192.0.2.13")  # doctor runs on the coordinator: expected
    assert doctor.check_exposure(_lan_view(), facts)[0].status == doctor.OK
    slow = rpcproto.Hello("192.0.2.10", 50052, (7, 0, 0), 0.006, 0.005, hello.devices, 100e6)
    [check] = doctor.check_workers(_lan_view(), doctor.Facts(hellos={"rig/cuda0": slow}))
    assert check.status == doctor.WARN and "Wi-Fi" in check.message


def test_doctor_before_the_first_start_warns_instead_of_failing() -> None:
    facts = doctor.Facts(hellos={"rig/cuda0": rpcproto.Unreachable("192.0.2.10:50052: refused")},
                         http={"coordinator": None, "proxy": None})
    assert facts.nothing_running
    checks = doctor.check_workers(_lan_view(), facts) + doctor.check_services(_lan_view(), facts)
    assert {c.status for c in checks} == {doctor.WARN}, checks
    # The role binds a token-less proxy to its host's loopback: not visible from here.
    assert "binds 127.0.0.1 on 192.0.2.13" in checks[-1].message
    # Once something runs, a missing service is a failure.
    facts.http["coordinator"] = discovery.HttpFinding(8090, "llama-server", healthy=True)
    assert not facts.nothing_running
    checks = doctor.check_workers(_lan_view(), facts)
    assert checks[0].status == doctor.FAIL and "unreachable" in checks[0].message


def test_doctor_refuses_the_example_inventorys_placeholder_token(tmp_path: Path) -> None:
    """doctor judges the proxy token by the proxy's own rule: the example's ``change-me`` on a
    LAN bind is red, as the proxy would refuse to start with it; a strong one is green."""
    from support import REPO
    from tightwad.cli import doctor as doctor_cli

    example = REPO / "inventory" / "example" / "hosts.yml"
    [check] = doctor.check_proxy_auth(doctor_cli.view_from_inventory(example, tmp_path),
                                      doctor.Facts())
    assert check.status == doctor.FAIL and "weak token: shorter than 16" in check.message
    assert check.fix
    data = yaml.safe_load(example.read_text())
    data["all"]["vars"]["tightwad_proxy_token"] = "kq3-Vx8_pL2mZ7rT9wY4-strong"
    strong = tmp_path / "hosts.yml"
    strong.write_text(yaml.safe_dump(data))
    [check] = doctor.check_proxy_auth(doctor_cli.view_from_inventory(strong, tmp_path),
                                      doctor.Facts())
    assert check.status == doctor.OK and "token" in check.message
