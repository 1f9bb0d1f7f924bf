"""Opt-in (TIGHTWAD_SLOW=1): compile the CUDA backend of the pin with the local nvcc for one
architecture, through the same tightwad.build path the Ansible role uses.

It cannot run the binary (no GPU here); it proves the flags the role chooses for an NVIDIA host
(compute 7.5, an RTX 2070) produce a CUDA build of ggml-rpc-server with our patches. About
30-60 minutes on 2 cores, hence not in CI.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tightwad import build as llama_build

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_backend_compiles_for_one_architecture(cache_dir):
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
