"""The settings every coordinator and drafter llama-server runs with (no host-RAM prompt cache:
docs/deploy.md, "llama-server settings") live in ``tightwad.defaults.LLAMA_SERVER_ARGS`` on the
Python side and in the llama_server role's ``llama_server_pool_args`` on the Ansible side; these
tests hold the two equal and show that the rendered units carry them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import REPO
from tightwad import defaults

ROLES = REPO / "roles"
VARIABLE = "llama_server_pool_args"

RENDER = """\
- name: Render the coordinator's and the drafter's units
  hosts: localhost
  gather_facts: false
  vars_files:
    - {roles}/llama_server/defaults/main.yml
    - {roles}/llama_server/vars/main.yml
  vars:
    llama_cpp_detected: {{backend: cpu}}
    ansible_host: 10.77.0.13
    ansible_facts: {{memtotal_mb: 4096}}
  tasks:
    - name: Render the units
      ansible.builtin.template:
        src: {roles}/llama_server/templates/tightwad-llama-server.service.j2
        dest: "{{{{ out }}}}/tightwad-{{{{ item.name }}}}.service"
        mode: "0644"
      vars:
        llama_server_name: "{{{{ item.name }}}}"
        llama_server_model: "{{{{ item.model }}}}"
        llama_server_args: "{{{{ item.args }}}}"
      loop:
        - {{name: coordinator, model: /models/big.gguf,
            args: [--rpc, "10.77.0.11:50052", --verify-max-tokens, "32"]}}
        - {{name: drafter, model: /models/small.gguf, args: []}}
"""


def test_the_role_runs_the_servers_with_tightwad_defaults() -> None:
    role = ROLES / "llama_server"
    role_defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    assert role_defaults[VARIABLE] == list(defaults.LLAMA_SERVER_ARGS)
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    assert spec["argument_specs"]["main"]["options"][VARIABLE]["default"] == \
        list(defaults.LLAMA_SERVER_ARGS)


def test_the_settings_say_no_prompt_cache() -> None:
    """What was measured and chosen (docs/deploy.md): the prompt cache off, whatever else."""
    args = list(defaults.LLAMA_SERVER_ARGS)
    assert args[args.index("--cache-ram") + 1] == "0"


@pytest.mark.parametrize("role", ["coordinator", "drafter"])
def test_coordinator_and_drafter_keep_the_shared_settings(role: str) -> None:
    """They get the flags from the llama_server block, in ONE place: neither sets them."""
    for path in (ROLES / role).rglob("*.yml"):
        assert VARIABLE not in path.read_text(), path.relative_to(REPO)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("ansible", reason="ansible-core is not installed")
    tmp = tmp_path_factory.mktemp("pool-server-units")
    out = tmp / "out"
    out.mkdir()
    (tmp / "play.yml").write_text(RENDER.format(roles=ROLES))
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    playbook = Path(sys.executable).parent / "ansible-playbook"
    result = subprocess.run(
        [str(playbook), "-i", "localhost,", "-c", "local", str(tmp / "play.yml"),
         "-e", f"out={out}", "-e", f"ansible_python_interpreter={sys.executable}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return out


@pytest.mark.parametrize("name", ["coordinator", "drafter"])
def test_rendered_units_carry_the_settings(rendered: Path, name: str) -> None:
    unit = (rendered / f"tightwad-{name}.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    words = exec_start.split()
    flags = list(defaults.LLAMA_SERVER_ARGS)
    at = next((i for i in range(len(words)) if words[i:i + len(flags)] == flags), None)
    assert at is not None, exec_start
    if name == "coordinator":  # the caller's own arguments come after, so they can override
        assert words.index("--rpc") > at
