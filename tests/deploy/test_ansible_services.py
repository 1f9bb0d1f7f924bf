"""The coordinator/drafter (llama_server) and proxy roles' rendered files: units that
``systemd-analyze verify`` accepts, with the arguments the inventory asks for and no secret on a
command line; a proxy config that the proxy's own schema accepts. The deploy test runs them for
real on systemd hosts; these catch template mistakes in seconds."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ansible", reason="ansible-core is not installed")

from support import REPO

ROLES = REPO / "roles"
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"
COORDINATOR_KEY = "coordinator-key-from-the-inventory"
DRAFTER_KEY = "generated-on-the-drafter-host-0123"

INVENTORY = """\
all:
  vars:
    tightwad_proxy_token: s3cret-token-for-tests
  children:
    rpc_workers:
      hosts:
        w1: {ansible_host: 10.77.0.11}
        w2: {ansible_host: 10.77.0.12, rpc_worker_instances: [{name: a, port: 50052}, {name: b, port: 50053}]}
    coordinator:
      hosts:
        coord: {ansible_host: 10.77.0.13, ansible_connection: local, coordinator_parallel: 3,
                coordinator_api_key: coordinator-key-from-the-inventory}
    drafters:
      hosts:
        junk: {ansible_host: 10.77.0.14, drafter_port: 9091}
    proxy:
      hosts:
        coord:
