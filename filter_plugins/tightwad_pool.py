"""The pool's shape from the inventory, as pure Jinja filters shared by the service roles.

Shared by the service roles (ansible.cfg points filter_plugins here). Nothing here touches a
host; tests call the functions directly. The rules themselves live in the tightwad package the
controller's Ansible runs with (docs/deploy.md, "What you need"): the split in
``tightwad.pool.placement``, the defaults in ``tightwad.defaults``, llama-server's output in
``tightwad.llamaserver.wire``.

- A host's pool address is ``tightwad_pool_address`` when the inventory sets it (the address on
  the network the pool uses), else ``ansible_host``, else its inventory name.
- The RPC endpoints are every worker instance of every worker host, in inventory order: the
  order of ``--rpc`` and therefore of ``--tensor-split``.
- The split is ``tightwad.pool.placement.place``'s, the one ``tightwad doctor`` prints: with
  ``auto`` and every worker measured (``python -m tightwad.pool.probe`` on the controller: a
  layer's time on each device, each link's round trip and bandwidth), the split with the least
  predicted time per token, its output layer's device last in ``--rpc``; else (or with
  ``memory``) proportional to each device's free memory less a compute headroom, read on the
  workers at deploy time (``llama-server --list-devices`` for GPUs; ``MemAvailable`` for the
  CPU device).
- ``*_ctx_size: auto`` is ``tightwad.pool.context``'s choice for the model file on the controller,
  the slots and the memory the deploy measured (or the host's RAM).
- The pool's description (``tightwad_pool_description``, written by the coordinator role, read
  by the proxy's dashboard: ``tightwad.server.dashboard.deployed_pool_view``): the workers in
  ``--rpc`` order, the applied split, the model's layer count, the probe's measurements.
"""

from __future__ import annotations

import re

try:  # Ansible is present when the role runs; the unit tests import this file without it too.
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover
    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        pass

try:
    from tightwad import defaults
    from tightwad.config import token_weakness
    from tightwad.llamaserver.wire import parse_list_devices
    from tightwad.pool import context, placement, probe
    from tightwad.pool.gguf_info import GGUFError, read_info
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "the tightwad package is not importable by the Python that runs Ansible: run "
        "ansible-playbook from the environment tightwad is installed in (scripts/bootstrap's "
        ".venv, or pip install ansible-core next to tightwad)") from exc

# Role defaults of other hosts' roles: hostvars do not carry role defaults, so a host that does
# not set one of these is read with the role's default (tests/deploy/test_role_defaults.py holds
# the roles' defaults/main.yml to the same tightwad.defaults values).
ROLE_DEFAULTS = {
    "rpc_worker_instances": [dict(instance) for instance in defaults.RPC_INSTANCES],
    "rpc_worker_peer_port_offset": defaults.RPC_PEER_PORT_OFFSET,
    "coordinator_port": defaults.COORDINATOR_PORT,
    "coordinator_parallel": defaults.SLOTS,
    "coordinator_verify_max_tokens": defaults.VERIFY_MAX_TOKENS,
    "drafter_port": defaults.DRAFTER_PORT,
    "drafter_parallel": defaults.SLOTS,
}
_MEM_AVAILABLE = re.compile(r"^MemAvailable:\s+(\d+) kB$", re.MULTILINE)


def _address(host: str, hv: dict) -> str:
    return str(hv.get("tightwad_pool_address") or hv.get("ansible_host") or host)


def tightwad_role_var(hv: dict, name: str):
    """A role variable of another host: its own value, else the role's default."""
    if name not in ROLE_DEFAULTS:
        raise AnsibleFilterError(f"tightwad_role_var: no role default for {name!r}; one of "
                                 f"{', '.join(ROLE_DEFAULTS)}")
    value = hv.get(name)
    return ROLE_DEFAULTS[name] if value in (None, "", []) else value


def tightwad_pool_addresses(hosts, hostvars) -> list:
    """Pool addresses of ``hosts``, without duplicates."""
    addresses: list[str] = []
    for host in hosts or []:
        address = _address(host, hostvars[host])
        if address not in addresses:
            addresses.append(address)
    return addresses


