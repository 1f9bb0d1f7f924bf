"""The wheel ships the `tightwad` package and nothing of the dev tools (proxy/tightwad_dev),
the tests or the benchmarks."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from support import REPO


def test_the_wheel_ships_tightwad_and_no_dev_or_test_code(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path), str(REPO)], check=True, timeout=300,
                   capture_output=True, text=True)
    (wheel,) = tmp_path.glob("tightwad-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"tightwad"}
    assert "tightwad/server/__main__.py" in names and "tightwad/build.py" in names
    assert not [n for n in names if "tightwad_dev" in n or n.startswith(("tests/", "bench/"))]
