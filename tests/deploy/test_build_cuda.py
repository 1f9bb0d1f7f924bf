"""Opt-in (TIGHTWAD_SLOW=1): compile the CUDA backend of the pin with the local nvcc for one
architecture, through the same tightwad.build path the Ansible role uses.

It cannot run the binary (no GPU here); it proves the flags the role chooses for an NVIDIA host
(compute 7.5, an RTX 2070) produce a CUDA build of ggml-rpc-server with our patches. About
30-60 minutes on 2 cores, hence not in CI.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from tightwad import build as llama_build

# The suite's 600 s default stops the compile a third of the way in; an interrupted build
# keeps its objects, so a rerun resumes where this one stopped.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(7200)]


def _toolkit_gap() -> str | None:
    """Why the local CUDA toolkit cannot build llama.cpp's CUDA backend (None: it can). The
    backend links cuBLAS and the driver library (libcuda: the driver's, or the link-only stub a
    toolkit keeps in lib/stubs); a toolkit without them fails at cmake's configure step."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "nvcc is not installed"
    probe = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"nvcc does not run: {probe.stderr.strip()[:200]}"
    # nvcc may be a wrapper script: the toolkit is where `nvcc -v` says its -I and -L dirs are
    # (it prints them quoted: "-I/usr/local/cuda/include").
    dry = subprocess.run([nvcc, "-v", "--dryrun", "-x", "cu", "-c", "/dev/null"],
                         capture_output=True, text=True)
    said = re.findall(r'-([IL])([^"\s]+)', dry.stderr)
    root = Path(nvcc).resolve().parent.parent
    includes = {root / "include", Path("/usr/include"), *(Path(p) for f, p in said if f == "I")}
    multiarch = Path("/usr/lib") / (sysconfig.get_config_var("MULTIARCH") or "")
    libs = {root / "lib64", root / "lib64" / "stubs", multiarch, Path("/usr/lib64"),
            Path("/usr/lib"), *(Path(p) for f, p in said if f == "L")}
    if not any((d / "cublas_v2.h").is_file() for d in includes):
        return "the CUDA toolkit here has no cuBLAS (cublas_v2.h), which the CUDA backend links"
    # cmake's FindCUDAToolkit links the unversioned names.
    missing = [f"lib{n}.so" for n in ("cublas", "cublasLt", "cuda")
               if not any((d / f"lib{n}.so").is_file() for d in libs)]
    if missing:
        where = (" (libcuda.so: the driver's, or the link-only stub in the toolkit's lib/stubs)"
                 if "libcuda.so" in missing else "")
        return f"the CUDA toolkit here lacks {', '.join(missing)}{where}, which the backend links"
    return None


def test_cuda_backend_compiles_for_one_architecture(cache_dir):
    gap = _toolkit_gap()
    if gap is not None:
        pytest.skip(gap)
    flags = llama_build.cmake_flags("cuda", cuda_arch="75", portable=True)
    build = llama_build.ensure_build("cuda", cache=cache_dir, flags=flags,
                                     targets=["ggml-rpc-server"])
    binary = build.binary("ggml-rpc-server")
    assert binary.is_file()
    assert "-DGGML_CUDA=ON" in build.manifest["cmake_flags"]
    assert "-DCMAKE_CUDA_ARCHITECTURES=75" in build.manifest["cmake_flags"]
    # The binary links the CUDA runtime: it is a CUDA build, not a CPU fallback.
    linked = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    assert "libcudart" in linked or "libcuda" in linked, linked
