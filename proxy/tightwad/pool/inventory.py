"""The Ansible inventory of a pool: the model, validation, and an atomic YAML writer.

The shape is the contract with the Ansible roles (see docs/cli.md):

    all:
      vars: {tightwad_model, tightwad_draft_model?, tightwad_proxy_token?}
      children:
        rpc_workers: {hosts: {NAME: {ansible_host, tightwad_pool_address,
                                     rpc_worker_instances: [{name, port, device?, threads?}]}}}
        coordinator: {hosts: {NAME: {ansible_host, coordinator_tensor_split?: auto | memory | [numbers]}}}
        drafters:    {hosts: {NAME: {...}}}
        proxy:       {hosts: {NAME: {...}}}

A host may sit in several groups (the usual coordinator is also a worker and the proxy); its
variables are the union of what each group's entry gives it, as in Ansible. Service ports are
the defaults below unless a host sets ``coordinator_port``, ``drafter_port`` or ``proxy_port``
(the roles' own variables). The defaults are ``tightwad.defaults``, the values
tests/deploy/test_role_defaults.py holds the roles' defaults to.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tightwad import defaults
from tightwad.config import token_weakness

GROUPS = ("rpc_workers", "coordinator", "drafters", "proxy")
COORDINATOR_PORT = defaults.COORDINATOR_PORT
DRAFTER_PORT = defaults.DRAFTER_PORT
PROXY_PORT = defaults.PROXY_PORT
RPC_PORT = defaults.RPC_PORT
DEFAULT_CTX = defaults.CTX_SIZE
DEFAULT_SLOTS = defaults.SLOTS
DEFAULT_INSTANCES: list[dict[str, Any]] = [dict(instance) for instance in defaults.RPC_INSTANCES]


class InventoryError(ValueError):
    """The inventory cannot be read or used; the message names the key."""


@dataclass
class Instance:
    name: str
    port: int
    device: str = ""
    threads: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "port": self.port}
        if self.device:
            out["device"] = self.device
        if self.threads is not None:
            out["threads"] = self.threads
        return out


@dataclass
class Host:
    name: str
    vars: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """Where the controller reaches it (ansible_host, else the name)."""
        return str(self.vars.get("ansible_host") or self.name)

    @property
    def pool_address(self) -> str:
        """Where the pool's processes reach it."""
        return str(self.vars.get("tightwad_pool_address") or self.address)

    @property
    def instances(self) -> list[Instance]:
        out = []
        for raw in self.vars.get("rpc_worker_instances") or DEFAULT_INSTANCES:
            if isinstance(raw, dict) and "name" in raw and "port" in raw:
                out.append(Instance(str(raw["name"]), int(raw["port"]), str(raw.get("device") or ""),
                                    raw.get("threads")))
        return out

    def port(self, key: str, default: int) -> int:
        return int(self.vars.get(key, default))

    def ctx_size(self, key: str) -> int | None:
        """A ``*_ctx_size`` role variable: its integer, or None for ``auto`` (the default: the
        role picks it from the model and the memory, ``tightwad.pool.context``)."""
        value = self.vars.get(key, DEFAULT_CTX)
        return None if value == "auto" else int(value)


@dataclass
class Inventory:
    """What the CLI knows about a pool, independent of the file it came from."""

    vars: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=lambda: {g: [] for g in GROUPS})
    hosts: dict[str, Host] = field(default_factory=dict)
    path: Path | None = None

    # -- reading ---------------------------------------------------------------------------

    def group(self, name: str) -> list[Host]:
        return [self.hosts[h] for h in self.groups.get(name, [])]

    @property
    def model(self) -> str | None:
        return self.vars.get("tightwad_model")

    @property
    def draft_model(self) -> str | None:
        return self.vars.get("tightwad_draft_model")

    @property
    def proxy_token(self) -> str | None:
        return self.vars.get("tightwad_proxy_token")

    @property
    def coordinator(self) -> Host | None:
        hosts = self.group("coordinator")
        return hosts[0] if hosts else None

    def worker_endpoints(self) -> list[tuple[Host, Instance]]:
        """Every RPC worker instance, in inventory order (the order of --rpc and the split)."""
        return [(host, inst) for host in self.group("rpc_workers") for inst in host.instances]

    # -- building --------------------------------------------------------------------------

    def add_host(self, group: str, name: str, **host_vars: Any) -> Host:
        if group not in GROUPS:
            raise InventoryError(f"unknown group {group!r}; one of {', '.join(GROUPS)}")
        host = self.hosts.setdefault(name, Host(name))
        host.vars.update({k: v for k, v in host_vars.items() if v is not None})
        if name not in self.groups.setdefault(group, []):
            self.groups[group].append(name)
        return host

    def to_dict(self) -> dict[str, Any]:
        """The YAML document. A host's role variables (``coordinator_*``, ``proxy_*``, ...) go
        under that role's group, the others under its first group; Ansible merges them."""
        written: set[str] = set()
        children: dict[str, Any] = {}
        for group in GROUPS:
            hosts: dict[str, Any] = {}
            for name in self.groups.get(group, []):
                own = {k: v for k, v in self.hosts[name].vars.items()
                       if _var_group(k, self.groups, name) == group
                       or (name not in written and _var_group(k, self.groups, name) is None)}
                hosts[name] = own or None
                written.add(name)
            children[group] = {"hosts": hosts}
        top_vars = {k: v for k, v in self.vars.items() if v is not None}
        return {"all": {"vars": top_vars, "children": children}}

    def to_yaml(self, header: str = "") -> str:
        body = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False,
                              width=100)
        lines = [f"# {line}" if line else "#" for line in header.splitlines()]
        return "---\n" + ("\n".join(lines) + "\n" if lines else "") + body