def tightwad_service_url(hosts, hostvars, port_var: str) -> str:
    """``http://address:port`` of the first of ``hosts`` (a coordinator or drafter), its port
    from the host's ``port_var`` (the role default when unset)."""
    if not hosts:
        return ""
    host = hosts[0]
    address = _address(host, hostvars[host])
    port = int(tightwad_role_var(hostvars[host], port_var))
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


def tightwad_peer_ports(instances, offset) -> list:
    """Where each worker instance takes the hidden states other workers push to it
    (``ggml-rpc-server --peer``): its port + ``rpc_worker_peer_port_offset``."""
    return [int(inst["port"]) + int(offset) for inst in instances or []]


def tightwad_rpc_endpoints(hosts, hostvars) -> list:
    """One dict per worker instance: host, address, port, name, device, rpc ("address:port"),
    peer (where it takes hidden states pushed by other workers, "" when it does not)."""
    endpoints = []
    for host in hosts or []:
        hv = hostvars[host]
        address = _address(host, hv)
        offset = int(tightwad_role_var(hv, "rpc_worker_peer_port_offset"))
        instances = tightwad_role_var(hv, "rpc_worker_instances")
        for inst, peer_port in zip(instances, tightwad_peer_ports(instances, offset)):
            port = int(inst["port"])
            endpoints.append({"host": host, "address": address, "port": port,
                              "name": inst["name"], "device": str(inst.get("device") or ""),
                              "rpc": f"{address}:{port}",
                              "peer": f"{address}:{peer_port}" if offset > 0 else ""})
    rpcs = [e["rpc"] for e in endpoints]
    if duplicates := sorted({r for r in rpcs if rpcs.count(r) > 1}):
        raise AnsibleFilterError(f"two RPC workers share the address and port {duplicates[0]}; "
                                 "give each rpc_worker_instances entry its own port")
    return endpoints


def tightwad_device_free_mib(list_devices: str, meminfo: str, device: str = "") -> int:
    """Free memory (MiB) of the device(s) one worker instance serves.

    ``device`` is the instance's ``--device`` value (``CUDA0``, ``Vulkan0,Vulkan1``, or empty for
    all devices). GPUs come from ``llama-server --list-devices`` on the worker; a CPU worker (no
    such device listed) offers the host's available RAM.
    """
    listed = {d.name: d.free_mib for d in parse_list_devices(list_devices or "")}
    wanted = [d.strip() for d in device.split(",") if d.strip() and d.strip().upper() != "CPU"]
    if wanted:
        missing = [d for d in wanted if d not in listed]
        if missing:
            raise AnsibleFilterError(
                f"device {missing[0]} is not on this worker (llama-server --list-devices shows: "
                f"{', '.join(listed) or 'no GPU devices'}); fix rpc_worker_instances[].device")
        return sum(listed[d] for d in wanted)
    if listed and device.strip().upper() != "CPU":
        return sum(listed.values())
    match = _MEM_AVAILABLE.search(meminfo or "")
    if not match:
        raise AnsibleFilterError("cannot read MemAvailable from /proc/meminfo on a CPU worker; "
                                 "set coordinator_tensor_split in the inventory")
    return int(match.group(1)) // 1024


def tightwad_free_mib(endpoints, list_devices: dict, meminfo: dict) -> list:
    """Free MiB per endpoint, from each worker host's ``--list-devices`` and ``/proc/meminfo``."""
    return [tightwad_device_free_mib(list_devices.get(e["host"], ""), meminfo.get(e["host"], ""),
                                     e.get("device", "")) for e in endpoints]


def tightwad_tensor_split(free_mib) -> str:
    """``--tensor-split`` for devices with ``free_mib`` free, in ``--rpc`` order: the proportions
    ``tightwad.pool.placement.propose_split`` gives. Refused when no device has room beyond its
    headroom (an even split over full devices would only fail at load time)."""
    free = [int(v) * placement.MiB for v in free_mib or []]
    if not any(placement.usable(f) for f in free):
        raise AnsibleFilterError(
            f"cannot split the model over free memory {[int(v) for v in free_mib or []]} MiB: no "
            "worker has any to spare beyond its compute headroom (none free); free memory or set "
            "coordinator_tensor_split")
    return placement.format_split(placement.propose_split(free))


