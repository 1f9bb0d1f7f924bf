"""The pool_firewall role (the workers' and the llama-servers' firewall) fails closed and
replaces its rules: ufw and firewalld get exactly the wanted rules (an old coordinator address
is removed, not kept beside the new one), a host with no firewall stops the deploy unless the
explicit opt-out is set, a macOS worker is refused without it, and the nftables rules admit only
the given sources. The deploy test shows the rules working on real hosts."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("ansible", reason="ansible-core is not installed")

from support import REPO

ROLES = REPO / "roles"
FIREWALL = ROLES / "pool_firewall"
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"


def _filters() -> ModuleType:
    path = FIREWALL / "filter_plugins" / "tightwad_firewall.py"
    spec = importlib.util.spec_from_file_location("tightwad_firewall_filters", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fw = _filters()

UFW_OLD = """\
Added user rules (see 'ufw status' for running firewall):
ufw allow 22/tcp
ufw allow proto tcp from 10.0.0.9 to any port 50052 comment 'tightwad-rpc'
ufw deny proto tcp to any port 50052 comment 'tightwad-rpc'
ufw allow proto tcp from 10.0.0.9 to any port 8090 comment 'tightwad-coordinator'
"""


def test_ufw_rules_are_replaced_not_appended():
    commands = fw.tightwad_ufw_commands(UFW_OLD, "rpc", ["10.0.0.13"], [50052])
    # The old coordinator's allow and the deny go first; the new allow comes before the deny.
    assert commands == [
        ["ufw", "delete", "allow", "proto", "tcp", "from", "10.0.0.9", "to", "any", "port", "50052"],
        ["ufw", "delete", "deny", "proto", "tcp", "to", "any", "port", "50052"],
        ["ufw", "allow", "proto", "tcp", "from", "10.0.0.13", "to", "any", "port", "50052",
         "comment", "tightwad-rpc"],
        ["ufw", "deny", "proto", "tcp", "to", "any", "port", "50052", "comment", "tightwad-rpc"],
    ]
    # Nobody else's rules are touched (the SSH rule, the coordinator's own).
    assert not any("22/tcp" in c or "8090" in c for c in commands)


def test_ufw_rules_already_right_change_nothing_and_absent_removes_them():
    current = "\n".join("ufw " + " ".join(
        f"'{w}'" if w.startswith("tightwad-") else w for w in rule)
        for rule in fw.tightwad_ufw_rules("rpc", ["10.0.0.13", "fd00::13"], [50052, 50053]))
    assert fw.tightwad_ufw_commands(current, "rpc", ["10.0.0.13", "fd00::13"], [50052, 50053]) == []
    removal = fw.tightwad_ufw_commands(current, "rpc", [], [])
    assert len(removal) == 6 and all(c[:2] == ["ufw", "delete"] for c in removal)


def test_firewalld_stale_rules_are_removed_and_wanted_ones_added():
    listed = "\n".join([
        'rule family="ipv4" source address="10.0.0.9" port port="50052" protocol="tcp" accept',
        'rule family="ipv4" source address="10.0.0.13" port port="50052" protocol="tcp" accept',
        'rule family="ipv4" source address="10.0.0.9" port port="22" protocol="tcp" accept',
    ])
    changes = fw.tightwad_firewalld_changes(listed, ["10.0.0.13", "fd00::13"], [50052])
    assert changes == {
        "add": ['rule family="ipv6" source address="fd00::13" port port="50052" protocol="tcp" accept'],
        "remove": ['rule family="ipv4" source address="10.0.0.9" port port="50052" protocol="tcp" accept'],
    }
    assert fw.tightwad_firewalld_changes(listed, [], [50052])["remove"] == listed.splitlines()[:2]


def _play(tmp_path: Path, tasks: str, *extra: str) -> subprocess.CompletedProcess:
    playbook = tmp_path / "play.yml"
    playbook.write_text(tasks)
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    return subprocess.run(
        [str(PLAYBOOK_BIN), "-i", "localhost,", "-c", "local", str(playbook),
         "-e", f"ansible_python_interpreter={sys.executable}", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


NO_FIREWALL = """\
- name: A service with no firewall
  hosts: localhost
  gather_facts: false
  roles:
    - role: pool_firewall
      pool_firewall_name: coordinator
      pool_firewall_ports: [8090]
      pool_firewall_sources: [10.0.0.13]
      pool_firewall_backend: none
      pool_firewall_opt_out_name: coordinator_allow_unprotected
"""


def test_no_firewall_stops_the_deploy(tmp_path):
    result = _play(tmp_path, NO_FIREWALL)
    assert result.returncode != 0
    assert "no firewall for tightwad-coordinator (TCP 8090)" in result.stdout, result.stdout[-3000:]
    assert "coordinator_allow_unprotected=true" in result.stdout


def test_the_explicit_opt_out_goes_on_with_a_warning(tmp_path):
    result = _play(tmp_path, NO_FIREWALL, "-e", "pool_firewall_allow_unprotected=true")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "WARNING localhost: tightwad-coordinator ports 8090 are open" in result.stdout


def test_a_firewall_that_is_not_installed_is_refused(tmp_path):
    tools = [Path(p) for p in ("/usr/sbin/ufw", "/usr/bin/firewall-cmd", "/usr/sbin/nft")]
    missing = next((name for name, path in zip(("ufw", "firewalld", "nftables"), tools)
                    if not path.exists()), None)
    if missing is None:
        pytest.skip("ufw, firewalld and nft are all installed here")
    result = _play(tmp_path, NO_FIREWALL.replace("backend: none", f"backend: {missing}"))
    assert result.returncode != 0
    assert f"guarded by {missing}, which is not installed" in result.stdout, result.stdout[-3000:]


MACOS = f"""\
- name: A macOS worker
  hosts: localhost
  gather_facts: false
  vars_files:
    - {ROLES}/rpc_worker/defaults/main.yml
  vars:
    rpc_worker_bind_address: 10.0.0.14
    rpc_worker_allowed_sources: [10.0.0.13]
  tasks:
    - name: The launchd part of the role
      ansible.builtin.import_tasks: {ROLES}/rpc_worker/tasks/launchd.yml
