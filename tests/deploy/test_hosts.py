"""The host harness: real systemd-nspawn hosts on a private bridge (tightwad_dev.hosts).

One group of three hosts boots once for the module; the last test closes it and checks that
nothing is left. A crash test kills a process that holds a one-host group and checks that the
next group under that prefix removes the leftovers.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tightwad_dev import hosts as th

_REASON = th.skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

PREFIX = "twtest"
CRASH_PREFIX = "twcrash"
NAMES = ["alpha", "beta", "gamma"]
PROBE_PORT = 8470
FW_PORT = 8471

# Run on a host: connect to each "addr:port" argument, print "addr:port ok" or
# "addr:port <error class>" per target; exit 0 always (the test reads the lines).
CONNECT = textwrap.dedent("""\
    import socket, sys
    for target in sys.argv[1:]:
        addr, port = target.rsplit(":", 1)
        try:
            socket.create_connection((addr, int(port)), timeout=2).close()
            print(target, "ok")
        except OSError as exc:
            print(target, type(exc).__name__)
""")


def connect_from(host: th.Host, *targets: str) -> dict[str, str]:
    proc = host.run(["python3", "-c", CONNECT, *targets], timeout=30)
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines())


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory):
    started = time.monotonic()
    with th.HostGroup(NAMES, prefix=PREFIX, log_dir=tmp_path_factory.mktemp("hosts")) as hosts:
        print(f"\n3 hosts up in {time.monotonic() - started:.1f} s: "
              + ", ".join(f"{h.name} {h.boot_seconds:.1f} s" for h in hosts), file=sys.stderr)
        yield hosts


def test_mirror_comes_from_apt_sources():
    assert th.debian_mirror().startswith(("http://", "https://", "file:/"))


def test_rootfs_is_cached_with_its_key():
    rootfs = th.ensure_rootfs()
    assert rootfs.dir.name == f"{th.SUITE}-{th.rootfs_key()}"
    assert rootfs.meta["packages"] == list(th.PACKAGES)
    assert (rootfs.key.stat().st_mode & 0o077) == 0
    authorized = (rootfs.rootfs / "root" / ".ssh" / "authorized_keys").read_text()
    assert authorized == Path(f"{rootfs.key}.pub").read_text()
    assert th.ensure_rootfs().dir == rootfs.dir  # the second call is a cache hit


def test_hosts_boot_systemd_as_pid1(group: th.HostGroup):
    for host in group:
        out = host.run("ps -p 1 -o comm=; hostname; systemctl is-system-running || true").stdout
        comm, hostname, state = out.split()
        assert (comm, hostname) == ("systemd", host.name)
        assert state in ("running", "degraded"), host.run("systemctl --failed").stdout
        assert host.run("systemctl is-active ssh").stdout.strip() == "active"


def test_addresses_and_no_route_out(group: th.HostGroup):
    addresses = [h.address for h in group]
    assert len(set(addresses)) == len(addresses)
    for host in group:
        assert host.run("ip -4 -o addr show dev eth0").stdout.split()[3].split("/")[0] \
            == host.address
        assert host.run("ip route show default").stdout.strip() == ""
        # Names of the group resolve on every host.
        assert group.controller_address in host.run(f"getent hosts {th.CONTROLLER_NAME}").stdout


def test_systemd_run_unit_and_hosts_reach_each_other(group: th.HostGroup):
    for host in group:
        host.run(["systemd-run", "--unit=probe", "--property=Restart=on-failure", "python3",
                  "-m", "http.server", str(PROBE_PORT), "--bind", host.address])
    for host in group:
        for _ in range(50):  # active, and listening
            if host.run(f"ss -Hltn 'sport = :{PROBE_PORT}'").stdout.strip():
                break
            time.sleep(0.1)
        assert host.run("systemctl is-active probe").stdout.strip() == "active"
    for host in group:
        peers = [f"{p.address}:{PROBE_PORT}" for p in group if p is not host]
        assert connect_from(host, *peers) == dict.fromkeys(peers, "ok"), host.name
    # The controller reaches them too, by name from the hosts' point of view and by address.
    for host in group:
        out = subprocess.run(["python3", "-c", CONNECT, f"{host.address}:{PROBE_PORT}"],
                             capture_output=True, text=True, timeout=30).stdout
        assert out.split() == [f"{host.address}:{PROBE_PORT}", "ok"]
    assert connect_from(group["alpha"], f"beta:{PROBE_PORT}") == {f"beta:{PROBE_PORT}": "ok"}


def test_units_are_isolated_between_hosts(group: th.HostGroup):
    """Each container has its own cgroup tree. Sharing one (what nspawn --keep-unit does when
    all containers start from the same cgroup) breaks `systemctl kill` of a unit that runs on
    two hosts under the same name ("Failed to send signal ... to auxiliary processes")."""
    a, b = group["alpha"], group["beta"]
    for host in (a, b):
        host.run("systemd-run --unit=isolation --property=Restart=always --property=RestartSec=0.2 "
                 "sleep 600")
    pid_b = b.run("systemctl show -P MainPID isolation").stdout.strip()
    a.run("systemctl kill -s KILL isolation")
    for _ in range(50):
        if a.run("systemctl show -P NRestarts isolation").stdout.strip() == "1":
            break
        time.sleep(0.1)
    assert a.run("systemctl show -P NRestarts isolation").stdout.strip() == "1"
    a.run("systemctl stop isolation")
    assert b.run("systemctl is-active isolation").stdout.strip() == "active"
    assert b.run("systemctl show -P MainPID isolation").stdout.strip() == pid_b
    assert b.run("systemctl show -P NRestarts isolation").stdout.strip() == "0"
    b.run("systemctl stop isolation")


def test_nftables_admits_port_only_from_one_source(group: th.HostGroup):
    a, b, c = group["alpha"], group["beta"], group["gamma"]
    b.run(["systemd-run", "--unit=fwprobe", "python3", "-m", "http.server", str(FW_PORT),
           "--bind", b.address])
    rules = textwrap.dedent(f"""\
        table inet twtest {{
            chain input {{
                type filter hook input priority 0; policy accept;
                tcp dport {FW_PORT} ip saddr {a.address} accept
                tcp dport {FW_PORT} drop
            }}
        }}
    """)
    b.run("nft -f -", input=rules)
    try:
        target = f"{b.address}:{FW_PORT}"
        for _ in range(50):
            if connect_from(a, target)[target] == "ok":
                break
            time.sleep(0.1)
        assert connect_from(a, target) == {target: "ok"}
        assert connect_from(c, target) == {target: "TimeoutError"}
        # Other ports on B stay open to C.
        assert connect_from(c, f"{b.address}:{PROBE_PORT}") == {f"{b.address}:{PROBE_PORT}": "ok"}
    finally:
        b.run("nft delete table inet twtest", check=False)
    assert connect_from(c, target) == {target: "ok"}


def test_inventory(group: th.HostGroup, tmp_path: Path):
    path = group.write_inventory(tmp_path / "inventory.yml",
                                 groups={"rpc_workers": ["alpha", "beta"],
                                         "coordinator": ["gamma"]})
    inv = yaml.safe_load(path.read_text())
    assert set(inv["all"]["hosts"]) == set(NAMES)
    assert set(inv["all"]["children"]["rpc_workers"]["hosts"]) == {"alpha", "beta"}
    gamma = inv["all"]["hosts"]["gamma"]
    assert gamma["ansible_host"] == group["gamma"].address
    assert gamma["ansible_user"] == "root"
    assert "UserKnownHostsFile=/dev/null" in gamma["ansible_ssh_common_args"]
    # The same connection settings, used by hand, log in.
    cmd = ["ssh", "-i", gamma["ansible_ssh_private_key_file"],
           *gamma["ansible_ssh_common_args"].split(), "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
           f"{gamma['ansible_user']}@{gamma['ansible_host']}", "hostname"]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() == "gamma"
    with pytest.raises(ValueError):
        group.inventory({"x": ["nope"]})


def test_close_removes_everything(group: th.HostGroup):
    """Keep this last in the module: it closes the shared group."""
    pids = [h.popen.pid for h in group]
    started = time.monotonic()
    group.close()
    print(f"\nteardown of {len(pids)} hosts: {time.monotonic() - started:.1f} s", file=sys.stderr)
    assert_clean(PREFIX)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    group.close()  # idempotent


def assert_clean(prefix: str) -> None:
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                          text=True).stdout.split() if n.startswith(f"{prefix}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f" {prefix}-" not in links
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"/run/netns/{prefix}-" not in ps
    assert th.leftovers(prefix) == {"nspawn": [], "netns": [], "links": [], "cgroups": []}


CRASHER = textwrap.dedent("""\
    import os, sys
    from tightwad_dev import hosts as th
    group = th.HostGroup(["solo"], prefix=sys.argv[1]).start()
    print("up", flush=True)
    os.kill(os.getpid(), 9)
