"""The proxy role's preflight refuses a weak token before anything is installed, by the proxy's
own rule (tightwad.config.token_weakness), without printing it; a strong token passes, and so
does any token on loopback, where it guards nothing reachable from elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ansible", reason="ansible-core is not installed")

from support import REPO

PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"

INVENTORY = """\
all:
  children:
    coordinator:
      hosts:
        coord: {ansible_host: 10.77.0.13, ansible_connection: local}
    proxy:
      hosts:
        coord:
"""

PLAY = """\
- name: The proxy role's preflight alone
  hosts: proxy
  gather_facts: false
  vars:
    ansible_facts: {system: Linux}
  tasks:
    - name: Preflight
      ansible.builtin.include_role:
        name: proxy
        tasks_from: preflight
"""


def preflight(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "inventory.yml").write_text(INVENTORY)
    (tmp_path / "play.yml").write_text(PLAY)
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    return subprocess.run(
        [str(PLAYBOOK_BIN), "-i", str(tmp_path / "inventory.yml"), str(tmp_path / "play.yml"),
         "-e", f"ansible_python_interpreter={sys.executable}", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_weak_tokens_stop_the_deploy_and_strong_ones_pass(tmp_path: Path) -> None:
    weak = "Short-Tok3n"
    done = preflight(tmp_path, "-e", f"tightwad_proxy_token={weak}")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "too weak to serve 10.77.0.13: shorter than 16 characters" in output, output
    assert "secrets.token_urlsafe(32)" in output and weak not in output
    done = preflight(tmp_path, "-e", "tightwad_proxy_token=change-me-please-now")
    assert done.returncode != 0 and "a placeholder such as change-me" in done.stdout, done.stdout

    done = preflight(tmp_path, "-e", "tightwad_proxy_token=kq3-Vx8_pL2mZ7rT9wY4")
    assert done.returncode == 0, done.stdout + done.stderr
    done = preflight(tmp_path, "-e", "tightwad_proxy_token=change-me",
                     "-e", "proxy_bind_address=127.0.0.1")
    assert done.returncode == 0, done.stdout + done.stderr