"""

RENDER = """\
- name: Render the service templates
  hosts: coord
  gather_facts: false
  vars_files:
    - {roles}/llama_server/defaults/main.yml
    - {roles}/llama_server/vars/main.yml
    - {roles}/coordinator/defaults/main.yml
    - {roles}/coordinator/vars/main.yml
    - {roles}/proxy/defaults/main.yml
    - {roles}/proxy/vars/main.yml
  vars:
    llama_cpp_detected: {{backend: cpu}}
    # What keys.yml reads from the drafter's host (its drafter_api_key is auto).
    _proxy_drafter_key_read: {{content: "{drafter_key_b64}"}}
    ansible_facts: {{python: {{version: {{major: 3, minor: 11}}, executable: /usr/bin/python3}},
                    architecture: x86_64, memtotal_mb: 4096}}
  tasks:
    - name: Render the coordinator's unit
      ansible.builtin.template:
        src: {roles}/llama_server/templates/tightwad-llama-server.service.j2
        dest: "{{{{ out }}}}/tightwad-coordinator.service"
        mode: "0644"
      vars:
        llama_server_name: coordinator
        llama_server_model: /models/big.gguf
        llama_server_draft_model: /models/small.gguf
        llama_server_api_key: coordinator-key-from-the-inventory
        llama_server_args: [--rpc, "10.77.0.11:50052,10.77.0.12:50052", --tensor-split, "3,1"]
        # As the coordinator role passes it: the workers' peer endpoints.
        llama_server_environment: "{{{{ _coordinator_environment }}}}"
        # What the pool_firewall role reports for an nftables host.
        _llama_server_fw_unit: tightwad-coordinator-firewall.service
    - name: Render the coordinator's firewall unit (its unit Requires= it)
      ansible.builtin.template:
        src: {roles}/pool_firewall/templates/tightwad-firewall.service.j2
        dest: "{{{{ out }}}}/tightwad-coordinator-firewall.service"
        mode: "0644"
      vars:
        pool_firewall_name: coordinator
        pool_firewall_ports: [8090]
        pool_firewall_sources: [10.77.0.13]
        pool_firewall_nftables_file: /etc/tightwad/firewall-coordinator.nft
    - name: Render the proxy's unit and config
      ansible.builtin.template:
        src: {roles}/proxy/templates/{{{{ item.src }}}}
        dest: "{{{{ out }}}}/{{{{ item.dest }}}}"
        mode: "0644"
      loop:
        - {{src: tightwad-proxy.service.j2, dest: tightwad-proxy.service}}
        - {{src: proxy.yml.j2, dest: proxy.yml}}
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("services")
    # Units name real executables (systemd-analyze verify checks them): fakes stand in.
    out, bin_dir, venv = tmp / "out", tmp / "bin", tmp / "venv"
    out.mkdir()
    for path in (bin_dir / "llama-server", venv / "bin" / "python"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    (tmp / "inventory.yml").write_text(INVENTORY)
    (tmp / "play.yml").write_text(RENDER.format(
        roles=ROLES, drafter_key_b64=base64.b64encode(DRAFTER_KEY.encode() + b"\n").decode()))
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    result = subprocess.run(
        [str(PLAYBOOK_BIN), "-i", str(tmp / "inventory.yml"), str(tmp / "play.yml"),
         "-e", f"out={out}", "-e", f"llama_server_bin_dir={bin_dir}",
         "-e", f"proxy_install_dir={tmp}",
         "-e", f"ansible_python_interpreter={sys.executable}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return out


def _exec_start(unit: str) -> str:
    return next(line for line in unit.splitlines() if line.startswith("ExecStart="))


def test_coordinator_unit_runs_the_pool_without_secrets_on_the_command_line(rendered):
    unit = (rendered / "tightwad-coordinator.service").read_text()
    assert unit.startswith("# Ansible managed")
    exec_start = _exec_start(unit)
    for part in ("--host 10.77.0.13 --port 8090", "--model /var/lib/tightwad/models/big.gguf",
                 "--parallel 4", "--n-gpu-layers 999",
                 "--spec-type draft-simple --spec-draft-model /var/lib/tightwad/models/small.gguf",
                 "--api-key-file /etc/tightwad/coordinator.key",
                 # /slots and the web UI are off unless asked for.
                 "--no-slots --no-webui",
                 "--rpc 10.77.0.11:50052,10.77.0.12:50052 --tensor-split 3,1"):
        assert part in exec_start, part
    assert COORDINATOR_KEY not in unit and "--api-key " not in exec_start
    # Fail closed: not without the rules that admit only the proxy.
    assert "Requires=tightwad-coordinator-firewall.service" in unit.splitlines()
    assert "After=tightwad-coordinator-firewall.service" in unit.splitlines()
    assert "--slots" not in exec_start.replace("--no-slots", "")
    # Its own account, not the proxy's: it cannot read the proxy's token.
    for line in ("User=tightwad-coordinator", "Group=tightwad-coordinator",
                 "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "UnsetEnvironment=LLAMA_SERVER_SLOTS_DEBUG",
                 "Restart=on-failure", "StartLimitIntervalSec=0", "PrivateDevices=yes"):
        assert line in unit.splitlines(), line
    # Workers pass hidden states to each other: every instance's --rpc endpoint and its port
    # + rpc_worker_peer_port_offset, on the worker's pool address.
    assert ('Environment="GGML_RPC_PEERS=10.77.0.11:50052=10.77.0.11:50152,'
            '10.77.0.12:50052=10.77.0.12:50152,10.77.0.12:50053=10.77.0.12:50153"'
            in unit.splitlines())


def test_proxy_config_is_accepted_by_the_proxy_and_points_at_the_pool(rendered):
    config = yaml.safe_load((rendered / "proxy.yml").read_text())
    assert config["listen"] == {"host": "10.77.0.13", "port": 8088}
    assert config["auth"] == {"token": "s3cret-token-for-tests"}
    # Both upstream keys: the coordinator's from the inventory, the drafter's generated on its
    # host (without it the drafter answers 401 and speculation silently stops).
    assert config["target"] == {"url": "http://10.77.0.13:8090", "slots": 3,
                                "api_key": COORDINATOR_KEY}
    assert config["drafter"] == {"url": "http://10.77.0.14:9091", "slots": 4,
                                 "api_key": DRAFTER_KEY}
    assert config["speculation"]["mode"] == "remote" and config["speculation"]["k_max"] == 16
    # The dashboard draws the deployed pool from the description the role copies here.
    assert config["dashboard"] == {"pool_file": "/etc/tightwad/proxy-pool.json"}
    check = subprocess.run([sys.executable, "-m", "tightwad.server", "--check", "--config",
                            str(rendered / "proxy.yml")], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stderr
    # The same file without its token is refused off loopback: the role's validate step.
    del config["auth"]
    bad = rendered / "proxy-no-token.yml"
    bad.write_text(yaml.safe_dump(config))
    check = subprocess.run([sys.executable, "-m", "tightwad.server", "--check", "--config",
                            str(bad)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 2 and "listen.host" in check.stderr


def test_proxy_unit_is_hardened(rendered):
    unit = (rendered / "tightwad-proxy.service").read_text()
    assert _exec_start(unit).endswith("/bin/python -m tightwad.server --config /etc/tightwad/proxy.yml")
    for line in ("User=tightwad-proxy", "Group=tightwad-proxy", "MemoryDenyWriteExecute=yes",
                 "SystemCallFilter=@system-service", "ProtectSystem=strict",
                 "CapabilityBoundingSet=", "MemoryMax=2G", "LimitNOFILE=16384", "TasksMax=256"):
        assert line in unit.splitlines(), line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("name", ["tightwad-coordinator.service", "tightwad-proxy.service"])
def test_systemd_analyze_verify_accepts_the_units(rendered, name):
    result = subprocess.run(["systemd-analyze", "verify", str(rendered / name)],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if name in line or "tightwad" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


@pytest.mark.parametrize("role", ["llama_cpp", "rpc_worker", "coordinator", "drafter", "proxy",
                                  "llama_server", "pool_firewall"])
def test_every_role_passes_syntax_check(tmp_path, role):
    playbook = tmp_path / "syntax.yml"
    playbook.write_text(f"- name: Syntax\n  hosts: all\n  roles:\n    - role: {role}\n")
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    result = subprocess.run([str(PLAYBOOK_BIN), "-i", "localhost,", "--syntax-check",
                             str(playbook)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


DESCRIBE = """\
- name: Describe the pool as the coordinator role does
  hosts: coord
  gather_facts: false
  vars_files:
    - {roles}/coordinator/defaults/main.yml
    - {roles}/coordinator/vars/main.yml
  tasks:
    - name: Run the role's description tasks
      ansible.builtin.import_tasks: {roles}/coordinator/tasks/describe.yml
"""


@pytest.mark.parametrize("split,free_mib", [([3, 1, 2], None), ("memory", [3000, 1000, 2000])])
def test_coordinator_describes_the_pool_it_runs(tmp_path, models, split, free_mib):
    """The coordinator role's description (roles/coordinator/tasks/describe.yml) run on this
    machine: the workers in --rpc order, the split the role applies, the layer count of the
    model; what the proxy's dashboard draws, covering every layer. A rerun and a check-mode run
    change nothing."""
    from tightwad.pool import placement
    from tightwad.pool.gguf_info import read_info
    from tightwad.server import dashboard

    pool_file = tmp_path / "etc" / "pool.json"
    (tmp_path / "inventory.yml").write_text(INVENTORY)
    (tmp_path / "play.yml").write_text(DESCRIBE.format(roles=ROLES))
    extra = {"coordinator_pool_file": str(pool_file), "coordinator_model": str(models.target),
             "coordinator_tensor_split": split}
    if free_mib is not None:  # what split.yml measures on the workers
        extra["_coordinator_free_mib"] = free_mib
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))

    def play(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(PLAYBOOK_BIN), "-i", str(tmp_path / "inventory.yml"), str(tmp_path / "play.yml"),
             "-e", f"ansible_python_interpreter={sys.executable}",
             "-e", f"@{tmp_path / 'extra.json'}", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    check = play("--check")  # before the first run: nothing written
    assert check.returncode == 0, check.stdout[-4000:]
    assert not pool_file.exists()
    first = play()
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    assert "changed=2" in first.stdout  # the directory and the file
    assert oct(pool_file.stat().st_mode & 0o777) == "0o644"
    description = json.loads(pool_file.read_text())
    rpcs = ["10.77.0.11:50052", "10.77.0.12:50052", "10.77.0.12:50053"]
    assert description["rpc"] == ",".join(rpcs)
    assert [(w["host"], w["instance"]) for w in description["workers"]] == [
        ("w1", "main"), ("w2", "a"), ("w2", "b")]
    assert description["n_layer"] == read_info(models.target).arch_value("block_count")
    assert description["model"] == models.target.name and description["coordinator"] == "coord"
    assert description["measurements"] == [] and COORDINATOR_KEY not in pool_file.read_text()
    if split == "memory":
        assert description["tensor_split"] == placement.format_split(
            placement.propose_split([v * placement.MiB for v in free_mib]))
        assert [w["free_mib"] for w in description["workers"]] == free_mib
    else:
        assert description["tensor_split"] == "3,1,2" and description["split"] == "explicit"
    view = dashboard.deployed_pool_view(description, True, {})
    layers = sorted(il for w in view["workers"] for a, b in w["layers"] for il in range(a, b + 1))
    assert layers == list(range(description["n_layer"] + 1))
    for again in (play(), play("--check")):
        assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout[-4000:]


SPLIT = """\
- name: Work out the split as the coordinator role does
  hosts: coord
  gather_facts: false
  vars_files:
    - {roles}/coordinator/defaults/main.yml
    - {roles}/coordinator/vars/main.yml
    - {roles}/llama_server/defaults/main.yml
    - {roles}/llama_server/vars/main.yml
  vars:
    # What the setup module reports of the Python Ansible uses; py_minor plays an older one.
    ansible_facts: {{python: {{version: {{major: 3, minor: "{{{{ py_minor | default({minor}) }}}}"}},
                              executable: {python}}}}}
  tasks:
    - name: Run the role's split tasks
      ansible.builtin.import_tasks: {roles}/coordinator/tasks/split.yml
"""

# One worker host with two instances where nothing listens: the probe's HELLO is refused.
SPLIT_INVENTORY = """\
all:
  children:
    rpc_workers:
      hosts:
        w1: {{ansible_host: 127.0.0.1, ansible_connection: local,
              rpc_worker_instances: [{{name: a, port: {p1}}}, {{name: b, port: {p2}}}]}}
    coordinator:
      hosts:
        coord: {{ansible_host: 127.0.0.1, ansible_connection: local}}
"""


def _task_result(stdout: str, task: str) -> str:
    """The first word of the first result line under ``task``'s header (ok, skipping, ...)."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("TASK [") and task in line)
    return next(line for line in lines[at + 1:] if line.strip()).split(":")[0]


def _python_for(user: str) -> tuple[Path, int] | None:
    """A Python 3 that ``user`` can run, outside any virtualenv, and its minor version: this
    interpreter itself, else the system's python3."""
    for found in (Path(sys.executable).resolve(), shutil.which("python3", path=os.defpath)):
        if found is None:
            continue
        result = subprocess.run(["runuser", "-u", user, "--", str(found), "-S", "-c",
                                 "import sys; print(sys.version_info[0], sys.version_info[1])"],
                                capture_output=True, text=True, timeout=60)
        if result.returncode == 0 and result.stdout.split()[:1] == ["3"]:
            return Path(found), int(result.stdout.split()[1])
    return None


def _unused_ports(n: int) -> list[int]:
    from tightwad.pool.procs import free_port
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="the probe runs as another account (runuser): needs root")
def test_coordinator_probes_from_its_host_and_keeps_the_split(tmp_path, models):
    """The coordinator role's split (roles/coordinator/tasks/split.yml) with this machine as the
    coordinator's host: the probe's zip shipped (lookup('tightwad', 'probe_zip')) and
    ``python -m tightwad.pool.probe`` run from it, with the base interpreter and no
    site-packages, as an unprivileged account. Nothing listens on the workers' ports, so each is
    reported not measured and the split falls back to free memory, saying why. A check run
    before writes nothing and says why it does not measure; a rerun changes nothing and does not
    measure; coordinator_tensor_split_refresh measures again; a Python older than the package's
    is not used, with a message."""
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no account 'nobody' to run the probe as")
    spec = importlib.util.spec_from_file_location("tightwad_lookup",
                                                  REPO / "lookup_plugins" / "tightwad.py")
    assert spec is not None and spec.loader is not None
    lookup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lookup)
    from tightwad import build

    found = _python_for("nobody")
    if found is None or found[1] < 10:
        pytest.skip("no Python 3.10+ that the account 'nobody' can run")
    python, minor = found
    # The probe's account must reach the zip: a world-readable directory, not pytest's.
    public = Path(tempfile.mkdtemp(prefix="tightwad-probe-test-"))
    try:
        public.chmod(0o755)
        bin_dir = tmp_path / "llama" / "bin"  # a worker's llama-server --list-devices: CPU only
        bin_dir.mkdir(parents=True)
        (bin_dir / "llama-server").write_text("#!/bin/sh\necho 'Available devices:'\n")
        (bin_dir / "llama-server").chmod(0o755)
        split_file, zip_file = tmp_path / "etc" / "tensor-split.json", public / "probe" / "t.zip"
        p1, p2 = _unused_ports(2)
        (tmp_path / "inventory.yml").write_text(SPLIT_INVENTORY.format(p1=p1, p2=p2))
        (tmp_path / "play.yml").write_text(SPLIT.format(
            roles=ROLES, minor=minor, python=python))
        (tmp_path / "extra.json").write_text(json.dumps({
            "coordinator_split_file": str(split_file), "coordinator_tensor_split": "auto",
            "coordinator_model": str(models.target), "llama_server_model": str(models.target),
            "llama_server_model_dir": str(models.target.parent), "llama_server_user": "nobody",
            "llama_cpp_install_dir": str(bin_dir.parent), "_coordinator_probe_zip": str(zip_file),
            "ansible_python_interpreter": sys.executable}))
        env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))

        def play(*args: str) -> subprocess.CompletedProcess:
            result = subprocess.run(
                [str(PLAYBOOK_BIN), "-i", str(tmp_path / "inventory.yml"),
                 str(tmp_path / "play.yml"), "-e", f"@{tmp_path / 'extra.json'}", *args],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
            return result

        check = play("--check")  # before the first run: nothing there, nothing written
        assert "check mode: the llama.cpp build, the model or the probe is not on coord yet" \
            in check.stdout, check.stdout[-4000:]
        assert not split_file.exists() and not zip_file.exists()

        first = play()
        assert _task_result(first.stdout, "Measure each worker's speed and link") == "ok"
        assert zip_file.read_bytes() == lookup.probe_zip_bytes(Path(build.__file__).parent)
        assert oct(zip_file.stat().st_mode & 0o777) == "0o644"
        kept = json.loads(split_file.read_text())
        rpcs = [f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"]
        assert [m["rpc"] for m in kept["measurements"]] == kept["rpc"] == rpcs
        # The probe ran (as nobody, from the zip) and reported each worker, not measured.
        assert all("refused" in m["skipped"] and m["layer_ms"] is None
                   for m in kept["measurements"]), kept["measurements"]
        assert kept["placement"].startswith("memory:") and "not measured: " in kept["placement"]

        for again in (play(), play("--check")):  # kept: the same zip, no probe
            assert "changed=0" in again.stdout, again.stdout[-4000:]
            assert _task_result(again.stdout, "Measure each worker's speed and link") == \
                "skipping"
        assert json.loads(split_file.read_text()) == kept

        refresh = play("-e", "coordinator_tensor_split_refresh=true")
        assert _task_result(refresh.stdout, "Read each worker host's devices") == "ok"
        assert _task_result(refresh.stdout, "Measure each worker's speed and link") == "ok"

        old = play("-e", "coordinator_tensor_split_refresh=true", "-e", "py_minor=9")
        assert _task_result(old.stdout, "Measure each worker's speed and link") == "skipping"
        assert (f"the probe needs Python {lookup.python_min()} or newer and coord's {python} "
                "is 3.9, so the split is proportional to free memory") in old.stdout
    finally:
        shutil.rmtree(public, ignore_errors=True)
