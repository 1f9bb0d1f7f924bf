"""The coordinator's and drafter's ``*_ctx_size: auto`` as Ansible runs it: the roles' context
tasks on the controller, fed a real GGUF (the demo pair) and memory facts, give the
tightwad.pool.context choice; an explicit number is kept; the drafter takes no more per slot than
the coordinator's; a word other than auto is refused. No host is contacted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ansible", reason="ansible-core is not installed")

from support import REPO
from tightwad import defaults
from tightwad.pool import context
from tightwad.pool.gguf_info import read_info
from tightwad.pool.placement import MiB

ROLES = REPO / "roles"
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"
INVENTORY = """\
all:
  children:
    coordinator: {hosts: {coord: {ansible_connection: local}}}
    drafters: {hosts: {junk: {ansible_connection: local}}}
"""
PLAY = """\
- name: Choose the coordinator's context
  hosts: coordinator
  gather_facts: false
  vars_files: [{roles}/coordinator/defaults/main.yml, {roles}/coordinator/vars/main.yml]
  vars:
    ansible_facts: {{memtotal_mb: 4096}}
    _coordinator_free_mib: [65536]  # what split.yml measured on the workers
  tasks:
    - name: Choose
      ansible.builtin.import_tasks: {roles}/coordinator/tasks/context.yml
    - name: Keep the choice
      ansible.builtin.copy:
        content: "{{{{ _coordinator_ctx | to_json }}}}"
        dest: "{{{{ out }}}}/coordinator.json"
        mode: "0644"

- name: Choose the drafter's context
  hosts: drafters
  gather_facts: false
  vars_files: [{roles}/drafter/defaults/main.yml]
  vars:
    ansible_facts: {{memtotal_mb: 65536}}
  tasks:
    - name: Choose
      ansible.builtin.import_tasks: {roles}/drafter/tasks/context.yml
    - name: Keep the choice
      ansible.builtin.copy:
        content: "{{{{ _drafter_ctx | to_json }}}}"
        dest: "{{{{ out }}}}/drafter.json"
        mode: "0644"
"""


def _play(tmp_path: Path, models, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (tmp_path / "inventory.yml").write_text(INVENTORY)
    (tmp_path / "play.yml").write_text(PLAY.format(roles=ROLES))
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    result = subprocess.run(
        [str(PLAYBOOK_BIN), "-i", str(tmp_path / "inventory.yml"), str(tmp_path / "play.yml"),
         "-e", f"out={out}", "-e", f"tightwad_model={models.target}",
         "-e", f"tightwad_draft_model={models.draft}",
         "-e", f"ansible_python_interpreter={sys.executable}", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return result, out


def test_auto_is_the_packages_choice_and_the_drafter_follows_the_coordinator(tmp_path, models):
    result, out = _play(tmp_path, models)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    coordinator = json.loads((out / "coordinator.json").read_text())
    want = context.choose_for_model(read_info(models.target), defaults.SLOTS, [65536 * MiB])
    assert (coordinator["ctx_size"], coordinator["per_slot"]) == (want.ctx_size, want.per_slot)
    assert want.per_slot == read_info(models.target).arch_value("context_length")
    assert f"tightwad-coordinator: {want.message}" in result.stdout
    drafter = json.loads((out / "drafter.json").read_text())
    assert drafter["per_slot"] <= coordinator["per_slot"]
    assert drafter["ctx_size"] == context.choose_for_model(
        read_info(models.draft), defaults.SLOTS, [65536 * MiB],
        cap_per_slot=coordinator["per_slot"]).ctx_size


def test_a_number_is_kept_and_caps_the_drafter(tmp_path, models):
    result, out = _play(tmp_path, models, "-e", "coordinator_ctx_size=4096")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    coordinator = json.loads((out / "coordinator.json").read_text())
    assert (coordinator["ctx_size"], coordinator["per_slot"]) == (4096, 4096 // defaults.SLOTS)
    drafter = json.loads((out / "drafter.json").read_text())
    assert (drafter["per_slot"], drafter["limit"]) == (4096 // defaults.SLOTS, "cap per slot")


def test_a_word_other_than_auto_is_refused(tmp_path, models):
    result, _ = _play(tmp_path, models, "-e", "coordinator_ctx_size=big")
    assert result.returncode != 0
    assert "coordinator_ctx_size is big; use auto or a number of tokens" in result.stdout
