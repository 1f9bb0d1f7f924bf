"""The rpc_worker role's rendered service files: the systemd unit passes ``systemd-analyze
verify``, the launchd plist parses with plistlib, the nftables rules admit only the coordinator
to the RPC ports and only the pool's workers to the peer ports, and the role refuses to listen
on every interface by default."""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ansible", reason="ansible-core is not installed")

from support import REPO

ROLE = REPO / "roles" / "rpc_worker"
FIREWALL = REPO / "roles" / "pool_firewall"
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"

INVENTORY = """\
all:
  hosts:
    worker:
      ansible_connection: local
      ansible_host: 10.77.0.12
    worker2:
      ansible_host: 10.77.0.14
  children:
    coordinator:
      hosts:
        coord:
          ansible_host: 10.77.0.13
    rpc_workers:
      hosts:
        worker:
        worker2:
"""

RENDER = """\
- name: Render the rpc_worker templates
  hosts: worker
  gather_facts: false
  vars_files:
    - {defaults}
    - {vars}
    - {fw_defaults}
  tasks:
    - name: Render {{{{ item.src }}}}
      ansible.builtin.template:
        src: "{{{{ item.src }}}}"
        dest: "{{{{ out }}}}/{{{{ item.dest }}}}"
        mode: "0644"
      loop:
        - {{src: {templates}/tightwad-rpc.service.j2, dest: tightwad-rpc-gpu0.service}}
        - {{src: {templates}/tightwad-rpc.plist.j2, dest: com.tightwad.rpc.gpu0.plist}}
        - {{src: {fw_templates}/firewall.nft.j2, dest: rpc-worker.nft}}
        - {{src: {fw_templates}/tightwad-firewall.service.j2, dest: tightwad-rpc-firewall.service}}
      vars:
        _rpc_worker: {{name: gpu0, port: 50053, device: CUDA0}}
        # What the pool_firewall role (the rpc_worker role's firewalls) is called with.
        _rpc_worker_fw_units: [tightwad-rpc-firewall.service, tightwad-rpc_peer-firewall.service]
        pool_firewall_name: rpc
        pool_firewall_ports: [50052]
        pool_firewall_sources: "{{{{ rpc_worker_allowed_sources }}}}"
        pool_firewall_nftables_file: "{{{{ rpc_worker_nftables_file }}}}"
    - name: Render the peer ports' {{{{ item.src }}}}
      ansible.builtin.template:
        src: "{{{{ item.src }}}}"
        dest: "{{{{ out }}}}/{{{{ item.dest }}}}"
        mode: "0644"
      loop:
        - {{src: {fw_templates}/firewall.nft.j2, dest: rpc-worker-peer.nft}}
        - {{src: {fw_templates}/tightwad-firewall.service.j2,
           dest: tightwad-rpc_peer-firewall.service}}
      vars:
        pool_firewall_name: rpc_peer
        pool_firewall_ports: "{{{{ _rpc_worker_peer_ports }}}}"
        pool_firewall_sources: "{{{{ rpc_worker_peer_sources }}}}"
        pool_firewall_nftables_file: "{{{{ rpc_worker_peer_nftables_file }}}}"
"""

# The checks alone (include_role would run the llama_cpp dependency first).
PREFLIGHT = f"""\
- name: Preflight
  hosts: worker
  gather_facts: false
  vars_files:
    - {ROLE}/defaults/main.yml
    - {ROLE}/vars/main.yml
  tasks:
    - name: Run the role's checks
      ansible.builtin.import_tasks: {ROLE}/tasks/preflight.yml
"""


def run_playbook(tmp_path: Path, text: str, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "inventory.yml").write_text(INVENTORY)
    playbook = tmp_path / "play.yml"
    playbook.write_text(text)
    # The project's ansible.cfg puts the shared filter plugins on the path; the role's own
    # (the bind guard's inet_addr) are added, as a play running the role would.
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_FILTER_PLUGINS=f"{REPO / 'filter_plugins'}:{ROLE / 'filter_plugins'}")
    cmd = [str(PLAYBOOK_BIN), "-i", str(tmp_path / "inventory.yml"), str(playbook),
           "-e", f"ansible_python_interpreter={sys.executable}", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("rpc-render")
    out = tmp / "out"
    out.mkdir()
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ggml-rpc-server"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    result = run_playbook(tmp, RENDER.format(defaults=ROLE / "defaults" / "main.yml",
                                             vars=ROLE / "vars" / "main.yml",
                                             fw_defaults=FIREWALL / "defaults" / "main.yml",
                                             templates=ROLE / "templates",
                                             fw_templates=FIREWALL / "templates"),
                          "-e", f"out={out}", "-e", f"rpc_worker_bin_dir={bin_dir}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return out


def test_unit_binds_the_pool_address_with_cache_and_hardening(rendered):
    unit = (rendered / "tightwad-rpc-gpu0.service").read_text()
    assert unit.startswith("# Ansible managed")
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith("/ggml-rpc-server --host 10.77.0.12 --port 50053 --device CUDA0 "
                               "--cache --peer 10.77.0.12:50153")
    assert "0.0.0.0" not in unit
    # Fail closed: no worker without its firewalls (a failed `nft -f` keeps it down).
    for fw in ("tightwad-rpc-firewall.service", "tightwad-rpc_peer-firewall.service"):
        assert f"Requires={fw}" in unit.splitlines() and f"After={fw}" in unit.splitlines()
    for line in ("User=tightwad-rpc", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "Restart=on-failure", "CacheDirectory=tightwad-rpc/gpu0",
                 "Environment=LLAMA_CACHE=/var/cache/tightwad-rpc/gpu0"):
        assert line in unit.splitlines(), line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("name", ["tightwad-rpc-gpu0.service", "tightwad-rpc-firewall.service"])
