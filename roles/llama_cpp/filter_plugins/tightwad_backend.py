"""Backend detection for the llama_cpp role, as pure Jinja filters.

The role runs the probes on each host (``uname -sm``, ``nvidia-smi --query-gpu=compute_cap
--format=csv,noheader``, ``rocminfo``) and hands their output to ``tightwad_backend``, which
decides the backend and the arguments for ``tightwad.build``; ``tightwad_build_key`` asks the
controller's ``tightwad.build`` for the cache key of that build. Nothing here touches a host, so
tests feed it fake probe output directly.
"""

from __future__ import annotations

import re
from pathlib import Path

try:  # Ansible is present when the role runs; the unit tests import this file without it too.
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover
    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        pass

try:
    from tightwad import build
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "the tightwad package is not importable by the Python that runs Ansible: run "
        "ansible-playbook from the environment tightwad is installed in (scripts/bootstrap's "
        ".venv, or pip install ansible-core next to tightwad)") from exc

BACKENDS = build.BACKENDS
_GFX = re.compile(r"^\s*Name:\s+(gfx[0-9a-f]+)\s*$", re.MULTILINE)
_COMPUTE_CAP = re.compile(r"^\s*(\d+)\.(\d+)\s*$")


def cuda_archs(nvidia_smi_output: str | None) -> str:
    """``8.9`` / ``7.5`` lines from nvidia-smi -> ``75;89`` for CMAKE_CUDA_ARCHITECTURES."""
    archs = set()
    for line in (nvidia_smi_output or "").splitlines():
        if not line.strip():
            continue
        match = _COMPUTE_CAP.match(line)
        if not match:
            raise AnsibleFilterError(
                f"nvidia-smi printed {line.strip()!r} where a compute capability such as 8.6 "
                "was expected; set llama_cpp_cuda_arch (e.g. 86) in the inventory for this host")
        archs.add(int(match.group(1)) * 10 + int(match.group(2)))
    return ";".join(str(a) for a in sorted(archs))


def rocm_targets(rocminfo_output: str | None) -> str:
    """Agent names ``gfx1100`` ... from rocminfo -> ``gfx1030;gfx1100`` for GPU_TARGETS."""
    return ";".join(sorted(set(_GFX.findall(rocminfo_output or ""))))


def tightwad_backend(probe: dict, backend: str = "auto", cuda_arch: str = "",
                     rocm_target: str = "", portable: bool = True) -> dict:
    """Decide a host's llama.cpp backend.

    ``probe``: ``uname`` (``uname -sm`` output), ``nvidia_smi`` and ``rocminfo`` (their stdout, or
    empty/None when the tool is missing or failed). ``backend``/``cuda_arch``/``rocm_target`` are
    the inventory overrides (``auto``/empty: detect). Order: inventory, NVIDIA, AMD, Apple Silicon
    (Metal), CPU. Vulkan is used only when the inventory asks for it. ``portable=False`` builds
    for the build host's own CPU (``-march=native``): only for hosts with that very CPU.

    Returns ``backend``, ``cuda_arch``, ``rocm_target``, ``portable``, ``system``, ``machine``,
    ``kind`` (hosts of one kind share one build) and ``build_args`` (for ``python -m
    tightwad.build build``).
    """
    uname = (probe.get("uname") or "").split()
    if len(uname) < 2:
        raise AnsibleFilterError(f"cannot read the host's OS and CPU from uname -sm: {uname!r}")
    system, machine = uname[0], uname[1]
    backend = (backend or "auto").lower()
    if backend not in ("auto", *BACKENDS):
        raise AnsibleFilterError(
            f"llama_cpp_backend={backend!r}; choose auto or one of: {', '.join(BACKENDS)}")
    nvidia, amd = probe.get("nvidia_smi") or "", probe.get("rocminfo") or ""
    if backend == "auto":
        if cuda_arch or cuda_archs(nvidia):
            backend = "cuda"
        elif rocm_target or rocm_targets(amd):
            backend = "rocm"
        elif system == "Darwin" and machine in ("arm64", "aarch64"):
            backend = "metal"
        else:
            backend = "cpu"
    if backend == "cuda":
        cuda_arch = str(cuda_arch or cuda_archs(nvidia))
        if not cuda_arch:
            raise AnsibleFilterError(
                "backend cuda but nvidia-smi reported no GPU; set llama_cpp_cuda_arch "
                "(the compute capability without the dot, e.g. 86 for an RTX 3060)")
    else:
        cuda_arch = ""
    if backend == "rocm":
        rocm_target = str(rocm_target or rocm_targets(amd))
        if not rocm_target:
            raise AnsibleFilterError(
                "backend rocm but rocminfo reported no gfx agent; set llama_cpp_rocm_target "
                "(e.g. gfx1100 for an RX 7900 XTX)")
    else:
        rocm_target = ""
    if backend == "metal" and system != "Darwin":
        raise AnsibleFilterError(f"backend metal needs macOS; this host runs {system}")
    args = ["--backend", backend]
    kind = f"{system.lower()}-{machine}-{backend}"
    if cuda_arch:
        args += ["--cuda-arch", cuda_arch]
        kind += "-sm" + cuda_arch.replace(";", "_")
    if rocm_target:
        args += ["--rocm-target", rocm_target]
        kind += "-" + rocm_target.replace(";", "_")
    # Binaries built on one host run on others of the same kind: no -march=native, unless the
    # inventory vouches that they all have the build host's CPU.
    if portable:
        args.append("--portable")
    else:
        kind += "-native"
    return {"backend": backend, "cuda_arch": cuda_arch, "rocm_target": rocm_target,
            "portable": bool(portable), "system": system, "machine": machine, "kind": kind,
            "build_args": args}


