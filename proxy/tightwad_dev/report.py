"""Measured figures from reliability, load and fuzz tests, for docs/reliability.md.

Tests call :func:`measured`; the figures are printed (``pytest -s`` shows them) and, when
``TIGHTWAD_MEASURE_FILE`` names a file, appended to it as JSON lines. Tests never assert on
speed: these numbers are for people.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any


def measured(scenario: str, **figures: Any) -> dict[str, Any]:
    """Record one scenario's figures (rounded floats); returns the record."""
    record = {"scenario": scenario, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **{k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}}
    line = json.dumps(record, sort_keys=False)
    print(f"\nMEASURED {line}")
    if path := os.environ.get("TIGHTWAD_MEASURE_FILE"):
        with open(path, "a") as fh:
            fh.write(line + "\n")
    return record