def tightwad_placement(endpoints, free_mib, measurements=None, model: str = "", ctx_size="auto",
                       slots=1, split="auto") -> dict:
    """The coordinator's split: ``tightwad.pool.placement.place`` for the workers ``endpoints``
    (inventory order) with ``free_mib`` free, the probe's ``measurements`` (a list of dicts,
    :class:`tightwad.pool.probe.Measurement`), the GGUF ``model`` on the controller, and
    ``split`` (``auto``, ``memory`` or a list of numbers, ``coordinator_tensor_split``).

    Returns ``rpc`` (the ``--rpc`` value, in the placement's order), ``tensor_split``, ``mode``,
    ``description`` (the reasoning, as ``tightwad doctor`` prints it) and ``order``."""
    endpoints = list(endpoints or [])
    rpcs = [e["rpc"] for e in endpoints]
    if isinstance(split, (list, tuple)):
        if len(split) != len(endpoints):
            raise AnsibleFilterError(f"coordinator_tensor_split has {len(split)} numbers for "
                                     f"{len(endpoints)} RPC workers ({', '.join(rpcs)})")
        return {"rpc": ",".join(rpcs), "tensor_split": ",".join(str(x) for x in split),
                "mode": "explicit", "order": list(range(len(rpcs))),
                "description": "explicit: set by coordinator_tensor_split"}
    if split not in ("auto", "memory"):
        raise AnsibleFilterError(f"coordinator_tensor_split is {split!r}: use auto (speed-aware "
                                 "when the workers are measured), memory, or one number per worker")
    memory_only = {"rpc": ",".join(rpcs), "tensor_split": tightwad_tensor_split(free_mib),
                   "mode": "memory", "order": list(range(len(rpcs)))}
    if not model:
        return {**memory_only, "description": "memory: proportional to free memory "
                "(coordinator_model is not a file on the controller, so nothing to measure with)"}
    try:
        info = read_info(model)
        total_ctx = (context.choose_for_model(info, int(slots), [int(v) * placement.MiB
                                                                  for v in free_mib or []]).ctx_size
                     if ctx_size == "auto" else int(ctx_size))
        shape = probe.model_shape(model, total_ctx)
    except GGUFError as exc:
        raise AnsibleFilterError(f"coordinator_tensor_split: {exc}") from None
    measured = {m.get("rpc"): probe.Measurement.from_dict(m) for m in measurements or []
                if isinstance(m, dict)}
    devices = []
    for e, free in zip(endpoints, free_mib or []):
        found = measured.get(e["rpc"])
        free_bytes = int(free) * placement.MiB
        devices.append(found.device(e["rpc"], free_bytes) if found is not None and not found.skipped
                       else placement.Device(e["rpc"], free_bytes, host=e["host"]))
    try:
        chosen = placement.place(shape, devices, mode=str(split))
    except placement.PlacementError as exc:
        raise AnsibleFilterError(f"coordinator_tensor_split: {exc}") from None
    skipped = [f"{m.rpc}: {m.skipped}" for m in measured.values() if m.skipped]
    return {"rpc": ",".join(rpcs[i] for i in chosen.order), "tensor_split": chosen.tensor_split,
            "mode": chosen.mode, "order": list(chosen.order),
            "description": chosen.describe() + (f" (not measured: {'; '.join(skipped)})"
                                                 if skipped else "")}


