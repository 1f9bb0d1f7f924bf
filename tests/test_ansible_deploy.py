"""site.yml against real systemd hosts (systemd-nspawn containers reached over SSH).

The pinned CPU build is made once on the controller with tightwad.build and shipped; the RPC
workers run as hardened systemd units bound to their pool address, firewalled to the
coordinator, and restarted by systemd when killed. A second run and a check-mode run change
nothing. (The coordinator, drafter and proxy plays come with their roles.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ansible", reason="ansible-core is not installed")

from tightwad.testing.hosts import PACKAGES, HostGroup, skip_reason  # noqa: E402

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

REPO = Path(__file__).resolve().parents[1]
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"
# The hosts have no route out: what the roles install with apt must be in the rootfs already
# (libgomp1: the binaries' OpenMP runtime; python3-apt: Ansible's apt module).
HOST_PACKAGES = [*PACKAGES, "libgomp1", "python3-apt"]
GROUPS = {"rpc_workers": ["w1", "w2"], "coordinator": ["coord"]}


def _changed(stdout: str) -> dict[str, int]:
    return {line.split()[0]: int(line.split("changed=")[1].split()[0])
            for line in stdout.splitlines() if "changed=" in line and "unreachable=" in line}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    with HostGroup(["w1", "w2", "coord"], prefix="twans", packages=HOST_PACKAGES,
                   log_dir=tmp_path_factory.mktemp("hosts")) as group:
        inventory = group.write_inventory(tmp_path_factory.mktemp("inv") / "inventory.yml",
                                          groups=GROUPS)

        def play(*args: str, playbook: str = "site.yml") -> subprocess.CompletedProcess:
            env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
            return subprocess.run([str(PLAYBOOK_BIN), "-i", str(inventory), playbook, *args],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)

        first = play()
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-2000:]
        yield group, play, first


def test_first_run_installs_the_workers(pool):
    group, _, first = pool
    assert all(n > 0 for n in _changed(first.stdout).values())
    for name in GROUPS["rpc_workers"]:
        host = group[name]
        assert host.run("systemctl is-active tightwad-rpc-main").stdout.strip() == "active"
        listening = host.run("ss -ltnH 'sport = :50052'").stdout
        assert f"{host.address}:50052" in listening and "0.0.0.0:50052" not in listening
        record = host.run("cat /opt/tightwad/llama.cpp/tightwad-llama-cpp.json").stdout
        assert '"backend": "cpu"' in record


def test_second_run_and_check_mode_change_nothing(pool):
    _, play, _ = pool
    again = play()
    assert again.returncode == 0, again.stdout[-6000:]
    assert set(_changed(again.stdout).values()) == {0}, again.stdout[-6000:]
    check = play("--check")
    assert check.returncode == 0, check.stdout[-6000:]
    assert set(_changed(check.stdout).values()) == {0}, check.stdout[-6000:]


def _connects(src, dst) -> bool:
    probe = f"timeout 3 bash -c 'echo > /dev/tcp/{dst.address}/50052' && echo OK || echo BLOCKED"
    return src.run(probe, check=False).stdout.strip() == "OK"


def test_rpc_port_admits_only_the_coordinator(pool):
    group, _, _ = pool
    assert _connects(group["coord"], group["w1"])
    assert not _connects(group["w2"], group["w1"])


def test_systemd_restarts_a_killed_worker(pool):
    group, _, _ = pool
    host = group["w2"]
    pid = host.run("systemctl show -p MainPID --value tightwad-rpc-main").stdout.strip()
    assert pid and pid != "0"
    host.run(f"kill -9 {pid}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        new = host.run("systemctl show -p MainPID --value tightwad-rpc-main").stdout.strip()
        if new not in ("0", pid) and host.run("systemctl is-active tightwad-rpc-main",
                                              check=False).stdout.strip() == "active":
            break
        time.sleep(0.5)
    else:
        pytest.fail("systemd did not restart the killed ggml-rpc-server")
    assert int(host.run("systemctl show -p NRestarts --value tightwad-rpc-main").stdout) >= 1


def test_teardown_removes_everything(pool):
    """Last: stops the services, drops the firewall table, removes files and the account."""
    group, play, _ = pool
    result = play(playbook="playbooks/teardown.yml")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    for name in GROUPS["rpc_workers"]:
        host = group[name]
        assert host.run("systemctl is-active tightwad-rpc-main", check=False).stdout.strip() != "active"
        assert host.run("ls /etc/systemd/system/ | grep -c tightwad", check=False).stdout.strip() == "0"
        assert host.run("nft list table inet tightwad_rpc", check=False).returncode != 0
        assert host.run("test -e /opt/tightwad", check=False).returncode != 0
        assert host.run("getent passwd tightwad-rpc", check=False).returncode != 0
        assert not host.run("pgrep -x ggml-rpc-server", check=False).stdout.strip()
    again = play(playbook="playbooks/teardown.yml")
    assert set(_changed(again.stdout).values()) == {0}, again.stdout[-4000:]