""")


def test_leftovers_of_a_crashed_run_are_removed():
    proc = subprocess.run([sys.executable, "-c", CRASHER, CRASH_PREFIX], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL and proc.stdout.strip() == "up", proc.stderr
    left = th.leftovers(CRASH_PREFIX)
    assert left["nspawn"] and left["netns"] == [f"{CRASH_PREFIX}-solo"], left
    assert left["cgroups"], left
    assert set(left["links"]) == {f"{CRASH_PREFIX}-br", f"{CRASH_PREFIX}-0"}
    # A new group under that prefix cleans up before it starts; with no hosts it starts nothing.
    with th.HostGroup([], prefix=CRASH_PREFIX) as empty:
        assert len(empty) == 0
        assert th.leftovers(CRASH_PREFIX)["nspawn"] == []
    assert_clean(CRASH_PREFIX)


HOLDER = textwrap.dedent("""\
    import sys, time
    from tightwad_dev import hosts as th
    with th.HostGroup(["solo"], prefix=sys.argv[1]):
        print("up", flush=True)
        time.sleep(300)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_interrupted_run_tears_down(sig: signal.Signals):
    prefix = f"twsig{int(sig)}"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, prefix], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up", proc.stderr.read()
        assert th.leftovers(prefix)["nspawn"]
        proc.send_signal(sig)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        th.cleanup_prefix(prefix)  # only matters when the assertions below fail
    assert proc.returncode != 0
    assert th.leftovers(prefix) == {"nspawn": [], "netns": [], "links": [], "cgroups": []}


def test_failed_boot_tears_down():
    with pytest.raises(th.HostsError, match="no sshd after"):
        # A zero deadline fails deterministically, after the container was started.
        th.HostGroup(["late"], prefix="twfail", boot_timeout=0).start()
    assert_clean("twfail")