def tightwad_ctx_size(model: str, slots, free_mib, name: str = "coordinator",
                      cap_per_slot=0) -> dict:
    """``auto`` context for the GGUF ``model`` (a controller path) served by ``slots`` slots on
    devices (or a host) with ``free_mib`` MiB free, at most ``cap_per_slot`` tokens per slot
    when set: ``tightwad.pool.context.choose_for_model``, as a dict (ctx_size, per_slot,
    trained, limit, warning, message)."""
    if not model:
        raise AnsibleFilterError(
            f"{name}_ctx_size: auto reads the model's trained context and KV cache size from the "
            f"GGUF on the controller, and {name}_model is not set (a model URL is not read "
            f"before it is on the host): set {name}_ctx_size to a number of tokens for all "
            f"slots together, e.g. {context.SMALL_PER_SLOT} x {name}_parallel")
    try:
        info = read_info(model)
    except GGUFError as exc:
        raise AnsibleFilterError(f"{name}_ctx_size: auto: {exc}") from None
    choice = context.choose_for_model(info, int(slots),
                                      [int(v) * placement.MiB for v in free_mib or []],
                                      cap_per_slot=int(cap_per_slot or 0))
    return {"ctx_size": choice.ctx_size, "per_slot": choice.per_slot, "trained": choice.trained,
            "limit": choice.limit, "warning": choice.warning, "message": choice.message}


def tightwad_pool_description(endpoints, placement: dict, model_file: str = "", model: str = "",
                              draft: str = "", gpu_layers=999, split_setting="auto",
                              free_mib=None, measurements=None, coordinator: str = "") -> dict:
    """What the proxy's dashboard draws a deployed pool from (no secrets): the workers
    ``endpoints`` (inventory order, with their ``free_mib``) listed in the order of
    ``placement``'s ``--rpc`` (``tightwad_placement``), the applied ``--tensor-split``, the
    layer count of the GGUF ``model_file`` on the controller (None without one), the model's and
    draft's file names, ``-ngl`` and, with ``split_setting`` auto, the probe's
    ``measurements`` (link round trip and bandwidth per worker)."""
    endpoints = list(endpoints or [])
    free = list(free_mib or [])
    by_rpc = {e["rpc"]: (e, free[i] if i < len(free) else None) for i, e in enumerate(endpoints)}
    rpcs = [r for r in str(placement.get("rpc", "")).split(",") if r]
    if sorted(rpcs) != sorted(by_rpc):
        raise AnsibleFilterError(f"tightwad_pool_description: --rpc {','.join(rpcs)} is not the "
                                 f"workers {', '.join(by_rpc)}")
    n_layer = None
    if model_file:
        try:
            n_layer = int(read_info(model_file).arch_value("block_count", 0)) or None
        except GGUFError as exc:
            raise AnsibleFilterError(f"tightwad_pool_description: {exc}") from None
    workers = [{"rpc": r, "host": by_rpc[r][0]["host"], "instance": by_rpc[r][0]["name"],
                "device": by_rpc[r][0].get("device", ""),
                "free_mib": None if by_rpc[r][1] is None else int(by_rpc[r][1])} for r in rpcs]
    return {"version": 1, "coordinator": coordinator, "model": model, "draft": draft or None,
            "n_layer": n_layer, "gpu_layers": int(gpu_layers), "rpc": ",".join(rpcs),
            "tensor_split": str(placement.get("tensor_split", "")),
            "split": split_setting if isinstance(split_setting, str) else "explicit",
            "placement": placement.get("description", ""), "workers": workers,
            "measurements": [dict(m) for m in measurements or [] if isinstance(m, dict)]
            if split_setting == "auto" else []}


def tightwad_secret_weakness(secret: object) -> str:
    """Why a key or token is too weak to guard a port on the network ("" when it is fine), by
    the proxy's own rule, so a preflight refuses what the proxy itself would refuse."""
    return token_weakness(str(secret)) or ""


class FilterModule:
    def filters(self) -> dict:
        return {"tightwad_secret_weakness": tightwad_secret_weakness,
                "tightwad_pool_addresses": tightwad_pool_addresses,
                "tightwad_rpc_endpoints": tightwad_rpc_endpoints,
                "tightwad_peer_ports": tightwad_peer_ports,
                "tightwad_service_url": tightwad_service_url,
                "tightwad_role_var": tightwad_role_var,
                "tightwad_free_mib": tightwad_free_mib,
                "tightwad_tensor_split": tightwad_tensor_split,
                "tightwad_placement": tightwad_placement,
                "tightwad_ctx_size": tightwad_ctx_size,
                "tightwad_pool_description": tightwad_pool_description}
