"""The example inventory loads with ansible-inventory and passes playbooks/check-inventory.yml
(every host's variables against the argument specs of its groups' roles); a broken inventory
fails it with a message that names the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ansible", reason="ansible-core is not installed")

from support import REPO

EXAMPLE = REPO / "inventory" / "example" / "hosts.yml"
BIN = Path(sys.executable).parent


def check_inventory(path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(path), "playbooks/check-inventory.yml",
         "-e", f"ansible_python_interpreter={sys.executable}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_example_inventory_lists():
    result = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(EXAMPLE), "--list"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    inventory = json.loads(result.stdout)
    for group in ("rpc_workers", "coordinator", "drafters", "proxy"):
        assert inventory[group]["hosts"], group
    assert len(inventory["_meta"]["hostvars"]) == 7


def test_example_inventory_passes_the_argument_specs():
    result = check_inventory(EXAMPLE)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # Every role was checked on the hosts of its group (xeon: worker, coordinator and proxy).
    for role in ("llama_cpp", "rpc_worker", "coordinator", "drafter", "proxy"):
        assert f"item={role}" in result.stdout, role
    assert "failed=0" in result.stdout and "failed=1" not in result.stdout


@pytest.mark.parametrize("host_vars, key", [
    ({"rpc_worker_instances": [{"name": "a", "port": "fifty"}]}, "port"),
    ({"rpc_worker_instance": [{"name": "a", "port": 50052}]}, "rpc_worker_instance"),
    ({"coordinator_port": "http"}, "coordinator_port"),
    ({"proxy_speculation_mode": "fast"}, "proxy_speculation_mode"),
])
def test_bad_values_fail_naming_the_key(tmp_path, host_vars, key):
    role_group = {"rpc": "rpc_workers", "coo": "coordinator", "pro": "proxy"}[next(iter(host_vars))[:3]]
    inventory = {"all": {"children": {role_group: {"hosts": {"box": host_vars}}}}}
    path = tmp_path / "inventory.yml"
    path.write_text(json.dumps(inventory))
    result = check_inventory(path)
    assert result.returncode != 0
    assert "Validation of arguments failed" in result.stdout and key in result.stdout, \
        result.stdout[-3000:]


@pytest.mark.parametrize("where,value,error", [
    ("all", "change-me", "all.vars.coordinator_api_key: too weak (shorter than 16 characters)"),
    ("host", "change-me-please-now", "xeon.coordinator_api_key: too weak (a placeholder"),
    ("host", 12345, "xeon.coordinator_api_key: must be a string"),
    ("host", "auto", None),
    ("all", "a-strong-key-of-the-inventory-0123", None),
])
def test_the_servers_keys_are_auto_or_strong(where, value, error):
    """tightwad doctor/start read the inventory with the roles' own rule: a weak key for the
    coordinator's llama-server is named (never echoed) before a deploy would refuse it."""
    from tightwad.pool import inventory as inv_mod

    doc = yaml.safe_load(EXAMPLE.read_text())
    if where == "all":
        doc["all"]["vars"]["coordinator_api_key"] = value
    else:
        doc["all"]["children"]["coordinator"]["hosts"]["xeon"] = {"coordinator_api_key": value}
    _, errors = inv_mod.parse(doc)
    found = [e for e in errors if "api_key" in e]
    assert found == ([] if error is None else [found[0]]) and (error is None or error in found[0])
    assert not any(str(value) in e for e in found if len(str(value)) > 10)
