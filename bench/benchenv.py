"""What a benchmark script in bench/ runs on: the llama.cpp binaries and the machine, as its
report states them. Shared by pool_bench.py and verify_round.py."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from tightwad import build as llama_build


def llama_binaries(bin_dir: Path | None, cache: Path) -> tuple[Path, str]:
    """(the binaries' directory, the build's name): ``--bin-dir`` when given, else the cached
    CPU build (built if missing)."""
    if bin_dir:
        return bin_dir, "custom (--bin-dir)"
    build = llama_build.ensure_build("cpu", cache=cache)
    return build.bin_dir, build.path.name


def machine_info() -> dict[str, Any]:
    """The machine and its load now; the caller adds ``loadavg_end`` when done."""
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "system": platform.platform(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg()}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def binary_version(path: Path) -> str:
    res = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("version")]
    return lines[0] if lines else "unknown"
