"""The example inventory loads with ansible-inventory and every host's role variables pass the
roles' argument specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ansible", reason="ansible-core is not installed")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "inventory" / "example" / "hosts.yml"
BIN = Path(sys.executable).parent

VALIDATE = """\
- name: Validate the example inventory against the roles' argument specs
  hosts: all
  gather_facts: false
  connection: local
  tasks:
    - name: Validate {{ item }} variables
      ansible.builtin.validate_argument_spec:
        argument_spec: >-
          {{ (lookup('ansible.builtin.file', roles_dir ~ '/' ~ item ~ '/meta/argument_specs.yml')
              | from_yaml).argument_specs.main.options }}
        provided_arguments: >-
          {{ dict(hostvars[inventory_hostname] | dict2items
                  | selectattr('key', 'match', item ~ '_') | items2dict) }}
      loop: [llama_cpp, rpc_worker]
"""


def test_example_inventory_lists():
    result = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(EXAMPLE), "--list"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    inventory = json.loads(result.stdout)
    for group in ("rpc_workers", "coordinator", "drafters", "proxy"):
        assert inventory[group]["hosts"], group
    assert len(inventory["_meta"]["hostvars"]) == 7


def test_example_inventory_passes_the_argument_specs(tmp_path):
    playbook = tmp_path / "validate.yml"
    playbook.write_text(VALIDATE)
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(EXAMPLE), str(playbook),
         "-e", f"roles_dir={REPO / 'roles'}", "-e", f"ansible_python_interpreter={sys.executable}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "failed=0" in result.stdout
