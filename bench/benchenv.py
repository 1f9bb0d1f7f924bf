"""What a benchmark script in bench/ runs on: the llama.cpp binaries and the machine, as its
report states them, and how it ends: on SIGTERM as on Ctrl-C, its JSON written whole or not at
all. Shared by the scripts in bench/."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
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


def stop_on_sigterm() -> None:
    """End the run on SIGTERM (a ``timeout``, a kill) as on Ctrl-C: every ``with`` and
    ``finally`` on the way out stops the processes it started, none is left behind."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def write_result(path: Path, text: str) -> None:
    """Write a run's result so that a run cut off while writing leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared result from other users
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