_VAR_PREFIXES = {"rpc_worker_": "rpc_workers", "coordinator_": "coordinator",
                 "drafter_": "drafters", "proxy_": "proxy"}


def _var_group(key: str, groups: dict[str, list[str]], host: str) -> str | None:
    """The group whose entry carries ``key`` for ``host`` (None: its first group)."""
    for prefix, group in _VAR_PREFIXES.items():
        if key.startswith(prefix) and host in groups.get(group, []):
            return group
    return None


def _as_mapping(value: Any, where: str, errors: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a mapping, got {type(value).__name__}")
        return {}
    return value


def parse(document: Any, path: Path | None = None) -> tuple[Inventory, list[str]]:
    """An :class:`Inventory` and the list of schema errors (empty when it is valid)."""
    errors: list[str] = []
    inv = Inventory(path=path)
    root = _as_mapping(document, "the file", errors)
    top = _as_mapping(root.get("all"), "all", errors)
    if not top and not errors:
        errors.append("all: missing; the inventory starts with 'all:' (see docs/cli.md)")
    inv.vars = dict(_as_mapping(top.get("vars"), "all.vars", errors))
    # Hosts listed under all.hosts carry their variables there; groups may name them bare.
    for name, host_vars in _as_mapping(top.get("hosts"), "all.hosts", errors).items():
        host_vars = _as_mapping(host_vars, f"all.hosts.{name}", errors)
        inv.hosts.setdefault(str(name), Host(str(name))).vars.update(host_vars)
    children = _as_mapping(top.get("children"), "all.children", errors)
    for group, body in children.items():
        body = _as_mapping(body, f"{group}", errors)
        for name, host_vars in _as_mapping(body.get("hosts"), f"{group}.hosts", errors).items():
            host_vars = _as_mapping(host_vars, f"{group}.hosts.{name}", errors)
            if group in GROUPS:
                inv.add_host(group, str(name), **host_vars)
            else:
                inv.hosts.setdefault(str(name), Host(str(name))).vars.update(host_vars)
    errors.extend(validate(inv))
    return inv, errors


def _port_ok(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _api_key_errors(where: str, scope: dict[str, Any]) -> list[str]:
    """The coordinator's and drafter's keys: "auto" (the roles generate one on the host), or
    a key strong enough for a port on the network (the proxy token's rule); never echoed."""
    errors = []
    for key in ("coordinator_api_key", "drafter_api_key"):
        if key not in scope or scope[key] in ("auto", ""):
            continue  # "": the role allows no key on a loopback bind only, and says so
        value = scope[key]
        if not isinstance(value, str):
            errors.append(f"{where}.{key}: must be a string (or auto)")
        elif weakness := token_weakness(value):
            errors.append(f"{where}.{key}: too weak ({weakness}); leave it out (auto: the "
                          "deploy generates one on the host) or use a strong key")
    return errors


def validate(inv: Inventory) -> list[str]:
    """Schema errors: what the roles and the CLI need, each naming the offending key."""
    errors: list[str] = []
    model = inv.vars.get("tightwad_model")
    if not isinstance(model, str) or not model:
        errors.append("all.vars.tightwad_model: missing; set it to the target GGUF's path on "
                      "the controller")
    for key in ("tightwad_draft_model", "tightwad_proxy_token"):
        if key in inv.vars and inv.vars[key] is not None and not isinstance(inv.vars[key], str):
            errors.append(f"all.vars.{key}: must be a string")
    if not inv.groups.get("rpc_workers"):
        errors.append("rpc_workers: no hosts; add at least one worker")
    coordinators = inv.groups.get("coordinator", [])
    if len(coordinators) != 1:
        errors.append(f"coordinator: needs exactly one host, has {len(coordinators)}")
    if len(inv.groups.get("proxy", [])) > 1:
        errors.append("proxy: at most one host")
    n_instances = 0
    for name in inv.groups.get("rpc_workers", []):
        host = inv.hosts[name]
        where = f"rpc_workers.hosts.{name}"
        raw = host.vars.get("rpc_worker_instances", DEFAULT_INSTANCES)
        if not isinstance(raw, list) or not raw:
            errors.append(f"{where}.rpc_worker_instances: must be a non-empty list of "
                          "{name, port, device?, threads?}")
            continue
        seen_ports: set[int] = set()
        seen_names: set[str] = set()
        for i, entry in enumerate(raw):
            at = f"{where}.rpc_worker_instances[{i}]"
            if not isinstance(entry, dict):
                errors.append(f"{at}: must be a mapping")
                continue
            unknown = set(entry) - {"name", "port", "device", "threads"}
            if unknown:
                errors.append(f"{at}: unknown key(s) {', '.join(sorted(unknown))}")
            if not isinstance(entry.get("name"), str) or not entry.get("name"):
                errors.append(f"{at}.name: required string")
            elif entry["name"] in seen_names:
                errors.append(f"{at}.name: {entry['name']!r} used twice on {name}")
            else:
                seen_names.add(entry["name"])
            if not _port_ok(entry.get("port")):
                errors.append(f"{at}.port: required integer 1-65535")
            elif entry["port"] in seen_ports:
                errors.append(f"{at}.port: {entry['port']} used twice on {name}")
            else:
                seen_ports.add(entry["port"])
            if "threads" in entry and not (isinstance(entry["threads"], int)
                                           and entry["threads"] > 0):
                errors.append(f"{at}.threads: must be a positive integer")
            n_instances += 1
    for where, scope in [("all.vars", inv.vars),
                         *((name, host.vars) for name, host in inv.hosts.items())]:
        errors += _api_key_errors(where, scope)
    for name, host in inv.hosts.items():
        for key in ("ansible_host", "tightwad_pool_address"):
            value = host.vars.get(key)
            if value is not None and not isinstance(value, str):
                errors.append(f"{name}.{key}: must be a string")
        for key in ("coordinator_port", "drafter_port", "proxy_port"):
            if key in host.vars and not _port_ok(host.vars[key]):
                errors.append(f"{name}.{key}: must be an integer 1-65535")
        for key in ("coordinator_ctx_size", "drafter_ctx_size"):
            value = host.vars.get(key, "auto")
            if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool)
                                        and value > 0):
                errors.append(f"{name}.{key}: must be auto or a positive integer")
    if coordinators:
        split = inv.hosts[coordinators[0]].vars.get("coordinator_tensor_split")
        if split is not None and split not in ("auto", "memory"):
            at = f"coordinator.hosts.{coordinators[0]}.coordinator_tensor_split"
            if (not isinstance(split, list) or not split
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                               and x >= 0 for x in split)
                    or sum(split) <= 0):
                errors.append(f"{at}: must be auto, memory, or a list of non-negative numbers "
                              "with a positive sum")
            elif n_instances and len(split) < n_instances:
                errors.append(f"{at}: {len(split)} entries for {n_instances} RPC workers "
                              "(one per worker, in inventory order, then local devices)")
    return errors


def load(path: Path) -> tuple[Inventory, list[str]]:
    """Read an inventory file (or a directory holding hosts.yml)."""
    path = Path(path)
    if path.is_dir():
        for name in ("hosts.yml", "hosts.yaml", "tightwad.yml"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise InventoryError(f"{path}: a directory without hosts.yml")
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InventoryError(f"{path}: no such inventory; create one with `tightwad init`") \
            from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InventoryError(f"{path}: invalid YAML{where}") from None
    return parse(document, path)


def is_loopback(address: str) -> bool:
    if address in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def write_atomic(path: Path, text: str, *, force: bool = False) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    Without ``force`` an existing file is never replaced, even by a concurrent writer: the new
    file is hard-linked into place, which fails if the name exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        # Inventories can hold the proxy token: keep them private to the user.
        os.chmod(tmp, 0o600)
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise InventoryError(f"{path} exists; pass --force to overwrite it") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