def test_systemd_analyze_verify_accepts_the_units(rendered, name):
    if name == "tightwad-rpc-firewall.service" and not Path("/usr/sbin/nft").exists():
        pytest.skip("verify checks that ExecStart exists; /usr/sbin/nft is not installed here")
    result = subprocess.run(["systemd-analyze", "verify", str(rendered / name)],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if name in line or "tightwad" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_launchd_plist_parses(rendered):
    with (rendered / "com.tightwad.rpc.gpu0.plist").open("rb") as fh:
        plist = plistlib.load(fh)
    assert plist["Label"] == "com.tightwad.rpc.gpu0"
    assert plist["ProgramArguments"][1:] == ["--host", "10.77.0.12", "--port", "50053",
                                             "--device", "CUDA0", "--cache",
                                             "--peer", "10.77.0.12:50153"]
    assert plist["ProgramArguments"][0].endswith("/ggml-rpc-server")
    assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True


def test_nftables_rules_admit_only_the_coordinator(rendered):
    rules = (rendered / "rpc-worker.nft").read_text()
    assert "table inet tightwad_rpc {" in rules and "delete table inet tightwad_rpc" in rules
    assert "ip saddr { 10.77.0.13 } tcp dport { 50052 } accept" in rules
    assert 'iif "lo" tcp dport { 50052 } accept' in rules
    assert rules.index("accept") < rules.index("tcp dport { 50052 } drop")
    unit = (rendered / "tightwad-rpc-firewall.service").read_text()
    assert "ExecStart=/usr/sbin/nft -f /etc/tightwad/rpc-worker.nft" in unit
    assert "ExecStop=/usr/sbin/nft delete table inet tightwad_rpc" in unit
    if shutil.which("nft") and os.geteuid() == 0:
        result = subprocess.run(["nft", "-c", "-f", str(rendered / "rpc-worker.nft")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_peer_port_rules_admit_only_the_pools_workers(rendered):
    rules = (rendered / "rpc-worker-peer.nft").read_text()
    assert "table inet tightwad_rpc_peer {" in rules
    assert "ip saddr { 10.77.0.12, 10.77.0.14 } tcp dport { 50152 } accept" in rules
    assert rules.index("accept") < rules.index("tcp dport { 50152 } drop")
    assert "10.77.0.13" not in rules  # the coordinator pushes nothing there
    if shutil.which("nft") and os.geteuid() == 0:
        result = subprocess.run(["nft", "-c", "-f", str(rendered / "rpc-worker-peer.nft")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("extra,needle", [
    ({"rpc_worker_bind_address": "0.0.0.0"}, "rpc_worker_allow_any_address=true"),
    # What inet_addr (the worker's parser) reads as every interface, whatever the spelling.
    ({"rpc_worker_bind_address": "0"}, "rpc_worker_allow_any_address=true"),
    ({"rpc_worker_bind_address": "0.0"}, "rpc_worker_allow_any_address=true"),
    ({"rpc_worker_bind_address": "000.0.0.0"}, "rpc_worker_allow_any_address=true"),
    # The worker binds IPv4 only: an IPv6 pool address would restart forever.
    ({"rpc_worker_bind_address": "fd00::12"}, "binds IPv4 only"),
    ({"rpc_worker_bind_address": "::"}, "binds IPv4 only"),
    ({"rpc_worker_bind_address": "rig.local"}, "tightwad_pool_address"),
    ({"rpc_worker_bind_address": "10.0.0.1 10.0.0.2"}, "tightwad_pool_address"),
    ({"rpc_worker_bind_address": "255.255.255.255"}, "tightwad_pool_address"),
    ({"rpc_worker_instances": [{"name": "a", "port": 1}, {"name": "b", "port": 1}]}, "unique"),
    ({"rpc_worker_coordinator_group": "nobody"}, "no coordinator address"),
    # a peer port that is another instance's RPC port, or past 65535
    ({"rpc_worker_instances": [{"name": "a", "port": 50052}, {"name": "b", "port": 50152}]},
     "rpc_worker_peer_port_offset"),
    ({"rpc_worker_instances": [{"name": "a", "port": 65500}]}, "at most 65535"),
    ({"rpc_worker_peer_group": "nobody"}, "must name the workers"),
])
def test_preflight_refuses_unsafe_or_broken_settings(tmp_path, extra, needle):
    extra_file = tmp_path / "extra.json"
    extra_file.write_text(json.dumps(extra))
    result = run_playbook(tmp_path, PREFLIGHT, "-e", f"@{extra_file}")
    assert result.returncode != 0
    assert needle in result.stdout, result.stdout[-3000:]


def test_preflight_accepts_the_defaults(tmp_path):
    result = run_playbook(tmp_path, PREFLIGHT)
    assert result.returncode == 0, result.stdout[-3000:]


def test_preflight_accepts_no_peer_port(tmp_path):
    """Offset 0: no peer port, so no peer group is needed (the coordinator relays)."""
    result = run_playbook(tmp_path, PREFLIGHT, "-e", "rpc_worker_peer_port_offset=0",
                          "-e", "rpc_worker_peer_group=nobody")
    assert result.returncode == 0, result.stdout[-3000:]