def tightwad_build_key(detected: dict, patches_dir: str) -> str:
    """The cache key of the build ``detected`` (from ``tightwad_backend``) asks for: what
    ``tightwad.build build <build_args> --patches <patches_dir>`` names its build."""
    backend = detected["backend"]
    flags = build.cmake_flags(backend, cuda_arch=detected.get("cuda_arch") or None,
                              rocm_target=detected.get("rocm_target") or None,
                              portable=bool(detected.get("portable")))
    return build.build_key(backend, patches_dir=Path(patches_dir), flags=flags).name


def tightwad_build_plan(hosts: list, hostvars: dict, controller_uname: str = "") -> list:
    """One build per kind among ``hosts`` that need an install.

    Each host carries ``llama_cpp_detected`` (from ``tightwad_backend``), ``_llama_cpp_key`` (the
    tightwad.build cache key), ``_llama_cpp_needs_install`` and ``llama_cpp_build_host``. Hosts of
    one kind must agree on their build host. A kind built on the controller (``localhost``) must
    match the controller's ``uname -sm``: binaries only run on the OS and CPU they were built for.
    """
    plan: dict[str, dict] = {}
    for host in hosts:
        hv = hostvars[host]
        if not _truthy(hv.get("_llama_cpp_needs_install")):
            continue
        detected = hv["llama_cpp_detected"]
        kind, build_host = detected["kind"], str(hv.get("llama_cpp_build_host") or "localhost")
        item = plan.setdefault(kind, {"kind": kind, "key": str(hv["_llama_cpp_key"]).strip(),
                                      "build_args": list(detected["build_args"]),
                                      "backend": detected["backend"], "build_host": build_host,
                                      "hosts": []})
        if item["build_host"] != build_host:
            raise AnsibleFilterError(
                f"hosts of kind {kind} name different build hosts ({item['build_host']} for "
                f"{item['hosts'][0]}, {build_host} for {host}); set one llama_cpp_build_host "
                "for all of them")
        item["hosts"].append(host)
    controller = controller_uname.split()
    for item in plan.values():
        if item["build_host"] != "localhost" or len(controller) < 2:
            continue
        system, machine = controller[0], controller[1]
        if not item["kind"].startswith(f"{system.lower()}-{machine}-"):
            raise AnsibleFilterError(
                f"{', '.join(item['hosts'])} need a {item['kind']} build, but the controller is "
                f"{system} {machine}; set llama_cpp_build_host to an inventory host of that kind")
    return list(plan.values())


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return bool(value)


class FilterModule:
    def filters(self) -> dict:
        return {"tightwad_backend": tightwad_backend, "tightwad_build_key": tightwad_build_key,
                "tightwad_build_plan": tightwad_build_plan}
