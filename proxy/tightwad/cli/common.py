"""What the commands share: the console, the one-line error, the inventory and Ansible."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from tightwad.pool import inventory as inv_mod

DEFAULT_INVENTORY = Path("inventory/tightwad.yml")
SERVICE_UNITS = ("tightwad-coordinator", "tightwad-drafter", "tightwad-proxy")

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class CliError(Exception):
    """Ends the command with ``error: <message>`` on stderr and ``code`` (no traceback)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def resolve_inventory(path: Path | None, local: bool) -> Path | None:
    """The inventory to use, or None for the local loopback pool.

    ``--local`` wins; an explicit ``-i`` must exist; otherwise ``inventory/tightwad.yml`` when
    it exists, else the local pool.
    """
    if local:
        return None
    if path is not None:
        if not Path(path).exists():
            raise CliError(f"{path}: no such inventory; write one with `tightwad init` or use "
                           "--local", 2)
        return Path(path)
    return DEFAULT_INVENTORY if DEFAULT_INVENTORY.exists() else None


def load_inventory(path: Path, *, strict: bool = True) -> tuple[inv_mod.Inventory, list[str]]:
    try:
        inventory, errors = inv_mod.load(path)
    except inv_mod.InventoryError as exc:
        raise CliError(str(exc), 2) from None
    if strict and errors:
        more = f" (and {len(errors) - 1} more; `tightwad doctor -i {path}` lists them)" \
            if len(errors) > 1 else ""
        raise CliError(f"{path}: {errors[0]}{more}", 2)
    return inventory, errors


def project_dir() -> Path:
    """Where site.yml, ansible.cfg and playbooks/ live: $TIGHTWAD_PROJECT_DIR, else the working
    directory (the checkout, where the default inventory/tightwad.yml lives too)."""
    return Path(os.environ.get("TIGHTWAD_PROJECT_DIR") or Path.cwd())


def find_tool(name: str) -> str:
    """An Ansible executable: next to this Python first, else on PATH.

    The roles' plugins import tightwad, so Ansible must run in the Python tightwad is installed
    in: the one next to this interpreter (a virtual environment) is that one.
    """
    sibling = Path(sys.executable).parent / name
    if sibling.is_file():
        return str(sibling)
    found = shutil.which(name)
    if found:
        return found
    raise CliError(f"{name} not found; install Ansible next to tightwad (pip install "
                   "ansible-core) on the controller", 2)


def run_playbook(playbook: str, inventory: Path, extra: Sequence[str] = ()) -> int:
    """``ansible-playbook PLAYBOOK -i INV ...`` in the project dir, output streamed."""
    root = project_dir()
    if not (root / playbook).is_file():
        raise CliError(f"{root / playbook} not found; run from a Tightwad checkout or set "
                       "TIGHTWAD_PROJECT_DIR", 2)
    cmd = [find_tool("ansible-playbook"), playbook, "-i", str(Path(inventory).resolve()),
           *extra]
    console.print(f"[dim]$ {' '.join(cmd[1:])}[/dim]")
    return subprocess.run(cmd, cwd=root).returncode


def ansible_command(inventory: Path, pattern: str, command: str,
                    timeout: float = 60) -> dict[str, dict[str, Any]]:
    """Run ``command`` on the hosts of ``pattern`` over SSH; per host {rc, stdout, unreachable}.

    Uses the ad-hoc ``ansible`` tool with ``--tree`` (one JSON result file per host), so the
    output is parsed, not scraped. Hosts that cannot be reached come back ``unreachable``.
    """
    with tempfile.TemporaryDirectory(prefix="tightwad-ansible-") as tree:
        cmd = [find_tool("ansible"), pattern, "-i", str(Path(inventory).resolve()), "-m",
               "ansible.builtin.command", "-a", command, "--tree", tree]
        try:
            proc = subprocess.run(cmd, cwd=project_dir(), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CliError(f"ansible did not answer within {timeout:.0f} s", 1) from None
        out: dict[str, dict[str, Any]] = {}
        for path in Path(tree).iterdir():
            try:
                result = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            out[path.name] = {"rc": result.get("rc"), "stdout": result.get("stdout", ""),
                              "unreachable": bool(result.get("unreachable")),
                              "msg": result.get("msg", "")}
    if not out and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CliError(f"ansible failed: {tail[0]}", 1)
    return out


def units_by_host(inventory: inv_mod.Inventory) -> dict[str, list[str]]:
    """The systemd units each host runs: tightwad-rpc-<instance>, -coordinator, -drafter,
    -proxy."""
    units: dict[str, list[str]] = {}
    for host, inst in inventory.worker_endpoints():
        units.setdefault(host.name, []).append(f"tightwad-rpc-{inst.name}")
    for group, unit in zip(("coordinator", "drafters", "proxy"), SERVICE_UNITS):
        for host in inventory.group(group):
            units.setdefault(host.name, []).append(unit)
    return units


def unit_states(inventory_path: Path, units: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """host -> {unit: systemctl is-active state, or unreachable / unknown}."""
    all_units = sorted({u for us in units.values() for u in us})
    results = ansible_command(inventory_path, ":".join(units) or "all",
                              "systemctl is-active " + " ".join(all_units))
    out: dict[str, dict[str, str]] = {}
    for host, host_units in units.items():
        result = results.get(host, {"unreachable": True})
        # `systemctl is-active a b c` prints one state per unit, in order.
        answer = dict(zip(all_units, (result.get("stdout") or "").split()))
        out[host] = {}
        for unit in host_units:
            if result.get("unreachable"):
                out[host][unit] = "unreachable"
            else:
                out[host][unit] = answer.get(
                    unit, f"unknown ({(result.get('msg') or 'no answer')[:40]})")
    return out


def dump_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()
