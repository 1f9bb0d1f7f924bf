"""How the CLI finds the Ansible project and Ansible itself: the playbooks from
$TIGHTWAD_PROJECT_DIR or the working directory (no path relative to the installed package), and
the ansible-playbook next to its own Python first (the roles' plugins import tightwad)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from support import REPO
from tightwad.cli import common


def test_project_dir_is_the_setting_else_the_working_directory(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIGHTWAD_PROJECT_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert common.project_dir() == tmp_path
    monkeypatch.setenv("TIGHTWAD_PROJECT_DIR", str(REPO))
    assert common.project_dir() == REPO


def test_a_playbook_outside_the_project_is_a_one_line_error(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIGHTWAD_PROJECT_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.CliError, match="TIGHTWAD_PROJECT_DIR") as error:
        common.run_playbook("site.yml", tmp_path / "inventory.yml")
    assert error.value.code == 2


def test_ansible_next_to_this_python_wins_over_path(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ansible-playbook").write_text("#!/bin/sh\n")
    (other / "ansible-playbook").chmod(0o755)
    monkeypatch.setenv("PATH", str(other))
    sibling = Path(sys.executable).parent / "ansible-playbook"
    if sibling.is_file():
        assert common.find_tool("ansible-playbook") == str(sibling)
    else:
        assert common.find_tool("ansible-playbook") == str(other / "ansible-playbook")
    with pytest.raises(common.CliError, match="ansible-core"):
        common.find_tool("no-such-ansible-tool")