"""


def test_a_macos_worker_without_pf_is_refused_without_the_opt_out(tmp_path):
    result = _play(tmp_path, MACOS, "-e", "rpc_worker_firewall=none")
    assert result.returncode != 0
    assert "is a macOS worker with rpc_worker_firewall=none" in result.stdout, \
        result.stdout[-3000:]
    assert "rpc_worker_allow_unprotected=true" in result.stdout
    assert not Path("/Library/Logs/tightwad").exists()  # refused before anything was written


PF = f"""\
- name: Render the macOS worker's pf rules and their boot daemon
  hosts: localhost
  gather_facts: false
  vars_files:
    - {ROLES}/rpc_worker/defaults/main.yml
    - {ROLES}/rpc_worker/vars/main.yml
  tasks:
    - name: Render
      ansible.builtin.template:
        src: "{ROLES}/rpc_worker/templates/{{{{ item.src }}}}"
        dest: "{{{{ out }}}}/{{{{ item.dest }}}}"
        mode: "0644"
      loop:
        - {{src: tightwad-rpc.pf.j2, dest: com.tightwad.rpc}}
        - {{src: tightwad-rpc-pf.plist.j2, dest: com.tightwad.rpc.pf.plist}}
      vars:
        rpc_worker_instances: [{{name: metal, port: 50052}}, {{name: cpu, port: 50053}}]
        rpc_worker_allowed_sources: [10.0.0.13, "fd00::13"]
        rpc_worker_peer_sources: [10.0.0.21, 10.0.0.22]
"""


def test_macos_pf_rules_admit_only_the_coordinator_and_the_workers_peers(tmp_path):
    import plistlib

    result = _play(tmp_path, PF, "-e", f"out={tmp_path}")
    assert result.returncode == 0, result.stdout[-3000:]
    rules = [line for line in (tmp_path / "com.tightwad.rpc").read_text().splitlines()
             if line and not line.startswith("#")]
    assert rules == [
        "table <tightwad_rpc_coordinator> const { 10.0.0.13, fd00::13 }",
        "pass in quick on lo0 proto tcp from any to any port { 50052, 50053 }",
        "pass in quick proto tcp from <tightwad_rpc_coordinator> to any port { 50052, 50053 }",
        "block drop in quick proto tcp from any to any port { 50052, 50053 }",
        # the peer ports (port + rpc_worker_peer_port_offset): only the pool's workers
        "table <tightwad_rpc_peers> const { 10.0.0.21, 10.0.0.22 }",
        "pass in quick on lo0 proto tcp from any to any port { 50152, 50153 }",
        "pass in quick proto tcp from <tightwad_rpc_peers> to any port { 50152, 50153 }",
        "block drop in quick proto tcp from any to any port { 50152, 50153 }",
    ]
    with (tmp_path / "com.tightwad.rpc.pf.plist").open("rb") as fh:
        daemon = plistlib.load(fh)
    assert daemon["RunAtLoad"] is True
    assert daemon["ProgramArguments"][-1] == (
        "/sbin/pfctl -E; /sbin/pfctl -a com.apple/tightwad.rpc -f /etc/pf.anchors/com.tightwad.rpc")
    if shutil.which("pfctl"):  # macOS: pf's own parser
        check = subprocess.run(["pfctl", "-nf", str(tmp_path / "com.tightwad.rpc")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr


RENDER = f"""\
- name: Render the nftables rules
  hosts: localhost
  gather_facts: false
  vars_files:
    - {FIREWALL}/defaults/main.yml
  tasks:
    - name: Render
      ansible.builtin.template:
        src: {FIREWALL}/templates/firewall.nft.j2
        dest: "{{{{ out }}}}/drafter.nft"
        mode: "0644"
      vars:
        pool_firewall_name: drafter
        pool_firewall_ports: [8091]
        pool_firewall_sources: [10.0.0.13, "fd00::13"]
"""


def test_nftables_rules_admit_only_the_sources(tmp_path):
    result = _play(tmp_path, RENDER, "-e", f"out={tmp_path}")
    assert result.returncode == 0, result.stdout[-3000:]
    rules = (tmp_path / "drafter.nft").read_text()
    lines = [line.strip() for line in rules.splitlines()]
    assert "ip saddr { 10.0.0.13 } tcp dport { 8091 } accept" in lines
    assert "ip6 saddr { fd00::13 } tcp dport { 8091 } accept" in lines
    assert lines[-3] == "tcp dport { 8091 } drop"
    if shutil.which("nft") and os.geteuid() == 0:
        check = subprocess.run(["nft", "-c", "-f", str(tmp_path / "drafter.nft")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
